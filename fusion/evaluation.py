"""nuScenes detection evaluation: Boxes (ego frame) -> submission JSON (global frame) -> nuscenes-devkit DetectionEval.

- Frames: `Boxes` are in the keyframe ego frame (x forward, y left, z up; meters, radians, m/s). The submission is in
  the global (map) frame, as the devkit wants: translation (m), size (w, l, h) (m), rotation (w, x, y, z) quaternion,
  velocity (vx, vy) (m/s, global axes). `boxes_to_submission` / `submission_to_boxes` convert with the keyframe's
  ego_to_global pose (4x4, float64).
- `make_submission`: every sample of the split present (possibly with an empty list), at most 500 boxes per sample
  (best scores kept), attribute names valid for the class (`default_attribute` where none is predicted), `meta` with
  the sensors used (`submission_meta`).
- `validate_submission`: the submission format checked before the devkit sees it, with errors naming the sample
  token and field (`SubmissionError`).
- `run_detection_eval`: the devkit's DetectionEval with the detection_cvpr_2019 config (custom split names come from
  <dataroot>/<version>/splits.json); it writes metrics_summary.json (and the PDF curves) to its output folder.
- `NuScenesDetectionMetrics`: a Lightning callback that scores the module's validation predictions with the devkit
  (curves off) and logs val/NDS, val/mAP, the TP errors and val/samples, so ModelCheckpoint can keep the best by NDS.
- Robustness: `RobustnessCondition` (sensors removed via Batch.without, LiDAR thinned to fewer beams by the reader's
  lidar_keep_rings, GPS noise via fusion.branches.gps.perturb_gps), `predict_split` and `format_robustness_table`.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from fusion.geometry import matrix_to_quaternion
from fusion.types import ATTRIBUTES, CLASS_ATTRIBUTES, DETECTION_CLASSES, MODALITIES, NO_ATTRIBUTE, Batch, Boxes

if TYPE_CHECKING:  # the devkit is imported lazily: it is slow to import and only needed here
    from nuscenes import NuScenes

DETECTION_CONFIG = "detection_cvpr_2019"
MAX_BOXES_PER_SAMPLE = 500
#: Above this speed (m/s) a box without a predicted attribute counts as moving (the public baselines' rule).
MOVING_SPEED_MPS = 0.2
#: Allowed |norm - 1| of a submitted rotation quaternion.
QUATERNION_NORM_TOLERANCE = 1e-3
META_KEYS = ("use_camera", "use_lidar", "use_radar", "use_map", "use_external")
BOX_FIELDS = ("sample_token", "translation", "size", "rotation", "velocity", "detection_name", "detection_score",
              "attribute_name")
TP_ERROR_NAMES = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE",
                  "attr_err": "mAAE"}


# ------------------------------------------------------------------------------------------------------------------
# Attributes and frames
# ------------------------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------------------------
# Submission writing and validation
# ------------------------------------------------------------------------------------------------------------------

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

    def __init__(self, source: str, problems: list[str], limit: int = 20):
        self.source = source
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(f"{source}: invalid nuScenes detection submission ({len(problems)} problem(s)):\n"
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


def validate_submission(submission: Any, sample_tokens: Sequence[str], source: str = "submission") -> None:
    """Check a submission dict against the nuScenes detection format for a split; raise SubmissionError listing
    every problem (missing or unknown sample tokens, missing meta or fields, bad class or attribute names,
    non-finite numbers, non-unit quaternions, negative sizes, scores outside [0, 1], more than 500 boxes)."""
    if not isinstance(submission, dict):
        raise SubmissionError(source, [f"top level must be an object with 'meta' and 'results', got "
                                       f"{type(submission).__name__}"])
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
        raise SubmissionError(source, problems)
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
            problems.extend(_box_problems(f"results[{token!r}][{i}]", token, box))
    if problems:
        raise SubmissionError(source, problems)


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


# ------------------------------------------------------------------------------------------------------------------
# The devkit: tables, splits, ground truth, DetectionEval
# ------------------------------------------------------------------------------------------------------------------

def load_nuscenes(dataroot: str | os.PathLike, version: str, verbose: bool = False) -> "NuScenes":
    """The devkit's NuScenes tables; FileNotFoundError names the dataroot / version folder."""
    from nuscenes import NuScenes

    dataroot = os.fspath(dataroot)
    if not os.path.isdir(os.path.join(dataroot, version)):
        raise FileNotFoundError(f"nuScenes dataroot {dataroot} has no version folder {version!r}")
    return NuScenes(version=version, dataroot=dataroot, verbose=verbose)


