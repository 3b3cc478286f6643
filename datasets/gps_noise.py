"""GPS noise: a Batch whose GPS inputs carry localisation and CAN noise (`perturb_gps`), an augmentation of the
GPS branch's input.

It is applied inside the model, where it always was: the GPS branch corrupts its input with it in training mode
(fusion.branches.gps.GpsBranch), and the robustness evaluation scores a model "with GPS noise" through it
(fusion.evaluation.robustness). The map raster [B, 1, H, W] is on the BEVGrid in the ego frame (meters); speed m/s,
yaw rate rad/s.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from fusion.grid import BEVGrid, rigid_2d
from fusion.types import Batch, EgoState


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
        pose_error = rigid_2d(yaw.to(map_raster.device), translation.to(map_raster.device))
        map_raster, _ = grid.warp(map_raster, pose_error, mode="bilinear")
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
