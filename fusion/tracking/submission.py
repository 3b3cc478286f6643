"""The nuScenes tracking submission: detections (submission boxes, global frame) -> tracks per scene, the ground
truth as a tracking submission, and checking a submission against the devkit's tracking format.

A tracking submission is {"meta": {...}, "results": {sample_token: [box, ...]}} with boxes in the global frame:
translation (m), size (w, l, h) (m), rotation (w, x, y, z), velocity (vx, vy) (m/s, global axes), tracking_id
(a string, stable over a scene), tracking_name (one of TRACKING_CLASSES), tracking_score in [0, 1].
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from fusion.evaluation.metrics import ground_truth_boxes
from fusion.evaluation.submission import submission_meta
from fusion.evaluation.submission_schema import (MAX_BOXES_PER_SAMPLE, SubmissionError, bounded_number,
                                                 common_box_problems, show, validate_submission)
from fusion.tracking.tracker import TRACKING_CLASSES, Tracker, TrackerConfig
from fusion.types import MODALITIES

if TYPE_CHECKING:
    from nuscenes import NuScenes

TRACKING_BOX_FIELDS = ("sample_token", "translation", "size", "rotation", "velocity", "tracking_id",
                       "tracking_name", "tracking_score")


def scene_samples(nusc: "NuScenes", sample_tokens: Sequence[str]) -> dict[str, list[tuple[str, float]]]:
    """scene token -> [(sample token, timestamp s)] of the given samples, in time order."""
    scenes: dict[str, list[tuple[str, float]]] = {}
    for token in sample_tokens:
        sample = nusc.get("sample", token)
        scenes.setdefault(sample["scene_token"], []).append((token, sample["timestamp"] * 1e-6))
    return {scene: sorted(samples, key=lambda item: item[1]) for scene, samples in scenes.items()}


def track_submission(nusc: "NuScenes", detections: Mapping, sample_tokens: Sequence[str],
                     config: TrackerConfig | None = None) -> dict:
    """A tracking submission from a detection submission ({"meta", "results": {token: [submission box]}}, global
    frame): one `Tracker` per scene run over its samples in time order; every sample of `sample_tokens` gets an
    entry (possibly empty). Track IDs are unique over the whole submission."""
    tracker = Tracker(config)
    results: dict[str, list[dict]] = {}
    for samples in scene_samples(nusc, sample_tokens).values():
        tracker.reset()
        for token, time_s in samples:
            tracks = tracker.update(detections["results"].get(token, []), time_s)
            results[token] = [_submission_box(token, track.to_dict()) for track in tracks[:MAX_BOXES_PER_SAMPLE]]
    return {"meta": dict(detections["meta"]), "results": {token: results[token] for token in sample_tokens}}


def _submission_box(token: str, track: Mapping) -> dict:
    box = {"sample_token": token, **track}
    box.pop("age", None)  # not a devkit field
    return box


def ground_truth_tracking_submission(nusc: "NuScenes", sample_tokens: Sequence[str]) -> dict:
    """The ground truth of the samples as a tracking submission (score 1, tracking_id = the annotation's instance
    token): the boxes the devkit evaluates (`ground_truth_boxes` with the tracking classes). A perfect tracker;
    scoring it checks the pipeline."""
    from nuscenes.eval.tracking.utils import category_to_tracking_name

    results = {}
    for token in sample_tokens:
        boxes = []
        for annotation, box in ground_truth_boxes(nusc, token, category_to_tracking_name):
            name = box.pop("name")
            boxes.append({**box, "tracking_id": annotation["instance_token"], "tracking_name": name,
                          "tracking_score": 1.0})
        results[token] = boxes
    return {"meta": submission_meta(MODALITIES), "results": results}


def tracking_box_problems(where: str, token: str, box: Any) -> list[str]:
    """The problems of one tracking submission box (each naming `where` and the field), types first."""
    if not isinstance(box, dict):
        return [f"{where}: must be an object, got {show(box)}"]
    problems = common_box_problems(where, token, box, TRACKING_BOX_FIELDS,
                                   ("sample_token", "tracking_id", "tracking_name"))
    if isinstance(box.get("tracking_id"), str) and not box["tracking_id"]:
        problems.append(f"{where}.tracking_id: must be a non-empty string")
    if isinstance(box.get("tracking_name"), str) and box["tracking_name"] not in TRACKING_CLASSES:
        problems.append(f"{where}.tracking_name: unknown class {show(box['tracking_name'])}; expected one of "
                        f"{list(TRACKING_CLASSES)}")
    if "tracking_score" in box:
        score = box["tracking_score"]
        if not bounded_number(score, 1.0) or score < 0:
            problems.append(f"{where}.tracking_score: must be a finite number in [0, 1], got {show(score)}")
    return problems


def validate_tracking_submission(submission: Any, sample_tokens: Sequence[str], source: str = "submission") -> None:
    """Check a tracking submission for a split (every sample present, meta, the fields of every box, at most 500
    boxes per sample, a tracking_id not used twice in one sample); raise SubmissionError listing every problem."""
    validate_submission(submission, sample_tokens, source, box_problems=tracking_box_problems, kind="tracking")
    problems = []
    for token, boxes in submission["results"].items():
        ids = [box["tracking_id"] for box in boxes]  # validated above: strings
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            problems.append(f"results[{token!r}]: tracking_id {repeated[0]!r} used by {ids.count(repeated[0])} "
                            f"boxes of one sample")
    if problems:
        raise SubmissionError(source, problems, kind="tracking")
