"""The nuScenes submission: Boxes (ego frame) <-> submission boxes (global frame), writing a split's submission
JSON, and checking a submission against the detection format before the devkit sees it.

- Frames: `Boxes` are in the keyframe ego frame (x forward, y left, z up; meters, radians, m/s). The submission is in
  the global (map) frame, as the devkit wants: translation (m), size (w, l, h) (m), rotation (w, x, y, z) quaternion,
  velocity (vx, vy) (m/s, global axes). `boxes_to_submission` / `submission_to_boxes` convert with the keyframe's
  ego_to_global pose (4x4, float64).
- `make_submission`: every sample of the split present (possibly with an empty list), at most 500 boxes per sample
  (best scores kept), attribute names valid for the class (`default_attribute` where none is predicted), `meta` with
  the sensors used (`submission_meta`).
- `validate_submission` (fusion.evaluation.submission_schema): the submission format checked types first, with
  errors naming the sample token and field (`SubmissionError`); `load_submission` reads the JSON file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from fusion.datasets.safe_io import checked_size
from fusion.evaluation.submission_schema import (BOX_FIELDS, MAX_BOXES_PER_SAMPLE, META_KEYS,  # noqa: F401
                                                 QUATERNION_NORM_TOLERANCE, SubmissionError, validate_submission)
from fusion.geometry import matrix_to_quaternion
from fusion.types import ATTRIBUTES, CLASS_ATTRIBUTES, DETECTION_CLASSES, MODALITIES, NO_ATTRIBUTE, Boxes

#: Above this speed (m/s) a box without a predicted attribute counts as moving (the public baselines' rule).
MOVING_SPEED_MPS = 0.2


def default_attribute(detection_name: str, speed_mps: float) -> str:
    """The attribute a box gets when none is predicted, as public baselines do: vehicles moving / parked and
    pedestrians moving / standing by speed (above MOVING_SPEED_MPS = moving), cycles with / without rider by
    speed, "" for barrier and traffic_cone (classes without attributes)."""
    if detection_name not in CLASS_ATTRIBUTES:
        raise ValueError(f"unknown detection class {detection_name!r}; expected one of {DETECTION_CLASSES}")
    moving = bool(speed_mps > MOVING_SPEED_MPS)
    if detection_name in ("barrier", "traffic_cone"):
        return ""
    if detection_name == "pedestrian":
        return "pedestrian.moving" if moving else "pedestrian.standing"
    if detection_name in ("bicycle", "motorcycle"):
        return "cycle.with_rider" if moving else "cycle.without_rider"
    return "vehicle.moving" if moving else "vehicle.parked"


def _quaternion_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (w, x, y, z) quaternions [..., 4] (broadcasting)."""
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack([aw * bw - ax * bx - ay * by - az * bz,
                     aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw], axis=-1)


def _check_pose(ego_to_global: np.ndarray, token: str) -> np.ndarray:
    pose = np.asarray(ego_to_global, dtype=np.float64)
    if pose.shape != (4, 4) or not np.isfinite(pose).all():
        raise ValueError(f"sample {token}: ego_to_global must be a finite 4x4 pose, got shape {pose.shape}")
    return pose


