"""Augmentations and preprocessing of a `Sample`, applied consistently to every sensor and to the boxes.

BEV augmentation: one 4x4 matrix A = T(translation) @ Rz(rotation) @ scale @ flip acts on the ego frame. Applying it
moves LiDAR and radar points (x' = A x), rotates/flips/scales radar and box velocities (v' = L v, L the 3x3 part),
boxes (center, yaw, size under scaling), camera extrinsics (cam_to_ego' = A @ cam_to_ego, so that a 3D point and its
pixel stay paired: images are never flipped), the map raster (resampled on the same grid) and the ego state
(ego_to_global' = ego_to_global @ A^-1; acceleration' = L a; a reflection negates the yaw rate; speed scales).
With scaling or a flip, cam_to_ego and ego_to_global are no longer rigid; projecting through them stays exact.

Every random transform takes an optional `torch.Generator`; a fixed seed gives the same augmentation. Without one
it draws from torch's global RNG (which DataLoader seeds per worker).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from fusion.datasets.io import scale_intrinsics
from fusion.grid import BEVGrid, planar_transform
from fusion.types import Boxes, EgoState, Sample


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    if low == high:
        return float(low)
    return float(low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64))


def _bernoulli(probability: float, generator: torch.Generator | None) -> bool:
    if probability <= 0:
        return False
    if probability >= 1:
        return True
    return bool(torch.rand((), generator=generator, dtype=torch.float64) < probability)


class Compose:
    """Apply transforms in order; each is called as t(sample, generator)."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        for transform in self.transforms:
            sample = transform(sample, generator)
        return sample


# ----------------------------------------------------------------------------------------------------------------
# BEV (global) augmentation
# ----------------------------------------------------------------------------------------------------------------

