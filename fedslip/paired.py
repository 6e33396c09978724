"""Paired comparisons over seeds: is a method ahead of a reference, behind it, or not measurably apart?

The runs of one seed share the partition and the initialization, so two methods' runs pair by seed.
For the n seeds where both have a value, d_s = method_s - reference_s and

    mean = sum(d_s) / n,    95% interval = mean ± t(0.975; n - 1) · sd(d) / sqrt(n)    (sd with n - 1)

The reading comes from the interval, never from rounded means: "ahead" when all of it lies above 0,
"behind" when all of it lies below, else "no measurable difference". With one pair there is no spread
to measure: the interval is undefined and the reading is "no measurable difference"; with none the
pair is "not compared". A seed present for one side only is left out, and the reason is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from scipy import stats

CONFIDENCE = 0.95
AHEAD, BEHIND, LEVEL, NOT_COMPARED = "ahead", "behind", "no measurable difference", "not compared"


@dataclass
class Paired:
    """Per-seed differences ``method - reference`` (in the unit of the values given) and their interval."""

    seeds: list[int]
    differences: list[float]
    left_out: list[str] = field(default_factory=list)  # one reason per seed not paired

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float | None:
        return sum(self.differences) / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The two-sided ``CONFIDENCE`` t interval of the mean difference; None below two pairs."""
        if self.n < 2:
            return None
        sd = math.sqrt(sum((d - self.mean) ** 2 for d in self.differences) / (self.n - 1))
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, self.n - 1)) * sd / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def reading(self) -> str:
        if not self.n:
            return NOT_COMPARED
        interval = self.interval
        if interval is None or interval[0] <= 0 <= interval[1]:
            return LEVEL
        return AHEAD if interval[0] > 0 else BEHIND

    def to_dict(self) -> dict:
        interval = self.interval
        return {"seeds": self.seeds, "differences": self.differences, "mean": self.mean,
                "interval": list(interval) if interval else None, "confidence": CONFIDENCE,
                "reading": self.reading, "left_out": self.left_out}


def pair(values: Mapping[int, float | None], reference_values: Mapping[int, float | None], name: str,
         reference_name: str, excluded: Mapping[int, str] | None = None) -> Paired:
    """Pair ``values`` (seed -> value, None: not measured) with ``reference_values`` by seed. ``excluded``:
    seeds that must not be paired, each with its reason (e.g. a run that lost clients)."""
    seeds, differences, left_out = [], [], []
    for seed in sorted(set(values) | set(reference_values)):
        mine, theirs = values.get(seed), reference_values.get(seed)
        if excluded and seed in excluded:
            left_out.append(f"seed {seed}: {excluded[seed]}")
        elif seed not in values or seed not in reference_values:
            left_out.append(f"seed {seed}: no {name if seed not in values else reference_name} run")
        elif mine is None or theirs is None:
            left_out.append(f"seed {seed}: no {name if mine is None else reference_name} value")
        else:
            seeds.append(seed)
            differences.append(mine - theirs)
    return Paired(seeds, differences, left_out)
