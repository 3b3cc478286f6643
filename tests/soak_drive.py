"""A long generated drive for the replay soak (a test helper, like real_frame.py), made cheap on purpose: the sensor
files are a small pool of low-resolution files (100-point LiDAR sweeps, 12-return radar scans, 16 x 8 JPEGs) that
the messages share, so any length of drive costs only its messages.

`SoakDrive(folder, seconds, seed)` writes the pool once; `messages(faults)` yields the drive's StreamMessages in
arrival order (LIDAR_TOP 20 Hz, RADAR_FRONT 13 Hz, CAM_FRONT 12 Hz, CAN pose 50 Hz; exact stamps, microseconds)
and, with faults=True, injects faults at random (seeded), counting each in `injected` by the replay's kind:
empty / truncated / missing_file (LiDAR files), corrupt (camera files), late and out_of_order (camera / radar
messages held back), duplicate (any message twice) and bad_timestamp (a stamp 10^5..10^9 s off). `faulted_us`
lists the stamps of the faulted messages, so that a test can tell which frames no fault touched.
"""
from __future__ import annotations

import dataclasses
import heapq
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from fusion.datasets.drive_stream import StreamMessage, can_channel
from fusion.datasets.io import RADAR_PCD_FIELDS, write_radar_pcd
from fusion.datasets.sample_builder import SensorMessage
from fusion.types import Boxes

#: channel -> (period us, phase us)
RATES = {"LIDAR_TOP": (50_000, 0), "RADAR_FRONT": (76_923, 11_000), "CAM_FRONT": (83_333, 23_000),
         can_channel("pose"): (20_000, 5_000)}
START_US = 1_600_000_000_000_000
FAULT_KINDS = ("empty", "truncated", "missing_file", "corrupt", "late", "out_of_order", "duplicate", "bad_timestamp")


def _ego_pose(timestamp_us: int) -> np.ndarray:
    """[4, 4] ego -> global at a time: driving along x at 5 m/s."""
    pose = np.eye(4)
    pose[0, 3] = 5.0 * (timestamp_us - START_US) * 1e-6
    return pose


