"""A scenario file: the drive to replay and the criteria its replay must meet (YAML), read into typed criteria.

    name: scene-2009 follows its traffic            # shown in the table and the JUnit XML
    drive: {dataroot: data/synthetic, version: v1.0-synth, scene: scene-2009}
    criteria:
      - {type: latency, percentile: 95, max_ms: 400}               # p50 / p95 / p99 of the replay's latency
      - {type: no_dropped_frames}                                   # nothing dropped (nor failed)
      - {type: detection_metric, metric: mAP, min: 0.3, window_s: [0, 8]}
      - {type: tracking_metric, metric: amota, min: 0.2}            # devkit TrackingEval over the window
      - {type: object_in_range, class: car, max_distance_m: 20, min_frames: 10, min_score: 0.3}
      - {type: no_id_switches, instance: 5e1f..., match_distance_m: 2.0, min_matched_frames: 3}

Every criterion may carry `name` (its test case name; default: its type and main figures). Windows are
[start, end] seconds from the scene's first keyframe (inclusive; default the whole drive). Metrics over a window
use its keyframes (the frames with ground truth). Distances are meters in the global frame, between box centres
(object_in_range: from the ego position of the frame). A relative dataroot is relative to the working directory.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fusion.evaluation.metrics import TP_ERROR_NAMES
from fusion.tracking.metrics import TRACKING_METRICS
from fusion.tracking.tracker import TRACKING_CLASSES
from fusion.types import DETECTION_CLASSES

DETECTION_METRICS = ("NDS", "mAP") + tuple(TP_ERROR_NAMES.values())
LATENCY_PERCENTILES = (50, 95, 99)


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Window:
    """[start_s, end_s] seconds from the scene's first keyframe, inclusive."""

    start_s: float = 0.0
    end_s: float = math.inf

    def contains(self, seconds: float) -> bool:
        return self.start_s <= seconds <= self.end_s

    def describe(self) -> str:
        return "" if (self.start_s, self.end_s) == (0.0, math.inf) else f" in [{self.start_s:g}, {self.end_s:g}] s"


@dataclass(frozen=True)
class Latency:
    """The replay's latency percentile (ms, from fusion.replay's summary) at most max_ms."""

    max_ms: float
    percentile: int = 95
    name: str = ""

    def title(self) -> str:
        return self.name or f"latency p{self.percentile} <= {self.max_ms:g} ms"


@dataclass(frozen=True)
class NoDroppedFrames:
    """No frame dropped (and, with include_failed, none failed to assemble), and at least one processed."""

    include_failed: bool = True
    name: str = ""

    def title(self) -> str:
        return self.name or "no dropped frames"


@dataclass(frozen=True)
class MetricThreshold:
    """A devkit metric over the window's keyframes: detection (NDS, mAP, mATE, ...) or tracking (amota, mota,
    ids, ...), at least `min` and / or at most `max`."""

    task: str  # "detection" | "tracking"
    metric: str
    min: float | None = None
    max: float | None = None
    window: Window = field(default_factory=Window)
    name: str = ""

    def title(self) -> str:
        bounds = " and ".join(([f">= {self.min:g}"] if self.min is not None else []) +
                              ([f"<= {self.max:g}"] if self.max is not None else []))
        return self.name or f"{self.metric} {bounds}{self.window.describe()}"


@dataclass(frozen=True)
class ObjectInRange:
    """An object of `object_class` (a detection, or with source "tracks" a track) scoring at least min_score within
    max_distance_m of the ego (horizontal, meters) in at least min_frames processed frames of the window."""

    object_class: str
    max_distance_m: float
    min_frames: int = 1
    min_score: float = 0.0
    source: str = "detections"  # "detections" | "tracks"
    window: Window = field(default_factory=Window)
    name: str = ""

    def title(self) -> str:
        return self.name or (f"{self.object_class} within {self.max_distance_m:g} m in >= {self.min_frames} frames"
                             f"{self.window.describe()}")


@dataclass(frozen=True)
class NoIdSwitches:
    """The annotated instance (its instance token) keeps one track ID: at each keyframe of the window where it is
    annotated, its match is the track it matched before if that track is still within match_distance_m (centres,
    meters; as CLEAR-MOT keeps matches), else the nearest track of its class within that distance; the verdict
    fails when the matched ID changes more than max_switches times, or fewer than min_matched_frames keyframes
    have a match."""

    instance: str
    match_distance_m: float = 2.0
    min_matched_frames: int = 2
    max_switches: int = 0
    window: Window = field(default_factory=Window)
    name: str = ""

    def title(self) -> str:
        return self.name or f"no ID switches of instance {self.instance[:8]}{self.window.describe()}"


Criterion = Latency | NoDroppedFrames | MetricThreshold | ObjectInRange | NoIdSwitches


@dataclass(frozen=True)
class Drive:
    """The recorded drive: a nuScenes-format dataroot, its table version and a scene name."""

    dataroot: str
    version: str
    scene: str


@dataclass(frozen=True)
class Scenario:
    name: str
    drive: Drive
    criteria: tuple[Criterion, ...]
    source: str = ""  # the file it was read from


# ------------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------------

