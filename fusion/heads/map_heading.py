"""Front / back of road vehicles from the map: traffic keeps to one side of a two-way road.

Why: the detector gets a vehicle's axis right far more often than its front (docs/benchmarks.md, issue 11: with
every flipped heading turned around, the selection drives' mAOE falls from 0.86 to 0.23 rad), and its front / back
classifier stays at chance on validation for objects that do not move, where motion cannot decide. The map can: on
a two-way road, in right-hand traffic, a vehicle driving, stopped or parked keeps to the right of the carriageway's
middle, so the middle lies on its left (in left-hand traffic, on its right).

Per box (`map_headings`): the drivable-surface raster (the batch's map crop on the BEV grid, ego frame) is sampled
along the line through the box centre across its axis, `reach_m` each way. The drivable run under the centre (or
the nearest one within `reach_m` for an object beside the road, e.g. a bicycle on the sidewalk) has a middle; the box
keeps its heading when that middle lies on the side traffic keeps it from, and is turned around when on the other.
No decision (the heading stays) where the run reaches the end of the window (intersections, open areas) or the
edge of the map crop, where the middle is within `min_offset_m` of the centre, for classes not listed, and
for boxes moving at least `min_speed` m/s (motion decides those: `align_heading_with_motion`).

It is a prior about how roads are used, not a measurement: one-way streets, vehicles turning at a junction and
objects placed against traffic break it, which is why it only decides where the run is a plain carriageway. It has
no trained parameters and runs after decoding, identically for PyTorch and onnxruntime. Frames: ego frame at the
keyframe; meters, radians, m/s.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from fusion.grid import BEVGrid
from fusion.heads.decode import turned_around
from fusion.types import DETECTION_CLASSES, Boxes

TRAFFIC_SIDES = ("right", "left")


@dataclass(frozen=True)
class MapHeadingSettings:
    """Settings of `map_headings` (meters, m/s).

    traffic: "right" (the middle of the road lies on a vehicle's left) or "left"-hand traffic.
    classes: detection classes the prior decides for (others keep their heading).
    reach_m: half-length of the sampled line across the box; step_m: spacing of its samples.
    min_offset_m: a box whose centre lies within this of the drivable run's middle is left undecided.
    min_speed: boxes at least this fast (m/s) are left to the motion (`heading_from_motion`).
    drivable_threshold: a raster value at least this counts as drivable (the crop holds mask / 255).
    """

    traffic: str = "right"
    classes: tuple[str, ...] = ("car", "truck", "bus", "trailer", "motorcycle", "bicycle")
    reach_m: float = 20.0
    step_m: float = 0.4
    min_offset_m: float = 0.8
    min_speed: float = 1.0
    drivable_threshold: float = 0.5

    def __post_init__(self):
        if self.traffic not in TRAFFIC_SIDES:
            raise ValueError(f"map_heading.traffic must be one of {TRAFFIC_SIDES}, got {self.traffic!r}")
        if isinstance(self.classes, str) or not all(isinstance(name, str) for name in self.classes):
            raise ValueError(f"map_heading.classes must be a list of class names, got {self.classes!r}")
        unknown = sorted(set(self.classes) - set(DETECTION_CLASSES))
        if unknown:
            raise ValueError(f"map_heading.classes: unknown class(es) {unknown}; "
                             f"expected names from {DETECTION_CLASSES}")
        object.__setattr__(self, "classes", tuple(self.classes))
        for name in ("reach_m", "step_m", "min_offset_m", "min_speed", "drivable_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"map_heading.{name} must be a finite number >= 0, got {value!r}")
        if self.step_m <= 0 or self.reach_m < self.step_m:
            raise ValueError(f"map_heading: step_m ({self.step_m}) must be > 0 and at most reach_m ({self.reach_m})")


def map_heading_settings(value: "MapHeadingSettings | dict | None") -> MapHeadingSettings | None:
    """MapHeadingSettings from a config value: None (off), a dict of fields ({} = defaults) or the settings."""
    if value is None or isinstance(value, MapHeadingSettings):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"map_heading must be a mapping of settings or null, got {type(value).__name__}")
    known = {field.name for field in fields(MapHeadingSettings)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"map_heading: unknown setting(s) {unknown}; expected some of {sorted(known)}")
    return MapHeadingSettings(**value)


def road_side(centers: np.ndarray, yaw: np.ndarray, drivable: np.ndarray, grid: BEVGrid,
              settings: MapHeadingSettings) -> np.ndarray:
    """[N] signed lateral position (meters) of the middle of the drivable run beside each box, positive on the
    box's left (yaw + pi / 2), NaN where undecidable (no drivable sample within reach, or an edge of the run not
    seen: the run reaches the end of the window or the edge of the grid). centers [N, 2] and yaw [N]: ego frame;
    drivable [H, W] bool on `grid` (row = y, column = x)."""
    offsets = np.arange(-settings.reach_m, settings.reach_m + 1e-9, settings.step_m)
    left = np.stack([-np.sin(yaw), np.cos(yaw)], axis=-1)
    samples = centers[:, None, :] + offsets[None, :, None] * left[:, None, :]
    column = np.floor((samples[..., 0] - grid.x_min) / grid.cell_size).astype(np.int64)
    row = np.floor((samples[..., 1] - grid.y_min) / grid.cell_size).astype(np.int64)
    inside = (column >= 0) & (column < grid.width) & (row >= 0) & (row < grid.height)
    on_road = drivable[row.clip(0, grid.height - 1), column.clip(0, grid.width - 1)] & inside
    middle = np.full(len(centers), np.nan)
    last = len(offsets) - 1
    for box in range(len(centers)):
        road = np.flatnonzero(on_road[box])
        if len(road) == 0:
            continue
        low = high = road[np.argmin(np.abs(offsets[road]))]
        while low > 0 and on_road[box, low - 1]:
            low -= 1
        while high < last and on_road[box, high + 1]:
            high += 1
        # Both edges must be seen: a sample off the road, inside the window and inside the grid, on each side.
        if low == 0 or high == last or not (inside[box, low - 1] and inside[box, high + 1]):
            continue
        middle[box] = 0.5 * (offsets[low] + offsets[high])
    return middle


def map_headings(boxes: Boxes, map_raster: Tensor, grid: BEVGrid, settings: MapHeadingSettings) -> Tensor:
    """[N] headings (radians, ego frame): each box of a listed class slower than `min_speed` turned to keep the
    road's middle on the side `settings.traffic` says; the others, and undecided ones, unchanged.
    map_raster: [1, H, W] or [H, W] drivable surface in [0, 1] on `grid` (ego frame)."""
    yaw = boxes.yaw
    if len(boxes) == 0:
        return yaw
    raster = map_raster.reshape(map_raster.shape[-2:])
    if tuple(raster.shape) != grid.shape:
        return yaw  # no map for this sample (the batch holds [1, 1] when none has one)
    names = [DETECTION_CLASSES[int(label)] for label in boxes.labels]
    slow = boxes.velocity.norm(dim=-1) < settings.min_speed
    chosen = torch.tensor([name in settings.classes for name in names], dtype=torch.bool) & slow.cpu()
    if not bool(chosen.any()):
        return yaw
    index = torch.nonzero(chosen)[:, 0]
    drivable = (raster >= settings.drivable_threshold).cpu().numpy()
    middle = road_side(boxes.center[index, :2].double().cpu().numpy(), yaw[index].double().cpu().numpy(),
                       drivable, grid, settings)
    sign = 1.0 if settings.traffic == "right" else -1.0
    keep_side = sign * middle
    turn = np.isfinite(middle) & (keep_side <= -settings.min_offset_m)
    result = yaw.clone()
    flip = index[torch.from_numpy(turn)].to(yaw.device)
    result[flip] = turned_around(yaw[flip])
    return result
