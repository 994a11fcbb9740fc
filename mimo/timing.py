"""Timings that say how far to trust them: repeated measurements as a median with their spread, the machine's
load around them, and checks for figures that contradict each other.

A timing on a shared machine is only as good as the machine was quiet: `mimo bench` and the speedrun's report
card repeat each timing, report the median and the min-max range, record the 1-minute load average before and
after, and call the machine busy when that load exceeds the cores the timing uses by a whole core or more (another
job held a core). Figures that cannot both be true (a speculative-decoding speed-up above the tokens committed per
verify step) are flagged instead of reported.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass

# speculative decoding: a draft-and-verify step costs at least a plain step, so the speed-up is at most the tokens
# a verify step commits; above that by more than this, the timings were disturbed
SPEEDUP_TOLERANCE = 1.1
UNSTABLE_SPREAD = 0.25  # (max - min) / median above this: the repeats disagree


@dataclass(frozen=True)
class Spread:
    """Repeated measurements of one quantity."""
    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values) -> Spread:
        values = list(values)
        return cls(statistics.median(values), min(values), max(values), len(values))

    @property
    def relative(self) -> float:
        """(max - min) / median; 0 for a single measurement."""
        return (self.high - self.low) / self.median if self.median else 0.0

    def cell(self, fmt: str = ".1f") -> str:
        """'433.9 (412.0-440.1)'; a single measurement as its value."""
        if self.n == 1:
            return format(self.median, fmt)
        return f"{self.median:{fmt}} ({self.low:{fmt}}-{self.high:{fmt}})"


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


@dataclass(frozen=True)
class Load:
    """The machine's 1-minute load average around a timing that used `threads` cores out of `cores`."""
    before: float | None
    after: float | None
    threads: int
    cores: int

    @property
    def busy(self) -> bool:
        """Another job competed: the load exceeded the cores this timing used by at least one."""
        loads = [x for x in (self.before, self.after) if x is not None]
        return bool(loads) and max(loads) >= self.threads + 1

    def numbers(self) -> str:
        """'load average 7.7 on 2 cores, 2 threads timed' (the higher of before and after)."""
        loads = [x for x in (self.before, self.after) if x is not None]
        if not loads:
            return "load average unknown"
        return f"load average {max(loads):.1f} on {self.cores} cores, {self.threads} threads timed"

    def describe(self) -> str:
        """'busy: load average 7.7 on 2 cores, 2 threads timed' or 'quiet: ...'."""
        if self.before is None and self.after is None:
            return self.numbers()
        return f"{'busy' if self.busy else 'quiet'}: {self.numbers()}"

    def as_dict(self) -> dict:
        return {**asdict(self), "busy": self.busy}


def speedup_contradiction(speedup: float, tokens_per_step: float | None) -> str | None:
    """Why a speculative-decoding speed-up cannot be right, or None when it can."""
    if tokens_per_step and speedup > SPEEDUP_TOLERANCE * tokens_per_step:
        return (f"the measured speed-up {speedup:.2f}x exceeds the {tokens_per_step:.2f} tokens a verify step "
                "commits (a draft-and-verify step costs at least a plain one): the timings were disturbed")
    return None


def spread_warning(name: str, spread: Spread) -> str | None:
    """A warning when repeated timings of one thing disagree by more than UNSTABLE_SPREAD."""
    if spread.n > 1 and spread.relative > UNSTABLE_SPREAD:
        return f"{name}: the {spread.n} repeats span {100 * spread.relative:.0f}% of their median"
    return None