def boxes_to_submission(token: str, boxes: Boxes, ego_to_global: np.ndarray) -> list[dict]:
    """nuScenes submission boxes (global frame) of one sample's ego-frame `boxes`, best score first, at most
    MAX_BOXES_PER_SAMPLE. ego_to_global: the keyframe's 4x4 pose (float64, meters).

    Global rotation = R_ego_to_global * Rz(yaw); velocity (vx, vy, 0) is rotated into the global axes. Boxes whose
    predicted attribute is NO_ATTRIBUTE or not valid for their class get `default_attribute`. Non-finite values or
    negative sizes raise ValueError naming the sample."""
    pose = _check_pose(ego_to_global, token)
    if len(boxes) == 0:
        return []
    order = torch.argsort(boxes.scores.detach().float().cpu(), descending=True, stable=True)[:MAX_BOXES_PER_SAMPLE]
    boxes = boxes.select(order.to(boxes.scores.device))
    center = boxes.center.detach().cpu().double().numpy()
    size = boxes.size.detach().cpu().double().numpy()
    yaw = boxes.yaw.detach().cpu().double().numpy()
    velocity = boxes.velocity.detach().cpu().double().numpy()
    scores = boxes.scores.detach().cpu().double().numpy()
    labels = boxes.labels.detach().cpu().numpy()
    attributes = boxes.attributes.detach().cpu().numpy()
    for name, values in (("center", center), ("size", size), ("yaw", yaw), ("velocity", velocity),
                         ("scores", scores)):
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            raise ValueError(f"sample {token}: {int(bad.sum())} box(es) with non-finite {name}")
    if (size < 0).any():
        raise ValueError(f"sample {token}: negative box size")
    if ((labels < 0) | (labels >= len(DETECTION_CLASSES))).any():
        raise ValueError(f"sample {token}: label outside 0..{len(DETECTION_CLASSES) - 1}")
    rotation, translation = pose[:3, :3], pose[:3, 3]
    global_center = center @ rotation.T + translation
    velocity3 = np.concatenate([velocity, np.zeros((len(velocity), 1))], axis=1)
    global_velocity = (velocity3 @ rotation.T)[:, :2]
    yaw_quaternion = np.stack([np.cos(yaw / 2), np.zeros_like(yaw), np.zeros_like(yaw), np.sin(yaw / 2)], axis=-1)
    global_rotation = _quaternion_multiply(matrix_to_quaternion(rotation)[None], yaw_quaternion)
    global_rotation /= np.linalg.norm(global_rotation, axis=-1, keepdims=True)
    speed = np.linalg.norm(velocity, axis=1)
    scores = np.clip(scores, 0.0, 1.0)
    entries = []
    for i in range(len(center)):
        name = DETECTION_CLASSES[int(labels[i])]
        attribute = int(attributes[i])
        attribute_name = ATTRIBUTES[attribute] if 0 <= attribute < len(ATTRIBUTES) else ""
        if attribute_name not in CLASS_ATTRIBUTES[name]:
            attribute_name = default_attribute(name, float(speed[i]))
        entries.append({
            "sample_token": token,
            "translation": [float(v) for v in global_center[i]],
            "size": [float(size[i, 1]), float(size[i, 0]), float(size[i, 2])],  # (l, w, h) -> devkit (w, l, h)
            "rotation": [float(v) for v in global_rotation[i]],
            "velocity": [float(v) for v in global_velocity[i]],
            "detection_name": name,
            "detection_score": float(scores[i]),
            "attribute_name": attribute_name,
        })
    return entries


