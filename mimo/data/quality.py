"""Quality stages for pretraining documents: exact and near-duplicate removal, n-gram decontamination,
and a reasoning-density score.

Normalisation (shared by every stage): lowercase, then split into words = runs of letters/digits, with
every other non-space character (``+ - * / = ( ) . ,`` ...) a word of its own, so digits and operators
count: "Calculate 5 + 3." -> ``calculate 5 + 3 .``. Each word gets a fixed 64-bit hash (blake2b, the same
in every process), and an n-gram's hash is a polynomial hash of its words' hashes mod 2**64, computed
for a whole batch of documents at once with numpy (prefix sums, so any n costs a few array passes).

- Exact duplicates: blake2b of the normalised text.
- Near duplicates: MinHash (datasketch, ``num_perm`` 64) over word 5-gram shingles and datasketch's
  MinHashLSH at Jaccard ``threshold`` (default 0.9); LSH candidates are confirmed with the MinHash
  Jaccard estimate, and the first document of a cluster (in corpus order) is kept. It runs on user
  text only: generated problems are distinct by construction once exact duplicates are gone, so on
  them near-dup can only make mistakes. Measured on 50,046 distinct procedural documents (traces and
  answer-only renders): 1 flagged at 0.9 (two answer-only prime factorizations with long "2 × 2 × ..."
  runs), 129 at 0.8, 1,876 at 0.7 (one template, different numbers); 2.5 s for MinHash + LSH on one core.
- Decontamination: `NgramIndex` holds hashed n-grams of reference texts: every 13-gram of a benchmark's
  problems, solutions and answers, plus its problems of 8-12 words whole (they have no 13-gram).
  ``whole=True`` indexes each text as one gram of its own length, i.e. exact containment at word
  boundaries: used for the procedural eval questions, which are short and templated, so 13-grams of
  their shared boilerplate would match every training problem of the task, while the whole question
  never does unless the problem itself leaked.
- Reasoning density: `density(text)` in [0, 1], a documented heuristic (see its docstring) standing in
  for MiMo's model-based reasoning-depth scorer.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from pathlib import Path

import numpy as np

_WORD = re.compile(r"[^\W_]+|[^\w\s]|_")
_P = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64
_P_INV = pow(_P, -1, 1 << 64)
_CHUNK_WORDS = 4_000_000  # words per numpy batch: bounds memory (a few arrays of 8 bytes per word)
_word_cache: dict[str, int] = {}


def words(text: str) -> list[str]:
    """The normalised words of `text` (lowercase; punctuation and operators are words of their own)."""
    return _WORD.findall(text.lower())


def normalize(text: str) -> str:
    return " ".join(words(text))


def text_key(text: str) -> bytes:
    """Exact-duplicate key: a 16-byte hash of the normalised text."""
    return hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()


def _word_hash(w: str) -> int:
    h = _word_cache.get(w)
    if h is None:
        if len(_word_cache) > 5_000_000:  # user text can have a huge vocabulary; the cache is only a speed-up
            _word_cache.clear()
        h = _word_cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
    return h


class WordBatch:
    """Documents as one flat uint64 array of word hashes plus offsets: document i = words[off[i]:off[i+1]]."""

    def __init__(self, texts):
        ids = array("Q")  # 8 bytes a word while collecting (a list would hold pointers to int objects)
        offsets = array("q", [0])
        for t in texts:
            ids.extend(_word_hash(w) for w in words(t))
            offsets.append(len(ids))
        self.words = np.frombuffer(ids, dtype=np.uint64) if len(ids) else np.zeros(0, np.uint64)
        self.offsets = np.frombuffer(offsets, dtype=np.int64)

    @classmethod
    def _of(cls, words_: np.ndarray, offsets: np.ndarray) -> WordBatch:
        batch = cls.__new__(cls)
        batch.words, batch.offsets = words_, offsets
        return batch

    def subset(self, docs: np.ndarray) -> WordBatch:
        """The documents `docs` (indices, in that order) as a new batch, without re-reading any text."""
        starts, lengths = self.offsets[:-1][docs], np.diff(self.offsets)[docs]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        pos = np.arange(int(offsets[-1])) + np.repeat(starts - offsets[:-1], lengths)
        return WordBatch._of(self.words[pos], offsets)

    def keys(self) -> list[bytes]:
        """Per document, a 16-byte hash of its normalised words (equal keys = exact duplicates)."""
        data = self.words.tobytes()
        return [hashlib.blake2b(data[8 * a:8 * b], digest_size=16).digest()
                for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist())]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def chunks(self):
        """(first_doc, last_doc_exclusive) ranges of at most ~_CHUNK_WORDS words each."""
        first, n = 0, len(self)
        while first < n:
            limit = self.offsets[first] + _CHUNK_WORDS
            last = max(first + 1, int(np.searchsorted(self.offsets, limit, side="right")) - 1)
            last = min(last, n)
            yield first, last
            first = last


class _Hasher:
    """Polynomial hashes of every window of a chunk of documents: window [i, i+L) has hash
    sum_j w[j] * P**(i+L-1-j), computed as P**(i+L) * (S[i+L] - S[i]) with S the prefix sums of
    w[j] * P**-(j+1), all mod 2**64 (numpy uint64 arithmetic wraps). Contiguous slices only: any
    window length costs a few passes over the chunk."""

    def __init__(self, batch: WordBatch, first: int, last: int):
        lo, hi = int(batch.offsets[first]), int(batch.offsets[last])
        w = batch.words[lo:hi]
        m = len(w)
        self.starts = batch.offsets[first:last] - lo
        self.ends = batch.offsets[first + 1:last + 1] - lo
        lengths = self.ends - self.starts
        self.doc_of = np.repeat(np.arange(first, last), lengths)
        # words left in the document from each position: window [i, i+L) is inside it iff left[i] >= L
        self.left = np.repeat(self.ends, lengths) - np.arange(m)
        powers = np.full(m + 1, _P, dtype=np.uint64)
        powers[0] = 1
        self.ppow = np.cumprod(powers)
        inv = np.full(m, _P_INV, dtype=np.uint64)
        self.prefix = np.zeros(m + 1, dtype=np.uint64)
        self.prefix[1:] = np.cumsum(w * np.cumprod(inv))
        self.m = m

    def windows(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(hashes, document index) of every window of `length` words inside one document."""
        k = self.m - length + 1
        if k <= 0:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        inside = self.left[:k] >= length
        h = self.ppow[length:] * (self.prefix[length:] - self.prefix[:k])
        return h[inside], self.doc_of[:k][inside]

    def whole(self) -> tuple[np.ndarray, np.ndarray]:
        """(hash, length) of every document taken as one gram."""
        s, e = self.starts, self.ends
        return self.ppow[e] * (self.prefix[e] - self.prefix[s]), e - s


