"""Depth targets for the camera branch from LiDAR at training time (BEVDepth-style explicit depth supervision).

Lift-splat learns depth only through the detection loss, which on a small data set leaves the depth distribution
nearly flat: the camera's features are smeared along every ray and the camera BEV finds almost nothing. Projecting
the keyframe LiDAR sweep into each camera gives, for the feature pixels a LiDAR point falls in, the depth of the
nearest surface there; a cross-entropy over the depth bins teaches the branch where along the ray its features belong.
LiDAR is used as a teacher only: inference never needs it, so the camera branch still works alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: LiDAR points whose time lag is at most this (seconds) count as the keyframe sweep (sweeps are 50 ms apart).
KEYFRAME_LAG_S = 0.01
NO_DEPTH = -1


def lidar_depth_targets(points: Tensor, point_sample: Tensor, camera_sample: Tensor, intrinsics: Tensor,
                        cam_to_ego: Tensor, image_size: tuple[int, int], feature_size: tuple[int, int],
                        depth_min: float, depth_max: float, depth_bins: int) -> Tensor:
    """Depth-bin index of the nearest keyframe LiDAR point in every feature pixel of each camera, NO_DEPTH where none.

    points: [P, 5] LiDAR columns (x, y, z ego frame meters, intensity, time lag seconds); point_sample: [P] int64
    sample of each point; camera_sample: [Nv] int64 sample of each camera; intrinsics: [Nv, 3, 3] pixels of the image
    as given (image_size = (H, W)); cam_to_ego: [Nv, 4, 4]; feature_size: (h, w) of the depth logits. Bins split
    depth_min..depth_max (meters along the optical axis) evenly, as the camera branch's. Returns [Nv, h, w] int64.
    """
    (height, width), (rows, cols) = image_size, feature_size
    num_views = camera_sample.shape[0]
    target = torch.full((num_views * rows * cols,), torch.iinfo(torch.int64).max, dtype=torch.int64,
                        device=points.device)
    keyframe = points[:, 4].abs() <= KEYFRAME_LAG_S
    points, point_sample = points[keyframe, :3].float(), point_sample[keyframe]
    step = (depth_max - depth_min) / depth_bins
    for view in range(num_views):
        xyz = points[point_sample == camera_sample[view]]
        if xyz.shape[0] == 0:
            continue
        ego_to_cam = torch.linalg.inv(cam_to_ego[view].float())
        cam = xyz @ ego_to_cam[:3, :3].T + ego_to_cam[:3, 3]
        depth = cam[:, 2]
        ahead = (depth > depth_min) & (depth < depth_max)
        cam, depth = cam[ahead], depth[ahead]
        pixel = cam @ intrinsics[view].float().T
        u, v = pixel[:, 0] / depth, pixel[:, 1] / depth
        # feature cell c covers image pixels whose centres lie in [c, c + 1) * (W / w) - 0.5 (the frustum's convention)
        col = torch.floor((u + 0.5) * cols / width).long()
        row = torch.floor((v + 0.5) * rows / height).long()
        inside = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
        depth_bin = ((depth[inside] - depth_min) / step).long().clamp(0, depth_bins - 1)
        flat = (view * rows + row[inside]) * cols + col[inside]
        target.scatter_reduce_(0, flat, depth_bin, reduce="amin")
    target = torch.where(target == torch.iinfo(torch.int64).max, torch.full_like(target, NO_DEPTH), target)
    return target.view(num_views, rows, cols)


def depth_loss(depth_logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of depth_logits [Nv, D, h, w] against target bins [Nv, h, w] (NO_DEPTH ignored), mean over the
    supervised pixels; 0 (with a gradient path) when no pixel has a target."""
    supervised = target != NO_DEPTH
    if not bool(supervised.any()):
        return depth_logits.sum() * 0.0
    logits = depth_logits.float().permute(0, 2, 3, 1)[supervised]
    return F.cross_entropy(logits, target[supervised])