def submission_to_boxes(entries: Sequence[Mapping[str, Any]], ego_to_global: np.ndarray) -> Boxes:
    """The inverse of `boxes_to_submission`: submission boxes (global frame) -> Boxes in the ego frame of
    `ego_to_global` (4x4). Yaw is the heading of the box's x axis in the ego frame; the velocity is taken as
    horizontal in the ego frame (as the writer assumes), so ego -> global -> ego is exact even for a tilted ego;
    attribute "" -> NO_ATTRIBUTE; point counts are unknown (-1)."""
    pose = _check_pose(ego_to_global, "?")
    if not entries:
        return Boxes.empty()
    rotation, translation = pose[:3, :3], pose[:3, 3]
    center = (np.array([e["translation"] for e in entries], dtype=np.float64) - translation) @ rotation
    wlh = np.array([e["size"] for e in entries], dtype=np.float64)
    quaternions = np.array([e["rotation"] for e in entries], dtype=np.float64)
    quaternions /= np.linalg.norm(quaternions, axis=-1, keepdims=True)
    ego_quaternion = matrix_to_quaternion(rotation) * np.array([1.0, -1.0, -1.0, -1.0])  # conjugate = inverse
    w, x, y, z = np.moveaxis(_quaternion_multiply(ego_quaternion[None], quaternions), -1, 0)
    yaw = np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
    # The ego-frame velocity is horizontal in the ego frame (vz = 0), so its global (vx, vy) is R[:2, :2] @ v.
    global_velocity = np.array([e["velocity"] for e in entries], dtype=np.float64).reshape(-1, 2)
    velocity = np.linalg.solve(rotation[:2, :2], global_velocity.T).T
    n = len(entries)
    return Boxes(
        center=torch.from_numpy(center).float(),
        size=torch.from_numpy(wlh[:, [1, 0, 2]].copy()).float(),
        yaw=torch.from_numpy(yaw).float(),
        velocity=torch.from_numpy(velocity).float(),
        labels=torch.tensor([DETECTION_CLASSES.index(e["detection_name"]) for e in entries], dtype=torch.int64),
        attributes=torch.tensor([ATTRIBUTES.index(e["attribute_name"]) if e["attribute_name"] else NO_ATTRIBUTE
                                 for e in entries], dtype=torch.int64),
        scores=torch.tensor([float(e["detection_score"]) for e in entries], dtype=torch.float32),
        num_lidar_pts=torch.full((n,), -1, dtype=torch.int64),
        num_radar_pts=torch.full((n,), -1, dtype=torch.int64),
    )


def submission_meta(modalities: Iterable[str], use_external: bool = False) -> dict[str, bool]:
    """The submission's `meta` for a model using `modalities` (fusion.types.MODALITIES). The GPS branch reads the
    map raster (and CAN), so "gps" sets use_map."""
    modalities = set(modalities)
    unknown = modalities - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; expected a subset of {MODALITIES}")
    return {"use_camera": "camera" in modalities, "use_lidar": "lidar" in modalities,
            "use_radar": "radar" in modalities, "use_map": "gps" in modalities, "use_external": bool(use_external)}


def make_submission(predictions: Mapping[str, Boxes], ego_poses: Mapping[str, np.ndarray],
                    sample_tokens: Sequence[str], meta: Mapping[str, bool]) -> dict:
    """The nuScenes submission dict {"meta": ..., "results": {token: [box, ...]}} for every token of the split.

    predictions: token -> Boxes in that keyframe's ego frame (a token without predictions gets an empty list).
    ego_poses: token -> 4x4 ego_to_global of the keyframe, for every predicted token.
    Raises ValueError for predictions of tokens outside `sample_tokens` or without a pose."""
    split = set(sample_tokens)
    unknown = [t for t in predictions if t not in split]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted sample token(s) are not in the split, e.g. {unknown[:3]}")
    missing_pose = [t for t, b in predictions.items() if len(b) and t not in ego_poses]
    if missing_pose:
        raise ValueError(f"no ego pose for predicted sample token(s) {missing_pose[:3]}")
    meta = {key: bool(meta[key]) for key in META_KEYS}
    results = {token: boxes_to_submission(token, predictions[token], ego_poses[token])
               if token in predictions and len(predictions[token]) else [] for token in sample_tokens}
    return {"meta": meta, "results": results}


def write_submission(submission: Mapping, path: str | os.PathLike) -> Path:
    """Write a submission as JSON (atomically: temp file + os.replace); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        json.dump(submission, handle)
    os.replace(temporary, path)
    return path


def load_submission(path: str | os.PathLike) -> dict:
    """Read a submission JSON file; FileNotFoundError / ValueError name the file (empty, too large, not JSON,
    numbers with more digits than Python converts, nesting too deep)."""
    path = Path(path)
    checked_size(path, "results file")
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except (ValueError, RecursionError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON: {type(error).__name__}: {str(error)[:200]}") from None
