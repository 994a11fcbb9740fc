"""The corpus config of `mimo data build` (mimo/data/corpus.py): its keys and defaults, the nano / tiny / small
presets, and the checks a config passes before a build starts.

Config (JSON; every top-level key is optional, unknown keys are errors; `default_config(preset)` for
nano / tiny / small)::

    {"seed": 0, "tokens": 4000000, "shard_tokens": 16777216,
     "val_fraction": 0.02, "val_min_tokens": 4096,   # held out by problem (all its formats together)
     "tokenizer": {"vocab_size": 2048, "sample_documents": 20000},   # or "path/to/tokenizer_dir"
     "sources": {
       "reasoning": {"type": "reasoning", "problems": 45000, "tasks": null,     # mimo.data.reasoning tasks
                     "formats": {"trace": 3, "answer_only": 1}},             # or ["trace"] / ["answer_only"]
       "reasoning_hard": {"type": "reasoning", "problems": 9000, "tasks": HARD_TASKS, "formats": ["trace"]},
       "web": {"type": "text", "paths": ["notes/", "more.jsonl", "books/*.txt"]}},
     "quality": {"near_dup_threshold": 0.9, "ngram": 13, "eval_split": true, "density_threshold": 0.15,
                 "benchmarks": ["math500", "aime2024", "aime2025", "gsm8k", "humaneval"]},
     "stages": [{"name": "broad", "fraction": 0.5, "mix": {"reasoning/answer_only": 1, "web": 1}},
                {"name": "reasoning", "fraction": 0.3,
                 "mix": {"reasoning": 0.5, "reasoning_hard": 0.2, "web": 0.3}},
                {"name": "long", "fraction": 0.2, "mix": {"reasoning_hard": 0.7, "reasoning": 0.3}}]}
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mimo.benchmarks import BENCHMARKS
from mimo.errors import MimoError
from mimo.jsonl import read_json
from mimo.presets import PRESETS, presets_with

FORMATS = ("trace", "answer_only")

# Stage 3 "long traces": harder reasoning-gym configs -> more terms and digits, longer derivations
# (measured: mean trace 130-400 characters per task vs 60-250 at the defaults).
HARD_TASKS = {
    "basic_arithmetic": {"min_terms": 4, "max_terms": 6, "min_digits": 1, "max_digits": 2},
    "chain_sum": {"min_terms": 3, "max_terms": 5, "min_digits": 2, "max_digits": 4},
    "products": {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 3},
    "simple_equations": {"min_terms": 2, "max_terms": 4, "min_value": 1, "max_value": 50},
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 100, "max_value": 9999},
    "lcm": {"min_numbers": 2, "max_numbers": 2, "min_value": 10, "max_value": 200},
    "prime_factorization": {"min_value": 1000, "max_value": 99999},
    "fraction_simplification": {"min_value": 10, "max_value": 99, "min_factor": 2, "max_factor": 50},
    "base_conversion": {"min_value": 256, "max_value": 65535},
    "letter_counting": {"min_words": 6, "max_words": 12},
    "number_sorting": {"min_numbers": 6, "max_numbers": 9},
    "spell_backward": {"min_word_len": 8, "max_word_len": 14},
}

DEFAULT_QUALITY = {"near_dup_threshold": 0.9, "ngram": 13, "benchmarks": list(BENCHMARKS),
                   "eval_split": True, "density_threshold": 0.15}
DEFAULTS = {
    "seed": 0,
    "tokens": 1_000_000,
    "shard_tokens": 16 * 2**20,
    "val_fraction": 0.02,
    "val_min_tokens": 4096,
    "tokenizer": {"vocab_size": 2048, "sample_documents": 20000},
    "sources": {"reasoning": {"type": "reasoning", "problems": 10000}},
    "quality": DEFAULT_QUALITY,
    "stages": [{"name": "broad", "fraction": 1.0, "mix": {"reasoning": 1.0}}],
}


def default_config(preset: str = "tiny", text: list[str] | None = None) -> dict:
    """The corpus config of a size preset (nano / tiny / small); `text` adds a user text source ("text")
    to every stage: half of stage 1, 30% of stage 2, 10% of stage 3. Stage 1 has no step-by-step traces."""
    if preset not in presets_with("corpus"):
        raise MimoError(f"unknown corpus preset {preset!r}; choose one of: {', '.join(presets_with('corpus'))}")
    tokens, vocab, problems, hard, sample = PRESETS[preset].corpus
    sources = {
        "reasoning": {"type": "reasoning", "problems": problems, "tasks": None,
                      "formats": {"trace": 3.0, "answer_only": 1.0}},
        "reasoning_hard": {"type": "reasoning", "problems": hard, "tasks": json.loads(json.dumps(HARD_TASKS)),
                           "formats": ["trace"]},
    }
    # MiMo: a broad stage 1, math and code raised in stage 2, synthetic reasoning traces added in stage 3. Here
    # stage 1 holds every task's problems answer-only (and the user's text), step-by-step traces enter in stage 2
    # and the long traces of the harder configs dominate stage 3.
    mixes = [{"reasoning/answer_only": 1.0}, {"reasoning": 0.7, "reasoning_hard": 0.3},
             {"reasoning_hard": 0.7, "reasoning": 0.3}]
    if text:
        sources["text"] = {"type": "text", "paths": list(text)}
        mixes = [{"reasoning/answer_only": 0.5, "text": 0.5}, {"reasoning": 0.5, "reasoning_hard": 0.2, "text": 0.3},
                 {"reasoning_hard": 0.6, "reasoning": 0.3, "text": 0.1}]
    stages = [{"name": name, "fraction": frac, "mix": mix}
              for name, frac, mix in zip(("broad", "reasoning", "long"), (0.5, 0.3, 0.2), mixes)]
    return {**DEFAULTS, "tokens": tokens, "tokenizer": {"vocab_size": vocab, "sample_documents": sample},
            "sources": sources, "quality": dict(DEFAULT_QUALITY), "stages": stages}


# ---------------------------------------------------------------- config validation


def load_config(path) -> dict:
    """A corpus config from a JSON file, validated, with text paths made relative to the file's folder."""
    path = Path(path)
    config = validate_config(read_json(path), where=str(path))
    for src in config["sources"].values():
        if src["type"] == "text":
            src["paths"] = [p if os.path.isabs(p) else str(path.parent / p) for p in src["paths"]]
    return config