class _Fields:
    """Typed access to one mapping of the file; every error names `where` and the key."""

    def __init__(self, source: str, where: str, mapping: Any, allowed: tuple[str, ...]):
        if not isinstance(mapping, dict):
            raise ScenarioError(f"{source}: {where}: must be a mapping, got {type(mapping).__name__}")
        unknown = sorted(set(mapping) - set(allowed))
        if unknown:
            raise ScenarioError(f"{source}: {where}.{unknown[0]}: unknown key; expected some of {list(allowed)}")
        self.source, self.where, self.mapping = source, where, mapping

    def fail(self, key: str, message: str) -> ScenarioError:
        return ScenarioError(f"{self.source}: {self.where}.{key}: {message}")

    def string(self, key: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str:
        if key not in self.mapping and default is not None:
            return default
        value = self.mapping.get(key)
        if value is None:
            raise self.fail(key, "missing")
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.fail(key, f"{value!r} is not one of {list(choices)}")
        return value

    def number(self, key: str, default: float | None = None, minimum: float | None = None,
               required: bool = True) -> float | None:
        value = self.mapping.get(key, default)
        if value is None:
            if required:
                raise self.fail(key, "missing")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, f"must be a finite number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be >= {minimum:g}, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        value = self.mapping.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.mapping.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def window(self) -> Window:
        value = self.mapping.get("window_s")
        if value is None:
            return Window()
        if (not isinstance(value, list) or len(value) != 2 or
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) or
                not 0 <= value[0] <= value[1]):
            raise self.fail("window_s", f"must be [start, end] seconds with 0 <= start <= end, got {value!r}")
        return Window(float(value[0]), float(value[1]))


_COMMON = ("type", "name")


def _criterion(source: str, index: int, mapping: Any) -> Criterion:
    where = f"criteria[{index}]"
    if not isinstance(mapping, dict):
        raise ScenarioError(f"{source}: {where}: must be a mapping with a 'type', got {type(mapping).__name__}")
    kind = mapping.get("type")
    if kind == "latency":
        f = _Fields(source, where, mapping, _COMMON + ("percentile", "max_ms"))
        percentile = f.integer("percentile", 95)
        if percentile not in LATENCY_PERCENTILES:
            raise f.fail("percentile", f"must be one of {list(LATENCY_PERCENTILES)}, got {percentile}")
        return Latency(f.number("max_ms", minimum=0.0), percentile, f.string("name", ""))
    if kind == "no_dropped_frames":
        f = _Fields(source, where, mapping, _COMMON + ("include_failed",))
        return NoDroppedFrames(f.boolean("include_failed", True), f.string("name", ""))
    if kind in ("detection_metric", "tracking_metric"):
        f = _Fields(source, where, mapping, _COMMON + ("metric", "min", "max", "window_s"))
        task = kind.split("_")[0]
        metric = f.string("metric", choices=DETECTION_METRICS if task == "detection" else TRACKING_METRICS)
        low, high = f.number("min", required=False), f.number("max", required=False)
        if low is None and high is None:
            raise f.fail("min", "give min and / or max")
        return MetricThreshold(task, metric, low, high, f.window(), f.string("name", ""))
    if kind == "object_in_range":
        f = _Fields(source, where, mapping, _COMMON + ("class", "max_distance_m", "min_frames", "min_score",
                                                        "source", "window_s"))
        object_source = f.string("source", "detections", ("detections", "tracks"))
        classes = DETECTION_CLASSES if object_source == "detections" else TRACKING_CLASSES
        return ObjectInRange(f.string("class", choices=classes), f.number("max_distance_m", minimum=0.0),
                             f.integer("min_frames", 1, minimum=1), f.number("min_score", 0.0, minimum=0.0),
                             object_source, f.window(), f.string("name", ""))
    if kind == "no_id_switches":
        f = _Fields(source, where, mapping, _COMMON + ("instance", "match_distance_m", "min_matched_frames",
                                                        "max_switches", "window_s"))
        return NoIdSwitches(f.string("instance"), f.number("match_distance_m", 2.0, minimum=0.0),
                            f.integer("min_matched_frames", 2, minimum=1), f.integer("max_switches", 0),
                            f.window(), f.string("name", ""))
    kinds = ["latency", "no_dropped_frames", "detection_metric", "tracking_metric", "object_in_range",
             "no_id_switches"]
    raise ScenarioError(f"{source}: {where}.type: {kind!r} is not one of {kinds}")


def parse_scenario(document: Any, source: str = "scenario") -> Scenario:
    """A Scenario from the parsed YAML document; ScenarioError names `source` and the field."""
    top = _Fields(source, "scenario", document, ("name", "description", "drive", "criteria"))
    drive = _Fields(source, "drive", document.get("drive"), ("dataroot", "version", "scene"))
    criteria = document.get("criteria")
    if not isinstance(criteria, list) or not criteria:
        raise top.fail("criteria", "must be a non-empty list of criteria")
    return Scenario(top.string("name"),
                    Drive(drive.string("dataroot"), drive.string("version"), drive.string("scene")),
                    tuple(_criterion(source, i, c) for i, c in enumerate(criteria)), source)


def load_scenario(path: str | os.PathLike) -> Scenario:
    """Read a scenario YAML file; ScenarioError names the file (and the field) when it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"scenario file not found: {path}")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ScenarioError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    return parse_scenario(document, str(path))
