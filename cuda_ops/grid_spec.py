"""Validation of voxelization arguments and the voxel grid they describe, computed exactly as the kernels see it.

The kernels work in float32: the range and voxel size are rounded to float32, the number of cells along an axis is
round((max - min) / size) evaluated in float32 (as spconv's PointToVoxel does), and a point's cell is
floor((p - min) / size) in float32. This module is shared by the compiled ops and the pure-torch reference.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

INT32_MAX = 2 ** 31 - 1


@dataclass(frozen=True)
class VoxelGridSpec:
    """A voxel grid in the ego frame: lower corner `range_min` (x, y, z, meters), `voxel_size` (x, y, z, meters), both
    already rounded to float32, and the number of cells `grid` (x, y, z). Keys are (z * grid_y + y) * grid_x + x."""

    range_min: tuple[float, float, float]
    voxel_size: tuple[float, float, float]
    grid: tuple[int, int, int]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """(Z, Y, X) number of cells, the order of the coordinates the ops return."""
        return self.grid[2], self.grid[1], self.grid[0]

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def _numbers(value, count: int, name: str, op: str) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    elif isinstance(value, np.ndarray):
        value = value.reshape(-1).tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{op}: {name} must be a sequence of {count} numbers, got {value!r}")
    value = list(value)
    if len(value) != count or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{op}: {name} must be {count} numbers, got {value!r}")
    value = [float(v) for v in value]
    if not all(math.isfinite(v) for v in value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return value


def voxel_grid(voxel_size, point_range, op: str = "voxelize") -> VoxelGridSpec:
    """Validate `voxel_size` (x, y, z) and `point_range` (x_min, y_min, z_min, x_max, y_max, z_max), meters, and
    return the grid the kernels use. ValueError names the argument when something is wrong."""
    size = _numbers(voxel_size, 3, "voxel_size", op)
    bounds = _numbers(point_range, 6, "point_range", op)
    if min(size) <= 0:
        raise ValueError(f"{op}: voxel_size must be positive, got {size}")
    lower, upper = bounds[:3], bounds[3:]
    for axis, lo, hi in zip("xyz", lower, upper):
        if not lo < hi:
            raise ValueError(f"{op}: point_range must be (x_min, y_min, z_min, x_max, y_max, z_max) with min < max; "
                             f"got {axis}_min={lo} >= {axis}_max={hi}")
    size32 = np.asarray(size, dtype=np.float32)
    lower32 = np.asarray(lower, dtype=np.float32)
    upper32 = np.asarray(upper, dtype=np.float32)
    if (size32 <= 0).any():
        raise ValueError(f"{op}: voxel_size {size} rounds to zero in float32")
    cells_f = (upper32 - lower32) / size32  # float32 arithmetic, as in the kernels
    grid = tuple(int(math.floor(float(c) + 0.5)) for c in cells_f)  # std::round for positive values
    for axis, cells in zip("xyz", grid):
        if cells < 1:
            raise ValueError(f"{op}: voxel_size {size} is larger than twice the {axis} extent of point_range "
                             f"{bounds}: the grid has no cell along {axis}")
    if grid[0] * grid[1] * grid[2] > INT32_MAX:
        raise ValueError(f"{op}: the grid has {grid[0]} x {grid[1]} x {grid[2]} cells (x, y, z), more than int32 can "
                         f"index; use larger voxels or a smaller point_range")
    return VoxelGridSpec(range_min=tuple(float(v) for v in lower32), voxel_size=tuple(float(v) for v in size32),
                         grid=grid)


def check_points(points, op: str) -> torch.Tensor:
    """ValueError unless `points` is a float32 [N, C >= 3] tensor; returns it contiguous (a copy if it was not)."""
    if not isinstance(points, torch.Tensor):
        raise ValueError(f"{op}: points must be a torch.Tensor, got {type(points).__name__}")
    if points.dtype != torch.float32:
        raise ValueError(f"{op}: points must be float32 (x, y, z first, meters), got {points.dtype}; "
                         f"convert with .float()")
    if points.dim() != 2 or points.shape[1] < 3:
        raise ValueError(f"{op}: points must be [N, C] with C >= 3 (x, y, z first), got shape {tuple(points.shape)}")
    if points.shape[0] > INT32_MAX:
        raise ValueError(f"{op}: at most {INT32_MAX} points, got {points.shape[0]}")
    return points.detach().contiguous()


#: Bounds of hard voxelization's output [max_voxels, max_points, C]: points per voxel, and voxel slots in all.
MAX_POINTS_PER_VOXEL = 1024
MAX_VOXEL_SLOTS = 2**31 - 1


def check_voxel_budget(max_points, max_voxels, op: str) -> tuple[int, int]:
    """(max_points, max_voxels) as ints after checking they are >= 1, max_points <= MAX_POINTS_PER_VOXEL and
    max_points * max_voxels <= MAX_VOXEL_SLOTS (the output is allocated at that size up front)."""
    max_points = check_positive_int(max_points, "max_points", op)
    max_voxels = check_positive_int(max_voxels, "max_voxels", op)
    if max_points > MAX_POINTS_PER_VOXEL:
        raise ValueError(f"{op}: max_points must be <= {MAX_POINTS_PER_VOXEL}, got {max_points}")
    if max_points * max_voxels > MAX_VOXEL_SLOTS:
        raise ValueError(f"{op}: max_points x max_voxels = {max_points * max_voxels} voxel slots, above the bound "
                         f"{MAX_VOXEL_SLOTS}")
    return max_points, max_voxels


def check_positive_int(value, name: str, op: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{op}: {name} must be an integer >= 1, got {value!r}")
    return int(value)
