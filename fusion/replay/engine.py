"""The replay engine: a message stream -> sync policy -> playback clock -> SampleBuilder -> the model -> frames.

`ReplayEngine` consumes StreamMessages in arrival order (fusion.datasets.drive_stream), buffers what the model uses,
assembles a frame per trigger sweep under its `SyncPolicy` (fusion.replay.policy), paced by a `PlaybackClock`
(fusion.replay.clock), and runs the detector on it. Each message carries its own ego pose; the SampleBuilder
compensates the ego motion into the frame at T. A sensor with no usable message is marked missing for the frame
(Sample.missing gives the reason) and the model runs on the modalities that are present.

Timing: a frame is ready at wall(T + wait_s). A frame is LATE when its processing starts after the next LiDAR sweep's
frame was ready (more than one sweep interval behind); it is DROPPED (counted, not processed) when its processing
would start more than `max_lag_s` after its ready time.

Message accounting (per channel, in the summary)
    received; used (read into at least one processed frame); skipped (valid but never used: a sensor the model does
    not use, superseded or out of tolerance, or its frame was dropped); corrupt (unreadable file: truncated
    .pcd.bin, bad .pcd, corrupt .jpg; a malformed CAN message; a broken table row); missing_file; out_of_order
    (timestamp not newer than the previous message of its channel); late (arrived after a frame it could have
    belonged to was assembled); duplicate (the same message again); bad_timestamp (not an integer, or more than
    `SyncPolicy.max_stamp_jump_s` away from the newest accepted message without another channel confirming the
    jump). None of these stops the replay, and an absurd stamp moves neither the clock nor any channel's order.
    `faults` counts every fault by kind (read errors split into empty, truncated, too_large, outside_dataroot,
    corrupt, missing_file: fusion.datasets.safe_io.fault_kind); a frame that cannot be built is counted as failed
    with its error, and the replay goes on.

Memory: every buffer is a bounded deque whose size follows from the policy; latency percentiles come from a
fixed-size log-spaced histogram (fusion.replay.latency). Frames: ego frame at the keyframe sweep (x forward, y left,
z up; meters, radians, seconds) unless a name says global.
"""
from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from fusion.datasets.can_bus import CAN_KINDS, CAN_MAX_GAP_S, CanState, can_message_problem, can_state_at
from fusion.datasets.collate import collate_samples
from fusion.datasets.drive_stream import CAN_PREFIX, StreamMessage, can_channel
from fusion.datasets.map_layer import MapLayer
from fusion.datasets.safe_io import fault_kind
from fusion.datasets.sample_builder import CHANNELS, SampleBuilder, SensorMessage, strided_sweeps
from fusion.evaluation.submission import boxes_to_submission
from fusion.fuser import FusionAttention, contribution_maps
from fusion.replay.clock import PlaybackClock
from fusion.replay.latency import LatencyHistogram
from fusion.replay.policy import NOMINAL_SWEEP_INTERVAL_US, SyncPolicy
from fusion.tracking.tracker import Tracker
from fusion.types import LIDAR_NAME, Boxes, Sample

COUNT_KEYS: tuple[str, ...] = ("received", "used", "skipped", "corrupt", "missing_file", "out_of_order", "late",
                                "duplicate", "bad_timestamp")


class Detector(Protocol):
    """What the engine needs of the model (FusionDetector has it): Batch -> (one Boxes per sample (ego frame), the
    fuser's FusionAttention of the batch, or None when the model has none)."""

    def predict(self, batch) -> tuple[list[Boxes], FusionAttention | None]: ...


@dataclass
class _Entry:
    """A buffered message and what became of it."""

    message: StreamMessage
    used: bool = False
    bad: bool = False

    @property
    def timestamp_us(self) -> int:
        return self.message.timestamp_us


@dataclass
class _Trigger:
    entry: _Entry  # the keyframe sweep
    sweep_index: int
    ready_us: int  # stream time at which the frame's sync window closes


