"""Hard and dynamic voxelization of point clouds (compiled CPU/CUDA kernels; pure-torch reference in reference.py).

Frames and units: points are [N, C] float32 in the ego frame, columns (x, y, z, ...) with x, y, z in meters.
`voxel_size` is (x, y, z) meters, `point_range` is (x_min, y_min, z_min, x_max, y_max, z_max) meters. Coordinates
come back as int32 (z, y, x); with a voxel size equal to the BEVGrid cell and the grid's extent as point_range,
(y, x) are exactly BEVGrid (row, col).
"""
from __future__ import annotations

import torch

from fusion.cuda_ops import reference
from fusion.cuda_ops._extension import check_device, compiled
from fusion.cuda_ops.grid_spec import check_points, check_voxel_budget, voxel_grid


def hard_voxelize(points: torch.Tensor, voxel_size, point_range, max_points: int, max_voxels: int,
                  use_reference: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group points into voxels, spconv `PointToVoxel` / mmcv hard-voxelization semantics, deterministic.

    A point belongs to cell floor((p - min) / size) computed in float32 and is dropped when that cell is outside the
    grid (round((max - min) / size) cells per axis, in float32) or a coordinate is NaN/Inf. Voxels are numbered in
    the order in which their first point appears in the input; each keeps its first `max_points` points in input
    order; voxels past `max_voxels` are dropped with their points. Identical results on CPU and CUDA.

    Returns (voxels [V, max_points, C] float32, zero-padded; coords [V, 3] int32 (z, y, x);
    num_points [V] int32), on the device of `points`. Not differentiable.
    `use_reference=True` runs the pure-torch reference instead (slow; for debugging).
    """
    op = "hard_voxelize"
    points = check_points(points, op)
    grid = voxel_grid(voxel_size, point_range, op)
    max_points, max_voxels = check_voxel_budget(max_points, max_voxels, op)
    if use_reference:
        return reference.hard_voxelize(points, voxel_size, point_range, max_points, max_voxels)
    check_device(op, points)
    return compiled().hard_voxelize(points, list(grid.range_min), list(grid.voxel_size), list(grid.grid),
                                    max_points, max_voxels)


def dynamic_voxelize(points: torch.Tensor, voxel_size, point_range, use_reference: bool = False) -> torch.Tensor:
    """The voxel of every point: [N, 3] int32 (z, y, x), a row of -1 for points dropped (outside the grid or with a
    NaN/Inf coordinate). Same cell arithmetic as `hard_voxelize`. Not differentiable."""
    op = "dynamic_voxelize"
    points = check_points(points, op)
    grid = voxel_grid(voxel_size, point_range, op)
    if use_reference:
        return reference.dynamic_voxelize(points, voxel_size, point_range)
    check_device(op, points)
    return compiled().dynamic_voxelize(points, list(grid.range_min), list(grid.voxel_size), list(grid.grid))
