"""GPS branch: the ego's CAN/IMU state and the map prior -> BEV [B, C, H, W] on the shared grid.

`GpsBranch`: the map raster (batch.map_raster [B, 1, H, W], drivable area on the grid, with two coordinate channels)
through a small CNN, modulated FiLM-style (per-channel scale and shift) by an embedding of the ego state
(EgoState.vector(): speed m/s, yaw rate rad/s, acceleration m/s^2, and can_valid). In training mode it corrupts its
input with the GPS-noise augmentation (fusion.datasets.gps_noise.perturb_gps; on by default) so the model cannot lean
on the ego state as a shortcut.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fusion.branches.common import BEVEncoder, ConvBNReLU
from fusion.datasets.gps_noise import perturb_gps
from fusion.grid import BEVGrid
from fusion.types import Batch

#: Scale of EgoState.vector() columns (speed m/s, yaw rate rad/s, ax, ay, az m/s^2) fed to the embedding.
EGO_STATE_SCALE = (0.1, 1.0, 0.25, 0.25, 0.1)


class GpsBranch(nn.Module):
    """Batch -> GPS/map BEV [B, out_channels, grid.height, grid.width].

    The map raster (zeros where a sample has none; a [B, 1, 1, 1] raster means no sample has one) plus normalised
    x/y coordinate channels goes through `map_channels` conv blocks; after each, FiLM from the ego-state embedding:
    features * (1 + scale) + shift. Then a BEV encoder. In training mode with `train_corruption`, the batch first goes
    through `perturb_gps` with the given sigmas (global RNG, so seeded runs repeat).
    """

    modality = "gps"

    def __init__(self, grid: BEVGrid, out_channels: int = 32, map_channels: Sequence[int] = (16, 32),
                 ego_embedding: int = 32, bev_blocks: int = 1, train_corruption: bool = True,
                 position_sigma_m: float = 0.5, yaw_sigma_rad: float = 0.02, speed_sigma_mps: float = 0.5,
                 yaw_rate_sigma_radps: float = 0.02, can_dropout: float = 0.2):
        super().__init__()
        map_channels = list(map_channels)
        if not map_channels:
            raise ValueError("GpsBranch: map_channels needs at least one entry")
        self.grid = grid
        self.out_channels = out_channels
        self.train_corruption = train_corruption
        self.corruption = dict(position_sigma_m=position_sigma_m, yaw_sigma_rad=yaw_sigma_rad,
                               speed_sigma_mps=speed_sigma_mps, yaw_rate_sigma_radps=yaw_rate_sigma_radps,
                               can_dropout=can_dropout)
        self.register_buffer("ego_scale", torch.tensor(EGO_STATE_SCALE), persistent=False)
        self.register_buffer("coordinates", grid.to_normalized(grid.cell_centers()).permute(2, 0, 1)[None],
                             persistent=False)  # [1, 2, H, W] in [-1, 1]
        # Ego state (5 values) + can_valid -> embedding.
        self.ego_encoder = nn.Sequential(nn.Linear(6, ego_embedding), nn.ReLU(inplace=True),
                                         nn.Linear(ego_embedding, ego_embedding), nn.ReLU(inplace=True))
        blocks, films, previous = [], [], 3
        for channels in map_channels:
            blocks.append(ConvBNReLU(previous, channels))
            films.append(nn.Linear(ego_embedding, 2 * channels))
            previous = channels
        self.map_blocks = nn.ModuleList(blocks)
        self.films = nn.ModuleList(films)
        self.bev_encoder = BEVEncoder(previous, out_channels, bev_blocks)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Batch -> [B, out_channels, grid.height, grid.width]."""
        if self.training and self.train_corruption:
            batch = perturb_gps(batch, generator=None, grid=self.grid, **self.corruption)
        device = self.coordinates.device
        size = batch.batch_size
        raster = batch.map_raster.to(device).float()
        if tuple(raster.shape[-2:]) == (1, 1):
            raster = raster.expand(-1, -1, *self.grid.shape)
        elif tuple(raster.shape[-2:]) != self.grid.shape:
            raise ValueError(f"GpsBranch: batch.map_raster is {tuple(raster.shape[-2:])} cells but the grid is "
                             f"{self.grid.shape}; the reader must rasterise the map on the model's grid")
        ego = batch.ego.to(device)
        state = torch.cat([ego.vector() * self.ego_scale, ego.can_valid.float()[:, None]], dim=-1)
        embedding = self.ego_encoder(state)
        x = torch.cat([raster, self.coordinates.expand(size, -1, -1, -1)], dim=1)
        for block, film in zip(self.map_blocks, self.films):
            x = block(x)
            scale, shift = film(embedding).chunk(2, dim=-1)
            x = x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.bev_encoder(x)
