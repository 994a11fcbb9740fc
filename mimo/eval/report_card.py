"""The speedrun's report card (RUN_DIR/report.md), in the spirit of nanochat's: the environment, time per
stage, the data, the curves, MTP, accuracies with intervals, and the command behind every figure. Every
number is read from the files the stages wrote; nothing here is typed in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections import Counter
from pathlib import Path

from mimo import __version__
from mimo.eval.report import metric_cell
from mimo.timing import speedup_contradiction


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _last_json_line(path: Path):
    try:
        return json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, json.JSONDecodeError, IndexError):
        return None


def _metrics(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def environment() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": ", ".join(gpus) or "none", "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "mimo": __version__, "git_commit": commit,
            "python": platform.python_version()}


def _eval_rows(out: Path) -> list[tuple[str, dict]]:
    rows = []
    for name in ("base", "sft", "rl"):
        summary = _json(out / "eval" / f"{name}-reasoning" / "summary.json")
        if summary:
            rows.append((name, summary))
    return rows


def _cut(summary: dict) -> str:
    """'3 of 48 at 96 tokens': samples that stopped at the eval's length limit (finish reason `length`)."""
    limit = summary["settings"].get("effective_max_new_tokens")
    return f"{summary.get('truncated', 0)} of {summary['samples']}" + (f" at {limit:,} tokens" if limit else "")


def _flag(name: str, value) -> str:
    return f" {name} {value}" if value else ""


def _load_cell(load: dict | None) -> str:
    """'0.4-2.1', with ' busy' when another job held a core."""
    loads = [x for x in (load.get("before"), load.get("after")) if x is not None] if load else []
    if not loads:
        return ""
    return f"{min(loads):.1f}-{max(loads):.1f}" + (" busy" if load.get("busy") else "")


def _tokens_per_s(r: dict) -> str:
    """'433.9 (412.0-440.1)': the median of the timed runs and their range."""
    if r.get("repeats", 1) > 1 and "decode_tokens_per_s_min" in r:
        return f"{r['decode_tokens_per_s']:.1f} ({r['decode_tokens_per_s_min']:.1f}-{r['decode_tokens_per_s_max']:.1f})"
    return f"{r['decode_tokens_per_s']:.1f}"


