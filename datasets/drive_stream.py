"""A recorded drive as a time-ordered stream of messages: what a live system would receive, read from the devkit
tables of a nuScenes-format dataroot (data access only; replay decides what to do with the messages).

`SceneSource` reads one scene and yields EVERY sample_data of it (LiDAR sweeps ~20 Hz, five radars ~13 Hz, six
cameras ~12 Hz; keyframes and sweeps alike) and the scene's CAN bus messages (pose, ms_imu, vehicle_monitor via
NuScenesCanBus, when the dataroot has them), merged by timestamp (microseconds). It is a generator: message records
are made one at a time and no sensor file is opened until a frame needs it. A broken table row or a CAN message
without a time becomes a message with `error` set, never an exception.

Each sensor message carries its calibration and the ego pose at its own timestamp (4x4 float64, meters).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from fusion.datasets.can_bus import CAN_KINDS, scene_can_messages
from fusion.datasets.safe_io import DataPathError, data_path
from fusion.datasets.sample_builder import CHANNELS, SensorMessage, sensor_file_path
from fusion.geometry import make_transform
from fusion.types import CAMERA_NAMES

CAN_PREFIX = "CAN_"


def can_channel(kind: str) -> str:
    """Stream channel name of a CAN message type, e.g. "CAN_pose"."""
    return CAN_PREFIX + kind



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
    fault: the replay's counter for an `error` ("corrupt", or "bad_timestamp" for a stamp that is not an integer
        or lies far outside the scene's span).
    """

    timestamp_us: int
    channel: str
    token: str = ""
    sample_token: str = ""
    sensor: SensorMessage | None = None
    can: dict | None = None
    is_key_frame: bool = False
    error: str = ""
    fault: str = "corrupt"


class SceneSource:
    """The messages of one scene of a nuScenes-format dataroot, in timestamp order (iterate it; it can be iterated
    again). Reads the devkit tables of a loaded `NuScenes`; `can_bus` is a `NuScenesCanBus`, a string saying why
    there is none, or None.

    CAN messages more than `can_margin_s` seconds before the scene's first or after its last sample are left out.
    A sensor record stamped more than `stamp_margin_s` seconds outside that span (or not an integer) is yielded as
    an error message with fault "bad_timestamp" at its predecessor's time, so one absurd stamp can neither hold back
    the rest of its channel nor make the replay wait for it.
    """

    def __init__(self, nusc, scene_name: str, can_bus=None, channels: Sequence[str] = CHANNELS,
                 can_margin_s: float = 1.0, stamp_margin_s: float = 10.0):
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
        self.map_path_error = ""
        if log.get("map_token"):
            try:
                self.map_path = data_path(self.dataroot, nusc.get("map", log["map_token"])["filename"],
                                          f"map {log['map_token']}.filename")
            except DataPathError as error:
                self.map_path_error = str(error)
        first = nusc.get("sample", self.scene["first_sample_token"])
        last = nusc.get("sample", self.scene["last_sample_token"])
        margin = int(can_margin_s * 1e6)
        self.can_window_us = (first["timestamp"] - margin, last["timestamp"] + margin)
        stamp_margin = int(stamp_margin_s * 1e6)
        self.stamp_window_us = (first["timestamp"] - stamp_margin, last["timestamp"] + stamp_margin)
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
        path, path_error = sensor_file_path(self.dataroot, record["filename"], record.get("token", ""))
        return SensorMessage(channel=record["channel"], timestamp_us=int(record["timestamp"]),
                             path=path, path_error=path_error, sensor_to_ego=sensor_to_ego,
                             ego_to_global=make_transform(pose["rotation"], pose["translation"]),
                             intrinsics=intrinsics)

    def _sensor_stream(self, channel: str, token: str) -> Iterator[StreamMessage]:
        last_timestamp = self.stamp_window_us[0]
        start, end = self.stamp_window_us
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
            stamp = record.get("timestamp")
            if isinstance(stamp, bool) or not isinstance(stamp, (int, np.integer)) or not start <= stamp <= end:
                yield StreamMessage(last_timestamp, channel, token, error=f"sample_data {token}: timestamp "
                                    f"{stamp!r} is not an integer within the scene's span"[:300],
                                    fault="bad_timestamp")
                token = record.get("next") or ""
                continue
            last_timestamp = int(stamp)
            common = dict(timestamp_us=last_timestamp, channel=channel, token=token,
                          sample_token=record["sample_token"], is_key_frame=bool(record["is_key_frame"]))
            try:
                yield StreamMessage(sensor=self.sensor_message(record), **common)
            except (KeyError, ValueError, TypeError) as error:
                yield StreamMessage(error=f"sample_data {token}: broken record ({error!r})"[:300], **common)
            token = record["next"]

    def _can_stream(self, kind: str, messages: list) -> Iterator[StreamMessage]:
        start, end = self.can_window_us
        last_timestamp = start
        for message in messages:
            utime = message.get("utime") if isinstance(message, dict) else None
            if isinstance(utime, bool) or not isinstance(utime, (int, np.integer)):
                yield StreamMessage(last_timestamp, can_channel(kind), error=f"CAN {kind} message without an "
                                    "integer utime", fault="bad_timestamp")
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

