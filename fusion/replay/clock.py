"""The playback clock: stream time (microseconds) -> wall time (seconds), at a chosen rate.

rate 0 ("max"): as fast as possible; nothing waits, no frame is late or dropped, and the output is deterministic.
rate r > 0 (1.0 = real time): the message stamped t is delivered at wall time start + (t - t0) / r.
The clock never sleeps longer than `max_wait_s` for one message: a longer gap in the stream (a pause in the
recording, or a stamp far in the future) is shortened to max_wait_s and the clock re-anchored there, so the
messages after it are neither held back nor counted as behind (`gaps_shortened` counts them).
"""
from __future__ import annotations

import math
import time
from typing import Callable


class PlaybackClock:
    """Stream time (microseconds) -> wall time (seconds). rate 0: as fast as possible (never waits, never behind)."""

    def __init__(self, rate: float, now: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep, max_wait_s: float = 1.0):
        if not rate >= 0 or not math.isfinite(rate):
            raise ValueError(f"playback rate must be 0 (as fast as possible) or a positive number, got {rate!r}")
        if not 0 < max_wait_s < math.inf:
            raise ValueError(f"max_wait_s must be a positive number of seconds, got {max_wait_s!r}")
        self.rate, self.now, self.sleep = float(rate), now, sleep
        self.max_wait_s = float(max_wait_s)
        self.gaps_shortened = 0
        self.wall_start: float | None = None
        self.stream_start_us = 0

    @property
    def realtime(self) -> bool:
        return self.rate > 0

    def start(self, stream_start_us: int) -> None:
        self.wall_start, self.stream_start_us = self.now(), int(stream_start_us)

    def wall_at(self, timestamp_us: int) -> float:
        """Wall time at which the stream reaches `timestamp_us` (real-time modes)."""
        return self.wall_start + (timestamp_us - self.stream_start_us) * 1e-6 / self.rate

    def wait_until(self, timestamp_us: int) -> None:
        """Sleep until the stream time `timestamp_us` has come (no-op as fast as possible or when behind), at most
        max_wait_s: a longer wait is cut there and the clock re-anchored (stream time timestamp_us = now)."""
        if self.realtime:
            delay = self.wall_at(timestamp_us) - self.now()
            if delay > self.max_wait_s:
                self.wall_start -= delay - self.max_wait_s
                self.gaps_shortened += 1
                delay = self.max_wait_s
            if delay > 0:
                self.sleep(delay)

    def lag_s(self, timestamp_us: int) -> float:
        """How far (wall seconds) the present is behind stream time `timestamp_us`; 0 as fast as possible."""
        return max(0.0, self.now() - self.wall_at(timestamp_us)) if self.realtime else 0.0