def ngrams(text: str, n: int = 13) -> set[int]:
    """The hashed word n-grams of `text` (empty when it has fewer than n words)."""
    batch = WordBatch([text])
    if len(batch.words) < n:
        return set()
    return {int(h) for h in _Hasher(batch, 0, 1).windows(n)[0]}


class NgramIndex:
    """Hashed word n-grams of reference texts (e.g. a benchmark), for overlap queries.

    ``whole=False``: every n-gram of every text (texts shorter than n words add nothing).
    ``whole=True``: each text is one gram of its own length, so a query hits only where it contains
    the whole normalised text (at word boundaries).
    """

    def __init__(self, texts=(), n: int = 13, whole: bool = False):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        self.n, self.whole = n, whole
        parts: dict[int, list[np.ndarray]] = {}
        batch = WordBatch(texts)
        for first, last in batch.chunks():
            hasher = _Hasher(batch, first, last)
            if whole:
                h, lengths = hasher.whole()
                for length in np.unique(lengths[lengths > 0]):
                    parts.setdefault(int(length), []).append(h[lengths == length])
            else:
                parts.setdefault(n, []).append(hasher.windows(n)[0])
        self.grams = {length: np.unique(np.concatenate(p)) for length, p in parts.items()}
        self.grams = {length: g for length, g in self.grams.items() if len(g)}
        # a bitmap over the low hash bits (~64 slots per gram) answers most misses without a search
        self.bitmaps = {}
        for length, g in self.grams.items():
            bits = np.zeros(1 << max(10, int(len(g) * 64).bit_length()), dtype=bool)
            bits[(g & np.uint64(len(bits) - 1)).astype(np.int64)] = True
            self.bitmaps[length] = bits

    def __len__(self) -> int:
        return sum(len(g) for g in self.grams.values())

    def _member(self, length: int, h: np.ndarray) -> np.ndarray:
        table, bits = self.grams[length], self.bitmaps[length]
        out = bits[(h & np.uint64(len(bits) - 1)).astype(np.int64)]
        maybe = np.flatnonzero(out)
        i = np.minimum(np.searchsorted(table, h[maybe]), len(table) - 1)
        out[maybe] = table[i] == h[maybe]
        return out

    def hits(self, batch: WordBatch) -> np.ndarray:
        """Per document of `batch`: how many of its windows are grams of the index."""
        return hits_many(batch, [self])[0]

    def counts(self, texts) -> np.ndarray:
        """Per text: how many of its windows are grams of the index (0 = clean)."""
        return self.hits(WordBatch(texts))

    def overlaps(self, text: str) -> int:
        """How many distinct n-grams (or whole indexed texts) of `text` are in the index."""
        batch = WordBatch([text])
        hasher = _Hasher(batch, 0, 1)
        total = 0
        for length in self.grams:
            h = np.unique(hasher.windows(length)[0])
            total += int(self._member(length, h).sum()) if len(h) else 0
        return total