def split_sample_tokens(nusc: "NuScenes", split: str) -> list[str]:
    """Keyframe sample tokens of a split (a devkit split name, or one from <dataroot>/<version>/splits.json), in
    scene order then time order."""
    from nuscenes.utils.splits import get_scenes_of_split

    try:
        scene_names = set(get_scenes_of_split(split, nusc))
    except ValueError as error:
        raise ValueError(f"split {split!r} of {nusc.dataroot}/{nusc.version}: {error}") from error
    tokens = []
    for scene in nusc.scene:
        if scene["name"] not in scene_names:
            continue
        token = scene["first_sample_token"]
        while token:
            tokens.append(token)
            token = nusc.get("sample", token)["next"]
    if not tokens:
        raise ValueError(f"split {split!r} has no samples in {nusc.dataroot}/{nusc.version}")
    return tokens


def keyframe_ego_poses(nusc: "NuScenes", sample_tokens: Iterable[str]) -> dict[str, np.ndarray]:
    """token -> 4x4 ego_to_global (float64) at the sample's LIDAR_TOP keyframe (the frame of the model's Boxes)."""
    from fusion.geometry import pose_record_to_transform

    poses = {}
    for token in sample_tokens:
        lidar = nusc.get("sample_data", nusc.get("sample", token)["data"]["LIDAR_TOP"])
        poses[token] = pose_record_to_transform(nusc.get("ego_pose", lidar["ego_pose_token"]))
    return poses


def ground_truth_submission(nusc: "NuScenes", split: str) -> dict:
    """The split's ground truth written as a submission (score 1): the boxes the devkit evaluates (detection
    classes, at least one LiDAR or radar point), velocity from the devkit's box_velocity (0 where it has none),
    the annotated attribute or `default_attribute`. A perfect detector; scoring it checks the pipeline."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    attribute_names = {a["token"]: a["name"] for a in nusc.attribute}
    results = {}
    for token in split_sample_tokens(nusc, split):
        boxes = []
        for annotation_token in nusc.get("sample", token)["anns"]:
            annotation = nusc.get("sample_annotation", annotation_token)
            name = category_to_detection_name(annotation["category_name"])
            if name is None or annotation["num_lidar_pts"] + annotation["num_radar_pts"] == 0:
                continue
            velocity = np.nan_to_num(np.asarray(nusc.box_velocity(annotation_token), dtype=np.float64)[:2])
            attribute = (attribute_names[annotation["attribute_tokens"][0]] if annotation["attribute_tokens"]
                         else default_attribute(name, float(np.linalg.norm(velocity))))
            boxes.append({"sample_token": token, "translation": list(map(float, annotation["translation"])),
                          "size": list(map(float, annotation["size"])),
                          "rotation": list(map(float, annotation["rotation"])),
                          "velocity": [float(v) for v in velocity], "detection_name": name,
                          "detection_score": 1.0, "attribute_name": attribute})
        results[token] = boxes
    return {"meta": submission_meta(MODALITIES), "results": results}


def detection_config():
    """The devkit's detection_cvpr_2019 DetectionConfig."""
    from nuscenes.eval.common.config import config_factory

    return config_factory(DETECTION_CONFIG)


