"""Summary statistics of timing samples (milliseconds)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def summarize(samples_ms: Sequence[float]) -> dict[str, float | int]:
    """Median, mean, std (sample), quartiles, IQR (also relative to the median), min, max and count."""
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


def relative_iqr(samples_ms: Sequence[float]) -> float:
    """IQR / median: the noise measure sampling tries to bring under its target."""
    q1, median, q3 = np.percentile(np.asarray(samples_ms, dtype=np.float64), [25, 50, 75])
    return float((q3 - q1) / median) if median > 0 else 0.0