class _Check:
    """Validation helpers that raise MimoError naming the config file and the key."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, msg: str):
        raise MimoError(f"{self.where}: {key}: {msg}")

    def keys(self, obj, allowed, key: str):
        if not isinstance(obj, dict):
            self.fail(key, "must be an object")
        extra = sorted(set(obj) - set(allowed))
        if extra:
            self.fail(f"{key}.{extra[0]}" if key else extra[0], f"unknown key (known: {', '.join(allowed)})")

    def number(self, value, key: str, lo: float, hi: float = float("inf"), integer=False, open_lo=False):
        ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        if not ok or value < lo or value > hi or (open_lo and value == lo):
            kind = "an integer" if integer else "a number"
            bounds = f">= {lo}" if hi == float("inf") else f"in {'(' if open_lo else '['}{lo}, {hi}]"
            self.fail(key, f"must be {kind} {bounds}, got {value!r}")


def validate_config(config, where: str = "config") -> dict:
    """A full copy of `config` with defaults filled in; MimoError names `where` and the bad key."""
    from mimo.data.reasoning import resolve_tasks

    c = _Check(where)
    if not isinstance(config, dict):
        raise MimoError(f"{where}: the corpus config must be a JSON object")
    c.keys(config, DEFAULTS, "")
    cfg = json.loads(json.dumps({**DEFAULTS, **config}))  # a deep copy, JSON types only
    for key, low in (("seed", 0), ("tokens", 1), ("shard_tokens", 1), ("val_min_tokens", 0)):
        c.number(cfg[key], key, low, integer=True)
    c.number(cfg["val_fraction"], "val_fraction", 0, 0.5, open_lo=True)
    tok = cfg["tokenizer"]
    if isinstance(tok, dict):
        c.keys(tok, ("vocab_size", "sample_documents"), "tokenizer")
        c.number(tok.get("vocab_size"), "tokenizer.vocab_size", 300, integer=True)
        tok.setdefault("sample_documents", DEFAULTS["tokenizer"]["sample_documents"])
        c.number(tok["sample_documents"], "tokenizer.sample_documents", 1, integer=True)
    elif not isinstance(tok, str) or not tok:
        c.fail("tokenizer", 'must be a tokenizer directory (string) or {"vocab_size": N}')

    if not isinstance(cfg["sources"], dict) or not cfg["sources"]:
        c.fail("sources", "must be a non-empty object of name -> source")
    pools = set()  # what a stage mix may name: sources and source/format pools
    for name, src in cfg["sources"].items():
        key = f"sources.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            c.fail(key, "source names may use letters, digits, '_', '.', '-' only")
        if not isinstance(src, dict) or src.get("type") not in ("reasoning", "text"):
            c.fail(f"{key}.type", 'must be "reasoning" or "text"')
        pools.add(name)
        if src["type"] == "text":
            c.keys(src, ("type", "paths"), key)
            if isinstance(src.get("paths"), str):
                src["paths"] = [src["paths"]]
            paths = src.get("paths")
            if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
                c.fail(f"{key}.paths", "must be a non-empty list of file, directory or glob strings")
            continue
        c.keys(src, ("type", "problems", "tasks", "formats"), key)
        c.number(src.get("problems"), f"{key}.problems", 1, integer=True)
        try:
            resolve_tasks(src.setdefault("tasks", None))
        except MimoError as e:
            c.fail(f"{key}.tasks", str(e))
        fmts = src.setdefault("formats", ["trace"])
        if isinstance(fmts, list) and all(isinstance(f, str) for f in fmts):
            fmts = src["formats"] = {f: 1.0 for f in fmts}
        if (not isinstance(fmts, dict) or not fmts or any(f not in FORMATS for f in fmts)
                or not all(_is_num(w) and w >= 0 for w in fmts.values()) or sum(fmts.values()) <= 0):
            c.fail(f"{key}.formats", f"must be a list of formats or an object format -> weight "
                                     f"({', '.join(FORMATS)})")
        pools |= {f"{name}/{f}" for f in fmts}

    c.keys(cfg["quality"], DEFAULT_QUALITY, "quality")
    cfg["quality"] = q = {**DEFAULT_QUALITY, **cfg["quality"]}
    if q["near_dup_threshold"] is not None:
        c.number(q["near_dup_threshold"], "quality.near_dup_threshold", 0, 1, open_lo=True)
    c.number(q["ngram"], "quality.ngram", 1, integer=True)
    if not isinstance(q["benchmarks"], list) or any(b not in BENCHMARKS for b in q["benchmarks"]):
        c.fail("quality.benchmarks", f"must be a list of benchmark names from: {', '.join(BENCHMARKS)}")
    if not isinstance(q["eval_split"], bool):
        c.fail("quality.eval_split", f"must be true or false, got {q['eval_split']!r}")
    c.number(q["density_threshold"], "quality.density_threshold", 0, 1)

    if not isinstance(cfg["stages"], list) or not cfg["stages"]:
        c.fail("stages", "must be a non-empty list of {name, fraction, mix}")
    names = set()
    for i, st in enumerate(cfg["stages"]):
        key = f"stages[{i}]"
        c.keys(st, ("name", "fraction", "mix"), key)
        if not isinstance(st.get("name"), str) or not st["name"] or st["name"] in names:
            c.fail(f"{key}.name", f"must be a unique non-empty string, got {st.get('name')!r}")
        names.add(st["name"])
        c.number(st.get("fraction"), f"{key}.fraction", 0, 1, open_lo=True)
        if not isinstance(st.get("mix"), dict) or not st["mix"]:
            c.fail(f"{key}.mix", "must be a non-empty object of source -> weight")
        for k, w in st["mix"].items():
            if k not in pools:
                c.fail(f"{key}.mix.{k}", f"not a source or a rendered source/format "
                                         f"(known: {', '.join(sorted(pools))})")
            c.number(w, f"{key}.mix.{k}", 0)
        if sum(st["mix"].values()) <= 0:
            c.fail(f"{key}.mix", "at least one weight must be positive")
    total = sum(st["fraction"] for st in cfg["stages"])
    if abs(total - 1) > 1e-6:
        c.fail("stages", f"fractions must sum to 1, got {total:g}")
    return cfg


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
