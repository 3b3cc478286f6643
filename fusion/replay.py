"""Offline replay of a recorded drive through the detector, as if it were live (no ROS).

    scene of a nuScenes-format dataroot -> time-ordered messages (`SceneSource`) -> playback clock -> sync
    (`SyncPolicy`) -> SampleBuilder -> the data module's inference transforms -> collate -> the model -> sinks

Message source
    `SceneSource` reads one scene through the nuscenes-devkit tables and yields EVERY sample_data of it (LiDAR sweeps
    ~20 Hz, five radars ~13 Hz, six cameras ~12 Hz; keyframes and sweeps alike) and the scene's CAN bus messages
    (pose, ms_imu, vehicle_monitor via NuScenesCanBus, when the dataroot has them), merged by timestamp. It is a
    generator: message records are made one at a time and no sensor file is opened until a frame needs it.

Sync policy (what one frame is made of; all times are the messages' own timestamps)
    - Trigger: every LiDAR sweep, or every k-th (`every_k_sweeps`; with `keyframes_only`, every k-th nuScenes
      keyframe sweep), is the keyframe of one frame at its time T, expressed in the ego frame at T (the sweep's own
      ego pose).
    - Wait: the frame is assembled once the stream has passed T + `wait_s` (default 50 ms), so that a camera or
      radar message taken just after the sweep can still be paired with it, as nuScenes keyframes pair them.
      `wait_s` = 0 makes the policy strictly causal (only messages up to T).
    - LiDAR: the trigger sweep plus up to `lidar_sweeps` previous sweeps still buffered, none older than T -
      `max_sweep_age_s`.
    - Cameras: per camera, the message nearest to T with |t - T| <= `camera_tolerance_s` (default 60 ms).
    - Radar: per radar, the message nearest to T with |t - T| <= `radar_tolerance_s` (default 100 ms), plus that
      radar's previous messages, `radar_sweeps` in all, none older than T - `max_sweep_age_s`.
    - CAN: speed, yaw rate and acceleration interpolated at T from the buffered CAN messages
      (fusion.datasets.nuscenes.can_state_at). Map: the scene's map layer cropped at the sweep's pose.
    Each message carries its own ego pose; the SampleBuilder compensates the ego motion into the frame at T. A
    sensor with no usable message is marked missing for the frame (Sample.missing gives the reason) and the model
    runs on the modalities that are present.

Playback rate
    rate 0 ("max"): as fast as possible; nothing waits, no frame is late or dropped, and the output is deterministic.
    rate r > 0 (1.0 = real time): the message stamped t is delivered at wall time start + (t - t0) / r; a frame is
    ready at wall(T + wait_s). A frame is LATE when its processing starts after the next LiDAR sweep's frame was
    ready (more than one sweep interval behind); it is DROPPED (counted, not processed) when its processing would
    start more than `max_lag_s` after its ready time.

Message accounting (per channel, in the summary)
    received; used (read into at least one processed frame); skipped (valid but never used: a sensor the model does
    not use, superseded or out of tolerance, or its frame was dropped); corrupt (unreadable file: truncated
    .pcd.bin, bad .pcd, corrupt .jpg; a malformed CAN message; a broken table row); missing_file; out_of_order
    (timestamp not newer than the previous message of its channel); late (arrived after a frame it could have
    belonged to was assembled). None of these stops the replay.

Memory
    Every buffer is a bounded deque whose size follows from the policy, not from the drive's length; the video is
    written frame by frame; PNGs are optional (every k-th frame); latency percentiles come from a fixed-size
    log-spaced histogram. Frames: ego frame at the keyframe sweep (x forward, y left, z up; meters, radians,
    seconds) unless a name says global.
"""
from __future__ import annotations

import heapq
import json
import math
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from PIL import GifImagePlugin, Image

from fusion.datasets.collate import collate_samples
from fusion.datasets.nuscenes import (CAN_MAX_GAP_S, CHANNELS, CanState, MapLayer, SampleBuilder, SensorMessage,
                                      can_state_at, load_map_layer, scene_can_messages)
