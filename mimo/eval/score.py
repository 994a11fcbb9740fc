"""`mimo eval score`: grade completions produced elsewhere (another runtime, an API) under the same protocol as
`mimo eval`, into the same samples.jsonl, summary.json and report.md."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from mimo.errors import MimoError
from mimo.eval.evaluate import print_summary, sample_row, write_results
from mimo.eval.tasks import Task
from mimo.jsonl import read_jsonl


def score_completions(task: Task, completions_path: Path, out_dir: Path) -> dict:
    """Grade completions produced elsewhere: lines with id and completion (generic math: problem, answer)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    known = {} if task.name == "math" else {r["id"]: r for r in task.load()}
    lines = []
    for n, item in read_jsonl(completions_path):
        if not isinstance(item, dict) or not isinstance(item.get("completion"), str) or "id" not in item:
            raise MimoError(f"{completions_path}:{n}: each line needs 'id' and a string 'completion'")
        if task.name == "math":
            if "answer" not in item or "problem" not in item:
                raise MimoError(f"{completions_path}:{n}: the math task needs 'problem' and 'answer' on each line")
            known.setdefault(item["id"], {"id": item["id"], "problem": item["problem"], "answer": str(item["answer"])})
        elif item["id"] not in known:
            raise MimoError(f"{completions_path}:{n}: id {item['id']!r} is not a {task.name} problem")
        lines.append(item)
    seen: Counter = Counter()
    with (out_dir / "samples.jsonl").open("w") as out:
        for item in tqdm(lines, desc=f"score {task.name}", unit="sample", mininterval=2.0):
            row = known[item["id"]]
            extracted, correct = task.grade(row, item["completion"])
            out.write(json.dumps(sample_row(task, row, seen[row["id"]], item.get("prompt", ""), item["completion"],
                                            extracted, correct, item.get("tokens", 0), 0.0,
                                            item.get("finish_reason"))) + "\n")
            seen[row["id"]] += 1
    rows = [known[i] for i in dict.fromkeys(item["id"] for item in lines)]
    settings = {"task": task.name, "backend": "score", "completions": str(completions_path)}
    return write_results(task, rows, out_dir, settings, elapsed_s=0.0)


def add_arguments(p):
    p.description = "grade completions produced elsewhere"
    p.add_argument("--task", required=True)
    p.add_argument("--completions", required=True, metavar="FILE.jsonl",
                   help="lines with id and completion (task math: also problem and answer)")
    p.add_argument("--out", required=True, metavar="DIR")


def run(args):
    from mimo.eval.tasks import get_task

    summary = score_completions(get_task(args.task), Path(args.completions), Path(args.out))
    print_summary(summary, Path(args.out))
