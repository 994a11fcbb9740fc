"""Build a pretraining corpus the MiMo way: reasoning-dense documents, deduplicated, decontaminated,
density-filtered, tokenized and laid out in three stages (broad -> reasoning-heavy -> long traces).

`build_corpus(config, out_dir)`: collect documents -> quality stages (`mimo.data.quality.filter_documents`:
exact dup, MinHash near dup of user text, benchmark / eval-split contamination, reasoning density) ->
train or load the tokenizer -> tokenize -> hold out a val split -> draw each stage's share of ``tokens``
from its sources by weight -> write ``train_NNN.bin`` / ``val_NNN.bin`` (flat uint16/uint32 tokens,
end-of-text after each document), ``tokenizer/`` and ``manifest.json`` (the contract `mimo.data.loader`
reads) into a temporary directory beside ``out_dir``, renamed into place at the end. Same config ->
byte-identical shards. `corpus_documents` decodes the documents back.

The config (`mimo.data.corpus_config`: its keys, the nano / tiny / small presets, the checks).

Sources. ``reasoning``: ``problems`` verified problems (split "train"; seeds derived from the config seed,
the source name and a chunk number, so a config always gives the same problems), rendered per format:
``trace`` (question, steps, answer) or ``answer_only``; each format is a pool ``<source>/<format>`` and the
format weights split the source's share by tokens (3 : 1 is about one answer-only copy per trace). ``text``:
files, directories (every .txt/.md/.jsonl below, sorted) or globs; a .txt/.md file is one document (blank
lines stay inside: code and derivations have them), a .jsonl line is one document (its ``text`` field).
`load_config` makes relative paths relative to the config file.

Stages. ``mix`` maps a source or one pool (``"reasoning/trace"``) to a weight; a stage's tokens are split by
weight; each pool is read in a seeded shuffled order that continues across stages and reshuffles at each
epoch (small sources repeat; the manifest counts epochs); a stage's documents are shuffled together and
stages are written in order, the manifest recording where each starts. Fractions must sum to 1; training gives
each stage that share of the run's steps, in order, whatever the run's length (`mimo.data.loader`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mimo import __version__
from mimo.checkpoint import replace_dir
from mimo.data import quality
from mimo.data.corpus_config import FORMATS, default_config, load_config, validate_config
from mimo.data.quality import corpus_documents  # noqa: F401  (reading a corpus back is part of this API)
from mimo.errors import MimoError
from mimo.jsonl import read_jsonl

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
CHUNK_PROBLEMS = 10_000  # problems per generation call (each chunk has its own derived seed)


# ---------------------------------------------------------------- collecting documents


def _derived_seed(*parts) -> int:
    from mimo.data.reasoning import MAX_SEED

    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % MAX_SEED


def _generate_chunk(args):
    """One generation call (runs in a worker process when workers > 1): rendered texts per format."""
    from mimo.data import reasoning

    tasks, n, seed, formats = args
    problems, stats = reasoning.generate_with_stats(tasks, n, "train", seed)
    render = {"trace": reasoning.render_pretrain, "answer_only": reasoning.render_answer_only}
    return [(p.task, p.question, [render[f](p) for f in formats]) for p in problems], stats


def _read_text_source(name: str, paths: list[str]) -> list[str]:
    files: list[Path] = []
    for spec in paths:
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        elif p.is_file():
            found = [p]
        else:
            found = [Path(f) for f in sorted(glob.glob(spec, recursive=True)) if Path(f).is_file()]
        if not found:
            raise MimoError(f"sources.{name}.paths: {spec}: no .txt, .md or .jsonl files found")
        files += found
    docs = []
    for f in files:
        if f.suffix not in TEXT_SUFFIXES:
            raise MimoError(f"{f}: unsupported file type (use .txt, .md or .jsonl)")
        if f.suffix != ".jsonl":
            try:
                docs.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise MimoError(f"{f}: not UTF-8 text") from None
            continue
        for lineno, row in read_jsonl(f):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise MimoError(f"{f}:{lineno}: expected an object with a string \"text\" field")
            docs.append(row["text"])
    return docs


class _Docs:
    """The collected documents as parallel lists: text, pool label, val group key, task ("" for text)."""

    def __init__(self):
        self.texts, self.labels, self.groups, self.tasks = [], [], [], []

    def add(self, text: str, label: str, group: str, task: str = ""):
        self.texts.append(text)
        self.labels.append(label)
        self.groups.append(group)
        self.tasks.append(task)


def _collect(cfg: dict, bar, workers: int) -> tuple[_Docs, dict]:
    docs, generation = _Docs(), {}
    for name, src in cfg["sources"].items():
        if src["type"] == "text":
            texts = _read_text_source(name, src["paths"])
            for t in texts:
                docs.add(t, name, "text/" + quality.text_key(t).hex())
            generation[name] = {"documents": len(texts)}
            continue
        formats = [f for f in FORMATS if f in src["formats"]]
        n = src["problems"]
        chunks = [(src["tasks"], min(CHUNK_PROBLEMS, n - start), _derived_seed(cfg["seed"], name, c), formats)
                  for c, start in enumerate(range(0, n, CHUNK_PROBLEMS))]
        stats: dict[str, Counter] = {}
        bar.set_description(f"generate {name}")
        for rows, st in _map(_generate_chunk, chunks, workers):
            for task, question, texts in rows:
                for fmt, text in zip(formats, texts):
                    docs.add(text, f"{name}/{fmt}", "q/" + quality.normalize(question), task)
            for task, counts in st.items():
                stats.setdefault(task, Counter()).update(counts)
            bar.update(len(rows))
        generation[name] = {"problems": n, "tasks": stats}
    return docs, generation


def _map(fn, items, workers: int):
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(items))) as pool:
        yield from pool.map(fn, items)  # in order: the output does not depend on the number of workers


# ---------------------------------------------------------------- tokenizing, splitting, mixing


def _tokenizer(cfg: dict, texts: list[str], seed: int):
    from mimo.tokenizer import Tokenizer

    spec = cfg["tokenizer"]
    if isinstance(spec, str):
        return Tokenizer.load(spec)
    k = min(spec["sample_documents"], len(texts))
    if k == 0:
        raise MimoError("no documents left after filtering: nothing to train the tokenizer on")
    pick = np.sort(np.random.default_rng([seed, 7]).choice(len(texts), size=k, replace=False))
    return Tokenizer.train([], spec["vocab_size"], show_progress=False, texts=[texts[i] for i in pick])


def _tokenize(tokenizer, texts: list[str], bar) -> tuple[np.ndarray, np.ndarray]:
    """(flat tokens with end-of-text after each document, offsets): document i is flat[off[i]:off[i+1]]."""
    eos = tokenizer.eos_token_id
    parts, lengths = [], []
    for start in range(0, len(texts), 10_000):
        for ids in tokenizer.encode_batch(texts[start:start + 10_000]):
            parts.append(np.asarray(ids + [eos], dtype=np.uint32))
            lengths.append(len(ids) + 1)
        bar.update(min(10_000, len(texts) - start))
    flat = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
    return flat, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _val_split(cfg: dict, groups: list[str], lengths: np.ndarray) -> np.ndarray:
    """Boolean mask of held-out documents: whole groups (a question in every format) in a seeded hash order,
    until both val_fraction of the documents and val_min_tokens are reached."""
    keys = [hashlib.blake2b(f"{cfg['seed']}/{g}".encode(), digest_size=8).digest() for g in groups]
    order = sorted(range(len(groups)), key=lambda i: (keys[i], i))  # a group's documents are adjacent
    cum = np.cumsum(lengths[order])
    by_tokens = int(np.searchsorted(cum, cfg["val_min_tokens"])) + 1
    k = min(max(int(np.ceil(cfg["val_fraction"] * len(groups))), by_tokens), len(groups))
    while k < len(groups) and keys[order[k]] == keys[order[k - 1]]:  # never split a group
        k += 1
    if k > len(groups) // 2:
        raise MimoError(f"the corpus has {len(groups)} documents ({int(cum[-1]) if len(cum) else 0} tokens): "
                        f"too few to hold out val_fraction {cfg['val_fraction']} and val_min_tokens "
                        f"{cfg['val_min_tokens']}")
    val = np.zeros(len(groups), dtype=bool)
    val[order[:k]] = True
    return val


class _Pool:
    """The train documents of one source/format, read in a shuffled order that continues across stages
    and reshuffles (seeded) at every new epoch."""

    def __init__(self, label: str, docs: np.ndarray, all_lengths: np.ndarray, seed: int):
        self.label, self.docs, self.lengths, self.seed = label, docs, all_lengths[docs], seed
        self.tokens = int(self.lengths.sum())
        self.epoch, self.pos, self.order = -1, 0, np.zeros(0, np.int64)
        self.drawn = 0

    def take(self, tokens: float) -> np.ndarray:
        """Documents in order until their tokens reach `tokens` (overshooting by at most one document)."""
        if self.tokens == 0:
            raise MimoError(f"source {self.label}: no train documents left after filtering and the val split")
        out = []
        while tokens > 0:
            if self.pos == len(self.order):
                self.epoch += 1
                label_key = hashlib.blake2b(self.label.encode(), digest_size=8).digest()
                rng = np.random.default_rng([self.seed, int.from_bytes(label_key, "little"), self.epoch])
                self.order, self.pos = rng.permutation(len(self.docs)), 0
            rest = self.order[self.pos:]
            cum = np.cumsum(self.lengths[rest])
            k = min(len(rest), int(np.searchsorted(cum, tokens)) + 1)
            out.append(self.docs[rest[:k]])
            tokens -= cum[k - 1]
            self.drawn += int(cum[k - 1])
            self.pos += k
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def _stage_weights(cfg: dict, mix: dict) -> dict[str, float]:
    """A stage's mix over pools: a reasoning source's weight is split over its formats by format weight."""
    out: Counter = Counter()
    for key, w in mix.items():
        src = cfg["sources"].get(key)
        if src is None or src["type"] == "text":  # a "source/format" pool or a text source
            out[key] += w
        else:
            for f, fw in src["formats"].items():
                out[f"{key}/{f}"] += w * fw / sum(src["formats"].values())
    return {pool: w for pool, w in sorted(out.items()) if w > 0}


# ---------------------------------------------------------------- writing


class _ShardWriter:
    """Appends tokens to <split>_NNN.bin files of at most shard_tokens tokens, hashing as it goes."""

    def __init__(self, out: Path, split: str, shard_tokens: int, dtype):
        self.out, self.split, self.cap, self.dtype = out, split, shard_tokens, np.dtype(dtype)
        self.shards, self.hashes, self.total = [], [], 0

    def write(self, tokens: np.ndarray):
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if not self.shards or self.shards[-1]["tokens"] == self.cap:
                name = f"{self.split}_{len(self.shards):03d}.bin"
                self.shards.append({"file": name, "tokens": 0, "sha256": ""})
                self.hashes.append(hashlib.sha256())
            room = self.cap - self.shards[-1]["tokens"]
            data, tokens = tokens[:room].tobytes(), tokens[room:]
            with open(self.out / self.shards[-1]["file"], "ab") as fh:
                fh.write(data)
            self.hashes[-1].update(data)
            self.shards[-1]["tokens"] += len(data) // self.dtype.itemsize
            self.total += len(data) // self.dtype.itemsize

    def close(self) -> dict:
        for shard, sha in zip(self.shards, self.hashes):
            shard["sha256"] = sha.hexdigest()
        return {"shards": self.shards, "tokens": self.total}


def _gather(flat: np.ndarray, offsets: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """The tokens of documents `docs` (each with its end-of-text), concatenated."""
    starts, lengths = offsets[docs], offsets[docs + 1] - offsets[docs]
    out_starts = np.cumsum(lengths) - lengths
    return flat[np.arange(int(lengths.sum())) + np.repeat(starts - out_starts, lengths)]


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


# ---------------------------------------------------------------- the build


def build_corpus(config: dict, out_dir, show_progress: bool = True, workers: int = 1) -> dict:
    """Build the corpus described by `config` into `out_dir`; returns the manifest.

    `workers` > 1 generates reasoning problems in that many processes (the output does not change)."""
    cfg = validate_config(config)
    out_dir, seed, q = Path(out_dir), cfg["seed"], cfg["quality"]
    if out_dir.exists() and not ((out_dir / "manifest.json").is_file() or _empty_dir(out_dir)):
        raise MimoError(f"{out_dir}: exists and is not a corpus directory; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    timings, clock = {}, [time.time()]

    def phase(name, total=None):
        return tqdm(total=total, desc=name, disable=not show_progress, file=sys.stderr, leave=False)

    def lap(name):
        timings[name], clock[0] = round(time.time() - clock[0], 2), time.time()

    reasoning_sources = [s for s in cfg["sources"].values() if s["type"] == "reasoning"]
    with phase("collect", sum(s["problems"] for s in reasoning_sources)) as b:
        docs, generation = _collect(cfg, b, workers)
    lap("collect")
    with phase("filter") as b:
        alive, filters, scores = quality.filter_documents(
            docs.texts, docs.labels, near_dup_threshold=q["near_dup_threshold"], ngram=q["ngram"],
            benchmarks=q["benchmarks"], density_threshold=q["density_threshold"], progress=b,
            procedural=[bool(t) for t in docs.tasks],
            eval_questions=quality.eval_split_questions([s["tasks"] for s in reasoning_sources])
            if q["eval_split"] else ())
    lap("filter")
    kept = np.flatnonzero(alive)
    for source, task, _ in sorted({(docs.labels[i].split("/")[0], docs.tasks[i], docs.groups[i])
                                   for i in kept if docs.tasks[i]}):
        generation[source]["tasks"][task]["kept"] += 1  # problems of each task with a document left
    texts, labels = [docs.texts[i] for i in kept], np.array([docs.labels[i] for i in kept])
    with phase("tokenizer", 1) as b:
        tokenizer = _tokenizer(cfg, texts, seed)
        b.update(1)
    dtype = "uint16" if tokenizer.vocab_size <= 65536 else "uint32"
    lap("tokenizer")
    with phase("tokenize", len(texts)) as b:
        flat, offsets = _tokenize(tokenizer, texts, b)
    lengths = np.diff(offsets)
    lap("tokenize")

    val = _val_split(cfg, [docs.groups[i] for i in kept], lengths)
    pools = {label: _Pool(label, np.flatnonzero((labels == label) & ~val), lengths, seed)
             for label in sorted(set(labels.tolist()))}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokenizer").mkdir(parents=True)
    try:
        tokenizer.save(tmp / "tokenizer")
        with phase("write", cfg["tokens"]) as b:
            train_split = _ShardWriter(tmp, "train", cfg["shard_tokens"], dtype)
            train, per_stage = _write_train(cfg, pools, flat, offsets, train_split, b)
            val_split = _ShardWriter(tmp, "val", cfg["shard_tokens"], dtype)
            val_split.write(_gather(flat, offsets, np.flatnonzero(val)))
        lap("write")
        sources = {}
        for label, pool in pools.items():
            held = (labels == label) & val
            sources[label] = {"documents": len(pool.docs), "tokens": pool.tokens,
                              "val_documents": int(held.sum()), "val_tokens": int(lengths[held].sum()),
                              "mean_density": round(float(scores[kept][labels == label].mean()), 4),
                              "stages": per_stage[label],
                              "epochs": round(pool.drawn / max(1, pool.tokens), 3)}
        manifest = {
            "mimo_version": __version__, "dtype": dtype, "tokenizer": "tokenizer",
            "vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_token_id, "seed": seed,
            "splits": {"train": train, "val": val_split.close()},
            "documents": {"collected": len(docs.texts), "kept": len(kept), "train_pool": int((~val).sum()),
                          "val": int(val.sum())},
            "sources": sources, "filters": filters, "generation": generation, "build_seconds": timings,
            "config": cfg,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        replace_dir(tmp, out_dir)  # two renames: never a half-written corpus
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_train(cfg: dict, pools: dict, flat, offsets, writer, bar) -> tuple[dict, dict]:
    """Each stage: its token share drawn from its pools by weight, shuffled, appended in stage order.
    Returns the train split of the manifest and {pool: {stage: {documents, tokens}}}."""
    rows, per_stage, remaining = [], {label: {} for label in pools}, cfg["tokens"]
    lengths = np.diff(offsets)
    for si, st in enumerate(cfg["stages"]):
        target = remaining if si == len(cfg["stages"]) - 1 else round(st["fraction"] * cfg["tokens"])
        remaining -= target
        weights = _stage_weights(cfg, st["mix"])
        chosen = []
        for label, w in weights.items():
            if label not in pools:
                raise MimoError(f"stages[{si}].mix: source {label} has no documents left after filtering")
            picked = pools[label].take(target * w / sum(weights.values()))
            per_stage[label][st["name"]] = {"documents": len(picked), "tokens": int(lengths[picked].sum())}
            chosen.append(picked)
        stage_docs = np.concatenate(chosen)
        stage_docs = stage_docs[np.random.default_rng([cfg["seed"], si, 1]).permutation(len(stage_docs))]
        start = writer.total
        for c in range(0, len(stage_docs), 200_000):
            writer.write(_gather(flat, offsets, stage_docs[c:c + 200_000]))
        rows.append({"name": st["name"], "start": start, "tokens": writer.total - start,
                     "documents": len(stage_docs)})
        bar.update(writer.total - start)
    return {**writer.close(), "stages": rows}, per_stage


def add_arguments(p):
    """`mimo data` -> its actions (build)."""
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = sub.add_parser("build", help="procedural reasoning data + your files -> dedup, decontamination, density "
                       "filter, staged mixture -> tokenized shards and a manifest")
    d.add_argument("--config", metavar="FILE", help="JSON config (default: the preset's)")
    d.add_argument("--preset", default="nano", help="default config to use without --config: nano | tiny | small")
    d.add_argument("--text", nargs="+", metavar="PATH", help="your general text (files, directories, globs of "
                   ".txt/.md/.jsonl) as a source of every stage of the preset's config: half of stage 1")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--out", required=True, metavar="DATA_DIR")


def run(args):
    """`mimo data build`."""
    if args.config and args.text:
        raise MimoError("--text adds a source to the preset's config; with --config, list it in the config's sources")
    config = load_config(args.config) if args.config else default_config(args.preset, text=args.text)
    if args.seed is not None:
        config["seed"] = args.seed
    manifest = build_corpus(config, Path(args.out))
    train = manifest["splits"]["train"]
    print(f"wrote {args.out}: {train['tokens']:,} training tokens in {len(train['shards'])} shard(s), "
          f"{manifest['splits']['val']['tokens']:,} validation tokens", file=sys.stderr)