from fusion.evaluation import boxes_to_submission
from fusion.geometry import invert_transform, make_transform
from fusion.grid import BEVGrid
from fusion.types import CAMERA_NAMES, LIDAR_NAME, MODALITIES, RADAR_NAMES, Boxes, Sample
from fusion.visualization import render_bev, render_contributions, side_by_side

#: CAN bus message types replayed, and the keys each must carry (those can_state_at reads).
CAN_KINDS: tuple[str, ...] = ("pose", "ms_imu", "vehicle_monitor")
CAN_KEYS: dict[str, tuple[str, ...]] = {"pose": ("vel", "accel", "rotation_rate"),
                                        "ms_imu": ("linear_accel", "rotation_rate"),
                                        "vehicle_monitor": ("vehicle_speed", "yaw_rate")}
CAN_PREFIX = "CAN_"
#: Nominal LiDAR sweep interval (nuScenes: 20 Hz), used until two sweeps have been seen.
NOMINAL_SWEEP_INTERVAL_US = 50_000
COUNT_KEYS: tuple[str, ...] = ("received", "used", "skipped", "corrupt", "missing_file", "out_of_order", "late")


def can_channel(kind: str) -> str:
    """Stream channel name of a CAN message type, e.g. "CAN_pose"."""
    return CAN_PREFIX + kind


# ----------------------------------------------------------------------------------------------------------------
# Messages and the message source
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamMessage:
    """One message of a recorded drive as a live system receives it.

    timestamp_us: the message's own timestamp, microseconds.
    channel: a sensor channel ("LIDAR_TOP", "RADAR_FRONT", "CAM_FRONT", ...) or "CAN_<type>".
    token: the sample_data token ("" for CAN). sample_token: the sample it belongs to in the tables.
    sensor: the SensorMessage (file, calibration, ego pose at timestamp_us) of a sensor message.
    can: the CAN bus message (a dict with "utime") of a CAN message.
    is_key_frame: whether the sample_data is a nuScenes keyframe.
    error: non-empty when the record could not be read (broken table row, malformed CAN message).
    """

    timestamp_us: int
    channel: str
    token: str = ""
    sample_token: str = ""
    sensor: SensorMessage | None = None
    can: dict | None = None
    is_key_frame: bool = False
    error: str = ""


