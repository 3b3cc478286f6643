"""The nuScenes reader: sensor messages -> `Sample`, and a `torch.utils.data.Dataset` over a devkit dataroot.

Two layers, one code path:
- `SampleBuilder.build(...)` turns sensor messages (`SensorMessage`: channel, timestamp, file, calibration and the
  ego pose at the message's own time) plus a CAN state and a map layer into a `Sample` in the ego frame at the
  LIDAR_TOP keyframe timestamp. It needs no NuScenes object: the replay engine feeds it messages it buffered.
- `NuScenesDataset` reads the devkit tables once (`NuScenes(version, dataroot)`), keeps a compact numpy index
  (`NuScenesIndex`: paths, poses, timestamps, ground-truth boxes, CAN state; cached as NPZ, never pickle), and feeds
  the same builder per keyframe.

Frames and units: meters, radians, seconds; poses are 4x4 float64 `T_parent_child` (fusion.geometry).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from fusion.datasets.io import (RADAR_PCD_FIELDS, RadarFilters, lidar_bin_size, read_jpeg, read_lidar_bin,
                                read_radar_pcd, scale_intrinsics)
from fusion.geometry import invert_transform, make_transform, yaw_of_matrix
from fusion.grid import BEVGrid
from fusion.types import (ATTRIBUTES, CAMERA_NAMES, DETECTION_CLASSES, LIDAR_FEATURES, LIDAR_NAME, NO_ATTRIBUTE,
                          RADAR_FEATURES, RADAR_NAMES, Boxes, CameraImages, EgoState, Sample)

ON_MISSING = ("error", "mark_missing")
#: Every sensor channel the reader knows, in index order (NuScenesIndex stores channels by this index).
CHANNELS: tuple[str, ...] = (LIDAR_NAME,) + RADAR_NAMES + CAMERA_NAMES
#: Eval ranges (meters, xy distance from the ego) of the nuScenes detection benchmark (detection_cvpr_2019).
DETECTION_EVAL_RANGE: dict[str, float] = {
    "car": 50.0, "truck": 50.0, "bus": 50.0, "trailer": 50.0, "construction_vehicle": 50.0,
    "pedestrian": 40.0, "motorcycle": 40.0, "bicycle": 40.0, "traffic_cone": 30.0, "barrier": 30.0,
}
#: Longest gap (seconds) between the two CAN messages around a keyframe that still counts as data, per message type.
CAN_MAX_GAP_S: dict[str, float] = {"pose": 0.2, "ms_imu": 0.2, "vehicle_monitor": 1.2}
_CHUNK_ROWS = 10_000  # rows per float32 [n, 5] x [5, 5] product: OpenBLAS threads above 262144 = m * n * k
_POINT_ITEM = np.dtype((np.void, 4 * len(LIDAR_FEATURES)))


# ----------------------------------------------------------------------------------------------------------------
# Messages, CAN state, map layer
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SensorMessage:
    """One sensor reading as the reader (or replay) sees it.

    channel: e.g. "LIDAR_TOP", "RADAR_FRONT", "CAM_FRONT".
    timestamp_us: the reading's own timestamp, microseconds.
    path: the file (.pcd.bin, .pcd or .jpg).
    sensor_to_ego: [4, 4] float64, sensor frame -> ego frame (calibrated_sensor), meters.
    ego_to_global: [4, 4] float64, ego pose at `timestamp_us` (ego -> global), meters.
    intrinsics: [3, 3] float64 pinhole matrix of a camera at the file's full resolution; None for other sensors.
    """

    channel: str
    timestamp_us: int
    path: str
    sensor_to_ego: np.ndarray
    ego_to_global: np.ndarray
    intrinsics: np.ndarray | None = None


@dataclass(frozen=True)
class CanState:
    """CAN bus state at a keyframe. speed m/s (forward), yaw_rate rad/s (counter-clockwise), acceleration [3] m/s^2
    in the ego frame. valid=False (values NaN) when there is no data; `reason` says why."""

    speed: float = float("nan")
    yaw_rate: float = float("nan")
    acceleration: tuple[float, float, float] = (float("nan"),) * 3
    valid: bool = False
    reason: str = ""

    @staticmethod
    def absent(reason: str) -> "CanState":
        return CanState(reason=reason)


def _interpolate_messages(messages: Sequence[dict], key: str, timestamp_us: int, max_gap_s: float) -> np.ndarray | None:
    """Value of `key` (scalar or vector) linearly interpolated at `timestamp_us` between the two messages around it,
    or None when they are more than `max_gap_s` apart (or, outside the messages' span, the nearest one is more than
    max_gap_s / 2 away)."""
    if not messages:
        return None
    times = np.array([m["utime"] for m in messages], dtype=np.int64)
    order = np.argsort(times, kind="stable")
    times = times[order]
    right = int(np.searchsorted(times, timestamp_us, side="left"))
    if right < len(times) and times[right] == timestamp_us:
        return np.asarray(messages[order[right]][key], dtype=np.float64)
    if right == 0 or right == len(times):
        nearest = 0 if right == 0 else len(times) - 1
        if abs(times[nearest] - timestamp_us) * 1e-6 > max_gap_s / 2:
            return None
        return np.asarray(messages[order[nearest]][key], dtype=np.float64)
    t0, t1 = times[right - 1], times[right]
    if (t1 - t0) * 1e-6 > max_gap_s:
        return None
    v0 = np.asarray(messages[order[right - 1]][key], dtype=np.float64)
    v1 = np.asarray(messages[order[right]][key], dtype=np.float64)
    alpha = (timestamp_us - t0) / (t1 - t0)
    return (1 - alpha) * v0 + alpha * v1


def can_state_at(messages: Mapping[str, Sequence[dict]], timestamp_us: int,
                 max_gap_s: Mapping[str, float] | None = None) -> CanState:
    """The CAN state at `timestamp_us` from nuScenes CAN bus messages (as `NuScenesCanBus.get_messages` returns them).

    messages: message type -> list of messages; the types used are "pose" (vel m/s, accel m/s^2, rotation_rate
        rad/s, all in the ego frame), "ms_imu" (linear_accel m/s^2, rotation_rate rad/s, ego frame) and
        "vehicle_monitor" (vehicle_speed km/h, yaw_rate deg/s). Missing types are fine.
    Sources, best first: speed from pose.vel[0], else vehicle_monitor.vehicle_speed; yaw rate from
    ms_imu.rotation_rate[2], else pose.rotation_rate[2], else vehicle_monitor.yaw_rate; acceleration from
    ms_imu.linear_accel, else pose.accel. The state is valid only when all three are known at the keyframe
    (interpolated between messages at most CAN_MAX_GAP_S apart); otherwise it is absent (NaN) with the reason.
    """
    gaps = dict(CAN_MAX_GAP_S, **(max_gap_s or {}))

    def get(kind: str, key: str):
        msgs = messages.get(kind) or []
        if not msgs or key not in msgs[0]:
            return None
        return _interpolate_messages(msgs, key, timestamp_us, gaps[kind])

    speed = get("pose", "vel")
    speed = speed[0] if speed is not None else None
    if speed is None:
        kmh = get("vehicle_monitor", "vehicle_speed")
        speed = float(kmh) / 3.6 if kmh is not None else None
    yaw_rate = None
    for kind in ("ms_imu", "pose"):
        rate = get(kind, "rotation_rate")
        if rate is not None:
            yaw_rate = float(rate[2])
            break
    if yaw_rate is None:
        deg = get("vehicle_monitor", "yaw_rate")
        yaw_rate = float(np.deg2rad(deg)) if deg is not None else None
    acceleration = get("ms_imu", "linear_accel")
    if acceleration is None:
        acceleration = get("pose", "accel")
    unknown = [name for name, value in (("speed", speed), ("yaw rate", yaw_rate), ("acceleration", acceleration))
               if value is None]
    if unknown:
        kinds = sorted(k for k, v in messages.items() if v)
        return CanState.absent(f"no CAN {', '.join(unknown)} at t={timestamp_us} us "
                               f"(message types available: {kinds or 'none'})")
    return CanState(float(speed), float(yaw_rate), tuple(float(a) for a in acceleration), True, "")


@dataclass(frozen=True)
class MapLayer:
    """A map raster of the devkit's MapMask kind: mask [Hm, Wm] uint8 (255 = drivable surface), `resolution` meters
    per pixel. Global (x, y) maps to pixel (round(x / res), round(Hm - y / res)), as in MapMask.to_pixel_coords."""

    mask: np.ndarray
    resolution: float = 0.1
    path: str = ""


_MAP_CACHE: dict[str, MapLayer] = {}


def load_map_layer(path: str, resolution: float = 0.1, cache_dir: str | None = None) -> MapLayer:
    """The map PNG at `path` as a MapLayer (kept per process). With `cache_dir`, the decoded raster is stored once
    as .npy there and memory-mapped, so DataLoader workers share one copy."""
    path = os.fspath(path)
    if path in _MAP_CACHE:
        return _MAP_CACHE[path]
    if not os.path.exists(path):
        raise FileNotFoundError(f"map raster not found: {path}")
    mask = None
    npy = None
    if cache_dir is not None:
        stat = os.stat(path)
        key = hashlib.sha1(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        npy = os.path.join(cache_dir, f"map_{key}.npy")
        if os.path.exists(npy):
            mask = np.load(npy, mmap_mode="r", allow_pickle=False)
    if mask is None:
        previous_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # nuScenes maps are large, trusted PNGs
        try:
            with Image.open(path) as image:
                mask = np.asarray(image.convert("L") if image.mode not in ("L", "1") else image, dtype=np.uint8)
                if image.mode == "1":
                    mask = mask * np.uint8(255)
        except OSError as error:
            raise ValueError(f"corrupt map raster {path}: {error}") from error
        finally:
            Image.MAX_IMAGE_PIXELS = previous_limit
        if resolution != 0.1:
            raise ValueError(f"map resolution {resolution} m: only the native 0.1 m/px is supported")
        if npy is not None:
            os.makedirs(cache_dir, exist_ok=True)
            temporary = f"{npy}.{os.getpid()}.tmp.npy"
            np.save(temporary, mask, allow_pickle=False)
            os.replace(temporary, npy)
            mask = np.load(npy, mmap_mode="r", allow_pickle=False)
    layer = MapLayer(mask=mask, resolution=resolution, path=path)
    _MAP_CACHE[path] = layer
    return layer


def crop_map(layer: MapLayer, ego_to_global: np.ndarray, grid: BEVGrid) -> np.ndarray:
    """[1, H, W] float32 in [0, 1]: the map value (mask / 255) at every BEV cell centre of `grid` (ego frame, taken
    to global through `ego_to_global`), nearest pixel as in MapMask; cells off the map are 0."""
    centers = grid.cell_centers(dtype=torch.float64).numpy().reshape(-1, 2)
    pose = np.asarray(ego_to_global, dtype=np.float64)
    global_xy = centers @ pose[:2, :2].T + pose[:2, 3]
    height, width = layer.mask.shape
    px = np.round(global_xy[:, 0] / layer.resolution).astype(np.int64)
    py = np.round(height - global_xy[:, 1] / layer.resolution).astype(np.int64)
    inside = (px >= 0) & (px < width) & (py >= 0) & (py < height)
    values = np.zeros(len(px), dtype=np.float32)
    values[inside] = layer.mask[py[inside], px[inside]].astype(np.float32) / 255.0
    return values.reshape(1, grid.height, grid.width)


# ----------------------------------------------------------------------------------------------------------------
# The sample builder
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class SampleBuilder:
    """Sensor messages -> `Sample` in the ego frame at the LIDAR_TOP keyframe timestamp.

    grid: the BEVGrid the map raster is cropped to.
    lidar_sweeps: previous LiDAR sweeps added to the keyframe (the devkit's nsweeps - 1).
    radar_sweeps: sweeps per radar, keyframe included (the devkit's nsweeps).
    radar_filters: "default" (the devkit's), "none", a dict or a RadarFilters.
    cameras / radars: channels to read, in output order; () disables the modality.
    lidar_min_distance / radar_min_distance: drop points with |x| and |y| below this in the sensor frame, meters
        (the devkit's remove_close; 0 keeps all).
    lidar_keep_rings: keep only rings with ring % k == 0 (thinning to fewer beams), None keeps all.
    camera_decode_size: (width, height) to decode JPEGs at least as large as, with JPEG DCT scaling (faster when the
        transforms shrink images anyway); the intrinsics follow. None decodes at full size.
    on_missing: "error" raises for a missing or unreadable sensor file (naming it); "mark_missing" leaves that
        sensor out of the sample and records why in Sample.missing / Sample.dropped_points.
    on_read_error: optional callable(message, error) told about every message whose file could not be read under
        "mark_missing" (replay uses it to count and retire the bad message).
    """

    grid: BEVGrid = field(default_factory=BEVGrid)
    lidar_sweeps: int = 9
    radar_sweeps: int = 6
    radar_filters: RadarFilters | str | dict | None = "default"
    cameras: tuple[str, ...] = CAMERA_NAMES
    radars: tuple[str, ...] = RADAR_NAMES
    lidar_min_distance: float = 1.0
    radar_min_distance: float = 1.0
    lidar_keep_rings: int | None = None
    camera_decode_size: tuple[int, int] | None = None
    on_missing: str = "error"
    on_read_error: Callable[[SensorMessage, Exception], None] | None = None

    def __post_init__(self):
        if self.on_missing not in ON_MISSING:
            raise ValueError(f"on_missing must be one of {ON_MISSING}, got {self.on_missing!r}")
        if int(self.lidar_sweeps) < 0:
            raise ValueError(f"lidar_sweeps must be >= 0, got {self.lidar_sweeps}")
        if int(self.radar_sweeps) < 1:
            raise ValueError(f"radar_sweeps must be >= 1 (the keyframe), got {self.radar_sweeps}")
        if self.lidar_keep_rings is not None and int(self.lidar_keep_rings) < 1:
            raise ValueError(f"lidar_keep_rings must be None or >= 1, got {self.lidar_keep_rings}")
        for name in self.cameras:
            if name not in CAMERA_NAMES:
                raise ValueError(f"unknown camera {name!r}; expected names from {CAMERA_NAMES}")
        for name in self.radars:
            if name not in RADAR_NAMES:
                raise ValueError(f"unknown radar {name!r}; expected names from {RADAR_NAMES}")
        self.cameras, self.radars = tuple(self.cameras), tuple(self.radars)
        self.radar_filters = RadarFilters.parse(self.radar_filters)

    # -- public ------------------------------------------------------------------------------------------------

    def build(self, *, token: str, scene_name: str, keyframe_lidar: SensorMessage,
              lidar_sweeps: Sequence[SensorMessage] = (),
              radar_messages: Mapping[str, Sequence[SensorMessage]] | None = None,
              camera_messages: Mapping[str, SensorMessage] | None = None,
              can_state: CanState | None = None, map_layer: MapLayer | None = None,
              boxes: Boxes | None = None) -> Sample:
        """One Sample. Frame: the ego frame at `keyframe_lidar.timestamp_us` (its ego pose).

        lidar_sweeps: previous LIDAR_TOP sweeps, newest first (extra ones beyond `lidar_sweeps` are ignored).
        radar_messages: radar channel -> its messages, keyframe first then previous sweeps.
        camera_messages: camera channel -> its keyframe image message.
        can_state: CAN state at the keyframe (None: absent). map_layer: the map of the scene (None: absent).
        boxes: ground truth already in this ego frame (None: empty).
        """
        missing: dict[str, str] = {}
        dropped: dict[str, int] = {}
        reference = np.asarray(keyframe_lidar.ego_to_global, dtype=np.float64)
        global_to_reference = invert_transform(reference)

        lidar = self._lidar(keyframe_lidar, list(lidar_sweeps)[: self.lidar_sweeps], global_to_reference, missing,
                            dropped)
        radar = self._radar(radar_messages or {}, keyframe_lidar.timestamp_us, global_to_reference, missing, dropped)
        cameras = self._cameras(camera_messages or {}, keyframe_lidar.timestamp_us, global_to_reference, missing)

        can = can_state if can_state is not None else CanState.absent("no CAN state given")
        if not can.valid:
            missing["CAN"] = can.reason or "no CAN data"
        nan = float("nan")
        ego = EgoState(
            ego_to_global=torch.from_numpy(reference.copy()),
            speed=torch.tensor(can.speed if can.valid else nan, dtype=torch.float32),
            yaw_rate=torch.tensor(can.yaw_rate if can.valid else nan, dtype=torch.float32),
            acceleration=torch.tensor(can.acceleration if can.valid else (nan, nan, nan), dtype=torch.float32),
            can_valid=torch.tensor(bool(can.valid)),
        )
        map_raster = None
        if map_layer is not None:
            map_raster = torch.from_numpy(crop_map(map_layer, reference, self.grid))
        else:
            missing.setdefault("MAP", "no map layer")
        return Sample(token=token, scene_name=scene_name, timestamp_us=int(keyframe_lidar.timestamp_us),
                      lidar=lidar, radar=radar, cameras=cameras, ego=ego, map_raster=map_raster,
                      boxes=boxes if boxes is not None else Boxes.empty(), missing=missing, dropped_points=dropped)

    def load_lidar(self, keyframe: SensorMessage, sweeps: Sequence[SensorMessage] = ()
                   ) -> tuple[torch.Tensor | None, dict[str, int], dict[str, str]]:
        """Only the LiDAR part of `build`: ([N, 5] points or None, dropped_points, missing)."""
        missing: dict[str, str] = {}
        dropped: dict[str, int] = {}
        reference = invert_transform(np.asarray(keyframe.ego_to_global, dtype=np.float64))
        points = self._lidar(keyframe, list(sweeps)[: self.lidar_sweeps], reference, missing, dropped)
        return points, dropped, missing

    def load_radar(self, keyframe: SensorMessage, radar_messages: Mapping[str, Sequence[SensorMessage]]
                   ) -> tuple[torch.Tensor | None, dict[str, int], dict[str, str]]:
        """Only the radar part of `build`: ([M, 8] points or None, dropped_points, missing)."""
        missing: dict[str, str] = {}
        dropped: dict[str, int] = {}
        reference = invert_transform(np.asarray(keyframe.ego_to_global, dtype=np.float64))
        points = self._radar(radar_messages, keyframe.timestamp_us, reference, missing, dropped)
        return points, dropped, missing

    def sensor_to_reference(self, message: SensorMessage, global_to_reference: np.ndarray) -> np.ndarray:
        """[4, 4] float64 sensor frame at the message's time -> keyframe ego frame, composed once in float64."""
        return global_to_reference @ np.asarray(message.ego_to_global, np.float64) @ \
            np.asarray(message.sensor_to_ego, np.float64)

    # -- LiDAR -------------------------------------------------------------------------------------------------

    def _read_or_mark(self, reader: Callable, message: SensorMessage, missing: dict | None, key: str):
        """reader(message.path), or None (recording why) when the file is missing/unreadable and we may skip it."""
        try:
            return reader(message.path)
        except (FileNotFoundError, ValueError) as error:
            if self.on_missing == "error":
                raise
            if self.on_read_error is not None:
                self.on_read_error(message, error)
            if missing is not None:
                missing[key] = str(error)
            return None

    def _lidar(self, keyframe: SensorMessage, sweeps: list[SensorMessage], global_to_reference: np.ndarray,
               missing: dict, dropped: dict) -> torch.Tensor | None:
        """[N, 5] float32 (LIDAR_FEATURES) keyframe + sweeps in the keyframe ego frame, or None if the keyframe
        file is missing (with on_missing="mark_missing").

        Each sweep is read into one small buffer (shared by the sweeps) and filtered, transformed and written to the
        output while it is still in cache: its sensor -> keyframe-ego transform, composed once in float64, is
        applied as a float32 [n, 5] x [5, 5] product of [x, y, z, intensity, 1] (intensity passes through, the ring
        column becomes the time lag). The output is allocated once for every point read and returned as a view of
        its kept rows (not shrunk: a realloc that shrinks it makes glibc map fresh pages for the next sample, which
        page-faulting made 3x slower on the project's VMs).
        """
        for key in ("lidar_nonfinite", "lidar_close", "lidar_ring_thinned"):
            dropped[key] = 0
        counts, messages = [], []
        for i, message in enumerate([keyframe] + list(sweeps)):
            count = self._read_or_mark(lidar_bin_size, message, missing if i == 0 else None, message.channel)
            if count is None:
                if i == 0:
                    return None
                dropped["lidar_sweeps_missing"] = dropped.get("lidar_sweeps_missing", 0) + 1
                continue
            counts.append(count)
            messages.append(message)
        width = len(LIDAR_FEATURES)
        out = np.empty((sum(counts), width), dtype=np.float32)
        block = np.empty((max(counts), width), dtype=np.float32)
        position = 0
        for message, count in zip(messages, counts):
            scan = read_lidar_bin(message.path, out=block[:count])  # sizes were checked above
            keep = None
            if not np.isfinite(scan).all():
                keep = np.isfinite(scan).all(axis=1)
                dropped["lidar_nonfinite"] += int(count - np.count_nonzero(keep))
            if self.lidar_min_distance > 0:
                close = np.abs(scan[:, 0]) < self.lidar_min_distance
                close &= np.abs(scan[:, 1]) < self.lidar_min_distance
                if keep is not None:
                    close &= keep
                dropped["lidar_close"] += int(np.count_nonzero(close))
                keep = ~close if keep is None else keep & ~close
            if self.lidar_keep_rings is not None and self.lidar_keep_rings > 1:
                thinned = np.round(scan[:, 4]).astype(np.int64) % int(self.lidar_keep_rings) != 0
                if keep is not None:
                    thinned &= keep
                dropped["lidar_ring_thinned"] += int(np.count_nonzero(thinned))
                keep = ~thinned if keep is None else keep & ~thinned
            if keep is not None and not keep.all():
                # rows as 20-byte items: boolean indexing of a 1-D void array copies them twice as fast as compress
                scan = scan.view(_POINT_ITEM).ravel()[keep].view(np.float32).reshape(-1, width)
            scan[:, 4] = 1.0                                   # the ring column becomes the homogeneous 1
            transform = self.sensor_to_reference(message, global_to_reference)
            matrix = np.zeros((width, width), dtype=np.float32)  # [x, y, z, intensity, 1] -> LIDAR_FEATURES
            matrix[:3, :3] = transform[:3, :3].T
            matrix[4, :3] = transform[:3, 3]
            matrix[3, 3] = 1.0
            matrix[4, 4] = (keyframe.timestamp_us - message.timestamp_us) * 1e-6
            # in row chunks so that BLAS stays single-threaded: a threaded sgemm with K=5 gains nothing and stalls
            # for milliseconds on a busy machine or in DataLoader workers
            for row in range(0, len(scan), _CHUNK_ROWS):
                chunk = scan[row:row + _CHUNK_ROWS]
                np.matmul(chunk, matrix, out=out[position:position + len(chunk)])
                position += len(chunk)
        return torch.from_numpy(out[:position])  # the dropped rows' tail stays allocated with the sample

    # -- radar -------------------------------------------------------------------------------------------------

    def _radar(self, radar_messages: Mapping[str, Sequence[SensorMessage]], keyframe_us: int,
               global_to_reference: np.ndarray, missing: dict, dropped: dict) -> torch.Tensor | None:
        """[M, 8] float32 (RADAR_FEATURES) of all radars and sweeps in the keyframe ego frame (channel order, then
        keyframe first), or None when every radar is missing. Positions and the compensated velocities
        (vx_comp, vy_comp, 0) go through each sweep's sensor -> keyframe-ego transform, composed once in float64."""
        if not self.radars:
            missing["RADAR"] = "radar disabled (radars=())"
            return None
        for key in ("radar_nonfinite", "radar_close"):
            dropped[key] = 0
        clouds, transforms, lags = [], [], []
        reader = lambda path: read_radar_pcd(path, self.radar_filters)  # noqa: E731
        for channel in self.radars:
            messages = list(radar_messages.get(channel) or [])[: self.radar_sweeps]
            if not messages:
                if self.on_missing == "error":
                    raise ValueError(f"no {channel} message for this sample (use on_missing='mark_missing' "
                                     "to read samples without it)")
                missing[channel] = "no message for this sample"
                continue
            for i, message in enumerate(messages):
                cloud = self._read_or_mark(reader, message, missing if i == 0 else None, channel)
                if cloud is None:
                    if i == 0:
                        break                      # no keyframe return of this radar: the channel is missing
                    dropped["radar_sweeps_missing"] = dropped.get("radar_sweeps_missing", 0) + 1
                    continue
                clouds.append(cloud)
                transforms.append(self.sensor_to_reference(message, global_to_reference))
                lags.append((keyframe_us - message.timestamp_us) * 1e-6)
        if not clouds:
            return None
        points = np.concatenate(clouds)
        sweep = np.repeat(np.arange(len(clouds)), [len(c) for c in clouds])
        columns = [RADAR_PCD_FIELDS.index(name) for name in ("x", "y", "z", "rcs", "vx_comp", "vy_comp", "dyn_prop")]
        keep = np.isfinite(points[:, columns]).all(axis=1)
        dropped["radar_nonfinite"] = int(len(points) - keep.sum())
        if self.radar_min_distance > 0:
            close = (np.abs(points[:, 0]) < self.radar_min_distance) & \
                    (np.abs(points[:, 1]) < self.radar_min_distance) & keep
            dropped["radar_close"] = int(close.sum())
            keep &= ~close
        points, sweep = points[keep], sweep[keep]
        transform = np.stack(transforms)[sweep]                           # [M, 4, 4] per point
        x, y, z, rcs, vx, vy, dyn_prop = (points[:, c] for c in columns)
        radar = np.empty((len(points), len(RADAR_FEATURES)), dtype=np.float64)
        radar[:, :3] = np.einsum("mij,mj->mi", transform[:, :3, :3], np.stack([x, y, z], axis=1)) + transform[:, :3, 3]
        radar[:, 3] = rcs
        radar[:, 4:6] = np.einsum("mij,mj->mi", transform[:, :2, :2], np.stack([vx, vy], axis=1))
        radar[:, 6] = dyn_prop
        radar[:, 7] = np.asarray(lags)[sweep]
        return torch.from_numpy(radar.astype(np.float32))

    # -- cameras -----------------------------------------------------------------------------------------------

    def _cameras(self, camera_messages: Mapping[str, SensorMessage], keyframe_us: int,
                 global_to_reference: np.ndarray, missing: dict) -> CameraImages | None:
        """The configured cameras (intrinsics for the decoded size, cam_to_ego through the ego motion between the
        camera's time and the keyframe), or None when every camera is missing."""
        if not self.cameras:
            missing["CAMERA"] = "cameras disabled (cameras=())"
            return None
        images: list[np.ndarray | None] = []
        intrinsics, extrinsics, offsets = [], [], []
        for channel in self.cameras:
            message = camera_messages.get(channel)
            if message is None:
                if self.on_missing == "error":
                    raise ValueError(f"no {channel} message for this sample (use on_missing='mark_missing' "
                                     "to read samples without it)")
                missing[channel] = "no message for this sample"
                images.append(None)
                intrinsics.append(np.eye(3))
                extrinsics.append(np.eye(4))
                offsets.append(0.0)
                continue
            if message.intrinsics is None:
                raise ValueError(f"camera message {channel} ({message.path}) has no intrinsics")
            decoded = self._read_or_mark(lambda path: read_jpeg(path, self.camera_decode_size), message, missing,
                                         channel)
            k = np.asarray(message.intrinsics, dtype=np.float64)
            if decoded is not None:
                image, factor = decoded
                if factor != 1:
                    k = scale_intrinsics(k, 1.0 / factor)
                images.append(image)
            else:
                images.append(None)
            intrinsics.append(k)
            extrinsics.append(self.sensor_to_reference(message, global_to_reference))
            offsets.append((message.timestamp_us - keyframe_us) * 1e-6)
        shapes = {img.shape for img in images if img is not None}
        if not shapes:
            return None
        if len(shapes) > 1:
            sizes = {c: img.shape[1::-1] for c, img in zip(self.cameras, images) if img is not None}
            raise ValueError(f"camera images of one sample differ in size {sizes}; set camera_decode_size or use "
                             "cameras of one resolution")
        height, width, _ = shapes.pop()
        valid = [img is not None for img in images]
        stacked = np.zeros((len(images), 3, height, width), dtype=np.uint8)
        for i, image in enumerate(images):
            if image is not None:
                stacked[i] = image.transpose(2, 0, 1)
        return CameraImages(
            images=torch.from_numpy(stacked),
            intrinsics=torch.from_numpy(np.stack(intrinsics).astype(np.float32)),
            cam_to_ego=torch.from_numpy(np.stack(extrinsics).astype(np.float32)),
            valid=torch.tensor(valid),
            time_offsets=torch.tensor(offsets, dtype=torch.float32),
            names=self.cameras,
        )


# ----------------------------------------------------------------------------------------------------------------
# The compact index over the devkit tables
# ----------------------------------------------------------------------------------------------------------------

INDEX_FORMAT = 1


@dataclass
class NuScenesIndex:
    """Everything the Dataset needs per keyframe, as flat numpy arrays (cheap to share with DataLoader workers,
    cached as NPZ). Messages are sample_data rows of the split's scenes (LiDAR and radar sweeps, keyframe images).

    msg_channel [M] int8 (index into CHANNELS); msg_timestamp [M] int64 us; msg_path [M] str (relative to the
    dataroot); msg_calib [M] int32 (row of calib_*); msg_ego_pose [M, 7] float64 (qw, qx, qy, qz, tx, ty, tz) ego
    pose at the message's time; msg_prev [M] int32 previous message of the same channel (-1 none).
    calib_sensor_to_ego [C, 4, 4] float64; calib_intrinsics [C, 3, 3] float64 (zeros for non-cameras).
    sample_token [S] str; sample_scene [S] str; sample_timestamp [S] int64 (LIDAR_TOP keyframe, us);
    sample_messages [S, len(CHANNELS)] int32 keyframe message per channel (-1 none); sample_map [S] int32 into
    map_paths (-1 none); sample_can [S, 5] float32 (speed, yaw_rate, ax, ay, az; NaN when invalid);
    sample_can_valid [S] bool; sample_can_reason [S] str.
    box_offsets [S + 1] int64: boxes of sample i are rows box_offsets[i]:box_offsets[i + 1] of box_center [B, 3],
    box_size [B, 3] (l, w, h), box_yaw [B], box_velocity [B, 2] (NaN where the devkit has none), box_label [B],
    box_attribute [B], box_num_lidar_pts [B], box_num_radar_pts [B] (all in the keyframe ego frame, float32 /
    int64), box_ego_dist [B] float32 (xy distance to the ego, as the devkit's eval), box_in_bike_rack [B] bool.
    """

    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.arrays["sample_token"])

    def __getattr__(self, name: str) -> np.ndarray:
        arrays = self.__dict__.get("arrays")
        if arrays is not None and name in arrays:
            return arrays[name]
        raise AttributeError(name)

    def save(self, path: str) -> None:
        """Write as NPZ (no pickled objects) atomically."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(temporary, format=np.array(INDEX_FORMAT), **self.arrays)
        os.replace(temporary, path)

    @staticmethod
    def load(path: str) -> "NuScenesIndex":
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data or int(data["format"]) != INDEX_FORMAT:
                raise ValueError(f"index cache {path} has another format; delete it to rebuild")
            return NuScenesIndex({k: data[k] for k in data.files if k != "format"})

    @staticmethod
    def build(nusc, scene_names: Sequence[str], can_bus=None, can_max_gap_s: Mapping[str, float] | None = None
              ) -> "NuScenesIndex":
        """Index the keyframes of `scene_names` from a loaded `NuScenes`; `can_bus` a `NuScenesCanBus` or None."""
        scenes = {s["name"]: s for s in nusc.scene}
        unknown = [name for name in scene_names if name not in scenes]
        if unknown:
            raise ValueError(f"scenes {unknown[:5]}{'...' if len(unknown) > 5 else ''} of the split are not in "
                             f"{nusc.dataroot}/{nusc.version}")
        scene_tokens = {scenes[name]["token"] for name in scene_names}
        channel_index = {c: i for i, c in enumerate(CHANNELS)}

        # Messages: every LiDAR/radar sample_data of these scenes, keyframe camera images.
        calib_rows: dict[str, int] = {}
        calib_s2e, calib_k = [], []
        msg_rows: dict[str, int] = {}
        columns: dict[str, list] = {k: [] for k in ("channel", "timestamp", "path", "calib", "pose", "prev")}
        sample_scene_token = {s["token"]: s["scene_token"] for s in nusc.sample}
        for record in nusc.sample_data:
            channel = record.get("channel")
            if channel not in channel_index or sample_scene_token.get(record["sample_token"]) not in scene_tokens:
                continue
            if channel in CAMERA_NAMES and not record["is_key_frame"]:
                continue
            cs_token = record["calibrated_sensor_token"]
            if cs_token not in calib_rows:
                cs = nusc.get("calibrated_sensor", cs_token)
                calib_rows[cs_token] = len(calib_s2e)
                calib_s2e.append(make_transform(cs["rotation"], cs["translation"]))
                k = np.asarray(cs.get("camera_intrinsic") or np.zeros((3, 3)), dtype=np.float64)
                calib_k.append(k if k.shape == (3, 3) else np.zeros((3, 3)))
            pose = nusc.get("ego_pose", record["ego_pose_token"])
            msg_rows[record["token"]] = len(columns["channel"])
            columns["channel"].append(channel_index[channel])
            columns["timestamp"].append(record["timestamp"])
            columns["path"].append(record["filename"])
            columns["calib"].append(calib_rows[cs_token])
            columns["pose"].append(list(pose["rotation"]) + list(pose["translation"]))
            columns["prev"].append(record["prev"])
        msg_prev = np.array([msg_rows.get(p, -1) if p else -1 for p in columns["prev"]], dtype=np.int32)

        # Keyframes, in scene order then time order.
        attribute_names = {a["token"]: a["name"] for a in nusc.attribute}
        can_cache: dict[str, dict | str] = {}
        samples: dict[str, list] = {k: [] for k in ("token", "scene", "timestamp", "messages", "map", "can",
                                                    "can_valid", "can_reason")}
        box_columns: dict[str, list] = {k: [] for k in ("center", "size", "yaw", "velocity", "label", "attribute",
                                                        "lidar", "radar", "dist", "bike_rack")}
        box_offsets = [0]
        map_paths: list[str] = []
        for scene_name in scene_names:
            scene = scenes[scene_name]
            log = nusc.get("log", scene["log_token"])
            map_path = ""
            if "map_token" in log:
                map_path = nusc.get("map", log["map_token"])["filename"]
            if map_path and map_path not in map_paths:
                map_paths.append(map_path)
            can_messages = scene_can_messages(can_bus, scene_name, can_cache)
            token = scene["first_sample_token"]
            while token:
                sample = nusc.get("sample", token)
                token = sample["next"]
                lidar_token = sample["data"].get(LIDAR_NAME)
                if lidar_token is None:
                    raise ValueError(f"sample {sample['token']} of {scene_name} has no {LIDAR_NAME} data; the reader "
                                     "needs it to define the sample's frame")
                lidar_record = nusc.get("sample_data", lidar_token)
                key_pose = nusc.get("ego_pose", lidar_record["ego_pose_token"])
                ego_to_global = make_transform(key_pose["rotation"], key_pose["translation"])
                samples["token"].append(sample["token"])
                samples["scene"].append(scene_name)
                samples["timestamp"].append(lidar_record["timestamp"])
                samples["messages"].append([msg_rows.get(sample["data"].get(c, ""), -1) for c in CHANNELS])
                samples["map"].append(map_paths.index(map_path) if map_path else -1)
                if isinstance(can_messages, str):
                    can = CanState.absent(can_messages)
                else:
                    can = can_state_at(can_messages, lidar_record["timestamp"], can_max_gap_s)
                samples["can"].append([can.speed, can.yaw_rate, *can.acceleration])
                samples["can_valid"].append(can.valid)
                samples["can_reason"].append(can.reason)

                for column, values in _ground_truth(nusc, sample, ego_to_global, attribute_names).items():
                    box_columns[column].extend(values)
                box_offsets.append(len(box_columns["label"]))

        def strings(values):
            return np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")

        n_boxes = len(box_columns["label"])
        arrays = {
            "msg_channel": np.array(columns["channel"], dtype=np.int8),
            "msg_timestamp": np.array(columns["timestamp"], dtype=np.int64),
            "msg_path": strings(columns["path"]),
            "msg_calib": np.array(columns["calib"], dtype=np.int32),
            "msg_ego_pose": np.array(columns["pose"], dtype=np.float64).reshape(-1, 7),
            "msg_prev": msg_prev,
            "calib_sensor_to_ego": np.array(calib_s2e, dtype=np.float64).reshape(-1, 4, 4),
            "calib_intrinsics": np.array(calib_k, dtype=np.float64).reshape(-1, 3, 3),
            "sample_token": strings(samples["token"]),
            "sample_scene": strings(samples["scene"]),
            "sample_timestamp": np.array(samples["timestamp"], dtype=np.int64),
            "sample_messages": np.array(samples["messages"], dtype=np.int32).reshape(-1, len(CHANNELS)),
            "sample_map": np.array(samples["map"], dtype=np.int32),
            "sample_can": np.array(samples["can"], dtype=np.float32).reshape(-1, 5),
            "sample_can_valid": np.array(samples["can_valid"], dtype=bool),
            "sample_can_reason": strings(samples["can_reason"]),
            "map_paths": strings(map_paths),
            "box_offsets": np.array(box_offsets, dtype=np.int64),
            "box_center": np.array(box_columns["center"], dtype=np.float32).reshape(n_boxes, 3),
            "box_size": np.array(box_columns["size"], dtype=np.float32).reshape(n_boxes, 3),
            "box_yaw": np.array(box_columns["yaw"], dtype=np.float32).reshape(n_boxes),
            "box_velocity": np.array(box_columns["velocity"], dtype=np.float32).reshape(n_boxes, 2),
            "box_label": np.array(box_columns["label"], dtype=np.int64),
            "box_attribute": np.array(box_columns["attribute"], dtype=np.int64),
            "box_num_lidar_pts": np.array(box_columns["lidar"], dtype=np.int64),
            "box_num_radar_pts": np.array(box_columns["radar"], dtype=np.int64),
            "box_ego_dist": np.array(box_columns["dist"], dtype=np.float32),
            "box_in_bike_rack": np.array(box_columns["bike_rack"], dtype=bool),
        }
        return NuScenesIndex(arrays)

    # -- per-sample accessors ---------------------------------------------------------------------------------

    def ego_to_global(self) -> np.ndarray:
        """[M, 4, 4] float64 ego pose of every message (computed once from msg_ego_pose, vectorised)."""
        cached = self.__dict__.get("_ego_to_global")
        if cached is None:
            q = self.msg_ego_pose[:, :4] / np.linalg.norm(self.msg_ego_pose[:, :4], axis=1, keepdims=True)
            w, x, y, z = q.T
            cached = np.zeros((len(q), 4, 4))
            cached[:, :3, :3] = np.stack([
                np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], axis=-1),
                np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], axis=-1),
                np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=-1)], axis=1)
            cached[:, :3, 3] = self.msg_ego_pose[:, 4:]
            cached[:, 3, 3] = 1.0
            self.__dict__["_ego_to_global"] = cached
        return cached

    def message(self, row: int, dataroot: str) -> SensorMessage:
        """The SensorMessage of message row `row`."""
        calib = int(self.msg_calib[row])
        channel = CHANNELS[int(self.msg_channel[row])]
        return SensorMessage(
            channel=channel,
            timestamp_us=int(self.msg_timestamp[row]),
            path=os.path.join(dataroot, str(self.msg_path[row])),
            sensor_to_ego=self.calib_sensor_to_ego[calib],
            ego_to_global=self.ego_to_global()[row],
            intrinsics=self.calib_intrinsics[calib] if channel in CAMERA_NAMES else None,
        )

    def chain(self, row: int, count: int) -> list[int]:
        """Message `row` and up to count - 1 previous messages of its channel, newest first."""
        rows = []
        while row >= 0 and len(rows) < count:
            rows.append(row)
            row = int(self.msg_prev[row])
        return rows

    def boxes(self, i: int, drop_empty: bool = True, eval_range: Mapping[str, float] | None = None,
              drop_in_bike_rack: bool = True) -> Boxes:
        """Ground-truth Boxes of sample i (keyframe ego frame) after the devkit's rules for which boxes count:
        no LiDAR and no radar point (filter_eval_boxes), beyond the class's eval range (optional), bicycles and
        motorcycles inside a bike rack."""
        rows = slice(int(self.box_offsets[i]), int(self.box_offsets[i + 1]))
        keep = np.ones(rows.stop - rows.start, dtype=bool)
        if drop_empty:
            keep &= (self.box_num_lidar_pts[rows] + self.box_num_radar_pts[rows]) != 0
        if eval_range is not None:
            limits = np.array([eval_range.get(name, np.inf) for name in DETECTION_CLASSES], dtype=np.float32)
            keep &= self.box_ego_dist[rows] < limits[self.box_label[rows]]
        if drop_in_bike_rack:
            keep &= ~self.box_in_bike_rack[rows]

        def take(name):
            return torch.from_numpy(np.ascontiguousarray(self.arrays[name][rows][keep]))

        n = int(keep.sum())
        return Boxes(center=take("box_center"), size=take("box_size"), yaw=take("box_yaw"),
                     velocity=take("box_velocity"), labels=take("box_label"), attributes=take("box_attribute"),
                     scores=torch.ones(n, dtype=torch.float32), num_lidar_pts=take("box_num_lidar_pts"),
                     num_radar_pts=take("box_num_radar_pts"))


def _ground_truth(nusc, sample: dict, ego_to_global: np.ndarray, attribute_names: dict[str, str]) -> dict[str, list]:
    """Column -> values of the detection-class boxes of one devkit sample, in its keyframe ego frame (the columns of
    NuScenesIndex's box_* arrays). Velocity: the devkit's box_velocity (global, NaN where it has none) rotated into
    the ego frame. in_bike_rack: a bicycle/motorcycle whose center lies in a static_object.bicycle_rack box
    (the devkit's filter_eval_boxes rule)."""
    from nuscenes.eval.detection.utils import category_to_detection_name
    from nuscenes.utils.data_classes import Box
    from nuscenes.utils.geometry_utils import points_in_box
    from pyquaternion import Quaternion

    global_to_ego = invert_transform(ego_to_global)
    annotations = [nusc.get("sample_annotation", token) for token in sample["anns"]]
    bike_racks = [Box(a["translation"], a["size"], Quaternion(a["rotation"])) for a in annotations
                  if a["category_name"] == "static_object.bicycle_rack"]
    columns: dict[str, list] = {k: [] for k in ("center", "size", "yaw", "velocity", "label", "attribute", "lidar",
                                                "radar", "dist", "bike_rack")}
    for ann in annotations:
        name = category_to_detection_name(ann["category_name"])
        if name is None:
            continue
        if len(ann["attribute_tokens"]) > 1:
            raise ValueError(f"annotation {ann['token']} has {len(ann['attribute_tokens'])} attributes; the devkit "
                             "allows at most one")
        attribute = ATTRIBUTES.index(attribute_names[ann["attribute_tokens"][0]]) if ann["attribute_tokens"] \
            else NO_ATTRIBUTE
        translation = np.asarray(ann["translation"], dtype=np.float64)
        box_ego = global_to_ego @ make_transform(ann["rotation"], translation)
        velocity = global_to_ego[:3, :3] @ np.asarray(nusc.box_velocity(ann["token"]), dtype=np.float64)
        width, length, height = ann["size"]
        offset = translation - ego_to_global[:3, 3]
        columns["center"].append(box_ego[:3, 3])
        columns["size"].append((length, width, height))
        columns["yaw"].append(yaw_of_matrix(box_ego[:3, :3]))
        columns["velocity"].append(velocity[:2])
        columns["label"].append(DETECTION_CLASSES.index(name))
        columns["attribute"].append(attribute)
        columns["lidar"].append(ann["num_lidar_pts"])
        columns["radar"].append(ann["num_radar_pts"])
        columns["dist"].append(np.hypot(offset[0], offset[1]))
        columns["bike_rack"].append(name in ("bicycle", "motorcycle") and any(
            points_in_box(rack, translation[:, None]).any() for rack in bike_racks))
    return columns


def scene_can_messages(can_bus, scene_name: str, cache: dict | None = None) -> dict | str:
    """Message type (pose, ms_imu, vehicle_monitor) -> messages of one scene from a NuScenesCanBus, or a string
    saying why the scene has no CAN data. `cache` (scene name -> result) avoids reading a scene twice."""
    cache = {} if cache is None else cache
    if scene_name in cache:
        return cache[scene_name]
    if isinstance(can_bus, str):
        cache[scene_name] = can_bus
        return can_bus
    messages: dict[str, list] = {}
    reasons = []
    for kind in ("pose", "ms_imu", "vehicle_monitor"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                messages[kind] = can_bus.get_messages(scene_name, kind, print_warnings=False)
        except AssertionError:
            reasons.append(f"scene name {scene_name!r} is not of the devkit's 'scene-NNNN' form")
            break
        except FileNotFoundError:
            reasons.append(f"no {kind} file")
        except Exception as error:  # the devkit raises a bare Exception for its CAN blacklist
            reasons.append(str(error))
            break
    result: dict | str = messages if messages else f"{scene_name} has no CAN bus data: {'; '.join(reasons)}"
    cache[scene_name] = result
    return result


# ----------------------------------------------------------------------------------------------------------------
# The Dataset
# ----------------------------------------------------------------------------------------------------------------

def _fingerprint(dataroot: str, version: str, split: str, extra: dict) -> str:
    """Hash of what the index depends on: the tables' and CAN files' sizes and times, split, options."""
    parts = [os.path.abspath(dataroot), version, split, json.dumps(extra, sort_keys=True), str(INDEX_FORMAT)]
    for folder in (os.path.join(dataroot, version), os.path.join(dataroot, "can_bus")):
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                stat = os.stat(os.path.join(folder, name))
                parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


class NuScenesDataset(torch.utils.data.Dataset):
    """One `Sample` per keyframe sample of a nuScenes split, every sensor in the ego frame at the LIDAR_TOP keyframe.

    dataroot / version: a nuScenes dataroot and its table folder (e.g. "v1.0-mini").
    split: a devkit split name (nuscenes.utils.splits: "mini_val", "train", ...) or a custom one from
        <dataroot>/<version>/splits.json (e.g. "synth_train").
    grid: the BEVGrid of the map crop. lidar_sweeps / radar_sweeps / radar_filters / cameras / radars / on_missing /
        lidar_min_distance / lidar_keep_rings / camera_decode_size: see SampleBuilder.
    load_map: crop the scene's map raster (the dataroot's map PNGs) onto the grid.
    transforms: a callable Sample -> Sample applied to every item (fusion.datasets.transforms).
    cache_dir: where to keep the NPZ index (and memory-mapped map rasters); None keeps them in memory only.
    drop_empty_boxes / box_eval_range / drop_boxes_in_bike_rack: the devkit's rules for which boxes count; pass
        box_eval_range=DETECTION_EVAL_RANGE to also drop boxes beyond the eval distance of their class.
    Box velocities are NaN where the devkit's box_velocity has no estimate (single-frame tracks, long gaps).
    """

    def __init__(self, dataroot: str, version: str, split: str, grid: BEVGrid | None = None, lidar_sweeps: int = 9,
                 radar_sweeps: int = 6, radar_filters: RadarFilters | str | dict | None = "default",
                 cameras: Sequence[str] = CAMERA_NAMES, radars: Sequence[str] = RADAR_NAMES,
                 load_map: bool = True, on_missing: str = "error",
                 transforms: Callable[[Sample], Sample] | None = None, cache_dir: str | None = None,
                 lidar_min_distance: float = 1.0, radar_min_distance: float = 1.0,
                 lidar_keep_rings: int | None = None, camera_decode_size: tuple[int, int] | None = None,
                 drop_empty_boxes: bool = True, box_eval_range: Mapping[str, float] | None = None,
                 drop_boxes_in_bike_rack: bool = True, can_max_gap_s: Mapping[str, float] | None = None):
        super().__init__()
        dataroot = os.fspath(dataroot)
        if not os.path.isdir(dataroot):
            raise FileNotFoundError(f"nuScenes dataroot not found: {dataroot}")
        if not os.path.isdir(os.path.join(dataroot, version)):
            raise FileNotFoundError(f"nuScenes dataroot {dataroot} has no version folder {version!r} "
                                    f"(found: {sorted(os.listdir(dataroot))})")
        self.dataroot, self.version, self.split = dataroot, version, split
        self.grid = grid if grid is not None else BEVGrid()
        self.builder = SampleBuilder(grid=self.grid, lidar_sweeps=lidar_sweeps, radar_sweeps=radar_sweeps,
                                     radar_filters=radar_filters, cameras=tuple(cameras), radars=tuple(radars),
                                     lidar_min_distance=lidar_min_distance, radar_min_distance=radar_min_distance,
                                     lidar_keep_rings=lidar_keep_rings, camera_decode_size=camera_decode_size,
                                     on_missing=on_missing)
        self.load_map = load_map
        self.transforms = transforms
        self.cache_dir = cache_dir
        self.drop_empty_boxes = drop_empty_boxes
        self.box_eval_range = dict(box_eval_range) if box_eval_range is not None else None
        self.drop_boxes_in_bike_rack = drop_boxes_in_bike_rack
        self.index = self._load_or_build_index(dict(can_max_gap_s or {}))

    def _load_or_build_index(self, can_max_gap_s: dict) -> NuScenesIndex:
        path = None
        if self.cache_dir is not None:
            key = _fingerprint(self.dataroot, self.version, self.split, {"can_max_gap_s": can_max_gap_s})
            path = os.path.join(self.cache_dir, f"nuscenes_index_{self.version}_{self.split}_{key}.npz")
            if os.path.exists(path):
                return NuScenesIndex.load(path)
        index = build_index(self.dataroot, self.version, self.split, can_max_gap_s)
        if path is not None:
            index.save(path)
        return index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def sample_tokens(self) -> list[str]:
        return [str(t) for t in self.index.sample_token]

    def messages(self, i: int, sensors: Sequence[str] = ("lidar", "radar", "camera")) -> dict:
        """The keyword arguments of SampleBuilder.build for sample i, minus CAN, map and boxes: the LiDAR keyframe
        and sweeps, and (when in `sensors`) the radar and camera messages."""
        index, root = self.index, self.dataroot
        rows = index.sample_messages[i]
        key_row = int(rows[CHANNELS.index(LIDAR_NAME)])
        if key_row < 0:
            raise ValueError(f"sample {index.sample_token[i]} has no {LIDAR_NAME} message")
        lidar_rows = index.chain(key_row, self.builder.lidar_sweeps + 1)
        messages = dict(keyframe_lidar=index.message(lidar_rows[0], root),
                        lidar_sweeps=[index.message(r, root) for r in lidar_rows[1:]])
        if "radar" in sensors:
            messages["radar_messages"] = {
                c: [index.message(r, root) for r in index.chain(int(rows[CHANNELS.index(c)]),
                                                                self.builder.radar_sweeps)]
                for c in self.builder.radars}
        if "camera" in sensors:
            messages["camera_messages"] = {c: index.message(int(rows[CHANNELS.index(c)]), root)
                                           for c in self.builder.cameras if rows[CHANNELS.index(c)] >= 0}
        return messages

    def can_state(self, i: int) -> CanState:
        values = self.index.sample_can[i]
        if not bool(self.index.sample_can_valid[i]):
            return CanState.absent(str(self.index.sample_can_reason[i]))
        return CanState(float(values[0]), float(values[1]), tuple(float(v) for v in values[2:]), True, "")

    def map_layer(self, i: int) -> MapLayer | None:
        row = int(self.index.sample_map[i])
        if row < 0:
            return None
        return load_map_layer(os.path.join(self.dataroot, str(self.index.map_paths[row])), cache_dir=self.cache_dir)

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples")
        i = int(i) % len(self)
        map_layer = None
        map_reason = None
        if self.load_map:
            try:
                map_layer = self.map_layer(i)
                if map_layer is None:
                    map_reason = "the scene's log has no map"
            except (FileNotFoundError, ValueError) as error:
                if self.builder.on_missing == "error":
                    raise
                map_reason = str(error)
        else:
            map_reason = "map loading disabled (load_map=False)"
        sample = self.builder.build(
            token=str(self.index.sample_token[i]), scene_name=str(self.index.sample_scene[i]),
            can_state=self.can_state(i), map_layer=map_layer,
            boxes=self.index.boxes(i, self.drop_empty_boxes, self.box_eval_range, self.drop_boxes_in_bike_rack),
            **self.messages(i))
        if map_reason is not None:
            sample.missing["MAP"] = map_reason
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample


def build_index(dataroot: str, version: str, split: str, can_max_gap_s: Mapping[str, float] | None = None
                ) -> NuScenesIndex:
    """Load the devkit tables once and index the keyframes of `split` (the NuScenes object is dropped after)."""
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.splits import get_scenes_of_split

    table_root = os.path.join(dataroot, version)
    if not os.path.isdir(table_root):
        raise FileNotFoundError(f"nuScenes dataroot {dataroot} has no version folder {version!r}")
    nusc = NuScenes(version=version, dataroot=dataroot, verbose=False)
    try:
        scene_names = list(get_scenes_of_split(split, nusc))
    except ValueError as error:
        raise ValueError(f"split {split!r} of {table_root}: {error}") from error
    present = {s["name"] for s in nusc.scene}
    scene_names = [name for name in scene_names if name in present] if _is_predefined(split) else scene_names
    if not scene_names:
        raise ValueError(f"split {split!r} has no scenes in {table_root}")
    can_bus: object
    try:
        from nuscenes.can_bus.can_bus_api import NuScenesCanBus
        can_bus = NuScenesCanBus(dataroot=dataroot)
    except Exception as error:  # the devkit raises a bare Exception when can_bus/ is absent
        can_bus = f"no CAN bus data in this dataroot: {error}"
    return NuScenesIndex.build(nusc, scene_names, can_bus, can_max_gap_s)


def _is_predefined(split: str) -> bool:
    from nuscenes.utils.splits import is_predefined_split
    return is_predefined_split(split)
