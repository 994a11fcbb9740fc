"""Why the notes do not stick: the data of bench/personal_notes.py trained by a plain loop (AdamW, constant rate,
gradient clip 1.0, 8 rows of 256 tokens a step) with what `mimo tune` trains swapped: the LoRA update (rank 16 as
mimo tune, or --rank) with or without the LM head, or every weight but the embedding (a full fine-tune, with or
without the head); the documents as written or with their order re-drawn every epoch (--shuffle: the profile's paragraphs and
the sentences within each, the diary's lines), so that a fact is learnt keyed on what its sentence says rather than
where it sits (knowledge augmentation: Allen-Zhu & Li, Physics of Language Models 3.1); --passages reads the
documents as `mimo tune` now does (each paragraph or diary line an example of its own; with --shuffle, the
sentences within each re-ordered every epoch). Scores the held-out questions as bench/personal_notes.py does, and the facts in the notes' own
wording (the likeliest profile line after "## NAME"), every --every epochs.

    python bench/personal_notes_loop.py MODEL_DIR --work DIR [--full [--freeze-head] | --train-head] [--shuffle]
        [--passages] [--rank 16] [--lr 5e-3] [--epochs 30] [--every 15]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personal_notes import VALUES, accuracy, write_data

from mimo.inference.lora import LoRAConfig, add_lora
from mimo.model import IGNORE_INDEX
from mimo.train.sft import pack, pack_positions
from mimo.train.tune import load_base, read_data, tokenize, tuning_data


def reordered(docs: list[str], rng: random.Random) -> list[str]:
    """Each document with its order re-drawn: markdown sections ("## NAME" + one line of sentences) shuffled and the
    sentences within each; a plain text file's lines shuffled."""
    out = []
    for d in docs:
        if "## " not in d:
            lines = d.splitlines()
            rng.shuffle(lines)
            out.append("\n".join(lines))
            continue
        sections = d.split("\n\n")
        rng.shuffle(sections)
        new = []
        for section in sections:
            lines = section.split("\n")
            if len(lines) == 2 and lines[0].startswith("## "):
                sentences = [x.strip() + "." for x in lines[1].split(".") if x.strip()]
                rng.shuffle(sentences)
                section = lines[0] + "\n" + " ".join(sentences)
            new.append(section)
        out.append("\n\n".join(new))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--full", action="store_true", help="train every weight but the embedding instead of LoRA")
    p.add_argument("--freeze-head", action="store_true", help="with --full: keep the LM head frozen")
    p.add_argument("--train-head", action="store_true", help="with LoRA: train the LM head too")
    p.add_argument("--shuffle", action="store_true", help="re-draw the documents' order every epoch (with "
                   "--passages: the sentences within each passage, as mimo tune's --sentence-order shuffle)")
    p.add_argument("--passages", action="store_true", help="each passage of the documents an example of its own, as "
                   "mimo tune reads them (default: each document whole, in pieces of 256 tokens)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha 2 x rank)")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--every", type=int, default=15)
    args = p.parse_args()
    torch.manual_seed(0)
    questions = write_data(args.work, 30, 0)
    values = {k: sorted({q["answer"] for q in questions if q["attribute"] == k}) for k in VALUES}
    docs, chats = read_data(args.work / "data")
    model, tok = load_base(args.model, None)
    if args.full:
        for name, w in model.named_parameters():
            w.requires_grad = "embed" not in name and not (args.freeze_head and "lm_head" in name)
    else:
        add_lora(model, LoRAConfig(r=args.rank, alpha=2.0 * args.rank, dropout=0.05), seed=0)
        model.lm_head.weight.requires_grad = args.train_head
    params = [w for w in model.parameters() if w.requires_grad]
    print(f"trainable parameters: {sum(w.numel() for w in params):,}", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng, t0 = random.Random(0), time.time()
    if args.passages:  # as mimo tune reads them: every epoch's copy, sentences re-ordered unless --shuffle is off
        epoch_examples, _, _ = tuning_data(tok, docs, chats, 256, 0.0, 0, args.shuffle)
    for epoch in range(1, args.epochs + 1):
        if args.passages:
            examples = epoch_examples(epoch - 1)
        else:
            # each document whole, in pieces of 256 tokens, as mimo tune read them before passages
            examples = tokenize(tok, reordered(docs, rng) if args.shuffle else docs, chats, 256)[0]
        rng.shuffle(examples)
        inputs, targets = pack(examples, 256, tok.eos_token_id)
        positions = pack_positions(examples, 256) if args.passages else None  # each passage attends to itself
        order, total, steps = torch.randperm(len(inputs)), 0.0, 0
        model.train()
        for i in range(0, len(inputs), 8):
            rows = order[i: i + 8]
            logits = model(inputs[rows], positions=None if positions is None else positions[rows]).logits  # [8, 256, V]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets[rows].flatten(),
                                                     ignore_index=IGNORE_INDEX)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            total, steps = total + loss.item(), steps + 1
        if epoch % args.every == 0 or epoch == args.epochs:
            scores = accuracy(model.eval(), tok, questions, values)
            recall = accuracy(model, tok, questions, values, notes_wording=True)
            print(f"epoch {epoch}: loss {total / steps:.3f}, accuracy {scores}, in the notes' wording {recall}, "
                  f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
