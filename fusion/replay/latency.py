"""Latency statistics: percentiles of a stream of durations in bounded memory (a fixed-size log-spaced histogram)."""
from __future__ import annotations

import math
from collections import Counter


class LatencyHistogram:
    """Percentiles of a stream of durations (ms) in bounded memory: log-spaced buckets `resolution` wide (1%),
    so a percentile is exact to within that relative error (and clamped to the observed min / max)."""

    def __init__(self, resolution: float = 0.01):
        self.log_step = math.log1p(resolution)
        self.buckets: Counter[int] = Counter()
        self.count, self.total, self.min, self.max = 0, 0.0, math.inf, -math.inf

    def add(self, value_ms: float) -> None:
        value_ms = max(float(value_ms), 1e-6)
        self.buckets[int(math.floor(math.log(value_ms) / self.log_step))] += 1
        self.count += 1
        self.total += value_ms
        self.min, self.max = min(self.min, value_ms), max(self.max, value_ms)

    def percentile(self, q: float) -> float | None:
        if not self.count:
            return None
        rank = max(1, math.ceil(q / 100.0 * self.count))
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return float(min(max(math.exp((bucket + 0.5) * self.log_step), self.min), self.max))
        return float(self.max)

    def summary(self) -> dict:
        if not self.count:
            return {"count": 0, "p50": None, "p95": None, "p99": None, "mean": None, "max": None}
        return {"count": self.count, "p50": self.percentile(50), "p95": self.percentile(95),
                "p99": self.percentile(99), "mean": self.total / self.count, "max": self.max}

