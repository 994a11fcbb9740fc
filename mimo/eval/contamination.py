"""Contamination checks.

`benchmark_matches`: which training texts (SFT conversations, RL problems) overlap a shipped benchmark or contain a
held-out procedural question. `mimo eval contamination`: per-problem n-gram overlap between a built training corpus
and an evaluation task, with a summary. Benchmarks are checked by shared word n-grams (default 13, as the corpus
build filters); the procedural `reasoning` task by whole-question containment (its questions are short and
templated, so their boilerplate n-grams would match every training problem of the task)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mimo.benchmarks import BENCHMARKS
from mimo.data import quality
from mimo.errors import MimoError

TRAINING_NGRAM = 16  # MiMo drops SFT queries with a 16-gram overlap with a benchmark; mimo applies it to RL problems too


def benchmark_matches(texts: list[str], n: int = TRAINING_NGRAM) -> list[str | None]:
    """Per text: the first benchmark it overlaps (a shared word n-gram, or a benchmark problem too short to have
    one contained whole), "eval_split" when it contains a held-out procedural question, else None."""
    if not texts:
        return []
    names, indexes = [], []
    for name in BENCHMARKS:
        for index in quality.benchmark_indexes(name, n):
            names.append(name)
            indexes.append(index)
    names.append("eval_split")
    indexes.append(quality.NgramIndex(sorted(quality.eval_split_questions()), whole=True))
    out: list[str | None] = [None] * len(texts)
    for name, hits in zip(names, quality.hits_many(quality.WordBatch(texts), indexes)):
        for i in np.flatnonzero(hits > 0):
            out[i] = out[i] or name
    return out


def reasoning_overlap(corpus_dir: Path) -> list[dict]:
    from mimo.eval.tasks import get_task

    docs = quality.corpus_documents(corpus_dir, "train")
    rows = get_task("reasoning").load()
    by_len: dict[int, list[dict]] = {}
    for r in rows:
        by_len.setdefault(len(quality.words(r["problem"])), []).append(r)
    out = {}
    for length, group in by_len.items():
        index = quality.NgramIndex(docs, n=length)  # every window of the question's own length
        for r in group:
            out[r["id"]] = {"id": r["id"], "ngrams": 1, "overlap": int(index.overlaps(r["problem"]) > 0)}
    return [out[r["id"]] for r in rows]


def contamination_report(corpus_dir: Path, task: str, n: int = 13) -> dict:
    corpus_dir = Path(corpus_dir)
    if not (corpus_dir / "manifest.json").exists():
        raise MimoError(f"{corpus_dir}: not a corpus directory (no manifest.json)")
    if task == "reasoning":
        rows, method = reasoning_overlap(corpus_dir), "whole-question containment"
    elif task in BENCHMARKS:
        rows, method = quality.benchmark_overlap(task, corpus_dir, n), f"shared word {n}-grams"
    else:
        raise MimoError(f"unknown task {task!r} for contamination (choose from reasoning, {', '.join(BENCHMARKS)})")
    hit = [r for r in rows if r["overlap"] > 0]
    summary = {"task": task, "corpus": str(corpus_dir), "method": method, "problems": len(rows),
               "contaminated": len(hit), "fraction": len(hit) / len(rows) if rows else 0.0,
               "max_overlap": max((r["overlap"] for r in rows), default=0),
               "contaminated_ids": [r["id"] for r in hit][:50]}
    return {"summary": summary, "problems": rows}


def add_arguments(p):
    """`mimo eval contamination`."""
    p.description = "n-gram overlap between a training corpus and a benchmark, per problem"
    p.add_argument("--data", required=True, metavar="DATA_DIR", help="a corpus from `mimo data build`")
    p.add_argument("--task", required=True)
    p.add_argument("--ngram", type=int, default=13)
    p.add_argument("--out", metavar="FILE.json", help="write the per-problem report here")


def run(args):
    report = contamination_report(Path(args.data), args.task, args.ngram)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"]))
