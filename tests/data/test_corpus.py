"""Corpus building: quality filters, staged mixture, manifest, determinism, the dataloader contract."""

import hashlib
import json

import numpy as np
import pytest
import torch

from mimo.benchmarks import load_benchmark
from mimo.data import corpus as data
from mimo.data import corpus_config, quality, reasoning
from mimo.data.loader import PackedTokens, PretrainBatches, document_positions, eval_batches
from mimo.errors import MimoError
from mimo.tokenizer import Tokenizer

PROSE = ("The weather was pleasant, and we walked along the river for a long time.\n"
         "Later, everyone had dinner together and talked about books, music and travel plans.")
LONG_PROSE = ("Alice read the long report about river pollution in the northern valley and wrote a careful "
              "summary for the council, listing every measurement, every source and every open question. "
              "The council met on Tuesday, discussed her findings for three hours, and agreed to fund a new "
              "survey of the upper tributaries before the spring floods arrive. Bob, who had collected most "
              "of the samples himself, offered to train the volunteers and to publish the raw data online.")
CLEAN = ["Problem: Tom has 12 apples and buys 30 more.\nSolution:\n12 + 30 = 42\nAnswer: 42",
         "Question: What is 7 times 6?\nSolution:\n7 * 6 = 42\nso the product is 42\nAnswer: 42"]


def small_config(**overrides):
    cfg = {
        "tokens": 16000,
        "val_min_tokens": 300,
        "tokenizer": {"vocab_size": 300},
        "sources": {"r": {"type": "reasoning", "problems": 300, "formats": {"trace": 3, "answer_only": 1}},
                    "hard": {"type": "reasoning", "problems": 60, "tasks": corpus_config.HARD_TASKS,
                             "formats": ["trace"]}},
        "stages": [{"name": "broad", "fraction": 0.5, "mix": {"r": 1}},
                   {"name": "reasoning", "fraction": 0.3, "mix": {"r/trace": 0.7, "hard": 0.3}},
                   {"name": "long", "fraction": 0.2, "mix": {"hard": 1}}],
    }
    cfg.update(overrides)
    return cfg


def text_config(tmp_path, docs, **overrides):
    path = tmp_path / "user.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = small_config(**overrides)
    cfg["sources"]["web"] = {"type": "text", "paths": [str(path)]}
    cfg["stages"][0]["mix"]["web"] = 1
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "c"
    return out, data.build_corpus(small_config(), out, show_progress=False)


# ---------------------------------------------------------------- quality stages


def test_dedup_exact_and_near_but_not_distinct_problems():
    base = LONG_PROSE
    texts = [base, base.upper().replace(" ", "  "), base.replace("careful", "detailed"), PROSE]
    exact = quality.exact_duplicates(texts)
    assert exact.tolist() == [False, True, False, False]
    unique = [t for t, e in zip(texts, exact) if not e]
    assert quality.near_duplicates(quality.WordBatch(unique), threshold=0.8).tolist() == [False, True, False]
    problems = reasoning.generate(None, 600, "train", 11)
    renders = (reasoning.render_pretrain, reasoning.render_answer_only)
    docs = [render(p) for p in problems for render in renders]
    docs = [d for d, e in zip(docs, quality.exact_duplicates(docs)) if not e]  # (the build skips them anyway)
    assert not quality.near_duplicates(quality.WordBatch(docs), threshold=0.9).any()


def test_ngram_index():
    assert quality.words("Calculate 5 + 3.") == ["calculate", "5", "+", "3", "."]
    assert len(quality.ngrams("a b c d e", 3)) == 3 and quality.ngrams("a b", 3) == set()
    index = quality.NgramIndex(["one two three four five six"], n=3)
    assert index.overlaps("zero one two three four nine") == 2
    assert index.counts(["one two three", "three two one"]).tolist() == [1, 0]
    whole = quality.NgramIndex(["Calculate 5 + 3."], whole=True)
    queries = ["Question: calculate 5+3.\nAnswer: 8", "Calculate 15 + 3.", "Calculate 5 + 3 + 1."]
    assert whole.counts(queries).tolist() == [1, 0, 0]


