"""The three experiments of docs/experiments.md, on top of a finished `mimo speedrun --preset tiny`.

    .venv/bin/python bench/experiments.py --speedrun runs/speedrun-tiny --out runs/experiments

(1) MTP vs no MTP at equal tokens: the speedrun's base model against the same pretraining with --mtp-layers 0.
(2) Reasoning-dense traces vs answer-only data of the same problems: the speedrun's corpus against the same
    corpus config with every problem rendered as question + answer only (same problems, same seed, same
    token budget, so answer-only problems repeat more often), each pretrained like the speedrun's base.
(3) "Above its weight": the recipe's tiny model against a model >= 4x larger (the depth-12 shape of the same
    dial) trained with next-token prediction alone on the answer-only corpus, for the same training FLOPs.

Every arm is a plain `mimo` command (printed as it runs); finished arms are skipped on rerun. Accuracy is on
the 200 held-out `reasoning` problems, 4 samples each (temperature 0.6), with 95% bootstrap intervals.
Base models are prompted raw; experiments (2) and (3) use the `question` prompt (question only, no
"Solution:" cue) for every model, since answer-only models never saw that cue.
"""

import argparse
import json
import shlex
from pathlib import Path

import mimo.bench

# every module the arms use, imported before the first long job (edits made while it runs cannot mix in)
import mimo.eval.backends
import mimo.eval.evaluate  # noqa: F401
from mimo.cli import dispatch
from mimo.config import MiMoConfig, config_for_depth
from mimo.eval.report import metric_cell
from mimo.eval.tasks import all_tasks

all_tasks()

BIG_DEPTH = 12
EVAL = ["--task", "reasoning", "--limit", "200", "--samples", "4", "--seed", "0"]


def run(argv: list[str]):
    print("$ mimo " + shlex.join(argv), flush=True)
    dispatch(argv)


def train_flops_per_token(cfg: MiMoConfig, seq_len: int) -> float:
    """6 x (matmul weights a token passes through, MTP layers and their LM-head pass included)
    + 12 x layers x hidden x seq_len for attention scores (forward + backward)."""
    H, F, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = H * D * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)  # q, o, k, v
    block = attn + 3 * H * F
    head = H * cfg.vocab_size
    mtp = cfg.num_nextn_predict_layers * (2 * H * H + block + head)
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    return 6 * (cfg.num_hidden_layers * block + head + mtp) + 12 * layers * H * seq_len


