"""Statistics for reporting RL results: interquartile mean and bootstrap intervals (as rliable)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def iqm(values: Sequence[float] | np.ndarray) -> float:
    """Interquartile mean as rliable computes it (``scipy.stats.trim_mean(x, 0.25)``): sort, drop
    ``int(0.25 * n)`` values at each end, average the rest."""
    x = np.sort(np.asarray(values, dtype=float).ravel())
    if len(x) == 0:
        return float("nan")
    cut = int(0.25 * len(x))
    return float(np.mean(x[cut : len(x) - cut]))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` resampled with replacement."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), (n_boot, len(x)))
    stats = np.array([statistic(x[row]) for row in idx])
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def stratified_bootstrap_iqm(
    scores: dict[str, Sequence[float]], n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """IQM over all runs of all tasks and its 95% interval, resampling runs within each task.

    :param scores: task -> per-run scores (here one task: a shift; runs: seeds).
    :return: ``(iqm, low, high)``.
    """
    tasks = [np.asarray(v, dtype=float) for v in scores.values() if len(v)]
    point = iqm(np.concatenate(tasks)) if tasks else float("nan")
    if not tasks or all(len(t) == 1 for t in tasks):
        return point, point, point
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        stats[b] = iqm(np.concatenate([t[rng.integers(0, len(t), len(t))] for t in tasks]))
    return point, float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))