def test_density_keeps_traces_and_answers_drops_prose():
    threshold = corpus_config.DEFAULT_QUALITY["density_threshold"]
    assert quality.density(PROSE) < threshold
    problems = reasoning.generate(None, 120, "train", 3) + reasoning.generate(corpus_config.HARD_TASKS, 60, "train", 3)
    assert min(quality.density(reasoning.render_pretrain(p)) for p in problems) >= 0.5
    assert min(quality.density(reasoning.render_answer_only(p)) for p in problems) >= threshold
    assert all(quality.density(t) >= 0.5 for t in CLEAN)


def test_decontamination_and_density_filters(tmp_path):
    rows = load_benchmark("math500")
    long, short = rows[0]["problem"], rows[3]["problem"]  # 40 words; 11 words (no 13-gram: matched whole)
    assert len(quality.words(short)) < 13 <= len(quality.words(long))
    eval_q = reasoning.eval_problems(1)[0].question
    docs = [f"Problem: {long}\nAnswer: 7", f"We know that {short} Answer: 9 = 3 * 3",
            f"Question: {eval_q}\nSolution:\n1 + 1 = 2\nAnswer: 2", PROSE, *CLEAN,
            LONG_PROSE, LONG_PROSE.replace("careful", "detailed")]
    m = data.build_corpus(text_config(tmp_path, docs), tmp_path / "c", show_progress=False)
    f = m["filters"]
    assert f["contamination"]["math500"] == 2 and f["contamination"]["eval_split"] == 1
    assert f["near_dup"] == f["by_source"]["web"]["near_dup"] == 1  # procedural documents skip near-dup
    assert f["density"] == f["by_source"]["web"]["density"] == 2  # both prose documents
    assert f["by_source"]["web"]["contamination"] == 3
    text = "\n".join(data.corpus_documents(tmp_path / "c") + data.corpus_documents(tmp_path / "c", "val"))
    assert long not in text and short not in text and PROSE not in text
    assert f"Question: {eval_q}\n" not in text
    assert all(c in text for c in CLEAN)


def test_benchmark_overlap_finds_a_leaked_problem(tmp_path):
    rows = load_benchmark("math500")[:3]
    cfg = text_config(tmp_path, [f"Problem: {rows[1]['problem']}\nAnswer: 1\n2 + 2 = 4"] * 3 + CLEAN,
                      quality={"benchmarks": [], "near_dup_threshold": None})
    data.build_corpus(cfg, tmp_path / "c", show_progress=False)
    counts = {r["id"]: r for r in quality.benchmark_overlap("math500", tmp_path / "c")}
    assert counts[rows[1]["id"]]["overlap"] == counts[rows[1]["id"]]["ngrams"] > 0
    assert counts[rows[0]["id"]]["overlap"] == 0 and counts[rows[2]["id"]]["overlap"] == 0


# ---------------------------------------------------------------- the built corpus


def test_manifest_counts_add_up(corpus):
    _, m = corpus
    d, f = m["documents"], m["filters"]
    dropped = f["empty"] + f["exact_dup"] + f["near_dup"] + sum(f["contamination"].values()) + f["density"]
    assert d["collected"] == d["kept"] + dropped
    assert d["kept"] == d["train_pool"] + d["val"] > 0
    assert sum(s["documents"] for s in m["sources"].values()) == d["train_pool"]
    assert sum(s["val_documents"] for s in m["sources"].values()) == d["val"]
    for split in ("train", "val"):
        assert sum(s["tokens"] for s in m["splits"][split]["shards"]) == m["splits"][split]["tokens"]
    stages = m["splits"]["train"]["stages"]
    assert sum(s["tokens"] for s in stages) == m["splits"]["train"]["tokens"]
    assert sum(s["documents"] for s in stages) == sum(
        v["documents"] for s in m["sources"].values() for v in s["stages"].values())
    assert m["dtype"] == "uint16" and m["tokenizer"] == "tokenizer"
    assert m["config"]["quality"]["ngram"] == 13 and m["splits"]["val"]["tokens"] >= 300


