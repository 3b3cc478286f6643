"""GPS branch: the ego's CAN/IMU state and the map prior -> BEV, plus GPS corruption and temporal alignment.

- `GpsBranch`: the map raster (batch.map_raster [B, 1, H, W], drivable area on the grid, with two coordinate channels)
  through a small CNN, modulated FiLM-style (per-channel scale and shift) by an embedding of the ego state
  (EgoState.vector(): speed m/s, yaw rate rad/s, acceleration m/s^2, and can_valid). In training mode it corrupts
  its input with `perturb_gps` (on by default) so the model cannot lean on the ego state as a shortcut.
- `perturb_gps`: GPS/CAN noise on a Batch: a random pose error (rotation + translation) applied to the map raster,
  noise on speed and yaw rate, random CAN dropout. Evaluation uses it to score "with GPS noise".
- `TemporalAligner`: warps a previous BEV into the current ego frame from both ego_to_global poses.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from fusion.branches.common import BEVEncoder, ConvBNReLU
from fusion.grid import BEVGrid
from fusion.types import Batch, EgoState

#: Scale of EgoState.vector() columns (speed m/s, yaw rate rad/s, ax, ay, az m/s^2) fed to the embedding.
EGO_STATE_SCALE = (0.1, 1.0, 0.25, 0.25, 0.1)


def _rigid_2d(xy: torch.Tensor, yaw: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Rotate points xy [B, ..., 2] by yaw [B] (radians) then translate by translation [B, 2] (meters)."""
    shape = (-1,) + (1,) * (xy.dim() - 2)
    cos, sin = torch.cos(yaw).view(shape), torch.sin(yaw).view(shape)
    x, y = xy[..., 0], xy[..., 1]
    moved = torch.stack([cos * x - sin * y, sin * x + cos * y], dim=-1)
    return moved + translation.view(shape + (2,))


def _shift_map_raster(raster: torch.Tensor, grid: BEVGrid, yaw: torch.Tensor,
                      translation: torch.Tensor) -> torch.Tensor:
    """The raster [B, 1, H, W] on `grid` as seen with a pose error: value at ego point p := old value at
    R(yaw) p + translation (yaw [B] radians, translation [B, 2] meters); bilinear, 0 from outside."""
    centres = grid.cell_centers(device=raster.device).expand(raster.shape[0], -1, -1, -1)  # [B, H, W, 2]
    source = _rigid_2d(centres, yaw, translation)
    return nn.functional.grid_sample(raster, grid.to_normalized(source).to(raster.dtype), mode="bilinear",
                                     padding_mode="zeros", align_corners=False)


def perturb_gps(batch: Batch, position_sigma_m: float, yaw_sigma_rad: float, generator: torch.Generator | None = None,
                *, grid: BEVGrid | None = None, speed_sigma_mps: float = 0.0, yaw_rate_sigma_radps: float = 0.0,
                can_dropout: float = 0.0) -> Batch:
    """A copy of `batch` whose GPS inputs carry localisation and CAN noise (the input batch is not modified).

    Pose error: per sample, a translation ~ N(0, position_sigma_m^2) per axis (meters) and a yaw ~ N(0,
    yaw_sigma_rad^2) (radians). The map raster is resampled as if it had been cropped at the wrong pose: the value at
    ego point p becomes the true value at R(yaw) p + t (bilinear; from outside the raster: 0 = not drivable). This
    needs the raster's extent, so `grid` (the BEVGrid the raster is on) is required whenever the batch has a map
    raster and a pose error is asked for. `ego_to_global` is left untouched, so boxes can still be converted to the
    global frame with this batch.
    CAN noise: speed += N(0, speed_sigma_mps^2), yaw_rate += N(0, yaw_rate_sigma_radps^2) where CAN is valid; with
    probability `can_dropout` a sample's CAN is dropped (can_valid False, speed/yaw_rate/acceleration NaN, as the
    reader marks missing CAN). `present["gps"]` is not changed.
    Random numbers come from `generator` (a CPU torch.Generator; the global RNG when None), drawn on the CPU in a
    fixed order, so a seeded generator gives the same noise on any device.
    """
    for name, value in (("position_sigma_m", position_sigma_m), ("yaw_sigma_rad", yaw_sigma_rad),
                        ("speed_sigma_mps", speed_sigma_mps), ("yaw_rate_sigma_radps", yaw_rate_sigma_radps)):
        if not value >= 0:
            raise ValueError(f"perturb_gps: {name} must be >= 0, got {value}")
    if not 0.0 <= can_dropout <= 1.0:
        raise ValueError(f"perturb_gps: can_dropout must be in [0, 1], got {can_dropout}")
    size = batch.batch_size
    translation = torch.randn(size, 2, generator=generator) * position_sigma_m
    yaw = torch.randn(size, generator=generator) * yaw_sigma_rad
    speed_noise = torch.randn(size, generator=generator) * speed_sigma_mps
    yaw_rate_noise = torch.randn(size, generator=generator) * yaw_rate_sigma_radps
    dropped = torch.rand(size, generator=generator) < can_dropout

    map_raster = batch.map_raster
    has_raster = map_raster.shape[-2:] != (1, 1)
    if has_raster and (position_sigma_m > 0 or yaw_sigma_rad > 0):
        if grid is None:
            raise ValueError("perturb_gps: grid= (the BEVGrid of batch.map_raster) is needed to move the map raster "
                             "by a pose error in meters")
        if tuple(map_raster.shape[-2:]) != grid.shape:
            raise ValueError(f"perturb_gps: batch.map_raster is {tuple(map_raster.shape[-2:])} cells but the grid is "
                             f"{grid.shape}")
        map_raster = _shift_map_raster(map_raster, grid, yaw.to(map_raster.device),
                                       translation.to(map_raster.device))
    ego = batch.ego
    device = ego.speed.device
    can_valid = ego.can_valid & ~dropped.to(device)
    nan = torch.full_like(ego.speed, float("nan"))
    speed = torch.where(can_valid, ego.speed + speed_noise.to(device), nan)
    yaw_rate = torch.where(can_valid, ego.yaw_rate + yaw_rate_noise.to(device), nan)
    acceleration = torch.where(can_valid[:, None], ego.acceleration, torch.full_like(ego.acceleration, float("nan")))
    ego = EgoState(ego_to_global=ego.ego_to_global, speed=speed, yaw_rate=yaw_rate, acceleration=acceleration,
                   can_valid=can_valid)
    return replace(batch, ego=ego, map_raster=map_raster)


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


class TemporalAligner(nn.Module):
    """Warps a previous BEV map into the current ego frame (grid_sample on the shared grid).

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
        device = previous.device
        relative = torch.linalg.solve(previous_ego_to_global.double(), current_ego_to_global.double())  # cur -> prev
        centres = grid.cell_centers(device=device, dtype=torch.float64)
        homogeneous = torch.cat([centres, torch.zeros_like(centres[..., :1]), torch.ones_like(centres[..., :1])], -1)
        source = torch.einsum("bij,hwj->bhwi", relative.to(device), homogeneous)[..., :2]  # [B, H, W, 2] meters
        valid = grid.contains(source)[:, None]
        sample_at = grid.to_normalized(source).to(previous.dtype)
        aligned = nn.functional.grid_sample(previous, sample_at, mode="bilinear", padding_mode="zeros",
                                            align_corners=False)
        return aligned * valid.to(aligned.dtype), valid
