"""Typed data passed between the reader, the transforms, the model, evaluation and replay.

Every tensor is in the ego frame at the LIDAR_TOP keyframe timestamp (x forward, y left, z up; meters, radians,
seconds) unless its docstring says otherwise. A sensor that is absent for a sample is `None` in `Sample` (with the
reason in `Sample.missing`) and masked in `Batch.present`; it is never filled with zeros that look like data.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

DETECTION_CLASSES: tuple[str, ...] = (
    "car", "truck", "construction_vehicle", "bus", "trailer",
    "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
)
ATTRIBUTES: tuple[str, ...] = (
    "vehicle.moving", "vehicle.parked", "vehicle.stopped",
    "cycle.with_rider", "cycle.without_rider",
    "pedestrian.moving", "pedestrian.standing", "pedestrian.sitting_lying_down",
)
#: The attributes each detection class may carry (the devkit's detection_name_to_rel_attributes); () for none.
CLASS_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "car": ("vehicle.moving", "vehicle.parked", "vehicle.stopped"),
    "truck": ("vehicle.moving", "vehicle.parked", "vehicle.stopped"),
    "construction_vehicle": ("vehicle.moving", "vehicle.parked", "vehicle.stopped"),
    "bus": ("vehicle.moving", "vehicle.parked", "vehicle.stopped"),
    "trailer": ("vehicle.moving", "vehicle.parked", "vehicle.stopped"),
    "barrier": (),
    "motorcycle": ("cycle.with_rider", "cycle.without_rider"),
    "bicycle": ("cycle.with_rider", "cycle.without_rider"),
    "pedestrian": ("pedestrian.moving", "pedestrian.sitting_lying_down", "pedestrian.standing"),
    "traffic_cone": (),
}
CAMERA_NAMES: tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT",
)
RADAR_NAMES: tuple[str, ...] = (
    "RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT",
)
LIDAR_NAME = "LIDAR_TOP"
MODALITIES: tuple[str, ...] = ("camera", "lidar", "radar", "gps")

#: Columns of `Sample.lidar` / `Batch.lidar_points`.
LIDAR_FEATURES: tuple[str, ...] = ("x", "y", "z", "intensity", "time_lag")
#: Columns of `Sample.radar` / `Batch.radar_points`.
RADAR_FEATURES: tuple[str, ...] = ("x", "y", "z", "rcs", "vx_comp", "vy_comp", "dyn_prop", "time_lag")

NO_ATTRIBUTE = -1


def _map_tensors(obj, fn):
    """A copy of a dataclass with `fn` applied to every tensor field (recursing into dataclasses, lists, dicts)."""
    def convert(value):
        if isinstance(value, torch.Tensor):
            return fn(value)
        if hasattr(value, "__dataclass_fields__"):
            return _map_tensors(value, fn)
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value
    return replace(obj, **{f.name: convert(getattr(obj, f.name)) for f in fields(obj)})


@dataclass
class Boxes:
    """3D boxes of one sample in the ego frame.

    center: [N, 3] float32, box center (x, y, z), meters.
    size: [N, 3] float32, (length along the heading, width, height), meters. (The devkit's `wlh` is (w, l, h).)
    yaw: [N] float32, heading about +z, radians, 0 along +x.
    velocity: [N, 2] float32, (vx, vy) over ground, m/s.
    labels: [N] int64, index into DETECTION_CLASSES.
    attributes: [N] int64, index into ATTRIBUTES, NO_ATTRIBUTE (-1) for none.
    scores: [N] float32 in [0, 1]; 1 for ground truth.
    num_lidar_pts / num_radar_pts: [N] int64 points inside the box (ground truth), -1 where unknown.
    """

    center: torch.Tensor
    size: torch.Tensor
    yaw: torch.Tensor
    velocity: torch.Tensor
    labels: torch.Tensor
    attributes: torch.Tensor
    scores: torch.Tensor
    num_lidar_pts: torch.Tensor
    num_radar_pts: torch.Tensor

    def __post_init__(self):
        n = self.center.shape[0]
        expected = {"center": (n, 3), "size": (n, 3), "yaw": (n,), "velocity": (n, 2), "labels": (n,),
                    "attributes": (n,), "scores": (n,), "num_lidar_pts": (n,), "num_radar_pts": (n,)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"Boxes.{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")

    @staticmethod
    def empty(device=None) -> "Boxes":
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        return Boxes(torch.zeros(0, 3, **f32), torch.zeros(0, 3, **f32), torch.zeros(0, **f32),
                     torch.zeros(0, 2, **f32), torch.zeros(0, **i64), torch.zeros(0, **i64),
                     torch.zeros(0, **f32), torch.zeros(0, **i64), torch.zeros(0, **i64))

    def __len__(self) -> int:
        return int(self.center.shape[0])

    def to(self, device) -> "Boxes":
        return _map_tensors(self, lambda t: t.to(device))

    def select(self, index: torch.Tensor) -> "Boxes":
        """The boxes at a bool mask or an index tensor [N]."""
        return _map_tensors(self, lambda t: t[index])

    @staticmethod
    def cat(boxes: list["Boxes"]) -> "Boxes":
        if not boxes:
            return Boxes.empty()
        return Boxes(**{f.name: torch.cat([getattr(b, f.name) for b in boxes]) for f in fields(Boxes)})

    def corners(self) -> torch.Tensor:
        """[N, 8, 3] corners in the ego frame, meters: first the four bottom corners (front-left, front-right,
        rear-right, rear-left), then the same four on top."""
        half = self.size / 2.0
        signs = torch.tensor([[1, 1, -1], [1, -1, -1], [-1, -1, -1], [-1, 1, -1],
                              [1, 1, 1], [1, -1, 1], [-1, -1, 1], [-1, 1, 1]],
                             dtype=self.size.dtype, device=self.size.device)
        local = signs[None] * half[:, None, :]
        cos, sin = torch.cos(self.yaw)[:, None], torch.sin(self.yaw)[:, None]
        x = local[..., 0] * cos - local[..., 1] * sin
        y = local[..., 0] * sin + local[..., 1] * cos
        return torch.stack([x, y, local[..., 2]], dim=-1) + self.center[:, None, :]


@dataclass
class CameraImages:
    """The surround cameras of one sample (leading [Ncam]) or of a batch (leading [B, Ncam]).

    images: [..., 3, H, W] uint8 RGB.
    intrinsics: [..., 3, 3] float32, pinhole matrix in pixels of `images` as they are (after any resize/crop).
    cam_to_ego: [..., 4, 4] float32, camera frame (x right, y down, z forward) -> keyframe ego frame, meters.
        It already includes the ego motion between the camera's own timestamp and the LiDAR keyframe, and any
        BEV augmentation applied to the sample.
    valid: [..., Ncam] bool, False for a camera whose image is missing or corrupt (its pixels are zeros).
    names: camera channel names in order (CAMERA_NAMES by default).
    time_offsets: [..., Ncam] float32, camera timestamp minus keyframe timestamp, seconds.
    """

    images: torch.Tensor
    intrinsics: torch.Tensor
    cam_to_ego: torch.Tensor
    valid: torch.Tensor
    time_offsets: torch.Tensor
    names: tuple[str, ...] = CAMERA_NAMES

    def to(self, device) -> "CameraImages":
        return _map_tensors(self, lambda t: t.to(device))


@dataclass
class EgoState:
    """GNSS/IMU/CAN state of the ego at the keyframe, one sample (scalars) or a batch (leading [B]).

    ego_to_global: [..., 4, 4] float64, keyframe ego pose (ego -> global), meters.
    speed: [...] float32, forward speed from the CAN bus, m/s.
    yaw_rate: [...] float32, rad/s, counter-clockwise positive (IMU).
    acceleration: [..., 3] float32, m/s^2 in the ego frame (IMU).
    can_valid: [...] bool. False where the scene has no CAN bus data or the keyframe falls in a gap: then speed,
        yaw_rate and acceleration are NaN, never zeros that look like data.
    """

    ego_to_global: torch.Tensor
    speed: torch.Tensor
    yaw_rate: torch.Tensor
    acceleration: torch.Tensor
    can_valid: torch.Tensor

    def to(self, device) -> "EgoState":
        return _map_tensors(self, lambda t: t.to(device))

    def vector(self) -> torch.Tensor:
        """[..., 5] float32 (speed, yaw_rate, ax, ay, az) with invalid states zeroed; pair it with `can_valid`."""
        state = torch.cat([self.speed[..., None], self.yaw_rate[..., None], self.acceleration], dim=-1).float()
        return torch.where(self.can_valid[..., None], torch.nan_to_num(state), torch.zeros_like(state))


@dataclass
class Sample:
    """One keyframe, every sensor in the keyframe ego frame.

    lidar: [N, 5] float32 (x, y, z meters; intensity; time_lag seconds >= 0), keyframe plus previous sweeps,
        motion-compensated; None if the LiDAR is missing.
    radar: [M, 8] float32 (x, y, z meters; rcs dBsm; vx_comp, vy_comp m/s in the ego frame; dyn_prop; time_lag s)
        from all radars and sweeps; None if every radar is missing. Zero rows is a valid, empty radar frame.
    cameras: the six images with calibration; None if every camera is missing.
    ego: pose and CAN state (always present: the pose comes with the keyframe).
    map_raster: [1, H, W] float32 in [0, 1], drivable area on the BEVGrid the reader was given; None if absent.
    boxes: ground-truth Boxes (empty at inference).
    missing: sensor channel (e.g. "CAM_FRONT", "RADAR_FRONT", "LIDAR_TOP", "CAN", "MAP") -> reason it is absent.
    dropped_points: what the reader dropped and why, e.g. {"lidar_nonfinite": 3}; counted, never silent.
    timestamp_us: keyframe (LIDAR_TOP) timestamp, microseconds.
    """

    token: str
    scene_name: str
    timestamp_us: int
    lidar: torch.Tensor | None
    radar: torch.Tensor | None
    cameras: CameraImages | None
    ego: EgoState
    map_raster: torch.Tensor | None
    boxes: Boxes
    missing: dict[str, str] = field(default_factory=dict)
    dropped_points: dict[str, int] = field(default_factory=dict)

    def present(self, modality: str) -> bool:
        """Whether the model may use this modality for this sample."""
        if modality == "lidar":
            return self.lidar is not None
        if modality == "radar":
            return self.radar is not None
        if modality == "camera":
            return self.cameras is not None and bool(self.cameras.valid.any())
        if modality == "gps":
            return self.map_raster is not None or bool(self.ego.can_valid)
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")


@dataclass
class Batch:
    """B samples collated for the model. Points of all samples are concatenated with a batch index.

    lidar_points: [P, 5] float32, columns LIDAR_FEATURES; lidar_batch: [P] int64 sample index.
    radar_points: [R, 8] float32, columns RADAR_FEATURES; radar_batch: [R] int64 sample index.
    cameras: CameraImages with leading [B, Ncam] (samples without cameras have valid all False), or None if no
        sample of the batch has cameras.
    ego: EgoState with leading [B].
    map_raster: [B, 1, H, W] float32 (zeros where absent; see present["gps"]); [B, 1, 1, 1] if no sample has one.
    present: modality -> [B] bool, which samples may use it. The model masks absent ones out of the fusion.
    boxes: ground truth per sample.
    tokens / scene_names: per sample; timestamps_us: [B] int64.
    """

    tokens: list[str]
    scene_names: list[str]
    timestamps_us: torch.Tensor
    lidar_points: torch.Tensor
    lidar_batch: torch.Tensor
    radar_points: torch.Tensor
    radar_batch: torch.Tensor
    cameras: CameraImages | None
    ego: EgoState
    map_raster: torch.Tensor
    present: dict[str, torch.Tensor]
    boxes: list[Boxes]

    @property
    def batch_size(self) -> int:
        return len(self.tokens)

    def to(self, device) -> "Batch":
        return _map_tensors(self, lambda t: t.to(device))

    def without(self, *modalities: str) -> "Batch":
        """A shallow copy with the given modalities marked absent for every sample."""
        present = dict(self.present)
        for modality in modalities:
            if modality not in MODALITIES:
                raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
            present[modality] = torch.zeros_like(self.present[modality])
        return replace(self, present=present)