def hits_many(batch: WordBatch, indexes: list[NgramIndex]) -> list[np.ndarray]:
    """`NgramIndex.hits` of several indexes at once, hashing each window length of the batch only once."""
    out = [np.zeros(len(batch), dtype=np.int64) for _ in indexes]
    lengths = sorted({length for index in indexes for length in index.grams})
    for first, last in batch.chunks():
        hasher = _Hasher(batch, first, last)
        for length in lengths:
            h, doc = hasher.windows(length)
            for index, counts in zip(indexes, out):
                if length in index.grams:
                    counts += np.bincount(doc[index._member(length, h)], minlength=len(batch))
    return out


# ---------------------------------------------------------------- deduplication


def exact_duplicates(texts) -> np.ndarray:
    """Boolean mask: True for every text (or WordBatch document) whose normalised form appeared earlier."""
    batch = texts if isinstance(texts, WordBatch) else WordBatch(texts)
    seen: set[bytes] = set()
    dup = np.zeros(len(batch), dtype=bool)
    for i, k in enumerate(batch.keys()):
        if k in seen:
            dup[i] = True
        else:
            seen.add(k)
    return dup


def minhash_signatures(batch: WordBatch, num_perm: int = 64, shingle: int = 5, seed: int = 1) -> np.ndarray:
    """[documents, num_perm] datasketch MinHash values (scheme "affine32") of each document's word
    `shingle`-grams; a document shorter than `shingle` words is one shingle. Computed for all documents
    at once with datasketch's own permutations and mixing, so the values equal what
    ``datasketch.MinHash(num_perm, seed).update_batch(...)`` gives for the same 32-bit shingle hashes."""
    from datasketch import MinHash
    from datasketch.minhash import _fmix

    a, b = MinHash(num_perm=num_perm, seed=seed).permutations  # uint32 [num_perm] each
    sig = np.full((len(batch), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    for first, last in batch.chunks():
        hasher = _Hasher(batch, first, last)
        h, doc = hasher.windows(shingle)
        whole, lengths = hasher.whole()
        short = np.nonzero((lengths < shingle) & (lengths > 0))[0]
        h = np.concatenate([h, whole[short]])
        doc = np.concatenate([doc, short + first])
        if not len(h):
            continue
        order = np.argsort(doc, kind="stable")
        h, doc = (h[order] >> np.uint64(32)).astype(np.uint32), doc[order]
        mixed = _fmix(h, 32)
        starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
        for k in range(num_perm):  # one pass per permutation keeps memory at one array of shingles
            sig[doc[starts], k] = np.minimum.reduceat(mixed * a[k] + b[k], starts)
    return sig


def near_duplicates(batch: WordBatch, threshold: float = 0.9, num_perm: int = 64, shingle: int = 5,
                    seed: int = 1, skip=None) -> np.ndarray:
    """Boolean mask: True for every document whose estimated Jaccard similarity with an earlier kept
    document is >= threshold (MinHashLSH candidates, confirmed with the MinHash estimate).
    Documents where `skip` is True are neither checked nor indexed."""
    from datasketch import LeanMinHash, MinHashLSH

    todo = np.flatnonzero(batch.lengths() > 0)
    if skip is not None:
        todo = todo[~np.asarray(skip, dtype=bool)[todo]]
    dup = np.zeros(len(batch), dtype=bool)
    if not len(todo):
        return dup
    sig = minhash_signatures(batch.subset(todo), num_perm, shingle, seed)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for k, i in enumerate(todo):
        m = LeanMinHash(seed=seed, hashvalues=sig[k], scheme="affine32")
        for j in lsh.query(m):
            if np.count_nonzero(sig[j] == sig[k]) >= threshold * num_perm:
                dup[i] = True
                break
        if not dup[i]:
            lsh.insert(k, m, check_duplication=False)
    return dup


# ---------------------------------------------------------------- reasoning density

_HEADER = re.compile(r"^\s*(?:question|problem|solution|answer|final answer)\s*:", re.IGNORECASE)
_QUESTION = re.compile(r"^\s*(?:question|problem)\s*:", re.IGNORECASE | re.MULTILINE)
_ANSWER = re.compile(r"^\s*(?:final answer|answer)\s*:|\\boxed\{", re.IGNORECASE | re.MULTILINE)
_MATH = re.compile(r"=|\d\s*[-+*/×÷^%<>]\s*[-(]?\d|\\(?:frac|sqrt|cdot|times|sum|int)\b")
_CODE = re.compile(r"^\s*(?:def|return|import|from|for|while|if|elif|else|class|print)\b.*|[{};]\s*$")
_LABEL = re.compile(r"^\s*[\w ]{1,24}:\s*\S")  # "spelled: c a t", "total: 3" - a labelled step
_RELATION = re.compile(r"\d.*\b(?:is|are|equals|gives|so|then|therefore|thus|hence|because)\b|"
                       r"\b(?:is|are|equals|gives|so|then|therefore|thus|hence|because)\b.*\d", re.IGNORECASE)
_OPERATOR = re.compile(r"[+\-*/=×÷^<>]")
_DIGIT = re.compile(r"\d")
_SYMBOL_SATURATION = 0.1  # operator share at which that feature scores 1 (procedural traces: 0.1-0.3)


def density(text: str) -> float:
    """Reasoning density in [0, 1]: ``0.5 * steps + 0.3 * symbols + 0.2 * qa``, where

    - steps: the fraction of non-empty lines (besides Question/Solution/Answer headers) that are
      reasoning steps: an equation or arithmetic (``=``, ``3 * 4``, LaTeX operators), a line of code,
      or a short line (<= 120 characters) that is labelled (``total: 3``, ``spelled: c a t``) or
      states a relation with a number (``smallest of 5, 3 is 3``, ``so x is 4``). Prose paragraphs
      (long lines) score 0 here.
    - symbols: operators (``+ - * / = ^ < >``) plus a tenth of the digits, as a share of the
      non-space characters, saturating at 0.1 (so numbers in prose count little, arithmetic a lot).
    - qa: 1 when the document states a question (``Question:``/``Problem:``) and a final answer
      (``Answer:`` or ``\\boxed{}``): a solved problem, even without its steps.

    So a step-by-step trace scores ~0.7-1, an answer-only problem ~0.2-0.5 (kept by the default
    threshold 0.15), and prose ~0-0.1 (dropped).
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    body = [ln for ln in lines if not _HEADER.match(ln)]
    step_lines = sum(1 for ln in body if _MATH.search(ln) or _CODE.search(ln)
                     or (len(ln) <= 120 and (_LABEL.match(ln) or _RELATION.search(ln))))
    steps = step_lines / len(body) if body else 0.0
    chars = len(text) - sum(text.count(c) for c in " \n\t")
    weight = len(_OPERATOR.findall(text)) + 0.1 * len(_DIGIT.findall(text))
    symbols = min(1.0, weight / max(1, chars) / _SYMBOL_SATURATION)
    qa = 1.0 if _QUESTION.search(text) and _ANSWER.search(text) else 0.0
    return round(min(1.0, 0.5 * steps + 0.3 * symbols + 0.2 * qa), 4)


# ---------------------------------------------------------------- the filter stage of a corpus build

SHORT_PROBLEM_WORDS = 8  # benchmark problems of 8 to n-1 words are matched whole (they have no n-gram)
_BENCH_INDEX: dict = {}


def benchmark_indexes(name: str, n: int = 13) -> list[NgramIndex]:
    """Every n-gram of the benchmark's texts (problems, solutions, answers), plus each problem too short
    to have an n-gram as a whole (answers are not: "\\frac{1}{2}" or "42" alone is no leak). Cached."""
    from mimo.benchmarks import benchmark_texts, load_benchmark

    if (name, n) not in _BENCH_INDEX:
        problems = [r["problem"] for r in load_benchmark(name)]
        short = [p for p in problems if SHORT_PROBLEM_WORDS <= len(words(p)) < n]
        _BENCH_INDEX[(name, n)] = [NgramIndex(benchmark_texts(name), n), NgramIndex(short, whole=True)]
    return _BENCH_INDEX[(name, n)]


def eval_split_questions(task_configs=()) -> set[str]:
    """The procedural eval questions of the default task configs and of each `mimo.data.reasoning` task config
    given (a corpus's harder configs have their own eval pools)."""
    from mimo.data.reasoning import eval_questions

    out = set(eval_questions(None))
    for tasks in task_configs:
        out |= eval_questions(tasks)
    return out


def filter_documents(texts: list[str], labels: list[str], *, near_dup_threshold: float | None = 0.9,
                     ngram: int = 13, benchmarks=(), eval_questions=(), density_threshold: float = 0.15,
                     procedural=None, progress=None) -> tuple[np.ndarray, dict, np.ndarray]:
    """The quality stages in order: empty, exact duplicates, near duplicates, contamination (each
    benchmark, then the procedural eval questions matched whole), reasoning density. Documents marked
    `procedural` (verified generated problems) skip near-dup: see the module docstring.

    Returns (kept mask, counts, density scores). counts: documents dropped by each stage, contamination
    split by benchmark / "eval_split" (a document counts under its first match), and "by_source": the
    same per label. `progress` (a tqdm bar) advances once per stage."""
    n, labels = len(texts), np.array(labels)
    alive = np.array([bool(t.strip()) for t in texts], dtype=bool)
    counts = {"empty": int((~alive).sum()), "exact_dup": 0, "near_dup": 0,
              "contamination": {**{b: 0 for b in benchmarks}, "eval_split": 0}, "density": 0}
    by_source = {str(lab): {"exact_dup": 0, "near_dup": 0, "contamination": 0, "density": 0}
                 for lab in sorted(set(labels.tolist()))}

    def step(desc):
        if progress is not None:
            progress.set_description(f"filter: {desc}")

    def drop(idx, mask, key, sub=None):
        full = np.zeros(n, dtype=bool)
        full[idx] = mask
        full &= alive
        alive[full] = False
        if sub is None:
            counts[key] += int(full.sum())
        else:
            counts[key][sub] += int(full.sum())
        for lab, c in zip(*np.unique(labels[full], return_counts=True)):
            by_source[str(lab)][key] += int(c)
        if progress is not None:
            progress.update(0)

    step("exact dedup")
    idx = np.flatnonzero(alive)
    batch = WordBatch([texts[i] for i in idx])  # normalised once, for every stage below
    dup = exact_duplicates(batch)
    drop(idx, dup, "exact_dup")
    idx, batch = idx[~dup], batch.subset(np.flatnonzero(~dup))
    if near_dup_threshold is not None:
        step("near dedup")
        skip = None if procedural is None else np.asarray(procedural, dtype=bool)[idx]
        drop(idx, near_duplicates(batch, threshold=near_dup_threshold, skip=skip), "near_dup")

    step("decontaminate")
    names, indexes = [], []
    for name in benchmarks:
        for index in benchmark_indexes(name, ngram):
            names.append(name)
            indexes.append(index)
    if eval_questions:
        names.append("eval_split")
        indexes.append(NgramIndex(sorted(eval_questions), whole=True))
    for name, hits in zip(names, hits_many(batch, indexes)):
        drop(idx, hits > 0, "contamination", name)

    step("density")
    scores = np.zeros(n)
    for i in np.flatnonzero(alive):
        scores[i] = density(texts[i])
    drop(np.arange(n), scores < density_threshold, "density")
    counts["by_source"] = by_source
    return alive, counts, scores


def benchmark_overlap(benchmark: str, corpus_dir, n: int = 13) -> list[dict]:
    """Per problem of `benchmark`: how many of its distinct word n-grams occur in the train documents of
    a built corpus. [{"id", "ngrams", "overlap"}]; overlap 0 = no shared n-gram. Decodes the corpus
    (unique documents) into memory: for small corpora."""
    from mimo.benchmarks import load_benchmark

    index = NgramIndex(corpus_documents(corpus_dir, "train"), n)
    return [{"id": r["id"], "ngrams": len(ngrams(r["problem"], n)), "overlap": index.overlaps(r["problem"])}
            for r in load_benchmark(benchmark)]


def corpus_documents(corpus_dir, split: str = "train", unique: bool = True) -> list[str]:
    """The documents of a built corpus, decoded from its shards (split at end-of-text); `unique` drops
    repeats (sources read for several epochs). Reads everything into memory: for small corpora."""
    from mimo.data.loader import PackedTokens
    from mimo.tokenizer import Tokenizer

    corpus_dir = Path(corpus_dir)
    tokens = PackedTokens(corpus_dir, split)
    tokenizer = Tokenizer.load(corpus_dir / tokens.manifest.get("tokenizer", "tokenizer"))
    stream = tokens.slice(0, len(tokens)) if len(tokens) else np.zeros(0, np.int64)
    ends = np.flatnonzero(stream == tokenizer.eos_token_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    pieces, seen = [], set()
    for s, e in zip(starts, ends):
        piece = stream[s:e]
        if unique:
            key = hashlib.blake2b(piece.tobytes(), digest_size=16).digest()
            if key in seen:
                continue
            seen.add(key)
        pieces.append(piece.tolist())
    return tokenizer.tk.decode_batch(pieces, skip_special_tokens=False)
