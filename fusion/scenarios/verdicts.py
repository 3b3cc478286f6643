"""Verdicts of a scenario's criteria over a replay: its per-frame records (detections.jsonl, read as a stream) and
its summary (summary.json), with the devkit's tables for the ground truth.

Each criterion becomes a judge that sees every frame record once (`observe`) and then gives its `Verdict`
(`finish`); only what a criterion needs is kept (the window's keyframe boxes for the metric criteria, a counter
or an ID per keyframe for the others), so judging stays bounded by the drive's keyframes. Records are the ones
fusion.replay.sinks.frame_record writes: boxes and tracks in the GLOBAL frame (meters), ego_to_global 4x4.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import numpy as np

from fusion.scenarios.spec import (Criterion, Latency, MetricThreshold, NoDroppedFrames, NoIdSwitches,
                                   ObjectInRange, Scenario, ScenarioError)

if TYPE_CHECKING:
    from nuscenes import NuScenes


@dataclass(frozen=True)
class Verdict:
    """One criterion's outcome: passed, what was measured and against what, in words."""

    name: str
    kind: str
    passed: bool
    measured: str
    expected: str
    detail: str = ""


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """The frame records of a detections.jsonl, one at a time."""
    with open(path) as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def scene_start_us(nusc: "NuScenes", scene_name: str) -> int:
    """Timestamp (microseconds) of the scene's first keyframe: time 0 of the scenario's windows."""
    scene = next((s for s in nusc.scene if s["name"] == scene_name), None)
    if scene is None:
        raise ScenarioError(f"drive.scene: no scene {scene_name!r} in {nusc.dataroot}/{nusc.version}")
    return nusc.get("sample", scene["first_sample_token"])["timestamp"]


class _Judge:
    def __init__(self, criterion: Criterion, start_us: int):
        self.criterion, self.start_us = criterion, start_us

    def seconds(self, record: Mapping) -> float:
        return (record["timestamp_us"] - self.start_us) * 1e-6

    def observe(self, record: Mapping) -> None:
        pass

    def finish(self, summary: Mapping) -> Verdict:
        raise NotImplementedError

    def verdict(self, passed: bool, measured: str, expected: str, detail: str = "") -> Verdict:
        return Verdict(self.criterion.title(), type(self.criterion).__name__, bool(passed), measured, expected, detail)


class _LatencyJudge(_Judge):
    def finish(self, summary: Mapping) -> Verdict:
        criterion, latency = self.criterion, summary["latency_ms"]
        expected = f"p{criterion.percentile} <= {criterion.max_ms:g} ms"
        if not latency.get("count"):
            return self.verdict(False, "no frame processed", expected)
        value = float(latency[f"p{criterion.percentile}"])
        return self.verdict(value <= criterion.max_ms, f"{value:.1f} ms", expected,
                            f"over {latency['count']} frames")


class _DroppedJudge(_Judge):
    def finish(self, summary: Mapping) -> Verdict:
        frames = summary["frames"]
        bad = frames["dropped"] + (frames["failed"] if self.criterion.include_failed else 0)
        what = "dropped + failed" if self.criterion.include_failed else "dropped"
        passed = bad == 0 and frames["processed"] > 0
        return self.verdict(passed, f"{bad} {what} of {frames['triggered']} triggered", f"0 {what}, >= 1 processed",
                            f"{frames['processed']} processed")


class _MetricJudge(_Judge):
    """Collects the window's keyframe boxes (detections or tracks), then runs the devkit on them."""

    def __init__(self, criterion: MetricThreshold, start_us: int, nusc: "NuScenes"):
        super().__init__(criterion, start_us)
        self.nusc = nusc
        self.results: dict[str, list[dict]] = {}

    def observe(self, record: Mapping) -> None:
        token = record.get("sample_token")
        if token and self.criterion.window.contains(self.seconds(record)):
            key = "boxes" if self.criterion.task == "detection" else "tracks"
            self.results[token] = [{"sample_token": token, **box} for box in record.get(key, [])]

    def finish(self, summary: Mapping) -> Verdict:
        from fusion.evaluation.metrics import evaluate_in_memory, summary_scalars
        from fusion.evaluation.submission import submission_meta
        from fusion.tracking.metrics import evaluate_tracking_in_memory, tracking_scalars

        criterion = self.criterion
        bounds = ([f">= {criterion.min:g}"] if criterion.min is not None else []) + \
            ([f"<= {criterion.max:g}"] if criterion.max is not None else [])
        expected = f"{criterion.metric} {' and '.join(bounds)}"
        if not self.results:
            return self.verdict(False, "no keyframe processed in the window", expected)
        if not any(self.results.values()):  # the devkit's filtering fails on a submission without any box
            what = "detections" if criterion.task == "detection" else "tracks"
            return self.verdict(False, f"no {what} in the window", expected,
                                f"{len(self.results)} keyframes; the devkit cannot score an empty submission")
        tokens = list(self.results)
        if not any(self.nusc.get("sample", token)["anns"] for token in tokens):
            return self.verdict(False, "no ground truth in the window", expected, f"{len(tokens)} keyframes")
        submission = {"meta": submission_meta(()), "results": self.results}
        if criterion.task == "detection":
            value = summary_scalars(evaluate_in_memory(self.nusc, submission, tokens))[criterion.metric]
        else:
            value = tracking_scalars(evaluate_tracking_in_memory(self.nusc, submission, tokens))[criterion.metric]
        passed = math.isfinite(value) and (criterion.min is None or value >= criterion.min) and \
            (criterion.max is None or value <= criterion.max)
        return self.verdict(passed, f"{value:.4f}", expected, f"devkit, {len(tokens)} keyframes")