@dataclass
class FrameResult:
    """One processed frame.

    timestamp_us / token: the keyframe LiDAR sweep's timestamp and sample_data token; sample_token is the nuScenes
    sample when that sweep is a keyframe, else "". index: the frame's rank among processed frames; sweep_index: its
    sweep's rank among the LiDAR sweeps received. ego_to_global: [4, 4] float64 pose of the frame (ego frame at
    timestamp_us -> global, meters). boxes: detections in that ego frame (CPU). sample: the model's input (after
    the inference transforms). sensors_used: channels that contributed (plus "CAN" and "MAP");
    sensors_missing: channel -> reason. messages: channel -> sample_data tokens used, newest first.
    latency_ms: from the moment the frame's data was complete (its ready time on the playback clock; the start of
    its processing when running as fast as possible) to its detections; processing_ms: assembly + model.
    late: see the module docstring. contributions: [M, H, W] per-modality attention share (order
    `contribution_modalities`), or None. tracks: the tracker's tracks reported at this frame (GLOBAL frame; dicts
    of fusion.tracking.Track.to_dict: tracking_id, tracking_name, translation, size, rotation, velocity,
    tracking_score, age in frames); empty when the engine has no tracker.
    """

    index: int
    sweep_index: int
    timestamp_us: int
    token: str
    sample_token: str
    scene_name: str
    ego_to_global: np.ndarray
    boxes: Boxes
    sample: Sample
    sensors_used: list[str]
    sensors_missing: dict[str, str]
    messages: dict[str, list[str]]
    latency_ms: float
    processing_ms: float
    late: bool
    contributions: torch.Tensor | None = None
    contribution_modalities: tuple[str, ...] = ()
    tracks: list[dict] = field(default_factory=list)


