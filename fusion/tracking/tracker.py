"""A CenterPoint-style multi-object tracker over per-frame detections in the GLOBAL frame.

The tracker of the nuScenes tracking baselines (CenterPoint's "greedy closest-point" tracker, Yin et al. 2021):
each detection's centre is moved back by its predicted velocity times the time since the previous frame, and
associated greedily (detections in descending score, each to the nearest free track of its class) with the tracks'
centres, within a per-class distance gate. Matched tracks take the detection's box; unmatched tracks coast along
their velocity and die after `max_coast_s` without a match (death by age); unmatched detections scoring at least
`birth_score` start new tracks (birth by score), reported once they have `min_hits` matches (birth by age).

Frames and units: global frame (x, y, z in meters), sizes (w, l, h) in meters, rotation a (w, x, y, z) quaternion,
velocity (vx, vy) in m/s in global axes, time in seconds. Inputs are nuScenes submission boxes
(fusion.evaluation.submission.boxes_to_submission); outputs are devkit tracking-submission boxes (`Track.to_dict`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

#: The nuScenes tracking classes (the devkit's tracking_nips_2019 config), a subset of the detection classes.
TRACKING_CLASSES: tuple[str, ...] = ("bicycle", "bus", "car", "motorcycle", "pedestrian", "trailer", "truck")

#: CenterPoint's per-class association gate (its NUSCENE_CLS_VELOCITY_ERROR), meters between a detection's
#: back-propagated centre and a track's centre.
CENTERPOINT_MATCH_DISTANCE_M: dict[str, float] = {
    "car": 4.0, "truck": 4.0, "bus": 5.5, "trailer": 3.0, "pedestrian": 1.0, "motorcycle": 13.0, "bicycle": 3.0}


@dataclass(frozen=True)
class TrackerConfig:
    """Association gates and the birth / death rules.

    match_distance_m: class -> largest centre distance (m) at which a detection continues a track.
    min_score: detections scoring below this are ignored. birth_score: an unmatched detection starts a track only
    from this score. min_hits: a track is reported from its min_hits-th matched frame on (1: at once).
    max_coast_s: a track unmatched for longer than this (seconds) is deleted; until then it coasts along its
    velocity and keeps its ID for re-association.
    """

    match_distance_m: Mapping[str, float] = field(default_factory=lambda: dict(CENTERPOINT_MATCH_DISTANCE_M))
    min_score: float = 0.1
    birth_score: float = 0.1
    min_hits: int = 1
    max_coast_s: float = 1.5

    def __post_init__(self):
        unknown = set(self.match_distance_m) - set(TRACKING_CLASSES)
        if unknown:
            raise ValueError(f"TrackerConfig.match_distance_m: unknown tracking classes {sorted(unknown)}")
        if self.min_hits < 1:
            raise ValueError(f"TrackerConfig.min_hits must be >= 1, got {self.min_hits}")
        if not self.max_coast_s >= 0:
            raise ValueError(f"TrackerConfig.max_coast_s must be >= 0, got {self.max_coast_s}")


@dataclass
class Track:
    """One tracked object (global frame). translation [3] m, size [3] (w, l, h) m, rotation [4] (w, x, y, z),
    velocity [2] (vx, vy) m/s; score: its last matched detection's score; age: frames since its birth (1 in its
    first frame); hits: frames it was matched in; coast_s: seconds since its last match."""

    tracking_id: int
    tracking_name: str
    translation: np.ndarray
    size: np.ndarray
    rotation: np.ndarray
    velocity: np.ndarray
    score: float
    age: int = 1
    hits: int = 1
    coast_s: float = 0.0

    def to_dict(self) -> dict:
        """The devkit tracking-submission box (without sample_token), plus the track's age in frames."""
        return {"tracking_id": str(self.tracking_id), "tracking_name": self.tracking_name,
                "translation": [float(v) for v in self.translation], "size": [float(v) for v in self.size],
                "rotation": [float(v) for v in self.rotation], "velocity": [float(v) for v in self.velocity],
                "tracking_score": float(self.score), "age": int(self.age)}

    def take(self, detection: Mapping) -> None:
        """Continue this track with a matched detection (a submission box)."""
        self.translation = np.asarray(detection["translation"], dtype=np.float64)
        self.size = np.asarray(detection["size"], dtype=np.float64)
        self.rotation = np.asarray(detection["rotation"], dtype=np.float64)
        self.velocity = np.asarray(detection["velocity"], dtype=np.float64)[:2]
        self.score = float(detection["detection_score"])
        self.hits += 1
        self.coast_s = 0.0