class _InRangeJudge(_Judge):
    def __init__(self, criterion: ObjectInRange, start_us: int):
        super().__init__(criterion, start_us)
        self.frames = self.seen = 0

    def observe(self, record: Mapping) -> None:
        criterion = self.criterion
        if not criterion.window.contains(self.seconds(record)):
            return
        self.frames += 1
        ego = np.asarray(record["ego_to_global"], dtype=np.float64)[:2, 3]
        if criterion.source == "detections":
            boxes, name_key, score_key = record.get("boxes", []), "detection_name", "detection_score"
        else:
            boxes, name_key, score_key = record.get("tracks", []), "tracking_name", "tracking_score"
        self.seen += any(box[name_key] == criterion.object_class and box[score_key] >= criterion.min_score
                         and math.dist(box["translation"][:2], ego) <= criterion.max_distance_m for box in boxes)

    def finish(self, summary: Mapping) -> Verdict:
        return self.verdict(self.seen >= self.criterion.min_frames, f"{self.seen} of {self.frames} frames",
                            f">= {self.criterion.min_frames} frames")


class _IdSwitchJudge(_Judge):
    """The instance's annotated centres at its keyframes in the scene; an instance that is not in the scene (or
    not of a tracking class) gives a failed verdict saying so."""

    def __init__(self, criterion: NoIdSwitches, start_us: int, nusc: "NuScenes", scene_name: str):
        super().__init__(criterion, start_us)
        from nuscenes.eval.tracking.utils import category_to_tracking_name

        self.centres: dict[str, np.ndarray] = {}  # sample token -> the instance's annotated centre (global, m)
        self.ids: list[str | None] = []  # the matched track ID at each annotated keyframe of the window
        self.tracking_name, self.problem = None, ""
        instance = next((i for i in nusc.instance if i["token"] == criterion.instance), None)
        if instance is None:
            self.problem = f"instance {criterion.instance} is not in {nusc.dataroot}/{nusc.version}"
            return
        category = nusc.get("category", instance["category_token"])["name"]
        self.tracking_name = category_to_tracking_name(category)
        if self.tracking_name is None:
            self.problem = f"instance {criterion.instance} is a {category}, not of a tracking class"
            return
        scene_token = next(s["token"] for s in nusc.scene if s["name"] == scene_name)
        token = instance["first_annotation_token"]
        while token:
            annotation = nusc.get("sample_annotation", token)
            if nusc.get("sample", annotation["sample_token"])["scene_token"] == scene_token:
                self.centres[annotation["sample_token"]] = np.asarray(annotation["translation"][:2], float)
            token = annotation["next"]
        if not self.centres:
            self.problem = f"instance {criterion.instance} is not annotated in {scene_name}"

    def observe(self, record: Mapping) -> None:
        token = record.get("sample_token")
        if not token or token not in self.centres or not self.criterion.window.contains(self.seconds(record)):
            return
        near = {}  # tracking_id -> distance of the tracks of the instance's class within the match distance
        for track in record.get("tracks", []):
            distance = math.dist(track["translation"][:2], self.centres[token])
            if track["tracking_name"] == self.tracking_name and distance <= self.criterion.match_distance_m:
                near[track["tracking_id"]] = min(distance, near.get(track["tracking_id"], math.inf))
        previous = next((i for i in reversed(self.ids) if i is not None), None)
        if previous in near:  # CLEAR-MOT: a match persists while its track stays within the match distance
            self.ids.append(previous)
        else:
            self.ids.append(min(near, key=near.get) if near else None)

    def finish(self, summary: Mapping) -> Verdict:
        criterion = self.criterion
        expected = f"<= {criterion.max_switches} switches, matched in >= {criterion.min_matched_frames}"
        if self.problem:
            return self.verdict(False, "instance not found", expected, self.problem)
        matched = [i for i in self.ids if i is not None]
        switches = sum(a != b for a, b in zip(matched, matched[1:]))
        passed = switches <= criterion.max_switches and len(matched) >= criterion.min_matched_frames
        return self.verdict(passed, f"{switches} switches, matched in {len(matched)} of {len(self.ids)} keyframes",
                            expected, f"track IDs {list(dict.fromkeys(matched))}")


def _judge(criterion: Criterion, start_us: int, nusc: "NuScenes", scene_name: str) -> _Judge:
    if isinstance(criterion, Latency):
        return _LatencyJudge(criterion, start_us)
    if isinstance(criterion, NoDroppedFrames):
        return _DroppedJudge(criterion, start_us)
    if isinstance(criterion, MetricThreshold):
        return _MetricJudge(criterion, start_us, nusc)
    if isinstance(criterion, ObjectInRange):
        return _InRangeJudge(criterion, start_us)
    if isinstance(criterion, NoIdSwitches):
        return _IdSwitchJudge(criterion, start_us, nusc, scene_name)
    raise TypeError(f"unknown criterion {criterion!r}")


def judge_scenario(scenario: Scenario, records: Iterable[Mapping], summary: Mapping, nusc: "NuScenes",
                   scene_name: str | None = None) -> list[Verdict]:
    """The verdict of every criterion of `scenario` over a replay of `scene_name` (default: the scenario's scene):
    its frame records (in time order) and its summary. ScenarioError when the scene is not in the tables."""
    scene_name = scene_name or scenario.drive.scene
    start_us = scene_start_us(nusc, scene_name)
    judges = [_judge(c, start_us, nusc, scene_name) for c in scenario.criteria]
    for record in records:
        for judge in judges:
            judge.observe(record)
    return [judge.finish(summary) for judge in judges]