def run_detection_eval(nusc: "NuScenes", split: str, results_path: str | os.PathLike, out_dir: str | os.PathLike,
                       render_curves: bool = True, verbose: bool = True) -> dict:
    """nuscenes-devkit DetectionEval (detection_cvpr_2019) of a submission file on a split. The devkit prints mAP,
    the TP errors, NDS and the per-class table, and writes metrics_summary.json, metrics_details.json and (with
    render_curves) the PDF curves under out_dir/plots. Returns the metrics summary. verbose=False silences it."""
    from nuscenes.eval.detection.evaluate import DetectionEval

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quiet = contextlib.nullcontext() if verbose else _silenced()
    with quiet:
        evaluator = DetectionEval(nusc, detection_config(), result_path=os.fspath(results_path), eval_set=split,
                                  output_dir=os.fspath(out_dir), verbose=verbose)
        return evaluator.main(plot_examples=0, render_curves=render_curves)


@contextlib.contextmanager
def _silenced():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def evaluate_in_memory(nusc: "NuScenes", submission: Mapping, sample_tokens: Sequence[str]) -> dict:
    """The devkit's DetectionEval metrics (detection_cvpr_2019) of an in-memory submission restricted to
    `sample_tokens` (e.g. the samples one validation epoch predicted); no files, no plots, no printing. The devkit's
    own loading, filtering (class range, empty boxes, bike racks) and metric code are used unchanged."""
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt_of_sample_tokens
    from nuscenes.eval.detection.data_classes import DetectionBox
    from nuscenes.eval.detection.evaluate import DetectionEval

    class _InMemoryDetectionEval(DetectionEval):
        def __init__(self):  # DetectionEval.__init__ reads files; set the same attributes from memory instead
            self.nusc, self.cfg, self.verbose = nusc, detection_config(), False
            self.meta = dict(submission["meta"])
            results = {token: submission["results"][token] for token in sample_tokens}
            self.pred_boxes = add_center_dist(nusc, EvalBoxes.deserialize(results, DetectionBox))
            self.gt_boxes = add_center_dist(nusc, load_gt_of_sample_tokens(nusc, list(sample_tokens), DetectionBox))
            self.pred_boxes = filter_eval_boxes(nusc, self.pred_boxes, self.cfg.class_range, verbose=False)
            self.gt_boxes = filter_eval_boxes(nusc, self.gt_boxes, self.cfg.class_range, verbose=False)
            self.sample_tokens = self.gt_boxes.sample_tokens

    with _silenced():
        metrics, _ = _InMemoryDetectionEval().evaluate()
    summary = metrics.serialize()
    summary["meta"] = dict(submission["meta"])
    return summary


def summary_scalars(summary: Mapping, prefix: str = "") -> dict[str, float]:
    """{prefix + "NDS", prefix + "mAP", prefix + "mATE", ...} from a devkit metrics summary."""
    scalars = {f"{prefix}NDS": float(summary["nd_score"]), f"{prefix}mAP": float(summary["mean_ap"])}
    for key, name in TP_ERROR_NAMES.items():
        scalars[f"{prefix}{name}"] = float(summary["tp_errors"][key])
    return scalars


# ------------------------------------------------------------------------------------------------------------------
# Validation scoring during training
# ------------------------------------------------------------------------------------------------------------------

def _boxes_to_numpy(boxes: Boxes) -> dict[str, np.ndarray]:
    """Plain arrays (float32 / int64) of Boxes, e.g. decoded under bf16 autocast, for gathering across ranks."""
    arrays = {}
    for name in Boxes.__dataclass_fields__:
        tensor = getattr(boxes, name).detach().cpu()
        arrays[name] = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    return arrays


def _boxes_from_numpy(arrays: Mapping[str, np.ndarray]) -> Boxes:
    return Boxes(**{name: torch.from_numpy(np.asarray(value)) for name, value in arrays.items()})


