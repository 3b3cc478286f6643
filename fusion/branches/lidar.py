"""LiDAR branches: multi-sweep point cloud (Batch.lidar_points, columns LIDAR_FEATURES, ego frame) -> BEV.

- `LidarBranch` (SECOND / CenterPoint style): `hard_voxelize` on a voxel grid finer than the BEV grid -> voxel feature
  encoder (mean of the points, or a small PointNet) -> spconv sparse 3D encoder (submanifold convs + stride-2 sparse
  convs until the x/y resolution equals the BEV grid) -> height collapse (channels x Z -> channels) -> 2D BEV convs.
- `LidarPillarBranch` (PointPillars style, for small/CPU configs): dynamic pillars (`dynamic_voxelize` +
  `scatter_reduce`), a PFN, scatter to the BEV, a small 2D CNN.

Both use every column, the sweep time lag included, and can stack the per-sweep occupancy (`time_slices`). The
sparse encoder runs under the single-thread guard on CPU, which applies spconv's CPU backward fix before first use
(fusion/sparse.py); importing this module patches nothing.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

import spconv.pytorch as spconv
from fusion.branches.common import (BEVEncoder, Downsample, PillarEncoder, PointMLP, check_power_of_two,
                                    time_slice_occupancy)
from fusion.branches.occupancy_flow import above_ground, flow_channels, flow_from_slices, flow_settings
from fusion.cuda_ops import hard_voxelize
from fusion.grid import BEVGrid
from fusion.sparse import SingleThreadSparse
from fusion.types import LIDAR_FEATURES, Batch

#: Scale of the (intensity, time_lag) columns fed to the networks: nuScenes intensity is 0..255, lags are < 1 s.
LIDAR_ATTRIBUTE_SCALE = (1.0 / 255.0, 1.0)


def _normalised_lidar_features(points: torch.Tensor, grid: BEVGrid) -> torch.Tensor:
    """[N, 5] LiDAR columns -> [N, 5] network inputs of order 1: x, y, z relative to the grid centre over its half
    extent, intensity / 255, time lag in seconds."""
    scale = points.new_tensor(LIDAR_ATTRIBUTE_SCALE)
    return torch.cat([grid.normalized_xyz(points[:, :3]), points[:, 3:5] * scale], dim=-1)


class SparseBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over sparse voxel features [V, C] that also accepts V <= 1 in training (then it normalises with
    the running statistics instead of failing)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] <= 1:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            training=False, eps=self.eps)
        return super().forward(x)


def _subm_block(in_channels: int, out_channels: int, key: str) -> list[nn.Module]:
    return [spconv.SubMConv3d(in_channels, out_channels, 3, padding=1, bias=False, indice_key=key),
            SparseBatchNorm(out_channels), nn.ReLU(inplace=True)]


def _down_block(in_channels: int, out_channels: int, key: str) -> list[nn.Module]:
    return [spconv.SparseConv3d(in_channels, out_channels, 3, stride=2, padding=1, bias=False, indice_key=key),
            SparseBatchNorm(out_channels), nn.ReLU(inplace=True)]


class VoxelPointNet(nn.Module):
    """Small PointNet over the points of each voxel: [V, T, F] padded points -> [V, out] (max over the real ones)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.mlp = PointMLP(in_features, out_features)

    def forward(self, points: torch.Tensor, num_points: torch.Tensor) -> torch.Tensor:
        real = torch.arange(points.shape[1], device=points.device)[None, :] < num_points[:, None]
        hidden = self.mlp(points)
        return hidden.masked_fill(~real[..., None], float("-inf")).amax(dim=1)


