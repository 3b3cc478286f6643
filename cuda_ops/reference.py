"""Pure-torch references of the compiled ops: slow, simple, independent implementations used by the tests (and by
`use_reference=True`). Same arguments, units and outputs as the ops in fusion.cuda_ops.
"""
from __future__ import annotations

import torch

from fusion.cuda_ops.grid_spec import check_points, check_voxel_budget, voxel_grid


def point_cells(points: torch.Tensor, voxel_size, point_range) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(cells [N, 3] int64 (x, y, z), kept [N] bool, grid) for float32 points [N, C]: floor((p - min) / size) in
    float32; a point is kept when all three cells are inside the grid (NaN/Inf never are)."""
    grid = voxel_grid(voxel_size, point_range, "reference")
    xyz = points[:, :3]
    lower = torch.tensor(grid.range_min, dtype=torch.float32, device=points.device)
    size = torch.tensor(grid.voxel_size, dtype=torch.float32, device=points.device)
    cells_f = torch.floor((xyz - lower) / size)
    upper = torch.tensor(grid.grid, dtype=torch.float32, device=points.device)
    kept = ((cells_f >= 0) & (cells_f < upper)).all(dim=1)
    cells = torch.where(kept[:, None], cells_f, torch.zeros_like(cells_f)).long()
    return cells, kept, grid.grid


def dynamic_voxelize(points: torch.Tensor, voxel_size, point_range) -> torch.Tensor:
    """[N, 3] int32 (z, y, x) cell of every point, -1 rows for dropped points."""
    points = check_points(points, "reference.dynamic_voxelize")
    cells, kept, _ = point_cells(points, voxel_size, point_range)
    zyx = cells.flip(1).int()
    return torch.where(kept[:, None], zyx, torch.full_like(zyx, -1))


def hard_voxelize(points: torch.Tensor, voxel_size, point_range, max_points: int, max_voxels: int):
    """(voxels [V, max_points, C] float32 zero-padded, coords [V, 3] int32 (z, y, x), num_points [V] int32) with
    voxels in order of first appearance and the first max_points points of each, in input order."""
    points = check_points(points, "reference.hard_voxelize")
    max_points, max_voxels = check_voxel_budget(max_points, max_voxels, "reference.hard_voxelize")
    n, c = points.shape
    device = points.device
    cells, kept, (gx, gy, gz) = point_cells(points, voxel_size, point_range)
    point_index = torch.nonzero(kept).view(-1)
    keys = ((cells[:, 2] * gy + cells[:, 1]) * gx + cells[:, 0])[point_index]
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    # First appearance of every distinct cell, then voxel ids in that order.
    first = torch.full((unique_keys.shape[0],), n, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, inverse, point_index, reduce="amin")
    order = torch.argsort(first)
    voxel_of_unique = torch.empty_like(order)
    voxel_of_unique[order] = torch.arange(order.shape[0], device=device)
    voxel = voxel_of_unique[inverse]
    num_voxels = min(int(unique_keys.shape[0]), max_voxels)
    inside = voxel < num_voxels
    point_index, voxel = point_index[inside], voxel[inside]
    # Rank of every point inside its voxel, in input order (a stable sort keeps input order within a voxel).
    by_voxel = torch.sort(voxel, stable=True).indices
    counts = torch.bincount(voxel, minlength=num_voxels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(voxel)
    rank[by_voxel] = torch.arange(voxel.shape[0], device=device) - starts[voxel[by_voxel]]
    slot_ok = rank < max_points
    voxels = torch.zeros(num_voxels, max_points, c, dtype=points.dtype, device=device)
    voxels[voxel[slot_ok], rank[slot_ok]] = points[point_index[slot_ok]]
    voxel_keys = unique_keys[order[:num_voxels]]
    coords = torch.stack([voxel_keys // (gx * gy), (voxel_keys // gx) % gy, voxel_keys % gx], dim=1).int()
    num_points = counts.clamp(max=max_points).int()
    return voxels, coords, num_points


def bev_pool(features: torch.Tensor, coords: torch.Tensor, batch_size: int, grid_shape) -> torch.Tensor:
    """[B, C, Z, H, W]: the sum of `features` [P, C] over points with the same (batch, z, y, x) in `coords` [P, 4]
    (accumulated in float32, or float64 for float64 features). Differentiable through torch's index_add."""
    depth, height, width = (int(s) for s in grid_shape)
    coords = coords.long()
    b, z, y, x = coords.unbind(1)
    bad = (b < 0) | (b >= batch_size) | (z < 0) | (z >= depth) | (y < 0) | (y >= height) | (x < 0) | (x >= width)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"bev_pool: coords row {row} = {tuple(coords[row].tolist())} (batch, z, y, x) is outside "
                         f"[0, {batch_size}) x [0, {depth}) x [0, {height}) x [0, {width})")
    keys = ((b * depth + z) * height + y) * width + x
    acc_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    channels = features.shape[1]
    cells = torch.zeros(batch_size * depth * height * width, channels, dtype=acc_dtype, device=features.device)
    cells = cells.index_add(0, keys, features.to(acc_dtype))
    out = cells.view(batch_size, depth, height, width, channels).permute(0, 4, 1, 2, 3)
    return out.to(features.dtype).contiguous()


def scatter_reduce(src: torch.Tensor, index: torch.Tensor, num_segments: int, reduce: str) -> torch.Tensor:
    """[S, ...]: `reduce` ("sum", "mean" or "max") of the rows of `src` [N, ...] whose `index` [N] is s; 0 for empty
    segments. A plain loop over segments (differentiable through torch's sum/mean/max)."""
    rows = []
    for segment in range(num_segments):
        members = src[index == segment]
        if members.shape[0] == 0:
            rows.append(src.new_zeros(src.shape[1:]))
        elif reduce == "sum":
            rows.append(members.sum(0))
        elif reduce == "mean":
            rows.append(members.mean(0))
        elif reduce == "max":
            rows.append(members.max(0).values)
        else:
            raise ValueError(f"scatter_reduce: reduce must be 'sum', 'mean' or 'max', got {reduce!r}")
    if not rows:
        return src.new_zeros((0,) + tuple(src.shape[1:]))
    return torch.stack(rows)