class Tracker:
    """CenterPoint-style tracker of one drive (see the module docstring). Call `update` once per frame, in time
    order; `reset` before another drive. Track IDs are integers, unique over the tracker's life (never reused)."""

    def __init__(self, config: TrackerConfig | None = None):
        self.config = config or TrackerConfig()
        self.tracks: list[Track] = []
        self.next_id = 0
        self.last_time_s: float | None = None

    def reset(self) -> None:
        """Forget every track (a new drive); IDs keep counting up."""
        self.tracks, self.last_time_s = [], None

    def update(self, detections: Sequence[Mapping], time_s: float) -> list[Track]:
        """Associate one frame's detections (submission boxes: translation, size, rotation, velocity,
        detection_name, detection_score; global frame) at `time_s` (seconds) and return the tracks reported for
        this frame (matched now, at least min_hits matches), in descending score."""
        if self.last_time_s is not None and not time_s > self.last_time_s:
            raise ValueError(f"tracker frames must be in time order: {time_s} s after {self.last_time_s} s")
        dt = 0.0 if self.last_time_s is None else time_s - self.last_time_s
        self.last_time_s = time_s
        config = self.config
        wanted = [d for d in detections if d["detection_name"] in config.match_distance_m
                  and float(d["detection_score"]) >= config.min_score]
        wanted.sort(key=lambda d: -float(d["detection_score"]))
        matches = self._associate(wanted, dt)
        matched_tracks = set(matches.values())
        for track_index, track in enumerate(self.tracks):
            track.age += 1
            if track_index not in matched_tracks:
                track.coast_s += dt
                track.translation = track.translation.copy()
                track.translation[:2] += track.velocity * dt
        reported = []
        for detection_index, detection in enumerate(wanted):
            track_index = matches.get(detection_index)
            if track_index is not None:
                track = self.tracks[track_index]
                track.take(detection)
            elif float(detection["detection_score"]) >= config.birth_score:
                track = Track(self.next_id, detection["detection_name"],
                              np.asarray(detection["translation"], dtype=np.float64),
                              np.asarray(detection["size"], dtype=np.float64),
                              np.asarray(detection["rotation"], dtype=np.float64),
                              np.asarray(detection["velocity"], dtype=np.float64)[:2],
                              float(detection["detection_score"]))
                self.next_id += 1
                self.tracks.append(track)
            else:
                continue
            if track.hits >= config.min_hits:
                reported.append(track)
        self.tracks = [t for t in self.tracks if t.coast_s <= config.max_coast_s]
        return reported

    def _associate(self, detections: list[Mapping], dt: float) -> dict[int, int]:
        """Greedy association: {detection index: track index}. Detections (in descending score) each take the
        nearest unmatched track of their class whose centre lies within the class's gate of the detection's
        centre moved back by velocity * dt (the detection's position one frame earlier)."""
        if not detections or not self.tracks:
            return {}
        centres = np.array([d["translation"][:2] for d in detections], dtype=np.float64)
        velocities = np.array([d["velocity"][:2] for d in detections], dtype=np.float64)
        previous = centres - velocities * dt
        track_centres = np.stack([t.translation[:2] for t in self.tracks])
        distance = np.linalg.norm(previous[:, None, :] - track_centres[None, :, :], axis=-1)  # [N, M]
        names = np.array([d["detection_name"] for d in detections])
        track_names = np.array([t.tracking_name for t in self.tracks])
        gate = np.array([self.config.match_distance_m[n] for n in names])
        distance[(names[:, None] != track_names[None, :]) | (distance > gate[:, None])] = math.inf
        matches = {}
        for i in range(len(detections)):
            j = int(np.argmin(distance[i]))
            if math.isfinite(distance[i, j]):
                matches[i] = j
                distance[:, j] = math.inf
        return matches
