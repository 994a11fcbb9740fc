"""`mimo eval`: MiMo's evaluation protocol with every sample published, the spread stated, resumable.

    mimo eval MODEL_DIR --task math500 [--limit N] [--samples K] [--out DIR]
    mimo eval --endpoint http://host:8000/v1 --model NAME --task aime2024 ...
    mimo eval score --task TASK --completions FILE.jsonl --out DIR      # grade completions made elsewhere
    mimo eval contamination --data DATA_DIR --task TASK                 # n-gram overlap corpus <-> benchmark

Output directory: samples.jsonl (one line per sample, appended as they finish: an interrupted run resumes
without redoing them), summary.json (metrics with 95% bootstrap intervals, every setting, the model's hash,
mimo's version), report.md with plots.
"""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from mimo import __version__
from mimo.config import QUANTIZATIONS
from mimo.errors import MimoError
from mimo.eval.backends import Request
from mimo.eval.tasks import PROTOCOL_MAX_NEW_TOKENS, Task


def read_samples(path: Path) -> list[dict]:
    """Lines of samples.jsonl; a line cut short by a crash is dropped (and rewritten away)."""
    if not path.exists():
        return []
    rows, lines = [], path.read_text().splitlines()
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if len(rows) != len([line for line in lines if line.strip()]):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def sample_row(task: Task, row: dict, k: int, prompt: str, text: str, extracted, correct: bool, tokens: int,
               latency: float, finish_reason, reasoning=None) -> dict:
    out = {"id": row["id"], "sample": k, "prompt": prompt, "completion": text,
           "extracted_answer": extracted, "correct": bool(correct), "tokens": tokens, "latency_s": round(latency, 4),
           "finish_reason": finish_reason}
    if reasoning:
        out["reasoning_content"] = reasoning
    out.update({f: row.get(f) for f in task.public_fields})
    return out


def check_settings(out_dir: Path, settings: dict):
    """A run directory belongs to one set of settings: resuming with others would mix samples."""
    path = out_dir / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in settings if k not in ("limit",) and old.get(k) != settings[k])
        if diff:
            raise MimoError(f"{path}: this directory holds samples made with other settings ({', '.join(diff)}); "
                            "use another --out")
    path.write_text(json.dumps(settings, indent=2) + "\n")


def length_limit_line(max_new_tokens: int, context: int | None) -> str:
    """What bounds a completion's length, said at start-up."""
    why = " (MiMo's protocol for math and code)" if max_new_tokens == PROTOCOL_MAX_NEW_TOKENS else ""
    if context is None:
        return (f"max new tokens {max_new_tokens:,}{why}; the server does not list its context: a request it refuses "
                "as too long is sent again for the rest of the context")
    if context <= max_new_tokens:
        return (f"max new tokens {max_new_tokens:,}{why}, capped by the model's context of {context:,} tokens: a "
                f"completion ends where prompt + completion reach {context:,} (finish reason `length`)")
    return f"max new tokens {max_new_tokens:,}{why} (the model's context: {context:,} tokens)"


