"""JSON and JSON Lines input (configs, manifests; corpora, SFT data, RL problems, completions to score) with errors
naming file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from mimo.errors import MimoError


def read_json(path, missing: str = "not found") -> object:
    """One JSON file's value; a missing file (`missing` says what to do) or malformed JSON is a one-line MimoError."""
    path = Path(path)
    if not path.is_file():
        raise MimoError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MimoError(f"{path}: malformed JSON ({e})") from None


def read_jsonl(path, objects_only: bool = False) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed value) for every non-blank line; a bad line is a one-line MimoError."""
    path = Path(path)
    if not path.is_file():
        raise MimoError(f"{path}: not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MimoError(f"{path}: not UTF-8 text") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MimoError(f"{path}:{n}: malformed JSON ({e})") from None
        if objects_only and not isinstance(row, dict):
            raise MimoError(f"{path}:{n}: expected a JSON object")
        yield n, row