class SceneSource:
    """The messages of one scene of a nuScenes-format dataroot, in timestamp order (iterate it; it can be iterated
    again). Reads the devkit tables of a loaded `NuScenes`; `can_bus` is a `NuScenesCanBus`, a string saying why
    there is none, or None.

    CAN messages more than `can_margin_s` seconds before the scene's first or after its last sample are left out.
    """

    def __init__(self, nusc, scene_name: str, can_bus=None, channels: Sequence[str] = CHANNELS,
                 can_margin_s: float = 1.0):
        scenes = {s["name"]: s for s in nusc.scene}
        if scene_name not in scenes:
            raise ValueError(f"scene {scene_name!r} is not in {nusc.dataroot}/{nusc.version} "
                             f"(scenes: {sorted(scenes)[:10]}{' ...' if len(scenes) > 10 else ''})")
        self.nusc = nusc
        self.scene = scenes[scene_name]
        self.scene_name = scene_name
        self.dataroot = nusc.dataroot
        log = nusc.get("log", self.scene["log_token"])
        self.map_path: str | None = None
        if log.get("map_token"):
            self.map_path = os.path.join(self.dataroot, nusc.get("map", log["map_token"])["filename"])
        first = nusc.get("sample", self.scene["first_sample_token"])
        last = nusc.get("sample", self.scene["last_sample_token"])
        margin = int(can_margin_s * 1e6)
        self.can_window_us = (first["timestamp"] - margin, last["timestamp"] + margin)
        self.channels = tuple(channels)
        self._starts = {channel: self._first_token(channel) for channel in self.channels}
        self.missing_channels = tuple(c for c, token in self._starts.items() if token is None)
        if can_bus is None:
            self.can_messages: dict | str = "no CAN bus given"
        else:
            self.can_messages = scene_can_messages(can_bus, scene_name)
        self._calibration: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    def _first_token(self, channel: str) -> str | None:
        """The earliest sample_data of `channel` in the scene (sweeps before the first keyframe included)."""
        sample_token = self.scene["first_sample_token"]
        while sample_token:
            sample = self.nusc.get("sample", sample_token)
            token = sample["data"].get(channel)
            if token:
                record = self.nusc.get("sample_data", token)
                while record["prev"]:
                    previous = self.nusc.get("sample_data", record["prev"])
                    if self._scene_of(previous) != self.scene["token"]:
                        break
                    record = previous
                return record["token"]
            sample_token = sample["next"]
        return None

    def _scene_of(self, record: dict) -> str | None:
        try:
            return self.nusc.get("sample", record["sample_token"])["scene_token"]
        except KeyError:
            return None

    def sensor_message(self, record: dict) -> SensorMessage:
        """The SensorMessage of a sample_data record (raises KeyError/ValueError for a broken record)."""
        cs_token = record["calibrated_sensor_token"]
        if cs_token not in self._calibration:
            calibration = self.nusc.get("calibrated_sensor", cs_token)
            intrinsics = None
            if record["channel"] in CAMERA_NAMES:
                intrinsics = np.asarray(calibration["camera_intrinsic"], dtype=np.float64)
                if intrinsics.shape != (3, 3):
                    raise ValueError(f"calibrated_sensor {cs_token}: camera_intrinsic is not 3x3")
            self._calibration[cs_token] = (make_transform(calibration["rotation"], calibration["translation"]),
                                           intrinsics)
        sensor_to_ego, intrinsics = self._calibration[cs_token]
        pose = self.nusc.get("ego_pose", record["ego_pose_token"])
        return SensorMessage(channel=record["channel"], timestamp_us=int(record["timestamp"]),
                             path=os.path.join(self.dataroot, record["filename"]), sensor_to_ego=sensor_to_ego,
                             ego_to_global=make_transform(pose["rotation"], pose["translation"]),
                             intrinsics=intrinsics)

    def _sensor_stream(self, channel: str, token: str) -> Iterator[StreamMessage]:
        last_timestamp = 0
        for _ in range(len(self.nusc.sample_data)):  # bounds a (corrupt) cyclic chain
            if not token:
                return
            try:
                record = self.nusc.get("sample_data", token)
            except KeyError:
                yield StreamMessage(last_timestamp, channel, token, error=f"sample_data {token} not in the tables")
                return
            if self._scene_of(record) != self.scene["token"]:
                return
            last_timestamp = int(record["timestamp"])
            common = dict(timestamp_us=last_timestamp, channel=channel, token=token,
                          sample_token=record["sample_token"], is_key_frame=bool(record["is_key_frame"]))
            try:
                yield StreamMessage(sensor=self.sensor_message(record), **common)
            except (KeyError, ValueError) as error:
                yield StreamMessage(error=f"sample_data {token}: broken record ({error!r})", **common)
            token = record["next"]

    def _can_stream(self, kind: str, messages: list) -> Iterator[StreamMessage]:
        start, end = self.can_window_us
        last_timestamp = start
        for message in messages:
            utime = message.get("utime") if isinstance(message, dict) else None
            if not isinstance(utime, (int, np.integer)):
                yield StreamMessage(last_timestamp, can_channel(kind), error=f"CAN {kind} message without utime")
                continue
            if not start <= utime <= end:
                continue
            last_timestamp = int(utime)
            yield StreamMessage(int(utime), can_channel(kind), can=message)

    def __iter__(self) -> Iterator[StreamMessage]:
        streams: list[Iterable[StreamMessage]] = [self._sensor_stream(c, t) for c, t in self._starts.items() if t]
        if isinstance(self.can_messages, dict):
            streams += [self._can_stream(kind, self.can_messages.get(kind) or []) for kind in CAN_KINDS
                        if self.can_messages.get(kind)]
        return heapq.merge(*streams, key=lambda m: m.timestamp_us)


def first_scene_of_split(nusc, split: str) -> str:
    """The first scene (table order) of a devkit or custom (splits.json) split that is in the dataroot."""
    from nuscenes.utils.splits import get_scenes_of_split
    try:
        names = set(get_scenes_of_split(split, nusc))
    except (ValueError, KeyError, FileNotFoundError, AssertionError) as error:
        raise ValueError(f"split {split!r} of {nusc.dataroot}/{nusc.version}: {error}") from error
    for scene in nusc.scene:
        if scene["name"] in names:
            return scene["name"]
    raise ValueError(f"split {split!r} has no scene in {nusc.dataroot}/{nusc.version}")


