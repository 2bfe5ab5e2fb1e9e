"""Power-law fits for scaling curves: ``L(C) = a * C**b`` by least squares in log-log space."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["PowerLaw", "fit_power_law", "pflops_days"]


def pflops_days(flops: float) -> float:
    """FLOPs expressed in PFLOP/s-days (the MoBA paper's compute axis)."""
    return flops / (1e15 * 86400.0)


@dataclass
class PowerLaw:
    """``y = a * x**b``; ``r2`` is the coefficient of determination of the log-log fit."""

    a: float
    b: float
    r2: float

    def __call__(self, x: float) -> float:
        return self.a * x**self.b

    def formula(self, var: str = "C") -> str:
        return f"{self.a:.3f}*{var}^{self.b:+.3f}".replace("^+", "^")


def fit_power_law(xs: list[float], ys: list[float]) -> PowerLaw:
    """Least-squares fit of ``log y = log a + b log x``. Needs >= 2 points with x, y > 0."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        raise ValueError(f"a power-law fit needs at least 2 points with positive x and y, got {len(pts)}")
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        raise ValueError("a power-law fit needs at least two distinct x values")
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    log_a = my - b * mx
    ss_tot = sum((p[1] - my) ** 2 for p in pts)
    ss_res = sum((p[1] - (log_a + b * p[0])) ** 2 for p in pts)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerLaw(a=math.exp(log_a), b=b, r2=r2)