def last_metrics(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = next(r for r in reversed(rows) if r.get("val_loss") is not None)
    return {"steps": rows[-1]["step"], "tokens": rows[-1]["tokens"], "val_loss": val["val_loss"],
            "val_mtp_top1": val.get("val_mtp_top1")}


def evaluate(model: Path, out: Path, fmt: str) -> dict:
    if not (out / "summary.json").exists():
        run(["eval", str(model), "--prompt-format", fmt, "--out", str(out), *EVAL])
    return json.loads((out / "summary.json").read_text())


def decode(model: Path, out: Path, mtp: bool) -> dict:
    path = out / f"decode-{'mtp' if mtp else 'no-mtp'}.json"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            run(["bench", "decode", str(model), "--new-tokens", "128", "--mtp" if mtp else "--no-mtp", "--json"])
        path.write_text(buf.getvalue().strip().splitlines()[-1] + "\n")
    return json.loads(path.read_text())


def pretrain(out: Path, data: Path, *extra: str) -> Path:
    if not (out / "final" / "config.json").exists():
        run(["pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out), "--seed", "0", *extra])
    return out / "final"


def accuracy(summary: dict) -> str:
    """avg@k: mean accuracy over the k samples of every problem."""
    metrics = summary["metrics"]
    name = next((k for k in metrics if k.startswith("avg@")), next(iter(metrics), None))
    return metric_cell(metrics[name]) if name else "n/a"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--speedrun", default="runs/speedrun-tiny", help="a finished tiny speedrun")
    ap.add_argument("--out", default="runs/experiments")
    args = ap.parse_args()
    sr, out = Path(args.speedrun), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, base = sr / "data", sr / "base" / "final"
    tiny_cfg = MiMoConfig.load(base / "config.json")
    results = {}

    # (1) MTP vs no MTP, same corpus, same steps and tokens
    no_mtp = pretrain(out / "no-mtp", data, "--mtp-layers", "0")
    results["1"] = {
        "mtp": {**last_metrics(sr / "base"), "eval": evaluate(base, out / "eval" / "mtp-raw", "raw"),
                "decode_plain": decode(base, out / "mtp", False), "decode_mtp": decode(base, out / "mtp", True)},
        "no_mtp": {**last_metrics(out / "no-mtp"), "eval": evaluate(no_mtp, out / "eval" / "no-mtp-raw", "raw"),
                   "decode_plain": decode(no_mtp, out / "no-mtp", False)},
    }

    # (2) traces vs answer-only data of the same problems
    answer_data = out / "data-answer-only"
    if not (answer_data / "manifest.json").exists():
        cfg = json.loads((data / "manifest.json").read_text())["config"]
        for src in cfg["sources"].values():
            if src.get("type") == "reasoning":
                src["formats"] = ["answer_only"]
        (out / "answer-only-corpus.json").write_text(json.dumps(cfg, indent=2) + "\n")
        run(["data", "build", "--config", str(out / "answer-only-corpus.json"), "--out", str(answer_data)])
    answer_only = pretrain(out / "answer-only", answer_data)
    results["2"] = {
        "traces": {**last_metrics(sr / "base"), "eval": evaluate(base, out / "eval" / "traces-question", "question")},
        "answer_only": {**last_metrics(out / "answer-only"),
                        "eval": evaluate(answer_only, out / "eval" / "answer-only-question", "question")},
    }

    # (3) the recipe's tiny model vs a >= 4x larger next-token-only model on answer-only data, equal FLOPs
    big_cfg = config_for_depth(BIG_DEPTH, tiny_cfg.vocab_size, num_mtp=0)
    seq = 256
    tiny_steps = last_metrics(sr / "base")["steps"]
    ratio = train_flops_per_token(tiny_cfg, seq) / train_flops_per_token(big_cfg, seq)
    big_steps = round(tiny_steps * ratio)
    big = pretrain(out / "big-ntp-answer-only", answer_data, "--depth", str(BIG_DEPTH), "--mtp-layers", "0",
                   "--max-steps", str(big_steps), "--lr", "1e-3")
    from mimo.checkpoint import load_model

    sizes = {name: load_model(path).num_params()["total"] for name, path in (("tiny", base), ("big", big))}
    results["3"] = {
        "flops_per_token": {"tiny": train_flops_per_token(tiny_cfg, seq), "big": train_flops_per_token(big_cfg, seq)},
        "params": sizes, "steps": {"tiny": tiny_steps, "big": big_steps},
        "tiny_base": results["2"]["traces"],
        "tiny_rl": json.loads((sr / "eval" / "rl-reasoning" / "summary.json").read_text()),
        "big": {**last_metrics(out / "big-ntp-answer-only"),
                "eval": evaluate(big, out / "eval" / "big-question", "question")},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_tables(results)


def print_tables(r: dict):
    one = r["1"]
    print("\n(1) MTP vs no MTP (same corpus, same steps and tokens)\n")
    print("| model | tokens | val loss (next token) | held-out accuracy % (raw prompt) | decode tokens/s | with MTP |")
    print("|---|---|---|---|---|---|")
    m, n = one["mtp"], one["no_mtp"]
    print(f"| MTP (speedrun base) | {m['tokens']:,} | {m['val_loss']:.3f} | {accuracy(m['eval'])} | "
          f"{m['decode_plain']['decode_tokens_per_s']:.1f} | {m['decode_mtp']['decode_tokens_per_s']:.1f} "
          f"(acceptance {m['decode_mtp'].get('acceptance_rate') or 0:.2f}) |")
    print(f"| no MTP | {n['tokens']:,} | {n['val_loss']:.3f} | {accuracy(n['eval'])} | "
          f"{n['decode_plain']['decode_tokens_per_s']:.1f} | n/a |")
    two = r["2"]
    print("\n(2) traces vs answer-only data of the same problems (question prompt)\n")
    print("| corpus | tokens trained | held-out accuracy % |")
    print("|---|---|---|")
    for name, arm in (("traces (the recipe's mix)", two["traces"]), ("answer-only", two["answer_only"])):
        print(f"| {name} | {arm['tokens']:,} | {accuracy(arm['eval'])} |")
    three = r["3"]
    print("\n(3) above its weight: equal training FLOPs\n")
    print("| model | parameters | training FLOPs/token | steps | held-out accuracy % |")
    print("|---|---|---|---|---|")
    f, p, s = three["flops_per_token"], three["params"], three["steps"]
    print(f"| tiny, recipe base (MTP, traces), question prompt | {p['tiny']:,} | {f['tiny'] / 1e6:.1f}M | {s['tiny']} | "
          f"{accuracy(three['tiny_base']['eval'])} |")
    print(f"| tiny, recipe after SFT + RL, chat | {p['tiny']:,} | | | {accuracy(three['tiny_rl'])} |")
    print(f"| depth {BIG_DEPTH}, next-token only, answer-only | {p['big']:,} | {f['big'] / 1e6:.1f}M | {s['big']} | "
          f"{accuracy(three['big']['eval'])} |")


if __name__ == "__main__":
    main()