def open_can_bus(dataroot: str):
    """A NuScenesCanBus over <dataroot>/can_bus, or a string saying why there is none."""
    try:
        from nuscenes.can_bus.can_bus_api import NuScenesCanBus
        return NuScenesCanBus(dataroot=dataroot)
    except Exception as error:  # the devkit raises a bare Exception when can_bus/ is absent
        return f"no CAN bus data in {dataroot}: {error}"


# ----------------------------------------------------------------------------------------------------------------
# Policy, clock, statistics
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SyncPolicy:
    """How frames are assembled from the message stream (see the module docstring). Times in seconds."""

    every_k_sweeps: int = 1
    keyframes_only: bool = False
    lidar_sweeps: int = 9
    radar_sweeps: int = 6
    camera_tolerance_s: float = 0.06
    radar_tolerance_s: float = 0.10
    wait_s: float = 0.05
    max_sweep_age_s: float = 0.6
    #: Frames waiting for their sync window; when more pile up the oldest is dropped (counted).
    max_pending_frames: int = 8
    #: CAN messages kept per type (pose 50 Hz, ms_imu 100 Hz: 256 cover over 2.5 s).
    can_buffer: int = 256

    def __post_init__(self):
        checks = {"every_k_sweeps": self.every_k_sweeps >= 1, "lidar_sweeps": self.lidar_sweeps >= 0,
                  "radar_sweeps": self.radar_sweeps >= 1, "camera_tolerance_s": self.camera_tolerance_s >= 0,
                  "radar_tolerance_s": self.radar_tolerance_s >= 0, "wait_s": 0 <= self.wait_s <= 1.0,
                  "max_sweep_age_s": self.max_sweep_age_s > 0, "max_pending_frames": self.max_pending_frames >= 1,
                  "can_buffer": self.can_buffer >= 2}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"SyncPolicy.{name}={getattr(self, name)!r} is out of range")

    def capacity(self, channel: str) -> int:
        """The bound of `channel`'s buffer (messages): what the policy can still need, plus the pending frames."""
        if channel == LIDAR_NAME:
            return self.lidar_sweeps + 1 + self.max_pending_frames
        if channel in RADAR_NAMES:
            return self.radar_sweeps + 2 + self.max_pending_frames
        if channel.startswith(CAN_PREFIX):
            return self.can_buffer
        return 3 + self.max_pending_frames


class PlaybackClock:
    """Stream time (microseconds) -> wall time (seconds). rate 0: as fast as possible (never waits, never behind)."""

    def __init__(self, rate: float, now: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep):
        if not rate >= 0 or not math.isfinite(rate):
            raise ValueError(f"playback rate must be 0 (as fast as possible) or a positive number, got {rate!r}")
        self.rate, self.now, self.sleep = float(rate), now, sleep
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
        """Sleep until the stream time `timestamp_us` has come (no-op as fast as possible or when behind)."""
        if self.realtime:
            delay = self.wall_at(timestamp_us) - self.now()
            if delay > 0:
                self.sleep(delay)

    def lag_s(self, timestamp_us: int) -> float:
        """How far (wall seconds) the present is behind stream time `timestamp_us`; 0 as fast as possible."""
        return max(0.0, self.now() - self.wall_at(timestamp_us)) if self.realtime else 0.0


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


# ----------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------

class Detector(Protocol):
    """What the engine needs of the model (FusionDetector has it): Batch -> one Boxes per sample (ego frame)."""

    def predict_boxes(self, batch) -> list[Boxes]: ...


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
    `contribution_modalities`), or None.
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


