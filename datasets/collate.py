"""Collate `Sample`s into a `Batch`: points concatenated with a batch index, images and states stacked."""
from __future__ import annotations

import torch

from fusion.types import (CAMERA_NAMES, LIDAR_FEATURES, MODALITIES, RADAR_FEATURES, Batch, CameraImages, EgoState,
                          Sample)


def _concat_points(clouds: list[torch.Tensor | None], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[P, width] points of all samples and their [P] int64 sample index; absent clouds contribute nothing."""
    parts, index = [], []
    for i, cloud in enumerate(clouds):
        if cloud is None:
            continue
        if cloud.ndim != 2 or cloud.shape[1] != width:
            raise ValueError(f"point cloud of sample {i} has shape {tuple(cloud.shape)}, expected [N, {width}]")
        parts.append(cloud.float())
        index.append(torch.full((cloud.shape[0],), i, dtype=torch.int64))
    if not parts:
        return torch.zeros(0, width), torch.zeros(0, dtype=torch.int64)
    return torch.cat(parts), torch.cat(index)


def _stack_cameras(samples: list[Sample]) -> CameraImages | None:
    """Cameras with leading [B, Ncam]; samples without cameras get zero images and valid=False."""
    reference = next((s.cameras for s in samples if s.cameras is not None), None)
    if reference is None:
        return None
    shapes = {tuple(s.cameras.images.shape) for s in samples if s.cameras is not None}
    if len(shapes) != 1:
        raise ValueError(f"camera images of one batch must share a shape, got {sorted(shapes)}; "
                         "resize them in the transforms")
    blank = CameraImages(
        images=torch.zeros_like(reference.images),
        intrinsics=torch.eye(3).expand_as(reference.intrinsics).clone(),
        cam_to_ego=torch.eye(4).expand_as(reference.cam_to_ego).clone(),
        valid=torch.zeros_like(reference.valid),
        time_offsets=torch.zeros_like(reference.time_offsets),
        names=reference.names,
    )
    cams = [s.cameras if s.cameras is not None else blank for s in samples]
    for s, c in zip(samples, cams):
        if c.names != reference.names:
            raise ValueError(f"sample {s.token} has cameras {c.names}, expected {reference.names}")
    return CameraImages(
        images=torch.stack([c.images for c in cams]),
        intrinsics=torch.stack([c.intrinsics for c in cams]).float(),
        cam_to_ego=torch.stack([c.cam_to_ego for c in cams]).float(),
        valid=torch.stack([c.valid for c in cams]),
        time_offsets=torch.stack([c.time_offsets for c in cams]).float(),
        names=reference.names,
    )


def _stack_ego(samples: list[Sample]) -> EgoState:
    return EgoState(
        ego_to_global=torch.stack([s.ego.ego_to_global.double() for s in samples]),
        speed=torch.stack([s.ego.speed.float() for s in samples]),
        yaw_rate=torch.stack([s.ego.yaw_rate.float() for s in samples]),
        acceleration=torch.stack([s.ego.acceleration.float() for s in samples]),
        can_valid=torch.stack([s.ego.can_valid.bool() for s in samples]),
    )


def _stack_maps(samples: list[Sample]) -> torch.Tensor:
    reference = next((s.map_raster for s in samples if s.map_raster is not None), None)
    if reference is None:
        return torch.zeros(len(samples), 1, 1, 1)
    return torch.stack([s.map_raster.float() if s.map_raster is not None else torch.zeros_like(reference)
                        for s in samples])


def collate_samples(samples: list[Sample]) -> Batch:
    """Collate a list of Samples (any subset of sensors per sample) into one Batch."""
    if not samples:
        raise ValueError("collate_samples needs at least one sample")
    lidar_points, lidar_batch = _concat_points([s.lidar for s in samples], len(LIDAR_FEATURES))
    radar_points, radar_batch = _concat_points([s.radar for s in samples], len(RADAR_FEATURES))
    present = {m: torch.tensor([s.present(m) for s in samples], dtype=torch.bool) for m in MODALITIES}
    return Batch(
        tokens=[s.token for s in samples],
        scene_names=[s.scene_name for s in samples],
        timestamps_us=torch.tensor([s.timestamp_us for s in samples], dtype=torch.int64),
        lidar_points=lidar_points,
        lidar_batch=lidar_batch,
        radar_points=radar_points,
        radar_batch=radar_batch,
        cameras=_stack_cameras(samples),
        ego=_stack_ego(samples),
        map_raster=_stack_maps(samples),
        present=present,
        boxes=[s.boxes for s in samples],
    )