class LidarBranch(nn.Module):
    """Batch -> LiDAR BEV [B, out_channels, grid.height, grid.width] through voxels and a sparse 3D encoder.

    Voxels are `grid.cell_size / voxel_upsample` wide (voxel_upsample a power of two; 8 turns a 0.6 m grid into
    0.075 m voxels) and `voxel_height` tall (meters) over grid.z_min..z_max. `sparse_channels` has one entry per
    resolution: the first at the voxel resolution, then one stride-2 stage per halving, so its length must be
    log2(voxel_upsample) + 1. `vfe` is "mean" (mean of each voxel's points; no parameters) or "pointnet".
    `time_slices` > 0 stacks the per-sweep occupancy on the BEV grid onto the collapsed sparse features (see
    `LidarPillarBranch`).
    Points outside the grid or non-finite are dropped by `hard_voxelize`; a sample without points gives the 2D
    encoder's response to an empty map.
    """

    modality = "lidar"

    def __init__(self, grid: BEVGrid, out_channels: int = 128, voxel_upsample: int = 8, voxel_height: float = 0.2,
                 max_points_per_voxel: int = 10, max_voxels: int = 120000,
                 sparse_channels: Sequence[int] = (16, 32, 64, 128), vfe: str = "mean", vfe_channels: int = 16,
                 bev_blocks: int = 2, time_slices: int = 0, time_slice_s: float = 0.15):
        super().__init__()
        check_power_of_two(voxel_upsample, "LidarBranch voxel_upsample")
        sparse_channels = list(sparse_channels)
        stages = voxel_upsample.bit_length() - 1
        if len(sparse_channels) != stages + 1:
            raise ValueError(f"LidarBranch: sparse_channels {sparse_channels} needs log2(voxel_upsample) + 1 = "
                             f"{stages + 1} entries for voxel_upsample={voxel_upsample}")
        if vfe not in ("mean", "pointnet"):
            raise ValueError(f"LidarBranch: vfe must be 'mean' or 'pointnet', got {vfe!r}")
        depth = (grid.z_max - grid.z_min) / voxel_height
        if voxel_height <= 0 or abs(depth - round(depth)) > 1e-6:
            raise ValueError(f"LidarBranch: voxel_height {voxel_height} must divide the grid height "
                             f"{grid.z_max - grid.z_min} m")
        self.grid = grid
        self.voxel_grid = grid.upsampled(voxel_upsample)
        self.voxel_size = (self.voxel_grid.cell_size, self.voxel_grid.cell_size, voxel_height)
        self.point_range = grid.point_range
        self.spatial_shape = [int(round(depth)), self.voxel_grid.height, self.voxel_grid.width]  # (Z, Y, X)
        self.max_points_per_voxel = max_points_per_voxel
        self.max_voxels = max_voxels
        self.out_channels = out_channels
        self.vfe = vfe
        in_features = len(LIDAR_FEATURES)
        if vfe == "pointnet":
            # Per point: the 5 normalised columns plus the offsets from the voxel mean point, in voxel sizes.
            self.voxel_encoder = VoxelPointNet(in_features + 3, vfe_channels)
            in_features = vfe_channels
        layers = _subm_block(in_features, sparse_channels[0], "subm0") + _subm_block(sparse_channels[0],
                                                                                     sparse_channels[0], "subm0")
        for i in range(1, len(sparse_channels)):
            layers += _down_block(sparse_channels[i - 1], sparse_channels[i], f"down{i}")
            layers += _subm_block(sparse_channels[i], sparse_channels[i], f"subm{i}")
        self.sparse_encoder = SingleThreadSparse(spconv.SparseSequential(*layers))
        out_depth = self.spatial_shape[0]
        for _ in range(stages):
            out_depth = (out_depth + 1) // 2
        self.collapsed_channels = sparse_channels[-1] * out_depth
        _check_time_slices(time_slices, time_slice_s)
        self.time_slices, self.time_slice_s = time_slices, time_slice_s
        self.bev_encoder = BEVEncoder(self.collapsed_channels + time_slices, out_channels, bev_blocks)

    def voxelize(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Voxel features [V, F] (normalised; see `_normalised_lidar_features`) and int32 coords [V, 4]
        (sample, z, y, x) of every sample's points."""
        device = self.bev_encoder.blocks[0].conv1.weight.device
        points, sample_of_point = batch.lidar_points.to(device), batch.lidar_batch.to(device)
        features, coords = [], []
        for sample in range(batch.batch_size):
            cloud = points[sample_of_point == sample].float().contiguous()
            if cloud.shape[0] == 0:
                continue
            voxels, voxel_coords, num_points = hard_voxelize(cloud, self.voxel_size, self.point_range,
                                                             self.max_points_per_voxel, self.max_voxels)
            if voxels.shape[0] == 0:
                continue
            num_points = num_points.long()
            real = (torch.arange(voxels.shape[1], device=device)[None, :] < num_points[:, None])[..., None]
            normalised = _normalised_lidar_features(voxels.reshape(-1, voxels.shape[-1]), self.grid).view_as(voxels)
            mean = (normalised * real).sum(dim=1) / num_points[:, None].clamp(min=1)
            if self.vfe == "mean":
                features.append(mean)
            else:
                mean_xyz = (voxels[..., :3] * real).sum(dim=1) / num_points[:, None].clamp(min=1)
                offsets = (voxels[..., :3] - mean_xyz[:, None]) / voxels.new_tensor(self.voxel_size) * real
                features.append(self.voxel_encoder(torch.cat([normalised, offsets], dim=-1), num_points))
            coords.append(torch.cat([torch.full_like(voxel_coords[:, :1], sample), voxel_coords], dim=1))
        if not features:
            width = len(LIDAR_FEATURES) if self.vfe == "mean" else self.voxel_encoder.mlp[0].out_features
            return torch.zeros(0, width, device=device), torch.zeros(0, 4, dtype=torch.int32, device=device)
        return torch.cat(features), torch.cat(coords).int()

    def forward(self, batch: Batch) -> torch.Tensor:
        """Batch -> [B, out_channels, grid.height, grid.width]."""
        features, coords = self.voxelize(batch)
        batch_size = batch.batch_size
        if features.shape[0] == 0:
            bev = features.new_zeros(batch_size, self.collapsed_channels, self.grid.height, self.grid.width)
        else:
            sparse = spconv.SparseConvTensor(features, coords, self.spatial_shape, batch_size)
            dense = self.sparse_encoder(sparse).dense()  # [B, C, Z', H, W]
            bev = dense.flatten(1, 2)
        bev = _with_time_slices(bev, batch.lidar_points.to(bev.device).float(), batch.lidar_batch.to(bev.device),
                                self.grid, self.time_slices, self.time_slice_s)
        return self.bev_encoder(bev)


class LidarPillarBranch(nn.Module):
    """Batch -> LiDAR BEV [B, out_channels, grid.height, grid.width] with dynamic pillars (PointPillars-style).

    Pillars are `grid.cell_size / pillar_upsample` wide (a power of two) and span grid.z_min..z_max; stride-2 convs
    bring finer pillars back to the grid. Points outside the grid or non-finite are dropped. With `time_slices` > 0
    the per-sweep occupancy (`time_slice_occupancy`, slices `time_slice_s` seconds apart) is stacked onto the pillar
    features, so that the convs see where each object was at each sweep (its motion). With `flow` (FlowSettings
    fields; {} for the defaults; needs time_slices >= 2) the velocity block-matched between the newest and the oldest
    slice's above-ground occupancy on the grid (`fusion.branches.occupancy_flow`) is stacked onto the BEV encoder's
    input as `flow_channels` more channels.
    """

    modality = "lidar"

    def __init__(self, grid: BEVGrid, out_channels: int = 64, pillar_upsample: int = 1, pillar_channels: int = 64,
                 hidden_channels: int = 32, bev_blocks: int = 2, time_slices: int = 0, time_slice_s: float = 0.15,
                 flow: dict | None = None):
        super().__init__()
        check_power_of_two(pillar_upsample, "LidarPillarBranch pillar_upsample")
        self.grid = grid
        self.out_channels = out_channels
        pillar_grid = grid.upsampled(pillar_upsample) if pillar_upsample > 1 else grid
        _check_time_slices(time_slices, time_slice_s)
        self.time_slices, self.time_slice_s = time_slices, time_slice_s
        # Point features: the 5 normalised LiDAR columns.
        self.pillars = PillarEncoder(pillar_grid, len(LIDAR_FEATURES), pillar_channels, hidden_channels)
        self.flow = flow_settings(flow)
        if self.flow is not None and time_slices < 2:
            raise ValueError(f"LidarPillarBranch: flow needs time_slices >= 2, got {time_slices}")
        self.downsample = Downsample(pillar_channels + time_slices, pillar_upsample)
        extra = flow_channels(self.flow) if self.flow is not None else 0
        self.bev_encoder = BEVEncoder(pillar_channels + time_slices + extra, out_channels, bev_blocks)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Batch -> [B, out_channels, grid.height, grid.width]."""
        device = self.bev_encoder.blocks[0].conv1.weight.device
        points = batch.lidar_points.to(device).float()
        features = _normalised_lidar_features(points, self.grid)
        sample_of_point = batch.lidar_batch.to(device)
        bev = self.pillars(points[:, :3], features, sample_of_point, batch.batch_size)
        bev = _with_time_slices(bev, points, sample_of_point, self.pillars.pillar_grid, self.time_slices,
                                self.time_slice_s)
        bev = self.downsample(bev)
        if self.flow is not None:
            low_removed = above_ground(points, self.flow)
            occupancy = time_slice_occupancy(low_removed[:, :3], low_removed[:, 4], sample_of_point,
                                             batch.batch_size, self.grid, self.time_slices, self.time_slice_s)
            flow = flow_from_slices(occupancy, self.grid.cell_size, self.time_slice_s, self.flow)
            bev = torch.cat([bev, flow.to(bev.dtype)], dim=1)
        return self.bev_encoder(bev)


def _with_time_slices(bev: torch.Tensor, points: torch.Tensor, sample_of_point: torch.Tensor, grid: BEVGrid,
                      slices: int, slice_s: float) -> torch.Tensor:
    """bev [B, C, H, W] on `grid` with the per-sweep occupancy of the LiDAR points [P, 5] (LIDAR_FEATURES) stacked on
    as `slices` more channels; bev itself when slices is 0."""
    if not slices:
        return bev
    occupancy = time_slice_occupancy(points[:, :3], points[:, 4], sample_of_point, bev.shape[0], grid, slices, slice_s)
    return torch.cat([bev, occupancy.to(bev.dtype)], dim=1)


def _check_time_slices(time_slices: int, time_slice_s: float) -> None:
    if not isinstance(time_slices, int) or time_slices < 0:
        raise ValueError(f"time_slices must be an integer >= 0, got {time_slices!r}")
    if not time_slice_s > 0:
        raise ValueError(f"time_slice_s must be positive (seconds), got {time_slice_s!r}")