class ReplayEngine:
    """Replays `source` (an iterable of StreamMessage in arrival order, e.g. a SceneSource) through `detector`.

    builder: the SampleBuilder configured like the model's data (its cameras / radars say which channels are read;
        on_missing is forced to "mark_missing"). transforms: Sample -> Sample (the data module's inference
        transforms), or None. use_can / map_layer: whether CAN messages are buffered, and the scene's map (None:
        marked missing with `map_reason`). rate: 0 = as fast as possible, else a multiple of real time.
    max_lag_s: real-time modes drop a frame whose processing would start more than this after its ready time.
    trajectory_points: ego positions kept for the rendered trajectory (bounded).
    Iterate `frames()` for the processed frames; the counters (`counts`, `frames_*`, `latency`, `buffer_high_water`)
    are complete once it is exhausted.
    """

    def __init__(self, source: Iterable[StreamMessage], detector: Detector, builder: SampleBuilder,
                 transforms: Callable[[Sample], Sample] | None = None, policy: SyncPolicy | None = None,
                 rate: float = 0.0, max_lag_s: float = 0.25, scene_name: str = "", use_can: bool = True,
                 map_layer: MapLayer | None = None, map_reason: str = "no map layer",
                 contributions: bool = True, trajectory_points: int = 2000, clock: PlaybackClock | None = None):
        if not max_lag_s > 0:
            raise ValueError(f"max_lag_s must be positive, got {max_lag_s}")
        self.source, self.detector, self.transforms = source, detector, transforms
        self.policy = policy or SyncPolicy()
        self.read_errors: list[tuple[SensorMessage, Exception]] = []
        self.builder = replace(builder, on_missing="mark_missing", lidar_sweeps=self.policy.lidar_sweeps,
                               radar_sweeps=self.policy.radar_sweeps,
                               on_read_error=lambda message, error: self.read_errors.append((message, error)))
        self.clock = clock or PlaybackClock(rate)
        self.max_lag_s = max_lag_s
        self.scene_name = scene_name or getattr(source, "scene_name", "")
        self.map_layer, self.map_reason = map_layer, map_reason
        self.want_contributions = contributions
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

    def _ingest(self, message: StreamMessage) -> None:
        channel, timestamp = message.channel, message.timestamp_us
        self._count(channel, "received")
        self.stream_span_us = (min(self.stream_span_us[0], timestamp), max(self.stream_span_us[1], timestamp))
        if message.error:
            self._count(channel, "corrupt")
            return
        if timestamp <= self.last_timestamp_us.get(channel, -math.inf):
            self._count(channel, "out_of_order")
            return
        if timestamp <= self.closed_until_us:
            self._count(channel, "late")
            self.last_timestamp_us[channel] = timestamp
            return
        self.last_timestamp_us[channel] = timestamp
        if channel not in self.wanted:
            self._count(channel, "skipped")
            return
        if channel.startswith(CAN_PREFIX):
            problem = _can_problem(channel[len(CAN_PREFIX):], message.can)
            if problem:
                self._count(channel, "corrupt")
                return
        elif message.sensor is None:
            self._count(channel, "corrupt")
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
        except (ValueError, FileNotFoundError, OSError) as error:
            self.frames_failed += 1
            self.frame_errors.append(f"frame at {trigger.entry.timestamp_us}: {error}")
            return None
        if self.transforms is not None:
            sample = self.transforms(sample)
        batch = collate_samples([sample])
        boxes = self.detector.predict_boxes(batch)[0].to("cpu")
        contributions, modalities = None, ()
        if self.want_contributions and getattr(self.detector, "last_attention", None) is not None:
            contributions = self.detector.contribution_maps()[0].detach().cpu()
            modalities = tuple(self.detector.last_attention.modalities)
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
        keyframe = trigger.entry.message
        return FrameResult(
            index=self.frames_processed - 1, sweep_index=trigger.sweep_index, timestamp_us=keyframe.timestamp_us,
            token=keyframe.token, sample_token=keyframe.sample_token if keyframe.is_key_frame else "",
            scene_name=self.scene_name, ego_to_global=np.asarray(keyframe.sensor.ego_to_global, dtype=np.float64),
            boxes=boxes, sample=sample, sensors_used=sensors_used, sensors_missing=missing, messages=messages,
            latency_ms=latency_ms, processing_ms=processing_ms, late=bool(late), contributions=contributions,
            contribution_modalities=modalities)

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
        selected: dict[str, list[_Entry]] = {LIDAR_NAME: [keyframe] + self._previous(LIDAR_NAME, t, oldest,
                                                                                     policy.lidar_sweeps)}
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
            "buffer_high_water": dict(self.buffer_high_water),
            "buffer_capacity": {c: self.policy.capacity(c) for c in self.buffer_high_water},
            "stream_seconds": (span[1] - span[0]) * 1e-6 if span else 0.0,
            "wall_time_s": self.wall_time_s,
        }