def _curation_line(path: Path) -> list[str]:
    """The RL problems' curation (`mimo rl`'s curation.json): how many were kept and why the others were dropped."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    counts = Counter(v.split(":")[0] for v in data.get("verdicts", {}).values())
    total = sum(counts.values())
    kept = counts.pop("kept", 0)
    samples = data.get("settings", {}).get("filter_samples", 0)
    why = {"never_solved": f"never solved in {samples} samples", "always_solved": f"solved in all {samples}",
           "contaminated": "overlapping a benchmark"}
    dropped = ", ".join(f"{n:,} {why.get(reason, reason)}" for reason, n in sorted(counts.items()))
    return [f"RL problems (curation.json, {data.get('seconds', 0):.0f} s): {kept:,} of {total:,} kept"
            + (f"; dropped {dropped}" if dropped else "") + "."]


def _mtp_section(mtp: dict, plain: dict) -> list[str]:
    """Decode speed with and without MTP; a speed-up the tokens per verify step rule out is flagged, not given."""
    acc, per_step = mtp.get("acceptance_rate"), mtp.get("mean_accepted_length") or 0
    command = (f"`mimo bench decode MODEL{' --compile' if mtp.get('compile') else ''} --num-draft "
               f"{mtp.get('num_draft')}{_flag('--draft-quantize', mtp.get('draft_quantize'))} --mtp` against "
               "`--no-mtp`; random prompts, greedy, batch 1")
    lines = ["## MTP speculative decoding", "",
             f"Decode tokens/s: the median of {mtp.get('repeats', 1)} timed runs (their range).", "",
             "| | decode tokens/s | acceptance |", "|---|---|---|",
             f"| without MTP | {_tokens_per_s(plain)} | |",
             f"| with MTP | {_tokens_per_s(mtp)} | {'n/a' if acc is None else f'{acc:.2f}'} |", ""]
    speedup = mtp["decode_tokens_per_s"] / plain["decode_tokens_per_s"] if plain["decode_tokens_per_s"] else 0.0
    contradiction = speedup_contradiction(speedup, per_step)
    if contradiction:
        lines.append(f"**Flagged, not a result:** {contradiction} ({per_step:.2f} tokens per verify step; {command}). "
                     "Rerun both on a quiet machine.")
    else:
        lines.append(f"Speed-up {speedup:.2f}x, {per_step:.2f} tokens per verify step ({command}).")
    notes = [f"{name}: {flag}" for name, r in (("without MTP", plain), ("with MTP", mtp)) for flag in r.get("flags", [])]
    if notes:
        lines += ["", "Flagged timings:", "", *[f"- {n}" for n in notes]]
    return lines + [""]


def write_report_card(out: Path, state: dict, commands: dict):
    out = Path(out)
    env = environment()
    lines = [f"# mimo speedrun report card: {state['preset']}", "",
             "Every figure below is read from the files this run wrote; the command that made it is listed.", "",
             "## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]

    lines += ["", "## Time per stage", "", ("One run each; the machine's 1-minute load average at the stage's start "
              "and end (busy: another job held a core, so the stage ran slower than it can)."), "",
              "| stage | seconds | load | commands |", "|---|---|---|---|"]
    total = 0.0
    for stage, info in state["stages"].items():
        total += info["seconds"]
        cmds = "<br>".join(f"`{c}`" for c in info.get("commands", []))
        lines.append(f"| {stage} | {info['seconds']:.0f} | {_load_cell(info.get('load'))} | {cmds} |")
    lines.append(f"| total | {total:.0f} | | |")

    manifest = _json(out / "data" / "manifest.json")
    if manifest:
        train = manifest["splits"]["train"]
        lines += ["", "## Data", "", (f"{train['tokens']:,} training tokens, {manifest['splits']['val']['tokens']:,} "
                  "validation tokens (`mimo data build`)."), "", "| stage | tokens | documents |", "|---|---|---|"]
        lines += [f"| {st['name']} | {st['tokens']:,} | {st.get('documents', '')} |" for st in train.get("stages", [])]
        filters = manifest.get("filters", {})
        if filters:
            lines += ["", "Documents dropped by each filter: " + ", ".join(
                f"{k} {v if not isinstance(v, dict) else sum(x for x in v.values() if isinstance(x, int))}"
                for k, v in filters.items() if k != "by_source") + "."]

    lines += ["", "## Training curves", ""]
    for name, png, title in (("base", "loss.png", "pretraining"), ("sft", "loss.png", "SFT"), ("rl", "rl.png", "RL")):
        rows = _metrics(out / name / "metrics.jsonl")
        if (out / name / png).exists():
            lines += [f"### {title}", "", f"![{title}]({name}/{png})", ""]
        if rows and name != "rl":
            last = rows[-1]
            val = next((r for r in reversed(rows) if r.get("val_loss") is not None), {})
            lines.append(f"Final training loss {last['loss']:.3f} (next-token {last['ntp_loss']:.3f}"
                         + (f", MTP {last['mtp_loss']:.3f}" if last.get("mtp_loss") is not None else "")
                         + f") after {last['step']} steps / {last['tokens']:,} tokens; validation loss "
                         + (f"{val['val_loss']:.3f}" if val else "n/a")
                         + (f", MTP top-1 accuracy on token t+2 {100 * val['val_mtp_top1']:.1f}%"
                            if val.get("val_mtp_top1") is not None else "") + ".")
            lines.append("")
        elif rows:
            first, last = rows[0], rows[-1]
            keys = [k for k in ("reward_mean", "pass_rate", "response_length", "mtp_acceptance")
                    if isinstance(first.get(k), (int, float)) and isinstance(last.get(k), (int, float))]
            lines.append("RL: " + ", ".join(f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in keys)
                         + f" over {last.get('step', len(rows))} steps.")
            lines += [*_curation_line(out / "rl" / "curation.json"), ""]

    mtp, plain = _last_json_line(out / "eval" / "decode-mtp.json"), _last_json_line(out / "eval" / "decode-no-mtp.json")
    if mtp and plain:
        lines += _mtp_section(mtp, plain)

    evals = _eval_rows(out)
    if evals:
        metric_names = list(evals[0][1]["metrics"])
        lines += ["## Held-out procedural reasoning", "",
                  ("Evaluation seeds are reserved and never generated for training. Accuracy in %, 95% bootstrap "
                  "interval over problems; cut: samples that stopped at the length limit."), "",
                  "| model | problems | " + " | ".join(metric_names) + " | cut |",
                  "|---|---|" + "---|" * len(metric_names) + "---|"]
        for name, summary in evals:
            cells = " | ".join(metric_cell(summary["metrics"].get(m)) for m in metric_names)
            lines.append(f"| {name} | {summary['problems']} | {cells} | {_cut(summary)} |")
        per_task = evals[-1][1].get("breakdown", {}).get("task")
        if per_task:
            lines += ["", f"Per task ({evals[-1][0]}):", "", "| task | accuracy % |", "|---|---|"]
            lines += [f"| {t} | {metric_cell(m)} |" for t, m in per_task.items()]
        lines.append("")

    bench = [(t, _json(out / "eval" / f"rl-{t}" / "summary.json")) for t in ("math500", "gsm8k")]
    bench = [(t, s) for t, s in bench if s]
    if bench:
        lines += ["## MATH-500 and GSM8K samples (RL model)", "",
                  "Small samples; near zero is the honest expectation at this size.", "",
                  "| task | problems | accuracy % | cut |", "|---|---|---|---|"]
        for t, s in bench:
            first = next(iter(s["metrics"].values()))
            lines.append(f"| {t} | {s['problems']} | {metric_cell(first)} | {_cut(s)} |")
        lines.append("")
    lines += ["## Reproduce", "", ("Each stage above is a plain `mimo` command; `mimo speedrun --preset "
              f"{state['preset']} --out DIR` runs them all. Samples of every evaluation are in `eval/*/samples.jsonl`."),
              "", "## Use the model", "", (f"`final/` is the RL model as a model directory: `mimo chat {out / 'final'}` "
              f"for a terminal chat, `mimo serve {out / 'final'}` for an OpenAI-compatible API and a web chat at "
              "http://127.0.0.1:8000/."), ""]
    (out / "report.md").write_text("\n".join(lines))
