"""Does document masking matter at these sizes? Pretraining and SFT on the nano preset, each way, same seed.

    python bench/document_masking.py RUN_DIR OUT_DIR [--pretrain-steps 150] [--sft-steps 60] [--problems 3000]

RUN_DIR: a nano speedrun (its data/ corpus and base/final model). Four runs, each the plain `mimo` command:
  pretrain  `mimo pretrain --preset nano --data RUN_DIR/data`, positions restarting after every end-of-text
            token so attention stays within a document (loader.document_positions; mimo's default since this
            measurement) against `--no-document-masking`: rows as windows of the token stream, documents running
            into each other;
  sft       `mimo sft --from RUN_DIR/base/final`, packed examples each attending to itself (mimo's default)
            against rows that attend across examples.
For every run: the final validation loss both ways (the same rows read with and without document masks), the
MTP top-1 accuracy on token t+2, training tokens/s (median over logged steps), and for SFT the held-out
reasoning accuracy (`mimo eval MODEL --task reasoning --limit 48 --samples 1 --max-new-tokens 96`, as the
speedrun). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from mimo.checkpoint import load_model
from mimo.cli import dispatch
from mimo.data import loader
from mimo.data.loader import PackedTokens
from mimo.tokenizer import Tokenizer
from mimo.train import loop


@torch.no_grad()
def val_losses(model_dir: Path, rows) -> dict:
    """Next-token loss over rows [(x, y, positions)], read as one sequence per row and as documents."""
    model = load_model(model_dir).eval()
    out = {}
    for name, masked in (("val_loss_plain", False), ("val_loss_documents", True)):
        losses = [model(x, y, positions=p if masked else None).ntp_loss for x, y, p in rows]
        out[name] = float(torch.stack(losses).mean())
    return out


def metrics(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = next(r for r in reversed(rows) if r.get("val_loss") is not None)
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r),
            "val_mtp_top1": val.get("val_mtp_top1")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--problems", type=int, default=3000)
    args = p.parse_args()
    data, base = args.run_dir / "data", args.run_dir / "base" / "final"
    eos = Tokenizer.load(base).eos_token_id
    plain_unpack = loop.unpack_batch
    results = {}
    val_rows = list(loader.eval_batches(PackedTokens(data, "val"), 256, 8, 4, eos=eos))
    for arm, flags in (("windows", ["--no-document-masking"]), ("documents", [])):
        run = args.out / f"pretrain-{arm}"
        dispatch(["pretrain", "--preset", "nano", "--data", str(data), "--out", str(run), "--seed", "0",
                  "--max-steps", str(args.pretrain_steps), *flags])
        results[f"pretrain, {arm}"] = {**metrics(run), **val_losses(run / "final", val_rows)}

    from mimo.train.sft import pack, pack_positions, procedural_examples, tokenize_example

    tokenizer = Tokenizer.load(base)
    examples = [tokenize_example(tokenizer, ex) for ex in procedural_examples(64, seed=12345)]
    sft_val = (*pack(examples, 256, eos), pack_positions(examples, 256))
    sft_rows = [tuple(t[i: i + 8] for t in sft_val) for i in range(0, len(sft_val[0]), 8)]
    for arm, documents in (("examples", True), ("across", False)):
        loop.unpack_batch = plain_unpack if documents else (lambda batch: (batch[0], batch[1], None))
        run = args.out / f"sft-{arm}"
        dispatch(["sft", "--from", str(base), "--out", str(run), "--seed", "0", "--max-steps", str(args.sft_steps),
                  "--problems", str(args.problems)])
        loop.unpack_batch = plain_unpack
        ev = args.out / f"eval-sft-{arm}"
        dispatch(["eval", str(run / "final"), "--task", "reasoning", "--prompt-format", "chat", "--out", str(ev),
                  "--seed", "0", "--limit", "48", "--samples", "1", "--max-new-tokens", "96"])
        summary = json.loads((ev / "summary.json").read_text())
        results[f"sft, {arm}"] = {**metrics(run), **val_losses(run / "final", sft_rows),
                                  "held_out": next(iter(summary["metrics"].values()))["value"]}

    print("| run | val loss (rows as sequences) | val loss (as documents) | MTP top-1 | held-out % | tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        held = f"{100 * r['held_out']:.1f}" if "held_out" in r else ""
        mtp = f"{100 * r['val_mtp_top1']:.1f}%" if r.get("val_mtp_top1") is not None else ""
        print(f"| {name} | {r['val_loss_plain']:.4f} | {r['val_loss_documents']:.4f} | {mtp} | {held} | "
              f"{r['tokens_per_s']:.0f} |")
    (args.out / "document_masking.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