def _can_problem(kind: str, message) -> str:
    """Why a CAN message of type `kind` cannot be used ("" if it can)."""
    if not isinstance(message, dict):
        return "not a dict"
    for key in CAN_KEYS.get(kind, ()):
        if key not in message:
            return f"no {key!r}"
        try:
            values = np.asarray(message[key], dtype=np.float64)
        except (TypeError, ValueError):
            return f"{key!r} is not numeric"
        if not np.isfinite(values).all():
            return f"{key!r} is not finite"
    return ""


# ----------------------------------------------------------------------------------------------------------------
# Sinks
# ----------------------------------------------------------------------------------------------------------------

def frame_record(frame: FrameResult) -> dict:
    """The JSON Lines record of a frame: timestamp, tokens, latency, sensors, and the boxes in the GLOBAL frame
    (fusion.evaluation.boxes_to_submission: translation m, size (w, l, h) m, rotation (w, x, y, z), velocity
    (vx, vy) m/s in global axes, detection_name, detection_score, attribute_name)."""
    boxes = boxes_to_submission(frame.token, frame.boxes, frame.ego_to_global)
    for box in boxes:
        box.pop("sample_token", None)
    return {
        "frame": frame.index,
        "timestamp_us": frame.timestamp_us,
        "lidar_token": frame.token,
        "sample_token": frame.sample_token,
        "scene": frame.scene_name,
        "latency_ms": round(frame.latency_ms, 3),
        "processing_ms": round(frame.processing_ms, 3),
        "late": frame.late,
        "sensors_used": frame.sensors_used,
        "sensors_missing": frame.sensors_missing,
        "ego_to_global": frame.ego_to_global.tolist(),
        "boxes": boxes,
    }


def render_frame(frame: FrameResult, grid: BEVGrid, trajectory_global: Sequence[np.ndarray] = (),
                 contributions: bool = True, pixels_per_meter: float = 5.0, start_us: int | None = None
                 ) -> Image.Image:
    """BEV picture of a frame (LiDAR, radar with velocities, map, predicted boxes, the ego's trajectory so far in
    the frame's ego frame), with the fuser's contribution map beside it when available. trajectory_global: ego
    positions [3] in the global frame, meters; start_us: the drive's start, for the time in the title."""
    trajectory = None
    if len(trajectory_global):
        positions = np.stack(list(trajectory_global))
        to_ego = invert_transform(frame.ego_to_global)
        trajectory = positions @ to_ego[:3, :3].T + to_ego[:3, 3]
    sample = frame.sample
    seconds = (frame.timestamp_us - (start_us if start_us is not None else frame.timestamp_us)) * 1e-6
    title = (f"{frame.scene_name}  t={seconds:.2f}s  frame {frame.index}  {len(frame.boxes)} boxes  "
             f"{frame.latency_ms:.0f} ms{'  LATE' if frame.late else ''}")
    bev = render_bev(grid, lidar=sample.lidar, radar=sample.radar, boxes=frame.boxes, map_raster=sample.map_raster,
                     trajectory=trajectory, pixels_per_meter=pixels_per_meter, title=title)
    if contributions and frame.contributions is not None:
        picture = render_contributions(frame.contributions, frame.contribution_modalities,
                                       cell_pixels=max(1, round(bev.height / frame.contributions.shape[-2])))
        bev = side_by_side(bev, picture)
    return bev


