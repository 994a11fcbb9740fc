"""Markdown reports with plots: the evaluation report (report.md beside summary.json) and shared helpers
that the speedrun's report card reuses."""

from __future__ import annotations

from pathlib import Path


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def metric_cell(m: dict) -> str:
    """'12.3 [8.1, 16.0]' from {'value', 'ci_low', 'ci_high'}."""
    if not m or m.get("value") is None:
        return "n/a"
    return f"{pct(m['value'])} [{pct(m.get('ci_low'))}, {pct(m.get('ci_high'))}]"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(groups: dict, title: str, path: Path):
    """groups: name -> {'value', 'ci_low', 'ci_high', 'n'} -> a bar chart with 95% intervals."""
    plt = _plt()
    names = list(groups)
    vals = [100 * (groups[n]["value"] or 0) for n in names]
    lo = [v - 100 * (groups[n].get("ci_low") or 0) for v, n in zip(vals, names)]
    hi = [100 * (groups[n].get("ci_high") or 0) - v for v, n in zip(vals, names)]
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(names) + 2), 4))
    ax.bar(range(len(names)), vals, yerr=[lo, hi], capsize=3, color="#4C72B0")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([str(n) for n in names], rotation=35, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def histogram(values: list, title: str, xlabel: str, path: Path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=30, color="#55A868")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def truncation_line(summary: dict) -> str:
    """How many samples the length limit cut (finish reason `length`), and what the limit was."""
    s, n, cut = summary["settings"], summary["samples"], summary.get("truncated", 0)
    limit = s.get("effective_max_new_tokens")
    where = (f" at the limit of {limit:,} new tokens (asked {s['max_new_tokens']:,}; the model's context "
             f"{'unknown' if s.get('context') is None else format(s['context'], ',')} tokens, prompt included)"
             if limit else "")
    return (f"{cut} of {n} samples ({pct(cut / n if n else None)}%) stopped{where} (finish reason `length`); "
            "they are graded as they stand.")


def write_eval_report(summary: dict, lengths: list, out_dir: Path):
    out_dir = Path(out_dir)
    s = summary["settings"]
    lines = [f"# {summary['task']}: {s.get('model', s.get('completions', ''))}", "",
             f"{summary['problems']} problems, {summary['samples']} samples; mimo {summary['mimo_version']}.", "",
             "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s.items()]
    lines += ["", "## Metrics (95% bootstrap interval over problems)", "", "| metric | % |", "|---|---|"]
    lines += [f"| {name} | {metric_cell(m)} |" for name, m in summary["metrics"].items()]
    lines += ["", "## Length limit", "", truncation_line(summary)]
    for key, groups in summary.get("breakdown", {}).items():
        if not groups:
            continue
        lines += ["", f"## By {key}", "", f"| {key} | problems | accuracy % |", "|---|---|---|"]
        lines += [f"| {g} | {m.get('n', '')} | {metric_cell(m)} |" for g, m in groups.items()]
        png = f"accuracy_by_{key}.png"
        bar_chart(groups, f"{summary['task']}: accuracy by {key}", out_dir / png)
        lines += ["", f"![accuracy by {key}]({png})"]
    if lengths:
        histogram(lengths, f"{summary['task']}: response lengths", "tokens", out_dir / "response_lengths.png")
        lines += ["", "## Response lengths", "",
                  f"mean {summary['response_tokens']['mean']:.1f} tokens, max {summary['response_tokens']['max']}.",
                  "", "![response lengths](response_lengths.png)"]
    lines += ["", "Every sample is in `samples.jsonl`; every setting and metric in `summary.json`.", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
