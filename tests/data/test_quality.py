"""The quality stages of a corpus build, called directly: each document is dropped by the first stage that
catches it (empty, exact duplicate, near duplicate, contamination, density), counted per stage and per source."""

from mimo.benchmarks import load_benchmark
from mimo.data import quality, reasoning

PROSE = ("The old lighthouse keeper walked along the shore every morning, watching the gulls circle above the "
         "grey water while the fishing boats slowly returned to the harbour with their nets.")


def traces(seed: int, n: int) -> str:
    """n procedural problems with their step-by-step solutions, as one document."""
    return "\n\n".join(reasoning.render_pretrain(p) for p in reasoning.generate(["chain_sum"], n, "train", seed))


def test_each_document_is_dropped_by_the_first_stage_that_catches_it():
    dense = traces(1, 1)
    long_doc = traces(2, 8)
    changed = long_doc.replace("Solution:", "Working:", 1)  # one word of a long document: a near duplicate
    benchmark = "Question: " + load_benchmark("math500")[0]["problem"] + "\nAnswer: 5"
    texts = [dense, dense, "   ", long_doc, changed, benchmark, PROSE]
    labels = ["gen", "gen", "notes", "notes", "notes", "notes", "notes"]
    kept, counts, scores = quality.filter_documents(texts, labels, near_dup_threshold=0.8, benchmarks=["math500"])
    assert kept.tolist() == [True, False, False, True, False, False, False]
    assert {k: counts[k] for k in ("empty", "exact_dup", "near_dup", "density")} == \
        {"empty": 1, "exact_dup": 1, "near_dup": 1, "density": 1}
    assert counts["contamination"] == {"math500": 1, "eval_split": 0}
    assert counts["by_source"] == {"gen": {"exact_dup": 1, "near_dup": 0, "contamination": 0, "density": 0},
                                   "notes": {"exact_dup": 0, "near_dup": 1, "contamination": 1, "density": 1}}
    assert scores[0] >= 0.5 and scores[3] >= 0.5 and scores[6] < 0.15  # scored where the density stage is reached
    assert scores[1] == scores[2] == scores[4] == scores[5] == 0


def test_procedural_documents_skip_near_dedup_but_not_exact_dedup():
    long_doc = traces(3, 8)
    texts = [long_doc, long_doc.replace("Solution:", "Working:", 1), long_doc]
    kept, counts, _ = quality.filter_documents(texts, ["gen"] * 3, near_dup_threshold=0.8, procedural=[True] * 3)
    assert kept.tolist() == [True, True, False] and counts["near_dup"] == 0 and counts["exact_dup"] == 1
    kept, counts, _ = quality.filter_documents(texts, ["gen"] * 3, near_dup_threshold=0.8)
    assert kept.tolist() == [True, False, False] and counts["near_dup"] == 1


def test_eval_split_questions_are_matched_whole_and_near_dedup_can_be_off():
    question = reasoning.eval_problems(1, ["chain_sum"])[0].question
    texts = [f"Question: {question}\nAnswer: 1", traces(4, 2)]
    kept, counts, _ = quality.filter_documents(texts, ["gen", "gen"], near_dup_threshold=None,
                                               eval_questions={question})
    assert kept.tolist() == [False, True] and counts["contamination"]["eval_split"] == 1
    assert counts["near_dup"] == 0