class GifStreamWriter:
    """An animated GIF written frame by frame (constant memory): the first frame's palette is the global colour
    table, every frame carries its own local palette (PIL's GifImagePlugin getheader / getdata)."""

    def __init__(self, path: str | os.PathLike, fps: float):
        self.path = Path(path)
        self.duration_ms = max(20, int(round(1000.0 / fps)))
        self.file = open(self.path, "wb")
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def append(self, image: Image.Image) -> None:
        frame = image.convert("RGB")
        if self.size is None:
            self.size = frame.size
        elif frame.size != self.size:
            frame = frame.resize(self.size, Image.BILINEAR)
        paletted = frame.quantize(colors=256)
        if self.frames == 0:
            header, _ = GifImagePlugin.getheader(paletted, info={"loop": 0, "duration": self.duration_ms})
            self.file.write(b"".join(header))
        self.file.write(b"".join(GifImagePlugin.getdata(paletted, duration=self.duration_ms,
                                                        include_color_table=True)))
        self.frames += 1

    def close(self) -> None:
        if not self.file.closed:
            self.file.write(b";")
            self.file.close()


class VideoSink:
    """The drive as a video, written incrementally: MP4 (H.264 through imageio-ffmpeg) or GIF. When the MP4 writer
    fails (no ffmpeg, codec error), the frames from then on go to a GIF next to it (`error` says so, and where the
    MP4's earlier frames are). `path` is where the video ended up; `frames` how many frames it has."""

    def __init__(self, out_stem: str | os.PathLike, kind: str, fps: float, log: Callable[[str], None] = print):
        if kind not in ("mp4", "gif"):
            raise ValueError(f"video kind must be 'mp4' or 'gif', got {kind!r}")
        self.stem, self.kind, self.fps, self.log = Path(out_stem), kind, fps, log
        self.path: Path | None = None
        self.frames = 0
        self.error = ""
        self._writer = None

    def _open_gif(self) -> None:
        self.kind, self.path = "gif", self.stem.with_suffix(".gif")
        self._writer = GifStreamWriter(self.path, self.fps)

    def append(self, image: Image.Image) -> None:
        array = np.asarray(image.convert("RGB"))
        if self.kind == "mp4":
            height, width = array.shape[:2]
            array = np.pad(array, ((0, height % 2), (0, width % 2), (0, 0)))  # H.264 (yuv420p) wants even sizes
            try:
                if self._writer is None:
                    import imageio.v2 as imageio
                    self.path = self.stem.with_suffix(".mp4")
                    self._writer = imageio.get_writer(self.path, format="FFMPEG", mode="I", fps=self.fps,
                                                      codec="libx264", macro_block_size=1, quality=7,
                                                      ffmpeg_log_level="error")
                self._writer.append_data(array)
                self.frames += 1
                return
            except Exception as error:  # imageio-ffmpeg raises RuntimeError/OSError/BrokenPipeError, etc.
                mp4, written = self.path, self.frames
                self._close_writer()
                if written == 0 and mp4 is not None and mp4.exists():
                    mp4.unlink()
                kept = f" (its first {written} frames kept in {mp4})" if written else ""
                self.error = f"MP4 writing failed ({error}){kept}; writing the frames from here on to a GIF"
                self.log(self.error)
                self.frames = 0
                self._open_gif()
        if self._writer is None:
            self._open_gif()
        self._writer.append(Image.fromarray(array))
        self.frames += 1

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception as error:  # a failed ffmpeg pipe can fail again on close
                self.error = self.error or f"closing the video failed: {error}"

    def close(self) -> None:
        self._close_writer()


@dataclass
class ReplayOutputs:
    """Where a replay wrote its outputs (None where disabled)."""

    out_dir: Path
    detections: Path
    summary: Path
    frames_dir: Path | None = None
    video: Path | None = None


