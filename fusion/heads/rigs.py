"""Articulated rigs: a trailer and the truck towing it move as one, so each takes the better of the two velocity
measurements.

Why: the LiDAR fit of one half of a rig often fails where the other's succeeds. The trailer hides the tractor from
behind, and the tractor hides the trailer from the front, so one of them has too few points. Also, an 11 m trailer
moving along its own axis matches itself at many shifts. On the training drives' ground-truth boxes, about a third
of the moving tractors had no fit while their trailers were measured within 0.5 m/s.

A pair is a rig when the two boxes lie end to end on one axis. Their headings agree within max_angle_rad (either
way round, front / back aside). The partner's centre lies within max_offset_m of the trailer's axis. The gap between
the facing ends is at most max_gap_m (and at least -max_gap_m: detected boxes are not exact). Frames: ego frame;
meters, radians, m/s.
"""
from __future__ import annotations

import numpy as np

from fusion.types import DETECTION_CLASSES, Boxes

TRAILER = DETECTION_CLASSES.index("trailer")
# Only trucks: a car stopped close behind a trailer would otherwise be taken for its tractor (end to end as well).
# Cars do tow trailers, but telling a towing car from a following one needs the front, which is what is uncertain.
TRACTORS = [DETECTION_CLASSES.index("truck")]


def rig_partners(boxes: Boxes, max_gap_m: float = 2.5, max_offset_m: float = 1.0,
                 max_angle_rad: float = 0.26) -> np.ndarray:
    """partner [N] int64: for each trailer box, the index of the nearest truck box that forms a rig with it;
    -1 for every other box and for trailers without one."""
    labels = boxes.labels.numpy()
    partner = np.full(len(boxes), -1, dtype=np.int64)
    trailers = np.flatnonzero(labels == TRAILER)
    tractors = np.flatnonzero(np.isin(labels, TRACTORS))
    if len(trailers) == 0 or len(tractors) == 0:
        return partner
    center = boxes.center.numpy()[:, :2].astype(np.float64)
    yaw = boxes.yaw.numpy().astype(np.float64)
    length = boxes.size.numpy()[:, 0].astype(np.float64)
    offset = center[tractors][None] - center[trailers][:, None]  # [T, K, 2]
    cos, sin = np.cos(yaw[trailers])[:, None], np.sin(yaw[trailers])[:, None]
    along = offset[..., 0] * cos + offset[..., 1] * sin
    across = -offset[..., 0] * sin + offset[..., 1] * cos
    gap = np.abs(along) - (length[trailers][:, None] + length[tractors][None]) / 2
    turn = np.abs((yaw[tractors][None] - yaw[trailers][:, None] + np.pi / 2) % np.pi - np.pi / 2)
    rig = (np.abs(gap) <= max_gap_m) & (np.abs(across) <= max_offset_m) & (turn <= max_angle_rad)
    distance = np.where(rig, np.abs(gap) + np.abs(across), np.inf)
    nearest = distance.argmin(1)
    found = np.isfinite(distance[np.arange(len(trailers)), nearest])
    partner[trailers[found]] = tractors[nearest[found]]
    return partner


def share_rig_velocities(boxes: Boxes, velocity: np.ndarray, sigma: np.ndarray, max_gap_m: float = 2.5
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(velocity [N, 2] m/s, sigma [N] m/s per axis) with both halves of every rig given the velocity and
    uncertainty of the better-measured half (smaller sigma; inf: not measured)."""
    partner = rig_partners(boxes, max_gap_m)
    velocity, sigma = velocity.copy(), sigma.copy()
    for trailer in np.flatnonzero(partner >= 0):
        tractor = int(partner[trailer])
        better, worse = (trailer, tractor) if sigma[trailer] <= sigma[tractor] else (tractor, trailer)
        if np.isfinite(sigma[better]):
            velocity[worse], sigma[worse] = velocity[better], sigma[better]
    return velocity, sigma