def augmentation_matrix(rotation: float = 0.0, scale: float = 1.0, flip_x: bool = False, flip_y: bool = False,
                        translation: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """[4, 4] float64 A = T(translation) @ Rz(rotation) @ (scale * I) @ flip, acting on ego-frame points (meters).
    flip_x negates x (front <-> back), flip_y negates y (left <-> right); rotation in radians about +z."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    flip = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0])
    c, s = math.cos(rotation), math.sin(rotation)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = rot @ (scale * flip)
    matrix[:3, 3] = np.asarray(translation, dtype=np.float64)
    return matrix


def _transform_points(points: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    out = points.clone()
    m = torch.from_numpy(matrix).to(points.dtype)
    out[:, :3] = points[:, :3] @ m[:3, :3].T + m[:3, 3]
    return out


def _transform_boxes(boxes: Boxes, matrix: np.ndarray) -> Boxes:
    if len(boxes) == 0:
        return boxes
    linear = torch.from_numpy(matrix[:3, :3]).to(boxes.center.dtype)
    scale = float(abs(np.linalg.det(matrix[:3, :3])) ** (1.0 / 3.0))
    heading = torch.stack([torch.cos(boxes.yaw), torch.sin(boxes.yaw)], dim=-1)
    heading = heading @ linear[:2, :2].T
    return replace(
        boxes,
        center=boxes.center @ linear.T + torch.from_numpy(matrix[:3, 3]).to(boxes.center.dtype),
        size=boxes.size * scale,
        yaw=torch.atan2(heading[:, 1], heading[:, 0]),
        velocity=boxes.velocity @ linear[:2, :2].T,
    )


def _resample_map(raster: torch.Tensor, matrix: np.ndarray, grid: BEVGrid) -> torch.Tensor:
    """New raster [1, H, W] whose value at each cell centre q is the old raster at A^-1 q (nearest, 0 outside)."""
    inverse = planar_transform(torch.from_numpy(np.linalg.inv(matrix)))
    return grid.warp(raster[None], inverse, mode="nearest")[0][0]


def apply_bev_augmentation(sample: Sample, matrix: np.ndarray, grid: BEVGrid | None = None) -> Sample:
    """A copy of `sample` with the ego-frame transform `matrix` [4, 4] applied to every sensor, the boxes, the map
    raster (needs the `grid` it was cropped on) and the ego state."""
    matrix = np.asarray(matrix, dtype=np.float64)
    linear = matrix[:3, :3]
    det = float(np.linalg.det(linear))
    lidar = _transform_points(sample.lidar, matrix) if sample.lidar is not None else None
    radar = None
    if sample.radar is not None:
        radar = _transform_points(sample.radar, matrix)
        radar[:, 4:6] = sample.radar[:, 4:6] @ torch.from_numpy(linear[:2, :2]).to(radar.dtype).T
    cameras = sample.cameras
    if cameras is not None:
        cameras = replace(cameras, cam_to_ego=(torch.from_numpy(matrix).to(cameras.cam_to_ego.dtype)
                                               @ cameras.cam_to_ego))
    map_raster = sample.map_raster
    if map_raster is not None:
        if grid is None or tuple(map_raster.shape[-2:]) != grid.shape:
            raise ValueError(f"apply_bev_augmentation: the map raster {tuple(map_raster.shape)} needs the BEVGrid it "
                             f"was cropped on (got {grid})")
        map_raster = _resample_map(map_raster, matrix, grid)
    ego = sample.ego
    scale = abs(det) ** (1.0 / 3.0)
    ego = EgoState(
        ego_to_global=ego.ego_to_global @ torch.from_numpy(np.linalg.inv(matrix)).to(ego.ego_to_global.dtype),
        speed=ego.speed * scale,
        yaw_rate=ego.yaw_rate * (1.0 if det > 0 else -1.0),
        acceleration=ego.acceleration @ torch.from_numpy(linear).to(ego.acceleration.dtype).T,
        can_valid=ego.can_valid,
    )
    return replace(sample, lidar=lidar, radar=radar, cameras=cameras, map_raster=map_raster, ego=ego,
                   boxes=_transform_boxes(sample.boxes, matrix), missing=dict(sample.missing),
                   dropped_points=dict(sample.dropped_points))


@dataclass
class GlobalAugmentation:
    """Random global rotation, scaling, flips and translation of the whole sample (training augmentation).

    rotation_range: radians, uniform. scale_range: uniform factor. flip_x_prob / flip_y_prob: probabilities of
    negating x / y. translation_std: (sx, sy, sz) meters, normal. grid: the BEVGrid of the map raster (needed when
    samples carry one).
    """

    rotation_range: tuple[float, float] = (-math.pi / 4, math.pi / 4)
    scale_range: tuple[float, float] = (0.95, 1.05)
    flip_x_prob: float = 0.5
    flip_y_prob: float = 0.5
    translation_std: tuple[float, float, float] = (0.0, 0.0, 0.0)
    grid: BEVGrid | None = None

    def sample_matrix(self, generator: torch.Generator | None = None) -> np.ndarray:
        """Draw one augmentation [4, 4]."""
        rotation = _uniform(*self.rotation_range, generator)
        scale = _uniform(*self.scale_range, generator)
        flip_x = _bernoulli(self.flip_x_prob, generator)
        flip_y = _bernoulli(self.flip_y_prob, generator)
        std = torch.tensor(self.translation_std, dtype=torch.float64)
        translation = (torch.randn(3, generator=generator, dtype=torch.float64) * std).numpy()
        return augmentation_matrix(rotation, scale, flip_x, flip_y, translation)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        return apply_bev_augmentation(sample, self.sample_matrix(generator), self.grid)


# ----------------------------------------------------------------------------------------------------------------
# Point range
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class PointRangeFilter:
    """Drop LiDAR and radar points outside the grid's x/y/z extent (counted in dropped_points) and, with
    filter_boxes, boxes whose center lies outside its x/y extent."""

    grid: BEVGrid
    filter_boxes: bool = True

    def _inside(self, xyz: torch.Tensor) -> torch.Tensor:
        g = self.grid
        return (g.contains(xyz[:, :2]) & (xyz[:, 2] >= g.z_min) & (xyz[:, 2] < g.z_max))

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        dropped = dict(sample.dropped_points)
        lidar, radar, boxes = sample.lidar, sample.radar, sample.boxes
        if lidar is not None:
            keep = self._inside(lidar)
            dropped["lidar_out_of_range"] = dropped.get("lidar_out_of_range", 0) + int((~keep).sum())
            lidar = lidar[keep]
        if radar is not None:
            keep = self._inside(radar)
            dropped["radar_out_of_range"] = dropped.get("radar_out_of_range", 0) + int((~keep).sum())
            radar = radar[keep]
        if self.filter_boxes and len(boxes):
            boxes = boxes.select(self.grid.contains(boxes.center[:, :2]))
        return replace(sample, lidar=lidar, radar=radar, boxes=boxes, dropped_points=dropped)


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class ImageResizeCrop:
    """Resize and crop the camera images to a fixed model input size, updating the intrinsics.

    output_size: (width, height) in pixels.
    The base scale makes the image cover the output (max of the two ratios); resize_range (e.g. (0.9, 1.1)) multiplies
    it by a random factor for training. crop_x: "center" | "random"; crop_y: "bottom" (keeps the road, drops sky) |
    "center" | "random". Regions outside the resized image are zero. cam_to_ego is unchanged.
    """

    output_size: tuple[int, int]
    resize_range: tuple[float, float] | None = None
    crop_x: str = "center"
    crop_y: str = "bottom"

    def __post_init__(self):
        if self.crop_x not in ("center", "random"):
            raise ValueError(f"crop_x must be 'center' or 'random', got {self.crop_x!r}")
        if self.crop_y not in ("bottom", "center", "random"):
            raise ValueError(f"crop_y must be 'bottom', 'center' or 'random', got {self.crop_y!r}")
        width, height = self.output_size
        if width < 1 or height < 1:
            raise ValueError(f"output_size must be positive, got {self.output_size}")

    def decode_size(self, full_size: tuple[int, int]) -> tuple[int, int]:
        """The smallest (width, height) to decode a full_size (width, height) image at without losing detail this
        transform keeps; pass it as the reader's camera_decode_size."""
        width, height = full_size
        base = max(self.output_size[0] / width, self.output_size[1] / height)
        top = base * (self.resize_range[1] if self.resize_range else 1.0)
        return math.ceil(width * top), math.ceil(height * top)

    def _offset(self, mode: str, slack: int, generator: torch.Generator | None) -> int:
        if mode == "center":
            return slack // 2
        if mode == "bottom":
            return slack
        low, high = min(0, slack), max(0, slack)
        return int(torch.randint(low, high + 1, (), generator=generator))

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        cameras = sample.cameras
        if cameras is None:
            return sample
        out_w, out_h = self.output_size
        height, width = cameras.images.shape[-2:]
        scale = max(out_w / width, out_h / height)
        if self.resize_range is not None:
            scale *= _uniform(*self.resize_range, generator)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        left = self._offset(self.crop_x, new_w - out_w, generator)
        top = self._offset(self.crop_y, new_h - out_h, generator)
        images = []
        for image in cameras.images:
            pil = Image.fromarray(image.permute(1, 2, 0).numpy())
            if (new_w, new_h) != (width, height):
                pil = pil.resize((new_w, new_h), Image.BILINEAR)
            pil = pil.crop((left, top, left + out_w, top + out_h))
            images.append(torch.from_numpy(np.array(pil)).permute(2, 0, 1))
        intrinsics = []
        for k in cameras.intrinsics.double().numpy():
            k = scale_intrinsics(k, new_w / width, new_h / height)
            k[0, 2] -= left
            k[1, 2] -= top
            intrinsics.append(k)
        cameras = replace(cameras, images=torch.stack(images).contiguous(),
                          intrinsics=torch.from_numpy(np.stack(intrinsics)).to(cameras.intrinsics.dtype))
        return replace(sample, cameras=cameras)