def run_replay(engine: ReplayEngine, out_dir: str | os.PathLike, grid: BEVGrid, *, max_frames: int | None = None,
               video: str = "mp4", png_every: int = 1, video_fps: float | None = None, contributions: bool = True,
               extra_summary: Mapping | None = None, on_frame: Callable[[FrameResult], None] | None = None,
               log: Callable[[str], None] = print) -> tuple[dict, ReplayOutputs]:
    """Run `engine` and write its sinks into `out_dir`: detections.jsonl (one line per processed frame, flushed as
    it goes), summary.json (written at the end, also when the replay fails), frames/frame_NNNNNN.png every
    `png_every` processed frames (0: none), and replay.mp4 / replay.gif (video "mp4" | "gif" | "none") of every
    processed frame. on_frame(frame) is called for each processed frame after its sinks. Returns (summary,
    outputs)."""
    if video not in ("mp4", "gif", "none"):
        raise ValueError(f"video must be 'mp4', 'gif' or 'none', got {video!r}")
    if png_every < 0:
        raise ValueError(f"png_every must be >= 0, got {png_every}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs = ReplayOutputs(out, out / "detections.jsonl", out / "summary.json")
    if png_every:
        outputs.frames_dir = out / "frames"
        outputs.frames_dir.mkdir(exist_ok=True)
        for stale in outputs.frames_dir.glob("frame_*.png"):  # a previous replay's pictures
            stale.unlink()
    fps = video_fps or max(1.0, 1e6 / (NOMINAL_SWEEP_INTERVAL_US * engine.policy.every_k_sweeps))
    sink = VideoSink(out / "replay", video, fps, log) if video != "none" else None
    completed, error_text = False, ""
    try:
        with open(outputs.detections, "w") as detections:
            for frame in engine.frames(max_frames):
                detections.write(json.dumps(frame_record(frame)) + "\n")
                detections.flush()
                need_png = png_every and frame.index % png_every == 0
                if need_png or sink is not None:
                    picture = render_frame(frame, grid, engine.trajectory, contributions,
                                           start_us=engine.stream_span_us[0])
                    if need_png:
                        picture.save(outputs.frames_dir / f"frame_{frame.index:06d}.png")
                    if sink is not None:
                        sink.append(picture)
                if on_frame is not None:
                    on_frame(frame)
        completed = True
    except BaseException as error:
        error_text = f"{type(error).__name__}: {error}"
        raise
    finally:
        if sink is not None:
            sink.close()
            outputs.video = sink.path
        summary = engine.summary()
        summary.update(dict(extra_summary or {}))
        summary["completed"] = completed
        if error_text:
            summary["error"] = error_text
        summary["video"] = {"path": str(outputs.video) if outputs.video else None,
                            "frames": sink.frames if sink is not None else 0,
                            "kind": sink.kind if sink is not None else "none",
                            "error": sink.error if sink is not None else ""}
        summary["outputs"] = {"detections": str(outputs.detections), "summary": str(outputs.summary),
                              "frames_dir": str(outputs.frames_dir) if outputs.frames_dir else None,
                              "video": str(outputs.video) if outputs.video else None}
        temporary = outputs.summary.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(temporary, outputs.summary)
    return summary, outputs


# ----------------------------------------------------------------------------------------------------------------
# Wiring the model's data settings
# ----------------------------------------------------------------------------------------------------------------

def engine_for_scene(nusc, scene_name: str, detector, data, policy: SyncPolicy | None = None, rate: float = 0.0,
                     can_bus=None, **engine_options) -> ReplayEngine:
    """A ReplayEngine over one scene, with the model's data settings (a FusionDataModule): its builder, its
    inference transforms, the scene's CAN bus (if the model uses GPS) and map layer. `policy` defaults to the data's
    LiDAR / radar sweep counts; engine_options go to ReplayEngine."""
    modalities = tuple(data.modalities)
    unknown = set(modalities) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}")
    builder = SampleBuilder(**{**data.reader_options(train=False), "on_missing": "mark_missing"})
    if policy is None:
        policy = SyncPolicy(lidar_sweeps=builder.lidar_sweeps, radar_sweeps=builder.radar_sweeps)
    use_gps = "gps" in modalities
    if use_gps and can_bus is None:
        can_bus = open_can_bus(nusc.dataroot)
    source = SceneSource(nusc, scene_name, can_bus if use_gps else None)
    map_layer, map_reason = None, "modality not used by the model"
    if use_gps:
        map_reason = "the scene's log has no map"
        if source.map_path is not None:
            try:
                map_layer = load_map_layer(source.map_path)
            except (FileNotFoundError, ValueError) as error:
                map_reason = str(error)
    return ReplayEngine(source, detector, builder, data.transforms(train=False), policy, rate=rate,
                        scene_name=scene_name, use_can=use_gps, map_layer=map_layer, map_reason=map_reason,
                        **engine_options)
