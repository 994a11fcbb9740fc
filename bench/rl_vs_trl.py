"""RL against a peer: `mimo rl` and TRL's GRPOTrainer from the same SFT model, on the same procedural problems with
the same reward, for the same wall-clock time; then the held-out reasoning accuracy of each (`mimo eval --task
reasoning`, 200 problems x 4 samples, 95% intervals) and each one's rollout throughput (generated tokens/s).

    bench/.venv/bin/python bench/rl_vs_trl.py SFT_DIR --work DIR [--minutes 20] [--arms mimo,trl,eval]

The settings are mimo rl's defaults on both sides: 16 prompts x 8 samples a step at temperature 1.0, at most 256
new tokens, four optimizer steps of 32 sequences, token-level loss (TRL's "dapo"), clip-higher 0.2 / 0.28, no KL,
advantages scaled by the group's std, AdamW lr 2e-5 constant, weight decay 0.01, grad clip 1.0, fp32, 2 threads.
Problems: mimo rl's own 2,000 train problems (rewards.load_problems, every procedural task, seed 0), each the
chat-rendered prompt SFT trained on; TRL gets the rendered text as a plain prompt (the bench checks that its
tokenizer reads it as the same ids). Reward: rewards.grade, 1.0 when the task's verifier gives full credit.
mimo rl's pass-rate filter is off (`--filter-samples 0`: it is an offline data step, and TRL has none) unless
--curation gives the verdicts of one made before from the same SFT model (mimo rl's default recipe, without
spending the filter's time again); its loading is not counted either: `--max-minutes` counts its training steps
only; TRL's budget starts at its first step.

Each side decodes as it does by default: mimo's continuous-batching engine with FIFO early termination, dynamic
sampling and the easy pool; TRL's transformers `generate` on the whole generation batch (128 sequences). TRL runs
in its own process, torch imported before mimo (so OpenMP keeps its default wait policy there; mimo's commands set
PASSIVE). Rollout throughput: mimo, the metrics' tokens_generated over rollout_s (rollout_s includes waiting for
rewards); TRL, the completion tokens up to and including EOS over the time spent in generate.

Writes DIR/results.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2


def mimo(*argv):
    subprocess.run([sys.executable, "-m", "mimo.cli", *map(str, argv)], check=True, cwd=ROOT)


def run_mimo(sft: Path, out: Path, minutes: float, seed: int, curation: Path | None = None) -> dict:
    """mimo rl for `minutes` of training steps. curation: a curation.json of mimo rl's pass-rate filter from the
    same SFT model and settings (e.g. the speedrun's rl/curation.json): the run keeps the problems it kept
    (mimo rl's default recipe; its verdicts are reused, so the filter's time is not spent again); None: no filter."""
    filter_samples = 0
    if curation is not None:
        out.mkdir(parents=True, exist_ok=True)
        made = json.loads(curation.read_text())
        (out / "curation.json").write_text(json.dumps(made, indent=1) + "\n")
        filter_samples = made["settings"]["filter_samples"]
    mimo("rl", "--from", sft, "--out", out, "--max-steps", 100_000, "--max-minutes", minutes, "--save-every", 1_000,
         "--filter-samples", filter_samples, "--seed", seed)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens, seconds = sum(r["tokens_generated"] for r in rows), sum(r["rollout_s"] for r in rows)
    curated = json.loads((out / "run_config.json").read_text())["curation"]
    return {"curation": curated, "steps": rows[-1]["step"], "train_s": round(sum(r["step_s"] for r in rows), 1),
            "rollout_s": round(seconds, 1), "tokens_generated": tokens, "rollout_tokens_per_s": round(tokens / seconds, 1),
            "sequences": sum(r["rollouts_finished"] for r in rows), "final_reward_mean": rows[-1]["reward_mean"]}


def run_trl(sft: Path, out: Path, minutes: float, seed: int, curation: Path | None = None) -> dict:
    """TRL's arm; runs in a child process (see trl_main). curation: train on the problems it kept, as mimo's arm."""
    subprocess.run([sys.executable, __file__, "--trl-child", str(sft), "--work", str(out), "--minutes", str(minutes),
                    "--seed", str(seed), *(["--curation", str(curation)] if curation else [])], check=True, cwd=ROOT)
    return json.loads((out / "trl_stats.json").read_text())


def trl_main(sft: Path, out: Path, minutes: float, seed: int, curation: Path | None = None):
    import torch  # before mimo: OpenMP keeps its default wait policy in TRL's process
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(ROOT))
    from mimo.tokenizer import Tokenizer
    from mimo.train import rewards
    from mimo.train.rl_config import RLConfig

    torch.set_num_threads(THREADS)
    cfg = RLConfig()
    problems = rewards.load_problems(cfg.tasks, cfg.num_problems, None, None, seed)
    if curation is not None:
        verdicts = json.loads(curation.read_text())["verdicts"]
        problems = [p for p in problems if verdicts[p.id] == "kept"]
    by_id = {p.id: p for p in problems}
    ours, hf = Tokenizer.load(sft), AutoTokenizer.from_pretrained(sft)
    texts = [ours.apply_chat_template([{"role": "user", "content": p.prompt}]) for p in problems]
    for text in texts[:50]:
        if hf(text, add_special_tokens=False)["input_ids"] != ours.encode(text):
            raise SystemExit(f"transformers' tokenizer reads the prompt differently from mimo's: {text!r}")
    data = Dataset.from_dict({"prompt": texts, "problem_id": [p.id for p in problems]})

    def reward(prompts, completions, problem_id, **_):
        return [rewards.grade(by_id[i], c).score for i, c in zip(problem_id, completions)]

    args = GRPOConfig(
        output_dir=str(out / "trainer"), use_cpu=True, bf16=False, seed=seed, data_seed=seed,
        num_generations=cfg.group_size, per_device_train_batch_size=cfg.mini_batch, gradient_accumulation_steps=1,
        steps_per_generation=cfg.batch_prompts * cfg.group_size // cfg.mini_batch, num_iterations=cfg.epochs,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, top_k=0,
        beta=cfg.kl_coef, epsilon=cfg.eps_low, epsilon_high=cfg.eps_high, loss_type="dapo", scale_rewards="group",
        learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.beta1, adam_beta2=cfg.beta2, max_grad_norm=cfg.grad_clip, max_steps=100_000,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0, disable_dropout=True)
    model = AutoModelForCausalLM.from_pretrained(sft, trust_remote_code=True, dtype=torch.float32)
    gen = {"seconds": 0.0, "tokens": 0, "sequences": 0, "calls": 0}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, *a, **kw):
            t0 = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*a, **kw)
            gen["seconds"] += time.perf_counter() - t0
            gen["tokens"] += sum(len(c) for c in completion_ids)  # through the first EOS
            gen["sequences"] += len(completion_ids)
            gen["calls"] += 1
            return completion_ids, logprobs

    class Budget(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **_):
            if time.perf_counter() - self.t0 >= 60 * minutes:
                control.should_training_stop = True
                self.seconds = time.perf_counter() - self.t0

    budget = Budget()
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=data,
                               processing_class=hf, callbacks=[budget])
    trainer.train()
    final = out / "final"
    trainer.save_model(str(final))
    hf.save_pretrained(str(final))
    ours.save(final)  # mimo's tokenizer files (the same vocabulary and template) for `mimo eval`
    logs = [r for r in trainer.state.log_history if "reward" in r]
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    stats = {"optimizer_steps": trainer.state.global_step, "steps": gen["calls"],
             "train_s": round(budget.seconds, 1), "rollout_s": round(gen["seconds"], 1),
             "tokens_generated": gen["tokens"], "rollout_tokens_per_s": round(gen["tokens"] / gen["seconds"], 1),
             "sequences": gen["sequences"], "final_reward_mean": logs[-1]["reward"] if logs else None}
    (out / "trl_stats.json").write_text(json.dumps(stats, indent=2))


def evaluate(model: Path, out: Path, limit: int, samples: int, seed: int) -> dict:
    if not (out / "summary.json").exists():
        mimo("eval", model, "--task", "reasoning", "--prompt-format", "chat", "--limit", limit, "--samples", samples,
             "--max-new-tokens", 256, "--seed", seed, "--out", out)
    return json.loads((out / "summary.json").read_text())


def per_problem(out: Path) -> dict[str, float]:
    from mimo.eval.evaluate import read_samples

    by: dict[str, list[bool]] = {}
    for r in read_samples(out / "samples.jsonl"):
        by.setdefault(r["id"], []).append(r["correct"])
    return {k: sum(v) / len(v) for k, v in by.items()}


def gain(base: Path, trained: Path) -> dict:
    """Accuracy difference trained - base with a 95% bootstrap interval over problems (paired)."""
    from mimo.eval.metrics import estimate

    a, b = per_problem(base), per_problem(trained)
    return estimate([b[k] - a[k] for k in a])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sft", type=Path, metavar="SFT_DIR")
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--minutes", type=float, default=20.0, help="each side's training wall-clock budget")
    ap.add_argument("--arms", default="mimo,trl,eval", help="which parts to run (finished ones are kept)")
    ap.add_argument("--curation", type=Path, default=None, metavar="CURATION_JSON",
                    help="mimo rl with its pass-rate filter, reusing these verdicts (mimo rl's curation.json from "
                    "the same SFT model); default: the filter off")
    ap.add_argument("--curate-trl", action="store_true", help="TRL trains on the problems --curation kept, too "
                    "(default: all of them, as TRL has no such filter)")
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_child:
        return trl_main(args.sft, args.work, args.minutes, args.seed, args.curation)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["settings"] = {"sft": str(args.sft), "minutes": args.minutes, "seed": args.seed, "threads": THREADS,
                           "curation": str(args.curation) if args.curation else None, "curate_trl": args.curate_trl}
    arms = args.arms.split(",")
    if "mimo" in arms and "mimo" not in results:
        results["mimo"] = run_mimo(args.sft, args.work / "mimo", args.minutes, args.seed, args.curation)
        results_path.write_text(json.dumps(results, indent=2))
    if "trl" in arms and "trl" not in results:
        results["trl"] = run_trl(args.sft, args.work / "trl", args.minutes, args.seed,
                                 args.curation if args.curate_trl else None)
        results_path.write_text(json.dumps(results, indent=2))
    if "eval" in arms:
        ev = args.work / "eval"
        models = {"sft": args.sft, "mimo": args.work / "mimo" / "final", "trl": args.work / "trl" / "final"}
        for name, model in models.items():
            if model.exists():
                summary = evaluate(model, ev / name, args.eval_limit, args.eval_samples, args.seed)
                results.setdefault("eval", {})[name] = summary["metrics"][f"avg@{args.eval_samples}"]
        for name in ("mimo", "trl"):
            if (ev / name / "samples.jsonl").exists():
                results.setdefault("gain", {})[name] = gain(ev / "sft", ev / name)
        results_path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"\n| | steps (rollout batches) | training s | rollout tokens/s | held-out avg@{args.eval_samples} | "
          "gain over SFT |")
    print("|---|---|---|---|---|---|")
    for name in ("mimo", "trl"):
        r, e, g = results.get(name, {}), results.get("eval", {}).get(name), results.get("gain", {}).get(name)
        cell = (lambda m: f"{100 * m['value']:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]" if m else "")
        print(f"| {name} | {r.get('steps', '')} | {r.get('train_s', '')} | {r.get('rollout_tokens_per_s', '')} | "
              f"{cell(e)} | {cell(g)} |")
    if "sft" in results.get("eval", {}):
        m = results["eval"]["sft"]
        print(f"\nSFT: {100 * m['value']:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]")


if __name__ == "__main__":
    main()
