"""Curve fits of the lab: saturating power laws and the compute-optimal size of an isoFLOP sweep.

    power law     L(x) = E + A * x^(-alpha): for a fixed alpha, E and A are a linear least-squares
                  problem, so alpha is searched (a fine grid, then golden-section refinement) and
                  E, A solved exactly for each; E can be fixed instead (a known floor).
    isoFLOP       for one compute budget, the loss against log N is a parabola near its minimum;
                  its vertex is the compute-optimal N*(C), and N* ~ C^a by a log-log line.

numpy only: these fits are small and exact enough that a general optimiser adds nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgument


@dataclass
class PowerLaw:
    E: float
    A: float
    alpha: float
    r2: float  # of the fitted curve against the points, on the loss scale

    def __call__(self, x) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha


def _solve(x: np.ndarray, y: np.ndarray, alpha: float, E: float | None) -> tuple[float, float, float]:
    """(E, A, squared error) for a fixed alpha: least squares of y = E + A x^-alpha."""
    u = x ** -alpha
    if E is None:
        design = np.stack([np.ones_like(u), u], axis=1)
        (e, a), *_ = np.linalg.lstsq(design, y, rcond=None)
    else:
        e, a = E, float(u @ (y - E) / (u @ u))
    residual = y - (e + a * u)
    return float(e), float(a), float(residual @ residual)


def fit_power_law(x, y, *, E: float | None = None, alphas: tuple[float, float] = (0.01, 3.0)) -> PowerLaw:
    """L(x) = E + A (x / min x)^-alpha through the points (x > 0); E fitted, or fixed when
    given. `power_law` gives the same law in x's own units."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    need = 3 if E is None else 2
    if len(x) < need + 1:
        raise InvalidArgument(f"a power-law fit needs at least {need + 1} points, got {len(x)}")
    if (x <= 0).any():
        raise InvalidArgument("power-law fits need positive x")
    x = x / x.min()  # well-conditioned powers; A is rescaled back below
    grid = np.geomspace(*alphas, 400)
    errors = [_solve(x, y, a, E)[2] for a in grid]
    i = int(np.argmin(errors))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):  # golden section on the bracket
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if _solve(x, y, a, E)[2] < _solve(x, y, b, E)[2]:
            hi = b
        else:
            lo = a
    alpha = (lo + hi) / 2
    e, a_scaled, sse = _solve(x, y, alpha, E)
    total = float(((y - y.mean()) ** 2).sum())
    return PowerLaw(E=e, A=a_scaled, alpha=float(alpha), r2=1 - sse / total if total > 0 else 1.0)


def rescaled(law: PowerLaw, x_min: float) -> PowerLaw:
    """The law in the original units of x (fit_power_law works on x / x_min)."""
    return PowerLaw(law.E, law.A * x_min ** law.alpha, law.alpha, law.r2)


def power_law(x, y, *, E: float | None = None) -> PowerLaw:
    """fit_power_law in the original units of x."""
    return rescaled(fit_power_law(x, y, E=E), float(np.min(np.asarray(x, dtype=float))))


def isoflop_optimum(sizes, losses) -> float:
    """The compute-optimal N of one budget: the vertex of the parabola through (log N, loss),
    clamped to the sizes tried (a vertex outside them is only a bound)."""
    n, l = np.log(np.asarray(sizes, dtype=float)), np.asarray(losses, dtype=float)
    if len(n) < 3:
        raise InvalidArgument(f"an isoFLOP optimum needs at least 3 sizes per budget, got {len(n)}")
    c2, c1, _ = np.polyfit(n, l, 2)
    if c2 <= 0:  # no minimum inside: the best size tried
        return float(np.exp(n[int(np.argmin(l))]))
    return float(np.exp(np.clip(-c1 / (2 * c2), n.min(), n.max())))


def loglog_slope(x, y) -> tuple[float, float]:
    """(slope, intercept) of log y = slope * log x + intercept."""
    if len(x) < 2:
        raise InvalidArgument("a log-log slope needs at least 2 points")
    slope, intercept = np.polyfit(np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float)), 1)
    return float(slope), float(intercept)
