"""The nuScenes submission: Boxes (ego frame) <-> submission boxes (global frame), writing a split's submission
JSON, and checking a submission against the detection format before the devkit sees it.

- Frames: `Boxes` are in the keyframe ego frame (x forward, y left, z up; meters, radians, m/s). The submission is in
  the global (map) frame, as the devkit wants: translation (m), size (w, l, h) (m), rotation (w, x, y, z) quaternion,
  velocity (vx, vy) (m/s, global axes). `boxes_to_submission` / `submission_to_boxes` convert with the keyframe's
  ego_to_global pose (4x4, float64).
- `make_submission`: every sample of the split present (possibly with an empty list), at most 500 boxes per sample
  (best scores kept), attribute names valid for the class (`default_attribute` where none is predicted), `meta` with
  the sensors used (`submission_meta`).
- `validate_submission`: the submission format checked, with errors naming the sample token and field
  (`SubmissionError`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from fusion.geometry import matrix_to_quaternion
from fusion.types import ATTRIBUTES, CLASS_ATTRIBUTES, DETECTION_CLASSES, MODALITIES, NO_ATTRIBUTE, Boxes

MAX_BOXES_PER_SAMPLE = 500
#: Above this speed (m/s) a box without a predicted attribute counts as moving (the public baselines' rule).
MOVING_SPEED_MPS = 0.2
#: Allowed |norm - 1| of a submitted rotation quaternion.
QUATERNION_NORM_TOLERANCE = 1e-3
META_KEYS = ("use_camera", "use_lidar", "use_radar", "use_map", "use_external")
BOX_FIELDS = ("sample_token", "translation", "size", "rotation", "velocity", "detection_name", "detection_score",
              "attribute_name")


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


class SubmissionError(ValueError):
    """A submission that does not follow the nuScenes format; `problems` lists each one (token and field named)."""

    def __init__(self, source: str, problems: list[str], limit: int = 20, kind: str = "detection"):
        self.source = source
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(f"{source}: invalid nuScenes {kind} submission ({len(problems)} problem(s)):\n"
                         f"{shown}{more}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _vector_problem(value: Any, length: int) -> str | None:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        return f"must be a list of {length} numbers, got {value!r}"[:200]
    if not all(_is_number(v) for v in value):
        return f"must hold numbers only, got {value!r}"[:200]
    if not all(math.isfinite(v) for v in value):
        return f"has non-finite values {list(value)}"
    return None


def _box_problems(where: str, token: str, box: Any) -> list[str]:
    if not isinstance(box, dict):
        return [f"{where}: must be an object, got {type(box).__name__}"]
    problems = [f"{where}: missing field {name!r}" for name in BOX_FIELDS if name not in box]
    if box.get("sample_token", token) != token:
        problems.append(f"{where}.sample_token: {box['sample_token']!r} differs from its results key {token!r}")
    for name, length in (("translation", 3), ("size", 3), ("rotation", 4), ("velocity", 2)):
        if name not in box:
            continue
        problem = _vector_problem(box[name], length)
        if problem:
            problems.append(f"{where}.{name}: {problem}")
        elif name == "size" and min(box[name]) < 0:
            problems.append(f"{where}.size: negative size {list(box[name])}")
        elif name == "rotation":
            norm = math.sqrt(sum(v * v for v in box[name]))
            if abs(norm - 1.0) > QUATERNION_NORM_TOLERANCE:
                problems.append(f"{where}.rotation: quaternion {list(box[name])} has norm {norm:.6g}, not 1")
    name = box.get("detection_name")
    if "detection_name" in box and name not in CLASS_ATTRIBUTES:
        problems.append(f"{where}.detection_name: unknown class {name!r}; expected one of {list(DETECTION_CLASSES)}")
    if "detection_score" in box:
        score = box["detection_score"]
        if not _is_number(score) or not math.isfinite(score) or not 0.0 <= score <= 1.0:
            problems.append(f"{where}.detection_score: must be a finite number in [0, 1], got {score!r}")
    if "attribute_name" in box and name in CLASS_ATTRIBUTES:
        attribute = box["attribute_name"]
        allowed = CLASS_ATTRIBUTES[name]
        if attribute not in allowed and not (attribute == "" and not allowed):
            expected = list(allowed) if allowed else ['""']
            problems.append(f"{where}.attribute_name: {attribute!r} is not valid for {name}; expected one of "
                            f"{expected}")
    return problems


def validate_submission(submission: Any, sample_tokens: Sequence[str], source: str = "submission",
                        box_problems: Callable[[str, str, Any], list[str]] | None = None,
                        kind: str = "detection") -> None:
    """Check a submission dict against the nuScenes detection format for a split; raise SubmissionError listing
    every problem (missing or unknown sample tokens, missing meta or fields, bad class or attribute names,
    non-finite numbers, non-unit quaternions, negative sizes, scores outside [0, 1], more than 500 boxes).
    box_problems(where, token, box) -> problems checks one box (default: the detection format's; the tracking
    format passes its own, fusion.tracking.submission); kind names the format in the error."""
    box_problems = box_problems or _box_problems
    if not isinstance(submission, dict):
        raise SubmissionError(source, [f"top level must be an object with 'meta' and 'results', got "
                                       f"{type(submission).__name__}"], kind=kind)
    problems = []
    meta = submission.get("meta")
    if meta is None:
        problems.append(f"missing 'meta' (an object with {list(META_KEYS)})")
    elif not isinstance(meta, dict):
        problems.append(f"meta: must be an object, got {type(meta).__name__}")
    else:
        for key in META_KEYS:
            if key not in meta:
                problems.append(f"meta: missing {key!r}")
            elif not isinstance(meta[key], bool):
                problems.append(f"meta.{key}: must be true or false, got {meta[key]!r}")
    results = submission.get("results")
    if not isinstance(results, dict):
        problems.append("missing 'results' (an object: sample token -> list of boxes)" if results is None
                        else f"results: must be an object, got {type(results).__name__}")
        raise SubmissionError(source, problems, kind=kind)
    split = set(sample_tokens)
    missing = [t for t in sample_tokens if t not in results]
    if missing:
        problems.append(f"results: {len(missing)} sample(s) of the split missing (every sample needs an entry, "
                        f"possibly an empty list), e.g. {missing[:3]}")
    unknown = [t for t in results if t not in split]
    if unknown:
        problems.append(f"results: {len(unknown)} unknown sample token(s) not in the split, e.g. {unknown[:3]}")
    for token, boxes in results.items():
        if not isinstance(boxes, list):
            problems.append(f"results[{token!r}]: must be a list of boxes, got {type(boxes).__name__}")
            continue
        if len(boxes) > MAX_BOXES_PER_SAMPLE:
            problems.append(f"results[{token!r}]: {len(boxes)} boxes, at most {MAX_BOXES_PER_SAMPLE} allowed")
        for i, box in enumerate(boxes):
            problems.extend(box_problems(f"results[{token!r}][{i}]", token, box))
    if problems:
        raise SubmissionError(source, problems, kind=kind)


def load_submission(path: str | os.PathLike) -> dict:
    """Read a submission JSON file; FileNotFoundError / ValueError name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