def test_stages_in_order_with_their_token_shares(corpus):
    out, m = corpus
    stages = m["splits"]["train"]["stages"]
    assert [s["name"] for s in stages] == ["broad", "reasoning", "long"]
    start = 0
    for s, frac in zip(stages, (0.5, 0.3, 0.2)):
        assert s["start"] == start
        assert abs(s["tokens"] - frac * 16000) < 600  # at most one document over per pool
        start += s["tokens"]
    src = m["sources"]
    broad = {k: v["stages"].get("broad", {}).get("tokens", 0) for k, v in src.items()}
    assert broad["hard/trace"] == 0 and abs(broad["r/trace"] / broad["r/answer_only"] - 3) < 0.3
    assert set(src["hard/trace"]["stages"]) == {"reasoning", "long"}
    assert "r/answer_only" not in {k for k, v in src.items() if "reasoning" in v["stages"]}
    # the stream really is in stage order: the last stage holds only long traces
    tok = Tokenizer.load(out / "tokenizer")
    last = PackedTokens(out).slice(stages[2]["start"], stages[2]["tokens"])
    docs = tok.decode(last).split("<|endoftext|>")[:-1]
    assert len(docs) == stages[2]["documents"] and all("Solution:" in d for d in docs)


def test_dataloader_reads_the_corpus_and_round_trips(corpus, tmp_path):
    out, m = corpus
    train, val = PackedTokens(out, "train"), PackedTokens(out, "val")
    assert len(train) == m["splits"]["train"]["tokens"] and len(val) == m["splits"]["val"]["tokens"]
    tok = Tokenizer.load(out / "tokenizer")
    stream = train.slice(0, 2000)
    first = tok.decode(stream[: int(np.flatnonzero(stream == tok.eos_token_id)[0])])
    assert first.startswith("Question: ") and "\nAnswer: " in first
    assert first in data.corpus_documents(out)
    assert train.windows([0, 1], 64).shape == (2, 65)
    # a user document comes back byte for byte
    doc = "Problem: 2 + 3 = ?\nSolution:\n2 + 3 = 5\nAnswer: 5 — café ✓"
    data.build_corpus(text_config(tmp_path, [doc] + CLEAN), tmp_path / "t", show_progress=False)
    assert doc in data.corpus_documents(tmp_path / "t") + data.corpus_documents(tmp_path / "t", "val")


