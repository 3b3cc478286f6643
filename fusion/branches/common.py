"""Building blocks shared by the branches: small 2D conv blocks, a compact ResNet-style image backbone, a BEV conv
encoder, and the pillar encoder (points -> per-pillar features -> BEV) used by the radar and LiDAR-pillar branches.

Shapes: images and BEV maps are [B, C, H, W]; BEV maps follow fusion/grid.py (row i <-> y, column j <-> x, ego frame).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fusion.cuda_ops import dynamic_voxelize, scatter_reduce
from fusion.grid import BEVGrid


class ConvBNReLU(nn.Sequential):
    """3x3 (or k x k) conv without bias -> BatchNorm -> ReLU; `stride` 2 halves the resolution (ceil)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 3):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a residual (1x1 conv projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """Compact ResNet for images [N, 3, H, W] (already normalised).

    A stride-2 stem (two 3x3 convs) then one stage per entry of `widths`, each starting with a stride-2 basic block,
    so stage k has stride 2 ** (k + 2). A light neck upsamples the last stage onto the second-to-last one and fuses
    them, so the output has stride `2 ** len(widths)` and `out_channels` channels.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128), blocks_per_stage: Sequence[int] = (1, 1, 1),
                 out_channels: int = 64, in_channels: int = 3):
        super().__init__()
        widths, blocks_per_stage = list(widths), list(blocks_per_stage)
        if len(widths) < 2 or len(widths) != len(blocks_per_stage):
            raise ValueError(f"ResNetBackbone: widths {widths} and blocks_per_stage {blocks_per_stage} must have the "
                             "same length, at least 2")
        if min(blocks_per_stage) < 1:
            raise ValueError(f"ResNetBackbone: blocks_per_stage must be >= 1, got {blocks_per_stage}")
        stem_width = max(widths[0] // 2, 8)
        self.stem = nn.Sequential(ConvBNReLU(in_channels, stem_width, stride=2), ConvBNReLU(stem_width, stem_width))
        stages, previous = [], stem_width
        for width, blocks in zip(widths, blocks_per_stage):
            layers = [BasicBlock(previous, width, stride=2)] + [BasicBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.lateral = nn.Conv2d(widths[-2], out_channels, 1, bias=False)
        self.top = nn.Conv2d(widths[-1], out_channels, 1, bias=False)
        self.fuse = ConvBNReLU(out_channels, out_channels)
        self.stride = 2 ** len(widths)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, out_channels, ceil(H / stride), ceil(W / stride)] (approximately; see `stride`)."""
        x = self.stem(images)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        lateral = self.lateral(features[-2])
        top = nn.functional.interpolate(self.top(features[-1]), size=lateral.shape[-2:], mode="bilinear",
                                        align_corners=False)
        return self.fuse(lateral + top)


class BEVEncoder(nn.Module):
    """A few residual 3x3 conv blocks on a BEV map at constant resolution: [B, in, H, W] -> [B, out, H, W]."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 2):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"BEVEncoder: num_blocks must be >= 1, got {num_blocks}")
        blocks = [BasicBlock(in_channels, out_channels)] + [BasicBlock(out_channels, out_channels)
                                                            for _ in range(num_blocks - 1)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Downsample(nn.Module):
    """Reduce a BEV map by an integer `factor` (a power of two) with stride-2 conv blocks; identity for factor 1."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        check_power_of_two(factor, "Downsample factor")
        steps = factor.bit_length() - 1
        self.layers = nn.Sequential(*[ConvBNReLU(channels, channels, stride=2) for _ in range(steps)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def check_power_of_two(value: int, name: str) -> None:
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 1, got {value!r}")


class PointMLP(nn.Sequential):
    """Per-point Linear -> LayerNorm -> ReLU. LayerNorm (not BatchNorm) so that a batch with zero, one or a handful
    of points behaves exactly like a large one."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(nn.Linear(in_features, out_features, bias=False), nn.LayerNorm(out_features),
                         nn.ReLU(inplace=True))


class PillarEncoder(nn.Module):
    """Dynamic pillars (PointPillars-style PFN) on `pillar_grid`, scattered to a BEV map.

    Each point gets its own features (`point_features`, [N, F], of order 1) plus the offsets of its (x, y, z) from the
    mean of its pillar and of its (x, y) from the pillar centre, in units of the pillar size (5 more columns). Two
    PFN layers: a point MLP, a max over the pillar appended to every point, a second point MLP, then a max (and the
    log point count) per pillar. Output [B, out_channels, pillar_grid.height, pillar_grid.width]; empty cells are
    exactly 0. Points outside the grid (x/y/z range) or with non-finite coordinates are dropped (`dynamic_voxelize`).
    """

    extra_features = 5

    def __init__(self, pillar_grid: BEVGrid, in_features: int, out_channels: int = 64, hidden_channels: int = 32):
        super().__init__()
        self.pillar_grid = pillar_grid
        self.voxel_size = (pillar_grid.cell_size, pillar_grid.cell_size, pillar_grid.z_max - pillar_grid.z_min)
        self.point_range = pillar_grid.point_range
        self.pfn1 = PointMLP(in_features + self.extra_features, hidden_channels)
        self.pfn2 = PointMLP(2 * hidden_channels, out_channels - 1)
        self.out_channels = out_channels

    def forward(self, xyz: torch.Tensor, point_features: torch.Tensor, batch_index: torch.Tensor,
                batch_size: int) -> torch.Tensor:
        """xyz [N, 3] ego-frame meters; point_features [N, F]; batch_index [N] int64 -> [B, C, H, W]."""
        grid = self.pillar_grid
        cells = grid.height * grid.width
        out = xyz.new_zeros(batch_size * cells, self.out_channels)
        if xyz.shape[0] > 0:
            coords = dynamic_voxelize(xyz.float().contiguous(), self.voxel_size, self.point_range).long()
            keep = coords[:, 0] >= 0
            if bool(keep.any()):
                xyz, point_features, coords = xyz[keep], point_features[keep], coords[keep]
                row, col = coords[:, 1], coords[:, 2]
                cell = batch_index[keep] * cells + row * grid.width + col
                # Compact to the occupied pillars (sorted, deterministic): memory follows the points, not the grid.
                pillar_cells, pillar = torch.unique(cell, return_inverse=True)
                num_pillars = pillar_cells.shape[0]
                pillar_size = xyz.new_tensor(self.voxel_size)
                mean_xyz = scatter_reduce(xyz, pillar, num_pillars, "mean")[pillar]
                center_xy = grid.cell_to_xy(row, col, dtype=xyz.dtype)
                features = torch.cat([point_features, (xyz - mean_xyz) / pillar_size,
                                      (xyz[:, :2] - center_xy) / pillar_size[:2]], dim=-1)
                hidden = self.pfn1(features)
                pooled = scatter_reduce(hidden, pillar, num_pillars, "max")[pillar]
                hidden = self.pfn2(torch.cat([hidden, pooled], dim=-1))
                pillar_features = scatter_reduce(hidden, pillar, num_pillars, "max")
                counts = torch.bincount(pillar, minlength=num_pillars).to(hidden.dtype)
                pillar_features = torch.cat([pillar_features, torch.log1p(counts)[:, None]], dim=-1)
                out = out.to(pillar_features.dtype).index_copy(0, pillar_cells, pillar_features)
        return out.view(batch_size, grid.height, grid.width, self.out_channels).permute(0, 3, 1, 2).contiguous()


def time_slice_occupancy(xyz: torch.Tensor, time_lag: torch.Tensor, batch_index: torch.Tensor, batch_size: int,
                         grid: BEVGrid, slices: int, slice_s: float) -> torch.Tensor:
    """Per-sweep BEV occupancy: log(1 + points) of each (time slice, cell), [B, slices, grid.height, grid.width].

    xyz [N, 3] ego-frame meters; time_lag [N] seconds before the keyframe (0 for the keyframe sweep); batch_index
    [N] int64. Slice k holds the points with round(lag / slice_s) == k; points outside the grid's x/y/z extent, with
    non-finite values, or in no slice are left out. Stacked as channels, the slices show a moving object at a
    different cell in each: the displacement (velocity) and its direction (heading) become visible to 2D convs,
    which a max over a pillar's points cannot see."""
    out = xyz.new_zeros(batch_size * slices * grid.height * grid.width)
    if xyz.shape[0] > 0 and slices > 0:
        row, col, inside = grid.cell_index(xyz[:, :2])
        slice_index = torch.round(torch.nan_to_num(time_lag, nan=-1.0) / slice_s).long()
        inside &= (xyz[:, 2] >= grid.z_min) & (xyz[:, 2] < grid.z_max) & torch.isfinite(xyz[:, 2])
        inside &= (slice_index >= 0) & (slice_index < slices) & torch.isfinite(time_lag)
        flat = ((batch_index * slices + slice_index) * grid.height + row) * grid.width + col
        out += torch.bincount(flat[inside], minlength=out.shape[0]).to(out.dtype)
    return torch.log1p(out).view(batch_size, slices, grid.height, grid.width)
