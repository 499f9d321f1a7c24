"""The intervals every reported rate carries: Wilson's 95% interval for a proportion over images, and Student's
t 95% interval for a mean over training seeds; and the one rule for saying that a target is met.

A proportion k / n of images (presence, accuracy, attack success) is a binomial estimate: its Wilson score
interval (Wilson 1927) keeps inside [0, 1] and stays honest at 0 and at n. A mean over training seeds is what
varies from one erasure to the next: its interval is mean ± t(0.975, s - 1) · sd / √s over the s seeds' own
figures, which says how far another seed may land, not how precisely each seed was measured.
"""

import math
from dataclasses import dataclass

from scipy.stats import t as student_t

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
RATE = (0.0, 1.0)  # a rate's range, which its mean's interval over seeds is cut to


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for k successes in n trials (n >= 1)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"a rate needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """k of n images, with its Wilson 95% interval."""

    k: int
    n: int

    @property
    def p(self) -> float:
        return self.k / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.k, self.n)

    def record(self) -> dict:
        low, high = self.interval
        return {"rate": self.p, "k": self.k, "n": self.n, "low": low, "high": high, "interval": "Wilson 95%"}

    def __str__(self) -> str:
        low, high = self.interval
        return f"{100 * self.p:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"

    def __add__(self, other: "Rate") -> "Rate":
        return Rate(self.k + other.k, self.n + other.n)


def pooled(rates) -> Rate:
    """The rate over every image of ``rates`` together."""
    rates = list(rates)
    if not rates:
        raise ValueError("no rates to pool")
    return Rate(sum(r.k for r in rates), sum(r.n for r in rates))


@dataclass(frozen=True)
class SeedMean:
    """The mean of one figure over training seeds, with its t 95% interval (None for a single seed), cut to
    ``bounds``, the figure's own range (a rate's (0, 1)) when given."""

    values: tuple[float, ...]
    bounds: tuple[float, float] | None = None

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def interval(self) -> tuple[float, float] | None:
        s = len(self.values)
        if s < 2:
            return None
        sd = math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (s - 1))
        half = float(student_t.ppf(0.975, s - 1)) * sd / math.sqrt(s)
        low, high = self.mean - half, self.mean + half
        if self.bounds is not None:
            low, high = max(self.bounds[0], low), min(self.bounds[1], high)
        return low, high

    def record(self) -> dict:
        interval = self.interval
        return {"mean": self.mean, "seeds": len(self.values), "values": list(self.values),
                "low": None if interval is None else interval[0], "high": None if interval is None else interval[1],
                "interval": "t 95% over seeds" if interval is not None else "one seed: no interval"}

    def __str__(self) -> str:
        interval = self.interval
        if interval is None:
            return f"{100 * self.mean:.1f}% (1 seed)"
        return f"{100 * self.mean:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}] ({len(self.values)} seeds)"


def verdict(estimate: float, interval: tuple[float, float] | None, target: float, lower_is_better: bool = True) -> str:
    """Whether a target is met: "met" only when the interval's far end meets it; "point estimate" when the
    estimate meets it and the interval does not (or there is none); else "not met"."""
    def meets(x):
        return x <= target if lower_is_better else x >= target

    if interval is not None and meets(interval[1] if lower_is_better else interval[0]):
        return "met"
    return "point estimate" if meets(estimate) else "not met"