class NuScenesDetectionMetrics(Callback):
    """After every validation epoch (not the sanity check), score the module's `validation_predictions`
    ({sample token: Boxes in the ego frame}, filled by FusionDetector.validation_step) with the devkit's
    DetectionEval (detection_cvpr_2019, no curves) and log `{prefix}NDS`, `{prefix}mAP`, the TP errors
    (`{prefix}mATE` ...) and `{prefix}samples` (how many samples were scored), so a ModelCheckpoint can monitor
    val/NDS.

    Under DDP the predictions of all ranks are gathered on rank 0, which scores them and broadcasts the numbers, so
    every rank logs the same values. The samples scored are those predicted (all of the split unless
    limit_val_batches cuts it). dataroot / version default to the datamodule's (`trainer.datamodule.dataroot`,
    `.version`); the devkit tables are loaded once, on rank 0.
    """

    def __init__(self, dataroot: str | None = None, version: str | None = None, prefix: str = "val/"):
        super().__init__()
        self.dataroot, self.version, self.prefix = dataroot, version, prefix
        self._nusc = None
        self.last_summary: dict | None = None

    def _tables(self, trainer) -> "NuScenes":
        datamodule = getattr(trainer, "datamodule", None)
        dataroot = self.dataroot or getattr(datamodule, "dataroot", None)
        version = self.version or getattr(datamodule, "version", None)
        if dataroot is None or version is None:
            raise ValueError("NuScenesDetectionMetrics needs dataroot and version (give them, or use a datamodule "
                             "with .dataroot and .version)")
        if self._nusc is None or (self._nusc.dataroot, self._nusc.version) != (os.fspath(dataroot), version):
            self._nusc = load_nuscenes(dataroot, version)
        return self._nusc

    def score(self, trainer, predictions: Mapping[str, Boxes], meta: Mapping[str, bool]) -> dict[str, float]:
        """Devkit scalars of {token: Boxes} predictions (rank 0)."""
        nusc = self._tables(trainer)
        tokens = sorted(predictions)
        submission = make_submission(predictions, keyframe_ego_poses(nusc, tokens), tokens, meta)
        self.last_summary = evaluate_in_memory(nusc, submission, tokens)
        return {**summary_scalars(self.last_summary, self.prefix), f"{self.prefix}samples": float(len(tokens))}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        local = {token: _boxes_to_numpy(boxes)
                 for token, boxes in getattr(pl_module, "validation_predictions", {}).items()}
        gathered = [local]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size if trainer.is_global_zero else None
            torch.distributed.gather_object(local, gathered, dst=0)
        scalars = None
        if trainer.is_global_zero:
            predictions = {token: _boxes_from_numpy(arrays) for part in gathered for token, arrays in part.items()}
            if predictions:
                meta = submission_meta(getattr(pl_module, "modalities", MODALITIES))
                scalars = self.score(trainer, predictions, meta)
        scalars = trainer.strategy.broadcast(scalars, src=0)
        if scalars is None:
            return
        for name, value in scalars.items():
            pl_module.log(name, value, prog_bar=name.endswith(("NDS", "mAP")), logger=True, on_epoch=True,
                          sync_dist=False, rank_zero_only=False, batch_size=1)


# ------------------------------------------------------------------------------------------------------------------
# Robustness conditions
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpsNoise:
    """GPS/CAN corruption for `perturb_gps`: pose error sigmas (meters, radians), CAN noise (m/s, rad/s), CAN
    dropout probability; `seed` makes every evaluation draw the same noise."""

    position_sigma_m: float = 1.0
    yaw_sigma_rad: float = 0.035
    speed_sigma_mps: float = 0.5
    yaw_rate_sigma_radps: float = 0.02
    can_dropout: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class RobustnessCondition:
    """One row of the robustness table: modalities removed for every sample (Batch.without), LiDAR thinned by the
    reader (keep rings with ring % lidar_keep_rings == 0), and/or GPS noise."""

    name: str
    description: str
    remove: tuple[str, ...] = ()
    lidar_keep_rings: int | None = None
    gps_noise: GpsNoise | None = None

    def modalities(self, model_modalities: Iterable[str]) -> list[str]:
        """The model's modalities still used under this condition."""
        return [m for m in model_modalities if m not in self.remove]