class SoakDrive:
    def __init__(self, folder: Path, seconds: float, seed: int = 0, faults_per_second: float = 0.5):
        self.folder, self.seconds, self.seed = Path(folder), float(seconds), seed
        messages_per_second = sum(1e6 / period for period, _ in RATES.values())
        self.fault_probability = faults_per_second / messages_per_second
        self.folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        self.lidar_files, self.radar_files, self.camera_files = [], [], []
        for i in range(8):
            points = np.concatenate([rng.uniform(-30, 30, (100, 3)), rng.uniform(0, 1, (100, 1)),
                                     rng.integers(0, 32, (100, 1))], axis=1).astype(np.float32)
            points[:, 2] = rng.uniform(-1, 1, 100)
            path = self.folder / f"lidar_{i}.pcd.bin"
            points.tofile(path)
            self.lidar_files.append(str(path))
        for i in range(4):
            radar = np.zeros((12, len(RADAR_PCD_FIELDS)))
            radar[:, :2] = rng.uniform(-40, 40, (12, 2))
            radar[:, RADAR_PCD_FIELDS.index("ambig_state")] = 3
            path = self.folder / f"radar_{i}.pcd"
            write_radar_pcd(path, radar, trailing_bytes=16)
            self.radar_files.append(str(path))
        for i in range(4):
            path = self.folder / f"camera_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (8, 16, 3), dtype=np.uint8)).save(path, format="JPEG")
            self.camera_files.append(str(path))
        (self.folder / "empty.pcd.bin").write_bytes(b"")
        (self.folder / "truncated.pcd.bin").write_bytes(b"\0" * 47)
        (self.folder / "corrupt.jpg").write_bytes(b"this is not a jpeg" * 8)
        self.calibration = {"LIDAR_TOP": np.eye(4), "RADAR_FRONT": np.eye(4), "CAM_FRONT": np.eye(4)}
        self.intrinsics = np.array([[8.0, 0, 8], [0, 8.0, 4], [0, 0, 1]])
        self.injected: Counter = Counter()
        self.faulted_us: list[int] = []

    # -- the clean drive ---------------------------------------------------------------------------------------

    def _channel(self, channel: str) -> Iterator[StreamMessage]:
        period, phase = RATES[channel]
        end = START_US + int(self.seconds * 1e6)
        for i, timestamp in enumerate(range(START_US + phase, end, period)):
            token = f"{channel}-{i}"
            if channel.startswith("CAN_"):
                can = {"utime": timestamp, "vel": [5.0, 0.0, 0.0], "accel": [0.0, 0.0, 0.0],
                       "rotation_rate": [0.0, 0.0, 0.01 * (i % 7)]}
                yield StreamMessage(timestamp, channel, token, can=can)
                continue
            files = {"LIDAR_TOP": self.lidar_files, "RADAR_FRONT": self.radar_files,
                     "CAM_FRONT": self.camera_files}[channel]
            sensor = SensorMessage(channel, timestamp, files[i % len(files)], self.calibration[channel],
                                   _ego_pose(timestamp), self.intrinsics if channel == "CAM_FRONT" else None)
            yield StreamMessage(timestamp, channel, token, sample_token="", sensor=sensor, is_key_frame=i % 10 == 0)

    def clean(self) -> Iterator[StreamMessage]:
        return heapq.merge(*(self._channel(c) for c in RATES), key=lambda m: m.timestamp_us)

    # -- faults --------------------------------------------------------------------------------------------------

    def _with_file(self, message: StreamMessage, name: str) -> StreamMessage:
        return dataclasses.replace(message, sensor=dataclasses.replace(message.sensor, path=str(self.folder / name)))

    def messages(self, faults: bool = True) -> Iterator[StreamMessage]:
        """The drive in arrival order, with faults injected when `faults` (counted in `injected`)."""
        self.injected.clear()
        self.faulted_us.clear()
        rng = np.random.default_rng(self.seed + 1)
        held: dict[str, tuple[str, StreamMessage]] = {}  # channel -> (late | out_of_order, message)
        pending = ""  # the fault drawn last, applied to the next message it fits
        for message in self.clean():
            channel = message.channel
            if channel in held:
                kind, old = held[channel]
                if kind == "late":
                    yield old  # just before the next message of its channel: after its frame was assembled
                    yield message
                else:
                    yield message
                    yield old  # after a newer message of its channel
                del held[channel]
                continue
            if faults and not pending and rng.random() < self.fault_probability:
                pending = str(rng.choice(FAULT_KINDS))
            if not pending or pending not in self._kinds(channel):
                yield message
                continue
            kind, pending = pending, ""
            self.injected[kind] += 1
            self.faulted_us.append(message.timestamp_us)
            if kind == "duplicate":
                yield message
                yield message
            elif kind == "bad_timestamp":
                offset = int(rng.uniform(1e5, 1e9) * 1e6) * (1 if rng.random() < 0.5 else -1)
                yield dataclasses.replace(message, timestamp_us=message.timestamp_us + offset)
            elif kind in ("late", "out_of_order"):
                held[channel] = (kind, message)
            else:
                yield self._with_file(message, {"empty": "empty.pcd.bin", "truncated": "truncated.pcd.bin",
                                                "missing_file": "no_such_file.pcd.bin",
                                                "corrupt": "corrupt.jpg"}[kind])
        for _, old in held.values():
            yield old

    @staticmethod
    def _kinds(channel: str) -> list[str]:
        if channel == "LIDAR_TOP":
            return ["empty", "truncated", "missing_file", "duplicate", "bad_timestamp"]
        if channel == "CAM_FRONT":
            return ["corrupt", "late", "out_of_order", "duplicate", "bad_timestamp"]
        if channel == "RADAR_FRONT":
            return ["out_of_order", "duplicate", "bad_timestamp"]
        return ["duplicate", "bad_timestamp"]


class InputDetector:
    """A deterministic stand-in for the model whose boxes depend on everything it is given: the LiDAR points'
    mean, the radar and camera inputs and the CAN speed, so equal boxes mean equal inputs."""

    def predict(self, batch):
        lidar = batch.lidar_points[:, :3].double()
        center = lidar.mean(0) if len(lidar) else torch.zeros(3, dtype=torch.float64)
        radar = float(batch.radar_points[:, :2].double().sum()) if len(batch.radar_points) else 0.0
        camera = float(batch.cameras.images.double().mean()) if batch.cameras is not None else -1.0
        speed = float(batch.ego.speed[0]) if bool(batch.ego.can_valid[0]) else -1.0
        box = Boxes(center=center.float()[None], size=torch.tensor([[4.0, 2.0, 1.5]]),
                    yaw=torch.tensor([(radar % 3.0) - 1.5]), velocity=torch.tensor([[speed, camera / 255.0]]),
                    labels=torch.tensor([0]), attributes=torch.tensor([0]), scores=torch.tensor([0.5]),
                    num_lidar_pts=torch.tensor([len(lidar)]), num_radar_pts=torch.tensor([len(batch.radar_points)]))
        return [box], None
