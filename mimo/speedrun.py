"""`mimo speedrun`: the whole MiMo recipe on one machine, ending in a report card.

    mimo speedrun --out runs/nano                 # nano: a first run, minutes on a laptop CPU
    mimo speedrun --preset tiny --out runs/tiny   # tiny: about an hour on 2 cores

Stages: data (reasoning-dense corpus) -> pretrain (next-token + MTP) -> sft (<think> traces) -> rl (GRPO with
verifiable rewards) -> eval (held-out reasoning for base / SFT / RL, small MATH-500 and GSM8K samples, MTP
speculative decoding) -> report (RUN_DIR/report.md). Each stage is exactly a `mimo` command (the report lists
them); a finished stage is skipped on rerun and an interrupted one resumes. Under torchrun the training stages
run data-parallel and rank 0 does the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from mimo import bench
from mimo.data import corpus
from mimo.errors import MimoError
from mimo.eval import evaluate
from mimo.parallel import barrier, init_distributed, is_main, print0
from mimo.presets import PRESETS, presets_with
from mimo.timing import Load, load_average
from mimo.train import pretrain, rl, sft

STAGES = ("data", "pretrain", "sft", "rl", "eval", "report")


def stage_commands(preset: str, out: Path, seed: int) -> dict[str, list[list[str]]]:
    """Every stage as the `mimo` command lines it runs."""
    plan, s = PRESETS[preset].speedrun, str(seed)
    ev = out / "eval"
    models = {"base": (out / "base" / "final", "raw"), "sft": (out / "sft" / "final", "chat"),
              "rl": (out / "rl" / "final", "chat")}
    evals = [["eval", str(m), "--task", "reasoning", "--prompt-format", fmt, "--out", str(ev / f"{name}-reasoning"),
              "--seed", s, *plan["reasoning_eval"]] for name, (m, fmt) in models.items()]
    evals += [["eval", str(models["rl"][0]), "--task", task, "--out", str(ev / f"rl-{task}"), "--seed", s,
               *plan["bench_eval"]] for task in ("math500", "gsm8k")]
    # the engine's fastest lossless setting: compiled steps, two tokens drafted per step from int4 draft weights
    best_mtp = ["--num-draft", "2", "--draft-quantize", "int4", "--mtp"]
    decode = [["bench", "decode", str(models["rl"][0]), "--new-tokens", plan["decode_tokens"], "--compile", *flags,
               "--json"] for flags in (best_mtp, ["--no-mtp"])]
    return {
        "data": [["data", "build", "--preset", preset, "--seed", s, "--out", str(out / "data")]],
        "pretrain": [["pretrain", "--preset", preset, "--data", str(out / "data"), "--out", str(out / "base"),
                      "--seed", s, *plan["pretrain"]]],
        "sft": [["sft", "--from", str(out / "base" / "final"), "--out", str(out / "sft"), "--seed", s, *plan["sft"]]],
        "rl": [["rl", "--from", str(out / "sft" / "final"), "--out", str(out / "rl"), "--seed", s, *plan["rl"]]],
        "eval": evals + decode,
    }


DISTRIBUTED_STAGES = ("pretrain", "sft")


# the commands the stages run, as `mimo`'s table has them (mimo/cli.py; the speedrun is one of its commands)
STAGE_COMMANDS = {"data": corpus, "pretrain": pretrain, "sft": sft, "rl": rl, "eval": evaluate, "bench": bench}


def run_stage_command(argv: list[str]):
    """Parse and run one `mimo` command line of a stage in this process; errors propagate."""
    module = STAGE_COMMANDS[argv[0]]
    p = argparse.ArgumentParser(prog=f"mimo {argv[0]}")
    module.add_arguments(p)
    module.run(p.parse_args(argv[1:]))


def run_command(argv: list[str], capture: Path | None = None):
    """Run one `mimo` command in this process; with capture, its stdout goes to that file."""
    import contextlib
    import io

    if capture is None:
        run_stage_command(argv)
        return
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run_stage_command(argv)
    capture.write_text(buf.getvalue())


def run(args):
    if args.preset not in presets_with("speedrun"):
        raise MimoError(f"unknown preset {args.preset!r} for the speedrun "
                        f"(choose from {', '.join(presets_with('speedrun'))})")
    init_distributed(args.device)
    out = Path(args.out)
    state_path = out / "speedrun.json"
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    state = json.loads(state_path.read_text()) if state_path.exists() else {"preset": args.preset, "stages": {}}
    if state["preset"] != args.preset:
        raise MimoError(f"{state_path}: this run directory holds a {state['preset']} speedrun")
    commands = stage_commands(args.preset, out, args.seed)
    t_all = time.time()
    for stage in STAGES:
        if state["stages"].get(stage, {}).get("done"):
            print0(f"[speedrun] {stage}: done earlier ({state['stages'][stage]['seconds']:.0f} s), skipping")
            continue
        print0(f"[speedrun] {stage} ...")
        t0, load_before = time.time(), load_average()
        if stage == "report":
            if is_main():
                from mimo.eval.report_card import write_report_card

                write_report_card(out, state, commands)
                final = out / "final"
                if final.exists():
                    shutil.rmtree(final)
                shutil.copytree(out / "rl" / "final", final)
        elif stage in DISTRIBUTED_STAGES or is_main():
            for argv in commands[stage]:
                capture = out / "eval" / f"decode-{argv[-2].lstrip('-')}.json" if argv[0] == "bench" else None
                run_command(argv, capture)
        barrier()
        if is_main():
            load = Load(load_before, load_average(), torch.get_num_threads(), os.cpu_count() or 1)
            state["stages"][stage] = {"done": True, "seconds": time.time() - t0, "load": load.as_dict(),
                                      "commands": [" ".join(["mimo", *c]) for c in commands.get(stage, [])]}
            state_path.write_text(json.dumps(state, indent=2) + "\n")
    print0(f"[speedrun] finished in {time.time() - t_all:.0f} s: {out / 'report.md'}, model in {out / 'final'}")


def add_arguments(p):
    p.add_argument("--preset", default="nano", help="nano (default, minutes) | tiny (about an hour) | small")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