@pytest.mark.parametrize("total_steps", [10, 400])
def test_each_stage_gets_its_share_of_any_run_in_order(corpus, total_steps):
    """Stages 0.5 / 0.3 / 0.2 of a 10-step run (reading part of each stage) and of a 400-step run (wrapping around
    inside each stage many times): the steps split 50/30/20, and every window of a step lies inside its stage."""
    out, m = corpus
    rows = m["splits"]["train"]["stages"]
    batches = PretrainBatches(PackedTokens(out), seq_len=32, global_seqs=4, micro_batch=2, total_steps=total_steps)
    spans = [(st.name, st.first_step, st.end_step) for st in batches.stages]
    cut = [0, total_steps // 2, total_steps * 8 // 10, total_steps]
    assert spans == [(r["name"], a, b) for r, a, b in zip(rows, cut, cut[1:])]
    stream = PackedTokens(out).slice(0, m["splits"]["train"]["tokens"])
    for step in range(total_steps):
        st = batches.stage(step)
        x = torch.cat([xy[0] for xy in batches.micro_batches(step)])  # [4, 32]
        rel = step - st.first_step
        for j, window in enumerate(x.tolist()):
            w = (rel * 4 + j) % ((st.tokens - 1) // 32)  # the stage's windows, in order, wrapping around
            assert window == stream[st.start + w * 32: st.start + w * 32 + 32].tolist()
    assert batches.stage(cut[1]).name == "reasoning" and batches.stage(total_steps - 1).name == "long"


def test_document_positions_restart_after_each_end_of_text(corpus):
    """Pretraining batches carry positions that restart after every end-of-text token (and at each row's start):
    the model then masks attention to other documents (document_mask); without eos, plain windows."""
    x = torch.tensor([[5, 9, 0, 7, 7, 0, 0, 3], [0, 4, 4, 4, 0, 2, 2, 2]])
    assert document_positions(x, eos=0).tolist() == [[0, 1, 2, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 0, 1, 2]]
    out, _ = corpus
    eos = Tokenizer.load(out / "tokenizer").eos_token_id
    masked = PretrainBatches(PackedTokens(out), seq_len=64, global_seqs=4, micro_batch=2, total_steps=4, eos=eos)
    plain = PretrainBatches(PackedTokens(out), seq_len=64, global_seqs=4, micro_batch=2, total_steps=4)
    for (x, y, positions), (px, py) in zip(masked.micro_batches(1), plain.micro_batches(1)):
        assert torch.equal(x, px) and torch.equal(y, py) and torch.equal(positions, document_positions(x, eos))
        assert (positions == 0).sum() > x.shape[0]  # the windows do cross documents
    (x, _, positions), = list(eval_batches(PackedTokens(out, "val"), 64, 2, 1, eos=eos))
    assert torch.equal(positions, document_positions(x, eos))


def test_a_corpus_without_stages_is_one(corpus, tmp_path):
    out, m = corpus
    tokens = PackedTokens(out)
    tokens.manifest = {**m, "splits": {"train": {k: v for k, v in m["splits"]["train"].items() if k != "stages"}}}
    (stage,) = PretrainBatches(tokens, seq_len=32, global_seqs=4, micro_batch=2, total_steps=7).stages
    assert (stage.start, stage.tokens, stage.first_step, stage.end_step) == (0, len(tokens), 0, 7)


def test_deterministic_and_formats_switch(tmp_path, corpus):
    out, m = corpus
    again = data.build_corpus(small_config(), tmp_path / "again", show_progress=False)
    for split in ("train", "val"):
        assert again["splits"][split]["shards"] == m["splits"][split]["shards"]
        for shard in again["splits"][split]["shards"]:
            digest = hashlib.sha256((tmp_path / "again" / shard["file"]).read_bytes()).hexdigest()
            assert digest == shard["sha256"]
    tokenizer_json = "tokenizer/tokenizer.json"
    assert (tmp_path / "again" / tokenizer_json).read_bytes() == (out / tokenizer_json).read_bytes()

    def questions(fmt):
        cfg = small_config(tokens=8000, stages=[{"name": "all", "fraction": 1.0, "mix": {"r": 1}}])
        cfg["sources"] = {"r": {**cfg["sources"]["r"], "formats": [fmt]}}
        data.build_corpus(cfg, tmp_path / fmt, show_progress=False)
        docs = data.corpus_documents(tmp_path / fmt) + data.corpus_documents(tmp_path / fmt, "val")
        assert all(("\nSolution:\n" in d) == (fmt == "trace") for d in docs)
        return {d.split("\n")[0] for d in docs}

    trace, answer_only = questions("trace"), questions("answer_only")
    assert len(trace & answer_only) > 0.5 * min(len(trace), len(answer_only))  # the same problems


def test_output_dir_is_replaced_atomically(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(MimoError, match="not a corpus directory"):
        data.build_corpus(small_config(), tmp_path / "notes", show_progress=False)
    cfg = small_config(tokens=4000, shard_tokens=1000,
                       stages=[{"name": "all", "fraction": 1.0, "mix": {"r": 1}}])
    data.build_corpus(cfg, tmp_path / "c", show_progress=False)
    m = data.build_corpus(cfg, tmp_path / "c", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "notes"]  # no temporary directory left
    shards = m["splits"]["train"]["shards"]
    assert [s["file"] for s in shards[:2]] == ["train_000.bin", "train_001.bin"]
    assert shards[0]["tokens"] == 1000
    stream = np.concatenate([np.fromfile(tmp_path / "c" / s["file"], dtype=np.uint16) for s in shards])
    assert np.array_equal(PackedTokens(tmp_path / "c").slice(900, 300), stream[900:1200])


# ---------------------------------------------------------------- configs


def test_default_configs_are_valid():
    for preset in ("nano", "tiny", "small"):
        cfg = corpus_config.validate_config(corpus_config.default_config(preset))
        assert [s["name"] for s in cfg["stages"]] == ["broad", "reasoning", "long"]
        assert set(cfg["stages"][0]["mix"]) == {"reasoning/answer_only"}  # no step-by-step traces in stage 1
        assert all("reasoning" in st["mix"] for st in cfg["stages"][1:])  # they enter in stages 2 and 3
    cfg = corpus_config.validate_config(corpus_config.default_config("tiny", text=["notes/"]))
    assert cfg["sources"]["text"]["paths"] == ["notes/"]
    assert set(cfg["stages"][0]["mix"]) == {"reasoning/answer_only", "text"}
    with pytest.raises(MimoError, match="unknown corpus preset"):
        corpus_config.default_config("huge")


@pytest.mark.parametrize("patch, key", [
    ({"stages": [{"name": "a", "fraction": 2, "mix": {"r": 1}}]}, r"stages\[0\]\.fraction"),
    ({"stages": [{"name": "a", "fraction": 1, "mix": {"nope": 1}}]}, r"stages\[0\]\.mix\.nope"),
    ({"stages": [{"name": "a", "fraction": 0.5, "mix": {"r": 1}}]}, "stages: fractions must sum to 1"),
    ({"tokens": "many"}, "tokens"),
    ({"tokenz": 5}, "tokenz: unknown key"),
    ({"tokenizer": {"vocab_size": 10}}, r"tokenizer\.vocab_size"),
    ({"quality": {"ngram": 0}}, r"quality\.ngram"),
    ({"sources": {"r": {"type": "reasoning", "problems": 10, "formats": ["steps"]}}}, r"sources\.r\.formats"),
    ({"sources": {"r": {"type": "reasoning", "problems": 10, "tasks": ["chess"]}}}, r"sources\.r\.tasks"),
    ({"sources": {"r": {"type": "web"}}}, r"sources\.r\.type"),
])
def test_bad_config_names_file_and_key(tmp_path, patch, key):
    cfg = {"sources": {"r": {"type": "reasoning", "problems": 10}},
           "stages": [{"name": "a", "fraction": 1, "mix": {"r": 1}}], **patch}
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(MimoError, match=f"corpus.json: {key}"):
        corpus_config.load_config(path)


def test_load_config_resolves_text_paths(tmp_path):
    (tmp_path / "notes").mkdir()
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps({"sources": {"t": {"type": "text", "paths": ["notes"]}},
                                "stages": [{"name": "a", "fraction": 1, "mix": {"t": 1}}]}))
    cfg = corpus_config.load_config(path)
    assert cfg["sources"]["t"]["paths"] == [str(tmp_path / "notes")] and cfg["seed"] == 0
    with pytest.raises(MimoError, match="no .txt, .md or .jsonl files"):
        data.build_corpus(cfg, tmp_path / "c", show_progress=False)
    (tmp_path / "notes" / "a.txt").write_text(CLEAN[0] + "\n\nstill the same document: 2 + 2 = 4")
    lines = [json.dumps({"text": CLEAN[1]}), "", json.dumps({"text": "x = 1"})]  # blank lines are skipped
    (tmp_path / "notes" / "b.jsonl").write_text("\n".join(lines))
    cfg["sources"]["r"] = {"type": "reasoning", "problems": 100}  # enough documents for a val split
    cfg["stages"][0]["mix"] = {"r": 1}  # the text documents may all land in val: this checks reading only
    m = data.build_corpus(cfg, tmp_path / "c", show_progress=False)
    assert m["generation"]["t"] == {"documents": 3}
    (tmp_path / "notes" / "c.jsonl").write_text('{"txt": "no text field"}\n')
    with pytest.raises(MimoError, match=r"c\.jsonl:1: expected an object with a string \"text\" field"):
        data.build_corpus(cfg, tmp_path / "c", show_progress=False)


def test_data_build_text_goes_with_the_preset_config(tmp_path, capsys):
    from mimo.cli import main

    (tmp_path / "c.json").write_text(json.dumps(small_config()))
    argv = ["data", "build", "--config", str(tmp_path / "c.json"), "--text", "notes/", "--out", str(tmp_path / "o")]
    assert main(argv) == 2 and "--text adds a source to the preset's config" in capsys.readouterr().err
