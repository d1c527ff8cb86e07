"""Server-side downsampling: about 2,000 points per series, keeping every bucket's min and max.

A spike is the min or the max of its bucket, so it always survives; a 100,000-step run sends the
browser 2,000 points per line instead of 100,000.
"""

from __future__ import annotations

import math

import numpy as np

MAX_POINTS = 2000


def downsample(
    x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` points of (x, y): the min and the max of each bucket, in x order.

    `y` must be finite (callers drop NaN and, for log axes, values <= 0 first)."""
    n = len(x)
    if n <= max_points:
        return x, y
    buckets = max(1, max_points // 2)
    size = math.ceil(n / buckets)
    buckets = math.ceil(n / size)
    pad = buckets * size - n
    # shape (buckets, size); padding never wins a min or a max
    lows = np.concatenate([y.astype(float), np.full(pad, np.inf)]).reshape(buckets, size)
    highs = np.concatenate([y.astype(float), np.full(pad, -np.inf)]).reshape(buckets, size)
    start = np.arange(buckets) * size
    keep = np.union1d(np.argmin(lows, axis=1) + start, np.argmax(highs, axis=1) + start)
    return x[keep], y[keep]


def finite_series(
    steps: np.ndarray, values: np.ndarray, log_axis: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """(steps, values) that can be drawn, downsampled, and how many values <= 0 a log axis lost."""
    finite = np.isfinite(values)
    left_out = int((finite & (values <= 0)).sum()) if log_axis else 0
    ok = finite & (values > 0) if log_axis else finite
    x, y = downsample(steps[ok], values[ok])
    return x, y, left_out
