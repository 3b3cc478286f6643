"""Radar branch: multi-sweep, velocity-compensated radar points (Batch.radar_points, columns RADAR_FEATURES, ego
frame) -> pillar encoder with scatter pooling -> BEV -> a few 2D convs.

Radar is sparse and noisy: most cells are empty, a sample may have zero returns, and points may fall outside the
grid; all of that is fine here (empty cells are exactly zero before the convs; points outside are dropped).
"""
from __future__ import annotations

import torch
from torch import nn

from fusion.branches.common import BEVEncoder, Downsample, PillarEncoder, check_power_of_two
from fusion.grid import BEVGrid
from fusion.types import RADAR_FEATURES, Batch

_COLUMN = {name: i for i, name in enumerate(RADAR_FEATURES)}
#: Scales that bring the radar attributes to order 1: rcs in dBsm (about -10..40), velocities in m/s.
RCS_SCALE = 0.1
VELOCITY_SCALE = 0.1


class RadarBranch(nn.Module):
    """Batch -> radar BEV [B, out_channels, grid.height, grid.width].

    Per point: x, y, z (normalised to the grid), rcs, compensated velocity (vx, vy) and its magnitude, time lag
    (seconds), and a learned embedding of the dynamic property (`dyn_prop` 0..dyn_prop_classes-1; other values are
    clamped into that range), plus the pillar offsets of `PillarEncoder`. Non-finite attributes (not coordinates) are
    read as 0; non-finite coordinates drop the point. Pillars are `grid.cell_size / pillar_upsample` wide.
    """

    modality = "radar"

    def __init__(self, grid: BEVGrid, out_channels: int = 64, pillar_upsample: int = 1, pillar_channels: int = 32,
                 hidden_channels: int = 32, dyn_prop_classes: int = 8, dyn_prop_embedding: int = 4,
                 bev_blocks: int = 2):
        super().__init__()
        check_power_of_two(pillar_upsample, "RadarBranch pillar_upsample")
        if dyn_prop_classes < 1:
            raise ValueError(f"RadarBranch: dyn_prop_classes must be >= 1, got {dyn_prop_classes}")
        self.grid = grid
        self.out_channels = out_channels
        self.dyn_prop_classes = dyn_prop_classes
        self.dyn_prop_embedding = nn.Embedding(dyn_prop_classes, dyn_prop_embedding)
        pillar_grid = grid.upsampled(pillar_upsample) if pillar_upsample > 1 else grid
        point_features = 3 + 5 + dyn_prop_embedding  # xyz, rcs, vx, vy, |v|, time_lag, dyn_prop embedding
        self.pillars = PillarEncoder(pillar_grid, point_features, pillar_channels, hidden_channels)
        self.downsample = Downsample(pillar_channels, pillar_upsample)
        self.bev_encoder = BEVEncoder(pillar_channels, out_channels, bev_blocks)

    def point_features(self, points: torch.Tensor) -> torch.Tensor:
        """[R, 8] radar columns -> [R, 8 + dyn_prop_embedding] network inputs of order 1."""
        attributes = torch.nan_to_num(points, nan=0.0, posinf=0.0, neginf=0.0)
        rcs = attributes[:, _COLUMN["rcs"]] * RCS_SCALE
        velocity = attributes[:, [_COLUMN["vx_comp"], _COLUMN["vy_comp"]]] * VELOCITY_SCALE
        time_lag = attributes[:, _COLUMN["time_lag"]]
        dyn_prop = attributes[:, _COLUMN["dyn_prop"]].round().long().clamp(0, self.dyn_prop_classes - 1)
        return torch.cat([self.grid.normalized_xyz(points[:, :3]), rcs[:, None], velocity, velocity.norm(dim=-1, keepdim=True),
                          time_lag[:, None], self.dyn_prop_embedding(dyn_prop)], dim=-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Batch -> [B, out_channels, grid.height, grid.width]."""
        device = self.dyn_prop_embedding.weight.device
        points = batch.radar_points.to(device).float()
        bev = self.pillars(points[:, :3], self.point_features(points), batch.radar_batch.to(device),
                           batch.batch_size)
        return self.bev_encoder(self.downsample(bev))
