"""Temporal alignment: warp a previous keyframe's BEV into the current ego frame from the two ego poses.

Used by the temporal fusion of the detector (fusion.module.TemporalFusion). Frames: each BEV is on the shared BEVGrid
in its own keyframe's ego frame (x forward, y left; meters); poses are [B, 4, 4] ego_to_global (meters).
"""
from __future__ import annotations

import torch
from torch import nn

from fusion.grid import BEVGrid, planar_transform


class TemporalAligner(nn.Module):
    """Warps a previous BEV map into the current ego frame (BEVGrid.warp on the shared grid).

    forward(previous [B, C, H, W], previous_ego_to_global [B, 4, 4], current_ego_to_global [B, 4, 4]) ->
    (aligned [B, C, H, W], valid [B, 1, H, W] bool). Each current cell centre p (current ego frame, meters) is taken
    to the previous ego frame, T_prev^-1 T_cur p (poses in float64: global coordinates are large), and the previous
    map is sampled there bilinearly; cells whose source lies outside the previous grid are zero and invalid.
    Only the planar part of the motion matters for a BEV map: the cell centres are taken at z = 0.
    """

    def __init__(self, grid: BEVGrid):
        super().__init__()
        self.grid = grid

    def forward(self, previous: torch.Tensor, previous_ego_to_global: torch.Tensor,
                current_ego_to_global: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.grid
        if previous.dim() != 4 or tuple(previous.shape[-2:]) != grid.shape:
            raise ValueError(f"TemporalAligner: previous BEV has shape {tuple(previous.shape)}, expected "
                             f"[B, C, {grid.height}, {grid.width}]")
        size = previous.shape[0]
        for name, pose in (("previous_ego_to_global", previous_ego_to_global),
                           ("current_ego_to_global", current_ego_to_global)):
            if tuple(pose.shape) != (size, 4, 4):
                raise ValueError(f"TemporalAligner: {name} has shape {tuple(pose.shape)}, expected [{size}, 4, 4]")
        relative = torch.linalg.solve(previous_ego_to_global.double(), current_ego_to_global.double())  # cur -> prev
        aligned, valid = grid.warp(previous, planar_transform(relative), mode="bilinear")
        valid = valid[:, None]
        return aligned * valid.to(aligned.dtype), valid