class ReplayEngine:
    """Replays `source` (an iterable of StreamMessage in arrival order, e.g. a SceneSource) through `detector`.

    builder: the SampleBuilder configured like the model's data (its cameras / radars say which channels are read;
        on_missing is forced to "mark_missing"). transforms: Sample -> Sample (the data module's inference
        transforms), or None. use_can / map_layer: whether CAN messages are buffered, and the scene's map (None:
        marked missing with `map_reason`). rate: 0 = as fast as possible, else a multiple of real time.
    max_lag_s: real-time modes drop a frame whose processing would start more than this after its ready time.
    trajectory_points: ego positions kept for the rendered trajectory (bounded).
    tracker: a fusion.tracking.Tracker fed every processed frame's detections (global frame; its time is part of
        the frame's processing time), or None for no tracks.
    Iterate `frames()` for the processed frames; the counters (`counts`, `frames_*`, `latency`, `buffer_high_water`)
    are complete once it is exhausted.
    """

    def __init__(self, source: Iterable[StreamMessage], detector: Detector, builder: SampleBuilder,
                 transforms: Callable[[Sample], Sample] | None = None, policy: SyncPolicy | None = None,
                 rate: float = 0.0, max_lag_s: float = 0.25, scene_name: str = "", use_can: bool = True,
                 map_layer: MapLayer | None = None, map_reason: str = "no map layer",
                 contributions: bool = True, trajectory_points: int = 2000, clock: PlaybackClock | None = None,
                 tracker: Tracker | None = None):
        if not max_lag_s > 0:
            raise ValueError(f"max_lag_s must be positive, got {max_lag_s}")
        self.source, self.detector, self.transforms = source, detector, transforms
        self.policy = policy or SyncPolicy()
        self.read_errors: list[tuple[SensorMessage, Exception]] = []
        self.builder = replace(builder, on_missing="mark_missing", lidar_sweeps=self.policy.lidar_sweeps,
                               lidar_sweep_stride=1,  # _assemble picks the strided sweeps itself
                               radar_sweeps=self.policy.radar_sweeps,
                               on_read_error=lambda message, error: self.read_errors.append((message, error)))
        self.clock = clock or PlaybackClock(rate)
        self.max_lag_s = max_lag_s
        self.scene_name = scene_name or getattr(source, "scene_name", "")
        self.map_layer, self.map_reason = map_layer, map_reason
        self.want_contributions = contributions
        self.tracker = tracker
        self.wanted = {LIDAR_NAME, *self.builder.radars, *self.builder.cameras}
        if use_can:
            self.wanted |= {can_channel(kind) for kind in CAN_KINDS}
        self.buffers: dict[str, deque[_Entry]] = {}
        self.buffer_high_water: Counter[str] = Counter()
        self.counts: dict[str, Counter] = {}
        self.pending: deque[_Trigger] = deque()
        self.trajectory: deque[np.ndarray] = deque(maxlen=trajectory_points)
        self.latency = LatencyHistogram()
        self.processing = LatencyHistogram()
        self.frames_triggered = self.frames_processed = self.frames_dropped = self.frames_late = 0
        self.frames_failed = 0
        self.frame_errors: deque[str] = deque(maxlen=20)
        self.last_timestamp_us: dict[str, int] = {}
        self.last_message: dict[str, StreamMessage] = {}
        self.faults: dict[str, Counter] = {}
        self.newest_us: int | None = None  # newest accepted stamp of any channel
        self.stamp_jump: tuple[str, int] | None = None  # (channel, stamp) of the last skipped jump
        self.closed_until_us = -math.inf
        self.sweep_interval_us = NOMINAL_SWEEP_INTERVAL_US
        self.sweeps_seen = self.eligible_sweeps = 0
        self.stream_span_us: tuple[int, int] | None = None
        self.wall_time_s = 0.0
        self.finished = False
        self.stopped_early = False

    # -- accounting --------------------------------------------------------------------------------------------

    def _count(self, channel: str, key: str, n: int = 1) -> None:
        self.counts.setdefault(channel, Counter({k: 0 for k in COUNT_KEYS}))[key] += n

    def _fault(self, channel: str, kind: str) -> None:
        self.faults.setdefault(channel, Counter())[kind] += 1

    def _retire(self, channel: str, entry: _Entry) -> None:
        if not entry.used and not entry.bad:
            self._count(channel, "skipped")

    def _push(self, channel: str, entry: _Entry) -> None:
        buffer = self.buffers.get(channel)
        if buffer is None:
            buffer = self.buffers[channel] = deque(maxlen=self.policy.capacity(channel))
        if len(buffer) == buffer.maxlen:
            self._retire(channel, buffer[0])  # the append below evicts it
        buffer.append(entry)
        self.buffer_high_water[channel] = max(self.buffer_high_water[channel], len(buffer))

    # -- the loop ----------------------------------------------------------------------------------------------

    def frames(self, max_frames: int | None = None) -> Iterator[FrameResult]:
        """Replay the stream, yielding each processed frame (in timestamp order); stops after `max_frames`."""
        if self.finished:
            raise RuntimeError("this ReplayEngine has already run; make a new one")
        wall_start = time.perf_counter()
        try:
            for message in self.source:
                if not self._stamp_ok(message):
                    continue
                if self.clock.wall_start is None:
                    self.clock.start(message.timestamp_us)
                    self.stream_span_us = (message.timestamp_us, message.timestamp_us)
                while self.pending and message.timestamp_us > self.pending[0].ready_us:
                    frame = self._complete(self.pending.popleft())
                    if frame is not None:
                        yield frame
                        if max_frames is not None and self.frames_processed >= max_frames:
                            self.stopped_early = True
                            return
                self.clock.wait_until(message.timestamp_us)
                self._ingest(message)
            while self.pending:
                frame = self._complete(self.pending.popleft())
                if frame is not None:
                    yield frame
                    if max_frames is not None and self.frames_processed >= max_frames:
                        self.stopped_early = bool(self.pending)
                        return
        finally:
            for channel, buffer in self.buffers.items():
                for entry in buffer:
                    self._retire(channel, entry)
                buffer.clear()
            if not self.stopped_early:  # an interrupted run: its waiting frames were never processed
                self.frames_dropped += len(self.pending)
            self.pending.clear()
            self.wall_time_s = time.perf_counter() - wall_start
            self.finished = True

    def _stamp_ok(self, message: StreamMessage) -> bool:
        """False (counted as bad_timestamp) for a stamp that is not an integer, or that jumps more than
        max_stamp_jump_s away from the newest accepted one unless another channel's message confirms the jump."""
        stamp, channel = message.timestamp_us, message.channel
        if isinstance(stamp, bool) or not isinstance(stamp, (int, np.integer)):
            self._count(channel, "received")
            self._count(channel, "bad_timestamp")
            self._fault(channel, "bad_timestamp")
            return False
        if self.newest_us is None or message.error:
            return True
        limit = int(self.policy.max_stamp_jump_s * 1e6)
        if abs(stamp - self.newest_us) <= limit:
            self.stamp_jump = None
            return True
        jump = self.stamp_jump
        if jump is not None and jump[0] != channel and abs(stamp - jump[1]) <= limit:
            self.stamp_jump = None  # two channels agree: the recording really jumped
            if stamp < self.newest_us:  # back from an absurd first stamp: forget what it set
                self._reanchor(int(min(stamp, jump[1])))
            return True
        self.stamp_jump = (channel, int(stamp))
        self._count(channel, "received")
        self._count(channel, "bad_timestamp")
        self._fault(channel, "bad_timestamp")
        return False

    def _reanchor(self, stamp: int) -> None:
        """Forget the stream times set by stamps after `stamp` (an absurd stamp the stream started with)."""
        self.newest_us = stamp
        self.last_timestamp_us = {c: t for c, t in self.last_timestamp_us.items() if t < stamp}
        self.last_message = {c: m for c, m in self.last_message.items() if m.timestamp_us < stamp}
        self.closed_until_us = min(self.closed_until_us, stamp - 1)
        self.clock.start(stamp)

    def _ingest(self, message: StreamMessage) -> None:
        channel, timestamp = message.channel, int(message.timestamp_us)
        self._count(channel, "received")
        self.stream_span_us = (min(self.stream_span_us[0], timestamp), max(self.stream_span_us[1], timestamp))
        if message.error:
            key = "bad_timestamp" if message.fault == "bad_timestamp" else "corrupt"
            self._count(channel, key)
            self._fault(channel, message.fault or "corrupt")
            return
        previous = self.last_message.get(channel)
        if previous is not None and timestamp == previous.timestamp_us and previous.token == message.token \
                and previous.can == message.can:
            self._count(channel, "duplicate")
            self._fault(channel, "duplicate")
            return
        if timestamp <= self.last_timestamp_us.get(channel, -math.inf):
            self._count(channel, "out_of_order")
            self._fault(channel, "out_of_order")
            return
        self.newest_us = timestamp if self.newest_us is None else max(self.newest_us, timestamp)
        self.last_message[channel] = message
        if timestamp <= self.closed_until_us:
            self._count(channel, "late")
            self._fault(channel, "late")
            self.last_timestamp_us[channel] = timestamp
            return
        self.last_timestamp_us[channel] = timestamp
        if channel not in self.wanted:
            self._count(channel, "skipped")
            return
        if channel.startswith(CAN_PREFIX):
            problem = can_message_problem(channel[len(CAN_PREFIX):], message.can)
            if problem:
                self._count(channel, "corrupt")
                self._fault(channel, "corrupt")
                return
        elif message.sensor is None:
            self._count(channel, "corrupt")
            self._fault(channel, "corrupt")
            return
        entry = _Entry(message)
        self._push(channel, entry)
        if channel == LIDAR_NAME:
            pose = message.sensor.ego_to_global
            self.trajectory.append(np.array(pose[:3, 3], dtype=np.float64))
            buffer = self.buffers[LIDAR_NAME]
            if len(buffer) >= 2:
                self.sweep_interval_us = max(1, buffer[-1].timestamp_us - buffer[-2].timestamp_us)
            eligible = message.is_key_frame or not self.policy.keyframes_only
            if eligible and self.eligible_sweeps % self.policy.every_k_sweeps == 0:
                if len(self.pending) >= self.policy.max_pending_frames:
                    self.pending.popleft()
                    self.frames_dropped += 1
                self.pending.append(_Trigger(entry, self.sweeps_seen, timestamp + int(self.policy.wait_s * 1e6)))
                self.frames_triggered += 1
            self.eligible_sweeps += int(eligible)
            self.sweeps_seen += 1

    def _complete(self, trigger: _Trigger) -> FrameResult | None:
        """Assemble, run and return one frame, or None when it is dropped or cannot be built."""
        self.closed_until_us = max(self.closed_until_us, trigger.ready_us)
        self.clock.wait_until(trigger.ready_us)
        lag = self.clock.lag_s(trigger.ready_us)
        if lag > self.max_lag_s:
            self.frames_dropped += 1
            return None
        late = self.clock.realtime and lag > self.sweep_interval_us * 1e-6 / self.clock.rate
        start = self.clock.now()
        try:
            sample, messages, used = self._assemble(trigger)
        except Exception as error:  # one frame's bad data never ends the drive; counted and named in the summary
            self.frames_failed += 1
            self.frame_errors.append(f"frame at {trigger.entry.timestamp_us}: {type(error).__name__}: {error}"[:500])
            return None
        if self.transforms is not None:
            sample = self.transforms(sample)
        batch = collate_samples([sample])
        boxes, attention = self.detector.predict(batch)
        boxes = boxes[0].to("cpu")
        contributions, modalities = None, ()
        if self.want_contributions and attention is not None:
            contributions = contribution_maps(attention)[0].detach().cpu()
            modalities = tuple(attention.modalities)
        keyframe = trigger.entry.message
        ego_to_global = np.asarray(keyframe.sensor.ego_to_global, dtype=np.float64)
        tracks = []
        if self.tracker is not None:
            detections = boxes_to_submission(keyframe.token, boxes, ego_to_global)
            tracks = [t.to_dict() for t in self.tracker.update(detections, keyframe.timestamp_us * 1e-6)]
        end = self.clock.now()
        ready = self.clock.wall_at(trigger.ready_us) if self.clock.realtime else start
        latency_ms, processing_ms = (end - min(ready, start)) * 1e3, (end - start) * 1e3
        self.latency.add(latency_ms)
        self.processing.add(processing_ms)
        self.frames_processed += 1
        self.frames_late += int(late)
        missing = dict(sample.missing)
        sensors_used = [c for c in used if c not in missing]
        if sample.ego.can_valid and "CAN" not in missing:
            sensors_used.append("CAN")
        if sample.map_raster is not None:
            sensors_used.append("MAP")
        return FrameResult(
            index=self.frames_processed - 1, sweep_index=trigger.sweep_index, timestamp_us=keyframe.timestamp_us,
            token=keyframe.token, sample_token=keyframe.sample_token if keyframe.is_key_frame else "",
            scene_name=self.scene_name, ego_to_global=ego_to_global,
            boxes=boxes, sample=sample, sensors_used=sensors_used, sensors_missing=missing, messages=messages,
            latency_ms=latency_ms, processing_ms=processing_ms, late=bool(late), contributions=contributions,
            contribution_modalities=modalities, tracks=tracks)

    # -- sync --------------------------------------------------------------------------------------------------

    def _candidates(self, channel: str) -> list[_Entry]:
        return [e for e in self.buffers.get(channel, ()) if not e.bad]

    def _nearest(self, channel: str, timestamp_us: int, tolerance_s: float) -> tuple[_Entry | None, str]:
        """The buffered message of `channel` nearest to `timestamp_us` within the tolerance, or why there is none."""
        candidates = self._candidates(channel)
        if not candidates:
            return None, "no message received"
        best = min(candidates, key=lambda e: (abs(e.timestamp_us - timestamp_us), e.timestamp_us))
        offset_ms = (best.timestamp_us - timestamp_us) * 1e-3
        if abs(offset_ms) > tolerance_s * 1e3:
            return None, f"no message within {tolerance_s * 1e3:.0f} ms of the sweep (nearest {offset_ms:+.0f} ms)"
        return best, ""

    def _previous(self, channel: str, before_us: int, oldest_us: int, count: int) -> list[_Entry]:
        """Up to `count` buffered messages of `channel` stamped in [oldest_us, before_us), newest first."""
        out = []
        for entry in reversed(self.buffers.get(channel, ())):
            if len(out) >= count or entry.timestamp_us < oldest_us:
                break
            if not entry.bad and entry.timestamp_us < before_us:
                out.append(entry)
        return out

    def _assemble(self, trigger: _Trigger) -> tuple[Sample, dict[str, list[str]], list[str]]:
        policy, keyframe = self.policy, trigger.entry
        t = keyframe.timestamp_us
        oldest = t - int(policy.max_sweep_age_s * 1e6)
        previous = self._previous(LIDAR_NAME, t, oldest, policy.previous_sweeps_needed)
        selected: dict[str, list[_Entry]] = {
            LIDAR_NAME: [keyframe] + strided_sweeps(previous, policy.lidar_sweeps, policy.lidar_sweep_stride)}
        reasons: dict[str, str] = {}
        for channel in self.builder.radars:
            entry, reason = self._nearest(channel, t, policy.radar_tolerance_s)
            if entry is None:
                reasons[channel] = reason
                continue
            selected[channel] = [entry] + self._previous(channel, entry.timestamp_us, oldest, policy.radar_sweeps - 1)
        for channel in self.builder.cameras:
            entry, reason = self._nearest(channel, t, policy.camera_tolerance_s)
            if entry is None:
                reasons[channel] = reason
            else:
                selected[channel] = [entry]
        can_state = self._can_state(t)

        def sensor(entries):
            return [e.message.sensor for e in entries]

        self.read_errors.clear()
        sample = self.builder.build(
            token=keyframe.message.token, scene_name=self.scene_name, keyframe_lidar=keyframe.message.sensor,
            lidar_sweeps=sensor(selected[LIDAR_NAME][1:]),
            radar_messages={c: sensor(selected[c]) for c in self.builder.radars if c in selected},
            camera_messages={c: selected[c][0].message.sensor for c in self.builder.cameras if c in selected},
            can_state=can_state, map_layer=self.map_layer)
        sample.missing.update(reasons)
        if self.map_layer is None:
            sample.missing["MAP"] = self.map_reason
        failed = {id(message): error for message, error in self.read_errors}
        messages: dict[str, list[str]] = {}
        for channel, entries in selected.items():
            tokens = []
            for entry in entries:
                error = failed.get(id(entry.message.sensor))
                if error is not None:
                    if not entry.bad:
                        entry.bad = True
                        self._count(channel, "missing_file" if isinstance(error, FileNotFoundError) else "corrupt")
                        self._fault(channel, fault_kind(error))
                    continue
                if not self._was_read(channel, entries, entry, sample):
                    continue
                if not entry.used:
                    entry.used = True
                    self._count(channel, "used")
                tokens.append(entry.message.token)
            if tokens:
                messages[channel] = tokens
        return sample, messages, list(messages)

    @staticmethod
    def _was_read(channel: str, entries: list[_Entry], entry: _Entry, sample: Sample) -> bool:
        """Whether the builder read `entry` (it skips a channel's older sweeps when the newest is unreadable)."""
        if entry is entries[0]:
            return True
        return channel not in sample.missing

    def _can_state(self, timestamp_us: int) -> CanState | None:
        if not any(can_channel(k) in self.wanted for k in CAN_KINDS):
            return CanState.absent("CAN not used by the model")
        messages = {kind: [e.message.can for e in self._candidates(can_channel(kind))] for kind in CAN_KINDS}
        if not any(messages.values()):
            return CanState.absent("no CAN bus message received")
        state = can_state_at(messages, timestamp_us)
        if state.valid:  # the messages around the sweep are the ones interpolated
            for kind in CAN_KINDS:
                entries = self._candidates(can_channel(kind))
                gap = int(CAN_MAX_GAP_S[kind] * 1e6)
                before = [e for e in entries if timestamp_us - gap <= e.timestamp_us <= timestamp_us][-1:]
                after = [e for e in entries if timestamp_us < e.timestamp_us <= timestamp_us + gap][:1]
                for entry in before + after:
                    if not entry.used:
                        entry.used = True
                        self._count(can_channel(kind), "used")
        return state

    # -- summary -----------------------------------------------------------------------------------------------

    def summary(self) -> dict:
        """Frames, latency, per-channel message counts, buffer high-water marks and wall time (JSON-ready)."""
        span = self.stream_span_us
        channels = [c for c in CHANNELS if c in self.counts] + sorted(c for c in self.counts if c not in CHANNELS)
        return {
            "scene": self.scene_name,
            "rate": self.clock.rate if self.clock.realtime else "max",
            "policy": asdict(self.policy),
            "max_lag_s": self.max_lag_s,
            "frames": {"triggered": self.frames_triggered, "processed": self.frames_processed,
                       "dropped": self.frames_dropped, "late": self.frames_late, "failed": self.frames_failed},
            "stopped_at_max_frames": self.stopped_early,
            "frame_errors": list(self.frame_errors),
            "latency_ms": self.latency.summary(),
            "processing_ms": self.processing.summary(),
            "messages": {c: dict(self.counts[c]) for c in channels},
            "faults": dict(sum(self.faults.values(), Counter())),
            "faults_by_channel": {c: dict(self.faults[c]) for c in channels if c in self.faults},
            "clock_gaps_shortened": self.clock.gaps_shortened,
            "buffer_high_water": dict(self.buffer_high_water),
            "buffer_capacity": {c: self.policy.capacity(c) for c in self.buffer_high_water},
            "stream_seconds": (span[1] - span[0]) * 1e-6 if span else 0.0,
            "wall_time_s": self.wall_time_s,
        }