def robustness_conditions(model_modalities: Sequence[str], keep_rings: Sequence[int] = (2, 4),
                          gps_noise: GpsNoise = GpsNoise()) -> list[RobustnessCondition]:
    """The conditions that apply to a model: all sensors; each of its sensors removed (when it has more than one);
    LiDAR thinned to 1/k of its beams for each k (with a LiDAR branch); GPS noise (with a GPS branch)."""
    conditions = [RobustnessCondition("all_sensors", "every sensor of the model")]
    if len(model_modalities) > 1:
        for modality in MODALITIES:
            if modality in model_modalities:
                conditions.append(RobustnessCondition(f"no_{modality}", f"{modality} removed", remove=(modality,)))
    if "lidar" in model_modalities:
        for k in keep_rings:
            if int(k) < 2:
                raise ValueError(f"LiDAR thinning factors must be >= 2, got {k}")
            conditions.append(RobustnessCondition(f"lidar_1_{int(k)}_beams", f"LiDAR thinned to 1/{int(k)} of its "
                                                  "beams", lidar_keep_rings=int(k)))
    if "gps" in model_modalities:
        conditions.append(RobustnessCondition(
            "gps_noise", f"GPS noise (position {gps_noise.position_sigma_m} m, yaw {gps_noise.yaw_sigma_rad} rad, "
            f"CAN dropout {gps_noise.can_dropout})", gps_noise=gps_noise))
    return conditions


def apply_condition(batch: Batch, condition: RobustnessCondition, grid, generator: torch.Generator | None = None
                    ) -> Batch:
    """The batch as the model sees it under `condition` (sensor removal and GPS noise; LiDAR thinning happens in the
    reader). `grid` is the BEVGrid of batch.map_raster (needed to move the map by a pose error)."""
    if condition.remove:
        batch = batch.without(*condition.remove)
    if condition.gps_noise is not None:
        from fusion.branches.gps import perturb_gps

        noise = condition.gps_noise
        batch = perturb_gps(batch, noise.position_sigma_m, noise.yaw_sigma_rad, generator, grid=grid,
                            speed_sigma_mps=noise.speed_sigma_mps, yaw_rate_sigma_radps=noise.yaw_rate_sigma_radps,
                            can_dropout=noise.can_dropout)
    return batch


def predict_split(model, batches: Iterable[Batch], condition: RobustnessCondition | None = None,
                  progress: bool = False) -> tuple[dict[str, Boxes], dict[str, np.ndarray]]:
    """Run `model.predict_boxes` over batches: ({token: Boxes in the ego frame, on the CPU}, {token: 4x4
    ego_to_global}). The model's temporal history (if any) is reset first, so each pass starts fresh."""
    if getattr(model, "temporal", None) is not None:
        model.temporal.reset()
    generator = None
    if condition is not None and condition.gps_noise is not None:
        generator = torch.Generator().manual_seed(condition.gps_noise.seed)
    predictions, poses = {}, {}
    iterator = batches
    if progress:
        from tqdm import tqdm

        iterator = tqdm(batches, desc=condition.name if condition else "inference", leave=False)
    for batch in iterator:
        if condition is not None:
            batch = apply_condition(batch, condition, model.grid, generator)
        for token, boxes, pose in zip(batch.tokens, model.predict_boxes(batch), batch.ego.ego_to_global):
            predictions[token] = boxes.to("cpu")
            poses[token] = pose.detach().cpu().double().numpy()
    return predictions, poses


@dataclass
class RobustnessRow:
    """Scores of one condition: NDS and mAP from the devkit, the sensors used, where its files are."""

    name: str
    description: str
    modalities: list[str]
    nds: float
    map: float
    tp_errors: dict[str, float] = field(default_factory=dict)
    results_path: str = ""


def format_robustness_table(rows: Sequence[RobustnessRow]) -> str:
    """A plain-text table: condition, sensors used, NDS, mAP, and the change in NDS from the first row."""
    reference = rows[0].nds if rows else 0.0
    header = f"{'condition':<20} {'sensors':<26} {'NDS':>7} {'mAP':>7} {'dNDS':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row.name:<20} {','.join(row.modalities) or '-':<26} {row.nds:>7.4f} {row.map:>7.4f} "
                     f"{row.nds - reference:>+8.4f}")
    return "\n".join(lines)
