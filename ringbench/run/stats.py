"""Summary statistics of timing samples (milliseconds)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt


def summarize(samples_ms: Sequence[float]) -> dict[str, Any]:
    """Median, mean, std (sample), quartiles, IQR (also relative to the median), min, max and count: the fields
    of ``ringbench.schema.Stats``, by name."""
    values = np.asarray(samples_ms, dtype=np.float64)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "n": int(values.size),
        "median_ms": float(median),
        "mean_ms": float(values.mean()),
        "std_ms": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "q1_ms": float(q1),
        "q3_ms": float(q3),
        "iqr_ms": float(q3 - q1),
        "rel_iqr": relative_iqr(values),
        "min_ms": float(values.min()),
        "max_ms": float(values.max()),
    }


def relative_iqr(samples_ms: Sequence[float] | npt.NDArray[np.float64]) -> float:
    """IQR / median: the noise measure sampling tries to bring under its target."""
    q1, median, q3 = np.percentile(np.asarray(samples_ms, dtype=np.float64), [25, 50, 75])
    return float((q3 - q1) / median) if median > 0 else 0.0


def mann_whitney_p(first: Sequence[float], second: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test (normal approximation, tie-corrected).

    Small p: the two samples are unlikely to come from one distribution. Timing
    samples are far from normal, hence a rank test.
    """
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        return float("nan")
    values = np.concatenate([a, b])
    order = values.argsort(kind="mergesort")
    ranks = np.empty(values.size)
    sorted_values = values[order]
    start = 0
    ties = 0.0
    while start < values.size:  # average ranks over runs of equal values
        end = start
        while end + 1 < values.size and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        count = end - start + 1
        ties += count**3 - count
        start = end + 1
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:
        return 1.0
    z = (abs(u - n1 * n2 / 2) - 0.5) / math.sqrt(variance)  # with continuity correction
    return float(math.erfc(max(z, 0.0) / math.sqrt(2)))
