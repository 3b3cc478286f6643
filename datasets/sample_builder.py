"""The sample builder: sensor messages (+ CAN state, map layer, boxes) -> one `Sample` in the keyframe ego frame.

`SampleBuilder.build(...)` turns sensor messages (`SensorMessage`: channel, timestamp, file, calibration and the ego
pose at the message's own time) plus a CAN state and a map layer into a `Sample` in the ego frame at the LIDAR_TOP
keyframe timestamp. It needs no NuScenes object: the Dataset feeds it messages from its index, the replay engine
messages it buffered from a drive stream.

Frames and units: meters, radians, seconds; poses are 4x4 float64 `T_parent_child` (fusion.geometry).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from fusion.datasets.can_bus import CanState
from fusion.datasets.io import (RADAR_PCD_FIELDS, RadarFilters, lidar_bin_size, read_jpeg, read_lidar_bin,
                                read_radar_pcd, scale_intrinsics)
from fusion.datasets.map_layer import MapLayer, crop_map
from fusion.datasets.safe_io import DataFileError, DataPathError, data_path
from fusion.geometry import invert_transform
from fusion.grid import BEVGrid
from fusion.types import (CAMERA_NAMES, LIDAR_FEATURES, LIDAR_NAME, RADAR_FEATURES, RADAR_NAMES, Boxes,
                          CameraImages, EgoState, Sample)

ON_MISSING = ("error", "mark_missing")
#: Every sensor channel the reader knows, in index order (NuScenesIndex stores channels by this index).
CHANNELS: tuple[str, ...] = (LIDAR_NAME,) + RADAR_NAMES + CAMERA_NAMES
_CHUNK_ROWS = 10_000  # rows per float32 [n, 5] x [5, 5] product: OpenBLAS threads above 262144 = m * n * k
_POINT_ITEM = np.dtype((np.void, 4 * len(LIDAR_FEATURES)))


@dataclass(frozen=True)
class SensorMessage:
    """One sensor reading as the reader (or replay) sees it.

    channel: e.g. "LIDAR_TOP", "RADAR_FRONT", "CAM_FRONT".
    timestamp_us: the reading's own timestamp, microseconds.
    path: the file (.pcd.bin, .pcd or .jpg).
    sensor_to_ego: [4, 4] float64, sensor frame -> ego frame (calibrated_sensor), meters.
    ego_to_global: [4, 4] float64, ego pose at `timestamp_us` (ego -> global), meters.
    intrinsics: [3, 3] float64 pinhole matrix of a camera at the file's full resolution; None for other sensors.
    path_error: non-empty when the table's file name leaves the dataroot (`sensor_file_path`); the file is then
        never opened and reading it raises DataPathError with this text.
    """

    channel: str
    timestamp_us: int
    path: str
    sensor_to_ego: np.ndarray
    ego_to_global: np.ndarray
    intrinsics: np.ndarray | None = None
    path_error: str = ""


def sensor_file_path(dataroot: str, filename: object, which: str = "") -> tuple[str, str]:
    """(path, path_error) of a sample_data file name: <dataroot>/<filename>, or ("", why) when the name leaves the
    dataroot (judged as written; symlinked folders inside the dataroot are fine). `which` names the row (its token,
    or its channel and time)."""
    try:
        return data_path(dataroot, filename, f"sample_data {which}".strip() + " filename"), ""
    except DataPathError as error:
        return "", str(error)


def strided_sweeps(previous: Sequence, count: int, stride: int) -> list:
    """Of the previous sweeps (newest first), every stride-th (the stride-th, 2 * stride-th, ...), at most count."""
    return list(previous)[stride - 1::stride][:count]


@dataclass
class SampleBuilder:
    """Sensor messages -> `Sample` in the ego frame at the LIDAR_TOP keyframe timestamp.

    grid: the BEVGrid the map raster is cropped to.
    lidar_sweeps: previous LiDAR sweeps added to the keyframe (the devkit's nsweeps - 1).
    lidar_sweep_stride: take every k-th previous sweep (k = 3 at 20 Hz: lags 0.15, 0.30, ... s), so that few sweeps
        span a long time baseline (moving objects move more between them) for the same number of points.
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
    lidar_sweep_stride: int = 1
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
        if int(self.lidar_sweep_stride) < 1:
            raise ValueError(f"lidar_sweep_stride must be >= 1, got {self.lidar_sweep_stride}")
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

    @property
    def previous_sweeps_needed(self) -> int:
        """How many previous LiDAR sweeps (newest first) `build` must be given to use `lidar_sweeps` of them."""
        return int(self.lidar_sweeps) * int(self.lidar_sweep_stride)

    def select_sweeps(self, sweeps: Sequence[SensorMessage]) -> list[SensorMessage]:
        """The previous sweeps (newest first) this builder uses: every lidar_sweep_stride-th, at most lidar_sweeps."""
        return strided_sweeps(sweeps, int(self.lidar_sweeps), int(self.lidar_sweep_stride))

    def build(self, *, token: str, scene_name: str, keyframe_lidar: SensorMessage,
              lidar_sweeps: Sequence[SensorMessage] = (),
              radar_messages: Mapping[str, Sequence[SensorMessage]] | None = None,
              camera_messages: Mapping[str, SensorMessage] | None = None,
              can_state: CanState | None = None, map_layer: MapLayer | None = None,
              boxes: Boxes | None = None) -> Sample:
        """One Sample. Frame: the ego frame at `keyframe_lidar.timestamp_us` (its ego pose).

        lidar_sweeps: previous LIDAR_TOP sweeps, newest first; every `lidar_sweep_stride`-th is used (the k-th,
            2k-th, ...), at most `lidar_sweeps` of them (see `previous_sweeps_needed`).
        radar_messages: radar channel -> its messages, keyframe first then previous sweeps.
        camera_messages: camera channel -> its keyframe image message.
        can_state: CAN state at the keyframe (None: absent). map_layer: the map of the scene (None: absent).
        boxes: ground truth already in this ego frame (None: empty).
        """
        missing: dict[str, str] = {}
        dropped: dict[str, int] = {}
        reference = np.asarray(keyframe_lidar.ego_to_global, dtype=np.float64)
        global_to_reference = invert_transform(reference)

        lidar = self._lidar(keyframe_lidar, self.select_sweeps(lidar_sweeps), global_to_reference, missing,
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
        points = self._lidar(keyframe, self.select_sweeps(sweeps), reference, missing, dropped)
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
        """reader(message.path), or None (recording why) when the file is missing/unreadable and we may skip it.
        A path outside the dataroot is refused without opening it."""
        try:
            if message.path_error:
                raise DataPathError(message.path_error)
            return reader(message.path)
        except (FileNotFoundError, DataFileError) as error:
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