def run_eval(task: Task, backend, out_dir, samples: int, limit: int | None, temperature: float, top_p: float,
             max_new_tokens: int, prompt_format: str, seed: int = 0, chunk: int = 64) -> dict:
    """prompt_format: chat (the chat template), raw (the task's raw prompt) or question (raw, no format cue).
    backend.context (None: unknown) caps max_new_tokens: settings record both and the effective limit."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = task.load()
    rows = rows[:limit] if limit else rows
    context = backend.context
    settings = {"task": task.name, "samples": samples, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "context": context,
                "effective_max_new_tokens": min(max_new_tokens, context or max_new_tokens),
                "prompt_format": prompt_format, "seed": seed, "limit": limit, **backend.describe}
    check_settings(out_dir, settings)
    print(length_limit_line(max_new_tokens, context), flush=True)
    chat = prompt_format == "chat"
    prompt_of = {"chat": task.chat_prompt, "raw": task.raw_prompt, "question": task.question_prompt}[prompt_format]
    if prompt_of is None:
        raise MimoError(f"task {task.name} has no {prompt_format!r} prompt format")
    samples_path = out_dir / "samples.jsonl"
    done = {(s["id"], s["sample"]) for s in read_samples(samples_path)}
    pending = [(row, k) for row in rows for k in range(samples) if (row["id"], k) not in done]
    if done:
        print(f"resuming: {len(done)} samples done, {len(pending)} to go", flush=True)
    t0 = time.time()
    with tqdm(total=len(pending), desc=f"eval {task.name}", unit="sample", mininterval=2.0) as bar, samples_path.open("a") as out:
        for start in range(0, len(pending), chunk):
            batch = pending[start: start + chunk]
            prompts = [prompt_of(r) for r, _ in batch]
            requests = [Request(p, max_new_tokens, temperature, top_p, seed * 1_000_003 + zlib.crc32(r["id"].encode()) + k,
                                [] if chat else task.raw_stop) for p, (r, k) in zip(prompts, batch)]
            for p, (row, k), res in zip(prompts, batch, backend.complete(requests)):
                extracted, correct = task.grade(row, res.text)
                out.write(json.dumps(sample_row(task, row, k, p, res.text, extracted, correct,
                                                res.completion_tokens, res.latency_s, res.finish_reason,
                                                res.reasoning)) + "\n")
            out.flush()
            bar.update(len(batch))
    return write_results(task, rows, out_dir, settings, elapsed_s=time.time() - t0)


def write_results(task: Task, rows: list[dict], out_dir: Path, settings: dict, elapsed_s: float) -> dict:
    from mimo.eval.metrics import breakdown, summarize
    from mimo.eval.report import write_eval_report

    by_id: dict = {}
    for s in read_samples(out_dir / "samples.jsonl"):
        by_id.setdefault(s["id"], []).append(s)
    wanted = [r for r in rows if r["id"] in by_id]
    correct = [[s["correct"] for s in sorted(by_id[r["id"]], key=lambda s: s["sample"])] for r in wanted]
    answers = [[s["extracted_answer"] for s in sorted(by_id[r["id"]], key=lambda s: s["sample"])] for r in wanted]
    lengths = [s["tokens"] for r in wanted for s in by_id[r["id"]]]
    reasons = Counter(str(s.get("finish_reason") or "unknown") for r in wanted for s in by_id[r["id"]])
    summary = {
        "task": task.name, "mimo_version": __version__, "settings": settings,
        "problems": len(wanted), "samples": sum(len(c) for c in correct),
        "metrics": summarize(correct, answers),
        "breakdown": {key: breakdown([{"group": r.get(key), "correct": c} for r, c in zip(wanted, correct)])
                      for key in task.breakdown},
        "response_tokens": {"mean": sum(lengths) / len(lengths) if lengths else 0, "max": max(lengths, default=0)},
        "finish_reasons": dict(reasons.most_common()),
        "truncated": reasons["length"],  # samples cut at the length limit (finish reason "length")
        "elapsed_s": round(elapsed_s, 2),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_eval_report(summary, lengths, out_dir)
    return summary


# ---- command line ----------------------------------------------------------------------------------

def run(args):
    from mimo.eval.backends import EndpointBackend, EngineBackend
    from mimo.eval.tasks import get_task

    task = get_task(args.task)
    chat = args.prompt_format == "chat"
    if args.endpoint:
        if not args.model_name:
            raise MimoError("--endpoint needs --model NAME (the served model's name)")
        backend = EndpointBackend(args.endpoint, args.model_name, args.api_key, chat, args.concurrency, args.timeout,
                                  args.retries)
        name = args.model_name
    else:
        if not args.model:
            raise MimoError("give a MODEL_DIR, or --endpoint URL --model NAME")
        backend = EngineBackend(args.model, chat, args.mtp, args.quantize, args.batch_size)
        name = Path(args.model).name
    samples = args.samples or task.default_samples
    out = Path(args.out or Path("evals") / name.replace("/", "_") / task.name)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise MimoError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    summary = run_eval(task, backend, out, samples, args.limit, args.temperature, args.top_p,
                       args.max_new_tokens or PROTOCOL_MAX_NEW_TOKENS, args.prompt_format, args.seed)
    print_summary(summary, out)


def print_summary(summary: dict, out: Path):
    from mimo.eval.report import metric_cell

    parts = [f"{name} {metric_cell(m)}" for name, m in summary["metrics"].items()]
    print(f"{summary['task']}: {summary['problems']} problems, {summary['samples']} samples: " + "; ".join(parts))
    if summary["truncated"]:
        limit = summary["settings"].get("effective_max_new_tokens")
        print(f"{summary['truncated']} of {summary['samples']} samples stopped at the length limit"
              + (f" ({limit:,} new tokens or the context)" if limit else "") + ": graded as they stand")
    print(f"wrote {out}/samples.jsonl, summary.json, report.md")


def add_arguments(p):
    """`mimo eval MODEL_DIR|--endpoint URL --task TASK`; `mimo eval score` and `mimo eval contamination` are
    commands of their own (mimo/eval/score.py, mimo/eval/contamination.py)."""
    import argparse

    p.description = ("evaluate a model (our engine or an OpenAI-compatible endpoint) under MiMo's protocol; also: "
                     "`mimo eval score`, `mimo eval contamination`")
    p.add_argument("model", nargs="?", metavar="MODEL_DIR")
    p.add_argument("--task", required=True, help="math500 | aime2024 | aime2025 | gsm8k | humaneval | reasoning")
    p.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", dest="model_name", metavar="NAME", help="the served model's name (with --endpoint)")
    p.add_argument("--api-key", help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--limit", type=int, help="the first N problems, in a fixed order")
    p.add_argument("--samples", type=int, help="samples per problem (default: the task's; AIME 32)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: evals/MODEL/TASK)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, help="longest completion (default: MiMo's protocol for math and code, "
                   f"{PROTOCOL_MAX_NEW_TOKENS:,}; a model's smaller context caps it)")
    p.add_argument("--prompt-format", choices=["chat", "raw", "question"], default="chat",
                   help="chat: the model's chat template (default); raw: plain continuation, for base models; "
                   "question: raw with the question only (reasoning task; for models trained on answer-only data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="engine batch size")
    p.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=True, help="MTP speculative decoding")
    p.add_argument("--quantize", choices=QUANTIZATIONS, help="weight-only quantization")
    p.add_argument("--concurrency", type=int, default=8, help="parallel requests to an endpoint")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=5, help="retries with exponential backoff per request")
