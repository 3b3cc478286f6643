"""Velocity and heading diagnostics of a submission against the ground truth (the questions mAVE / mAOE leave open).

mAVE and mAOE say how wrong velocities and headings are, not why. This matches predictions to ground truth the way
the devkit does for its TP errors (same class, centre distance at most 2 m, greedy by score) and reports: how fast
the matched objects move and how fast they are predicted to (a head collapsed to zero predicts ~0 for all), how
many moving objects are predicted as moving, and how heading errors split into right (< 0.3 rad), flipped front /
back (> pi - 0.3) and the rest. All in the global frame of the submission: meters, m/s, radians.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

MATCH_DISTANCE_M = 2.0
MOVING_MPS = 1.0
RIGHT_RAD = 0.3


def _yaw(quaternion) -> float:
    w, x, y, z = (float(v) for v in quaternion)
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


@dataclass
class MotionDiagnostics:
    """Over the matched (prediction, ground truth) pairs; velocities in m/s, shares in [0, 1]."""

    matched: int
    moving_matched: int
    mean_true_speed: float
    mean_predicted_speed: float
    max_predicted_speed: float
    moving_predicted_moving: float
    moving_velocity_error: float
    heading_right: float
    heading_flipped: float
    moving_heading_flipped: float

    def as_dict(self) -> dict:
        return asdict(self)


def match_pairs(predictions: Mapping[str, list], ground_truth: Mapping[str, list],
                max_distance_m: float = MATCH_DISTANCE_M) -> list[tuple[dict, dict]]:
    """(prediction, ground truth) box dicts (submission format) matched per sample and class, greedily by
    prediction score, to the nearest unmatched ground truth within max_distance_m (x-y centre distance)."""
    pairs = []
    for token, truths in ground_truth.items():
        preds = sorted(predictions.get(token, []), key=lambda box: -float(box["detection_score"]))
        used = set()
        for pred in preds:
            best, best_distance = None, max_distance_m
            for index, truth in enumerate(truths):
                if index in used or truth["detection_name"] != pred["detection_name"]:
                    continue
                distance = math.dist(pred["translation"][:2], truth["translation"][:2])
                if distance <= best_distance:
                    best, best_distance = index, distance
            if best is not None:
                used.add(best)
                pairs.append((pred, truths[best]))
    return pairs


def motion_diagnostics(predictions: Mapping[str, list], ground_truth: Mapping[str, list]) -> MotionDiagnostics:
    """`MotionDiagnostics` of a submission's results against the ground truth's (both {sample_token: [box]}).
    Heading errors leave out barriers (the devkit scores their orientation modulo pi) and traffic cones (not
    scored)."""
    pairs = match_pairs(predictions, ground_truth)
    if not pairs:
        return MotionDiagnostics(0, 0, *([float("nan")] * 8))
    true_v = np.array([p[1]["velocity"][:2] for p in pairs], dtype=np.float64)
    pred_v = np.array([p[0]["velocity"][:2] for p in pairs], dtype=np.float64)
    true_speed, pred_speed = np.linalg.norm(true_v, axis=1), np.linalg.norm(pred_v, axis=1)
    moving = true_speed > MOVING_MPS
    oriented = np.array([p[1]["detection_name"] not in ("barrier", "traffic_cone") for p in pairs])
    error = np.array([abs(math.remainder(_yaw(p[0]["rotation"]) - _yaw(p[1]["rotation"]), 2 * math.pi))
                      for p in pairs])
    flipped = error > math.pi - RIGHT_RAD

    def share(mask: np.ndarray, of: np.ndarray) -> float:
        return float(mask[of].mean()) if of.any() else float("nan")

    return MotionDiagnostics(
        matched=len(pairs), moving_matched=int(moving.sum()),
        mean_true_speed=float(true_speed.mean()), mean_predicted_speed=float(pred_speed.mean()),
        max_predicted_speed=float(pred_speed.max()),
        moving_predicted_moving=share(pred_speed > MOVING_MPS / 2, moving),
        moving_velocity_error=float(np.linalg.norm(pred_v - true_v, axis=1)[moving].mean()) if moving.any()
        else float("nan"),
        heading_right=share(error < RIGHT_RAD, oriented), heading_flipped=share(flipped, oriented),
        moving_heading_flipped=share(flipped, oriented & moving))
