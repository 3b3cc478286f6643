"""The CenterPoint-style tracker (fusion.tracking.tracker) on hand-made detections: association through the
predicted velocity, per-class gates, greedy order, birth / death by score and age; tracking submissions and the
devkit's TrackingEval through tools/evaluate.py --task tracking (ground truth as predictions scores AMOTA > 0.95;
broken submissions exit 2 naming sample and field; a checkpoint's detections tracked and scored)."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tool_runner import call_tool, load_tool
from fusion.evaluation import load_nuscenes, split_sample_tokens, write_submission
from fusion.tracking import (TRACKING_CLASSES, Tracker, TrackerConfig, evaluate_tracking_in_memory,
                             ground_truth_tracking_submission, track_submission, validate_tracking_submission)
from fusion.evaluation import SubmissionError

ROOT = Path(__file__).resolve().parents[1]
TRACK_KEYS = {"tracking_id", "tracking_name", "translation", "size", "rotation", "velocity", "tracking_score", "age"}


def detection(x: float, y: float, vx: float = 0.0, vy: float = 0.0, name: str = "car", score: float = 0.9) -> dict:
    """A submission box (global frame) at (x, y) moving at (vx, vy) m/s."""
    return {"translation": [x, y, 0.8], "size": [1.9, 4.5, 1.6], "rotation": [1.0, 0.0, 0.0, 0.0],
            "velocity": [vx, vy], "detection_name": name, "detection_score": score, "attribute_name": ""}


def ids(tracks) -> list[int]:
    return [t.tracking_id for t in tracks]


# ----------------------------------------------------------------------------------------------------------------
# The tracker
# ----------------------------------------------------------------------------------------------------------------

def test_fast_objects_keep_their_ids_through_the_predicted_velocity():
    # Two cars 6 m apart driving in opposite directions at 12 m/s, frames 0.5 s apart (keyframes): each moves 6 m
    # per frame, beyond the car gate (4 m), so only the velocity-propagated centre associates them.
    tracker = Tracker()
    history = []
    for k in range(8):
        t = 0.5 * k
        reported = tracker.update([detection(12.0 * t, 0.0, 12.0, 0.0), detection(100.0 - 12.0 * t, 6.0, -12.0, 0.0)],
                                  t)
        history.append({int(round(tr.translation[1])): (tr.tracking_id, tr.age) for tr in reported})
    assert [sorted(frame) for frame in history] == [[0, 6]] * 8
    assert len({frame[0][0] for frame in history}) == 1 and len({frame[6][0] for frame in history}) == 1
    assert history[0][0][0] != history[0][6][0]
    assert [frame[0][1] for frame in history] == list(range(1, 9))
    assert tracker.tracks[0].hits == 8

    # The same drive with the velocity withheld: every frame starts new tracks (the gate is what it is).
    blind = Tracker()
    seen = set()
    for k in range(4):
        t = 0.5 * k
        seen.update(ids(blind.update([detection(12.0 * t, 0.0)], t)))
    assert len(seen) == 4


def test_classes_are_gated_and_the_higher_score_chooses_first():
    tracker = Tracker()
    first = tracker.update([detection(0.0, 0.0, name="car"), detection(30.0, 0.0, name="pedestrian")], 0.0)
    car_id, pedestrian_id = (t.tracking_id for t in sorted(first, key=lambda t: t.tracking_name))
    # A pedestrian next to the car track does not continue it; two cars compete for one track: the better scored
    # one takes it although the other is closer.
    reported = tracker.update([detection(0.5, 0.0, name="pedestrian", score=0.8),
                               detection(0.2, 0.0, name="car", score=0.5), detection(1.0, 0.0, name="car", score=0.9)],
                              0.1)
    by_key = {(t.tracking_name, round(float(t.translation[0]), 1)): t.tracking_id for t in reported}
    assert by_key[("car", 1.0)] == car_id
    assert by_key[("car", 0.2)] not in (car_id, pedestrian_id)
    assert by_key[("pedestrian", 0.5)] not in (car_id, pedestrian_id)
    # Classes outside the tracking classes are not tracked.
    assert tracker.update([detection(50.0, 0.0, name="barrier")], 0.2) == []
    assert "barrier" not in TRACKING_CLASSES and "traffic_cone" not in TRACKING_CLASSES


def test_coasting_tracks_are_found_again_until_they_die():
    config = TrackerConfig(max_coast_s=1.0)
    tracker = Tracker(config)
    (track,) = tracker.update([detection(0.0, 0.0, 10.0, 0.0)], 0.0)
    # Unseen for 0.5 s: the track coasts along its velocity (to x = 5 m), is not reported, and takes the detection
    # at x = 10 m at t = 1.0 s (back-propagated to 5 m at the last frame) under its old ID.
    assert tracker.update([], 0.5) == []
    assert tracker.tracks[0].translation[0] == pytest.approx(5.0) and tracker.tracks[0].coast_s == pytest.approx(0.5)
    (again,) = tracker.update([detection(10.0, 0.0, 10.0, 0.0)], 1.0)
    assert again.tracking_id == track.tracking_id and again.age == 3 and again.hits == 2
    # Unseen for longer than max_coast_s: it dies, and the object comes back under a new ID.
    for t in (1.5, 2.0, 2.5):
        tracker.update([], t)
    assert tracker.tracks == []
    (reborn,) = tracker.update([detection(35.0, 0.0, 10.0, 0.0)], 3.0)
    assert reborn.tracking_id != track.tracking_id


def test_birth_by_score_and_by_hits():
    tracker = Tracker(TrackerConfig(min_score=0.1, birth_score=0.5, min_hits=2))
    assert tracker.update([detection(0.0, 0.0, score=0.3)], 0.0) == []  # too weak to start a track
    assert tracker.tracks == []
    assert tracker.update([detection(0.0, 0.0, score=0.6)], 0.1) == []  # born, but reported from its 2nd hit
    (track,) = tracker.update([detection(0.1, 0.0, score=0.3)], 0.2)  # a weak detection continues it
    assert track.hits == 2 and track.score == pytest.approx(0.3)
    assert tracker.update([detection(0.2, 0.0, score=0.05)], 0.3) == []  # below min_score: ignored
    with pytest.raises(ValueError, match="time order"):
        tracker.update([], 0.3)
    with pytest.raises(ValueError, match="unknown tracking classes"):
        TrackerConfig(match_distance_m={"barrier": 1.0})


def test_track_dict_is_the_replay_contract():
    (track,) = Tracker().update([detection(3.0, 4.0, 1.0, 2.0)], 0.0)
    record = track.to_dict()
    assert set(record) == TRACK_KEYS
    assert isinstance(record["tracking_id"], str) and isinstance(record["age"], int) and record["age"] == 1
    assert record["translation"] == [3.0, 4.0, 0.8] and record["size"] == [1.9, 4.5, 1.6]
    assert record["velocity"] == [1.0, 2.0] and record["tracking_name"] == "car"
    json.dumps(record)


# ----------------------------------------------------------------------------------------------------------------
# Submissions and the devkit
# ----------------------------------------------------------------------------------------------------------------

def run_tool(argv: list[str]) -> tuple[int, str, str]:
    return call_tool("evaluate", argv)


@pytest.fixture(scope="module")
def nusc(tiny_dataroot):
    with contextlib.redirect_stdout(io.StringIO()):
        return load_nuscenes(tiny_dataroot.dataroot, tiny_dataroot.version)


@pytest.fixture(scope="module")
def val_tokens(tiny_dataroot, nusc):
    return split_sample_tokens(nusc, tiny_dataroot.val_split)


def tracking_args(info, out: Path) -> list[str]:
    return ["--task", "tracking", "--dataroot", str(info.dataroot), "--version", info.version, "--split",
            info.val_split, "--out", str(out), "--no-curves"]


def test_ground_truth_tracks_score_amota_above_0_95(tiny_dataroot, nusc, val_tokens, tmp_path):
    submission = ground_truth_tracking_submission(nusc, val_tokens)
    validate_tracking_submission(submission, val_tokens)
    assert sum(len(boxes) for boxes in submission["results"].values()) > 0
    path = write_submission(submission, tmp_path / "gt_tracks.json")
    code, stdout, stderr = run_tool(tracking_args(tiny_dataroot, tmp_path / "eval") + ["--results", str(path)])
    assert code == 0, stderr
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["amota"] > 0.95 and summary["ids"] == 0
    assert f"AMOTA {summary['amota']:.4f}" in stdout
    # The in-memory evaluation (used by the scenarios) agrees with the file-based one.
    in_memory = evaluate_tracking_in_memory(nusc, submission, val_tokens)
    assert in_memory["amota"] == pytest.approx(summary["amota"])

    # Identities swapped halfway through the scene: the devkit counts the switches, AMOTA stays high-ish but IDS
    # is no longer 0 (the evaluation looks at the IDs, not only at the boxes).
    swapped = json.loads(path.read_text())
    for token in val_tokens[len(val_tokens) // 2:]:
        for box in swapped["results"][token]:
            box["tracking_id"] = box["tracking_id"] + "-after"
    assert evaluate_tracking_in_memory(nusc, swapped, val_tokens)["ids"] > 0


def test_broken_tracking_submission_exits_2_naming_sample_and_field(tiny_dataroot, nusc, val_tokens, tmp_path):
    submission = ground_truth_tracking_submission(nusc, val_tokens)
    token = next(t for t in val_tokens if submission["results"][t])
    submission["results"][token][0]["tracking_id"] = 7
    submission["results"][token][0]["tracking_name"] = "barrier"
    path = write_submission(submission, tmp_path / "broken.json")
    code, stdout, stderr = run_tool(tracking_args(tiny_dataroot, tmp_path / "eval") + ["--results", str(path)])
    assert code == 2
    assert "broken.json: invalid nuScenes tracking submission (2 problem(s))" in stderr
    assert f"results['{token}'][0].tracking_id" in stderr and f"results['{token}'][0].tracking_name" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "eval" / "metrics_summary.json").exists()
    # A valid but empty submission: the devkit cannot score it; said in one line.
    empty = write_submission({"meta": submission["meta"], "results": {t: [] for t in val_tokens}},
                             tmp_path / "empty.json")
    code, _, stderr = run_tool(tracking_args(tiny_dataroot, tmp_path / "eval") + ["--results", str(empty)])
    assert code == 2 and "empty.json: no track in any sample" in stderr and len(stderr.strip().splitlines()) == 1
    # A detection submission is not a tracking submission.
    detections = {"meta": submission["meta"], "results": {t: [] for t in val_tokens}}
    detections["results"][token] = [{"sample_token": token, "translation": [0, 0, 0], "size": [1, 1, 1],
                                     "rotation": [1, 0, 0, 0], "velocity": [0, 0], "detection_name": "car",
                                     "detection_score": 0.5, "attribute_name": ""}]
    with pytest.raises(SubmissionError, match="missing field 'tracking_id'"):
        validate_tracking_submission(detections, val_tokens)
    # The same ID twice in one sample.
    twice = ground_truth_tracking_submission(nusc, val_tokens)
    boxes = next(b for b in twice["results"].values() if len(b) >= 2)
    boxes[1]["tracking_id"] = boxes[0]["tracking_id"]
    with pytest.raises(SubmissionError, match="used by 2 boxes"):
        validate_tracking_submission(twice, val_tokens)


def test_tracking_the_ground_truth_detections_keeps_identities(nusc, val_tokens):
    """The tracker over perfect detections (the ground truth without its IDs) recovers the tracks: AMOTA close to
    the ground truth's own, few ID switches."""
    truth = ground_truth_tracking_submission(nusc, val_tokens)
    detections = {"meta": truth["meta"], "results": {
        token: [{**{k: box[k] for k in ("translation", "size", "rotation", "velocity")}, "detection_name":
                 box["tracking_name"], "detection_score": 0.9, "attribute_name": ""} for box in boxes]
        for token, boxes in truth["results"].items()}}
    tracked = track_submission(nusc, detections, val_tokens)
    validate_tracking_submission(tracked, val_tokens)
    summary = evaluate_tracking_in_memory(nusc, tracked, val_tokens)
    assert summary["amota"] > 0.9, summary["amota"]
    assert summary["ids"] <= 1


def test_checkpoint_detections_are_tracked_and_scored(tiny_dataroot, tiny_checkpoint, val_tokens, tmp_path):
    config, checkpoint = tiny_checkpoint
    out = tmp_path / "eval"
    code, stdout, stderr = run_tool(tracking_args(tiny_dataroot, out) + ["--checkpoint", str(checkpoint),
                                                                          "--config", str(config)])
    assert code == 0, stderr
    submission = json.loads((out / "tracking_results.json").read_text())
    validate_tracking_submission(submission, val_tokens)
    assert (out / "results_nusc.json").is_file()
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert "amota" in summary and "ids" in summary
    assert math.isnan(summary["amota"]) or 0.0 <= summary["amota"] <= 1.0
    assert "AMOTA " in stdout
    # IDs are stable integers (as strings) over the scene: a track ID seen in two samples is one track.
    all_ids = [box["tracking_id"] for boxes in submission["results"].values() for box in boxes]
    assert all(i.isdigit() for i in all_ids)
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(io.StringIO()):
            load_tool("evaluate").main(tracking_args(tiny_dataroot, out)
                                       + ["--checkpoint", str(checkpoint), "--robustness"])


# ----------------------------------------------------------------------------------------------------------------
# Tracks in the replay
# ----------------------------------------------------------------------------------------------------------------

class ParkedCarDetector:
    """Detects one parked car at a fixed GLOBAL position (seen from each frame's ego pose), score 0.8: the tracker
    must keep one ID over the whole replay."""

    def __init__(self, position_global: np.ndarray):
        self.position = np.asarray(position_global, dtype=np.float64)

    def predict(self, batch):
        from fusion.types import Boxes

        pose = batch.ego.ego_to_global[0].double().numpy()
        centre = (self.position - pose[:3, 3]) @ pose[:3, :3]  # global -> ego frame
        box = Boxes(center=torch.from_numpy(centre[None]).float(), size=torch.tensor([[4.5, 1.9, 1.6]]),
                    yaw=torch.tensor([0.0]), velocity=torch.zeros(1, 2), labels=torch.tensor([0]),
                    attributes=torch.tensor([1]), scores=torch.tensor([0.8]),
                    num_lidar_pts=torch.tensor([-1]), num_radar_pts=torch.tensor([-1]))
        return [box], None


def test_replay_records_carry_tracks_in_the_global_frame(tiny_dataroot, tmp_path):
    from nuscenes.nuscenes import NuScenes

    from fusion.datasets.datamodule import FusionDataModule
    from fusion.grid import BEVGrid
    from fusion.replay import engine_for_scene, run_replay

    nusc = NuScenes(tiny_dataroot.version, str(tiny_dataroot.dataroot), verbose=False)
    scene = tiny_dataroot.val_scenes[0]
    grid = BEVGrid(cell_size=3.2)
    data = FusionDataModule(str(tiny_dataroot.dataroot), tiny_dataroot.version, grid=grid, modalities=["lidar"],
                            lidar_sweeps=1, cache_dir=None)
    first = nusc.get("sample", next(s for s in nusc.scene if s["name"] == scene)["first_sample_token"])
    pose = nusc.get("ego_pose", nusc.get("sample_data", first["data"]["LIDAR_TOP"])["ego_pose_token"])
    parked = np.asarray(pose["translation"]) + np.array([12.0, 3.0, 0.8])
    engine = engine_for_scene(nusc, scene, ParkedCarDetector(parked), data, contributions=False)
    _, outputs = run_replay(engine, tmp_path / "replay", grid, video="none", png_every=0, max_frames=12)
    records = [json.loads(line) for line in outputs.detections.read_text().splitlines()]
    assert len(records) == 12
    tracks = [record["tracks"] for record in records]
    assert all(len(frame) == 1 for frame in tracks)
    assert {frame[0]["tracking_id"] for frame in tracks} == {"0"}
    assert [frame[0]["age"] for frame in tracks] == list(range(1, 13))
    for record, (track,) in zip(records, tracks):
        assert set(track) == TRACK_KEYS and track["tracking_name"] == "car"
        assert np.allclose(track["translation"], parked, atol=1e-3)  # global frame, not the ego frame
        assert track["translation"] == pytest.approx(record["boxes"][0]["translation"])
        assert track["tracking_score"] == pytest.approx(0.8)

    # Without a tracker the records still have the key, empty.
    engine = engine_for_scene(nusc, scene, ParkedCarDetector(parked), data, contributions=False, tracker=None)
    _, outputs = run_replay(engine, tmp_path / "untracked", grid, video="none", png_every=0, max_frames=2)
    assert [json.loads(line)["tracks"] for line in outputs.detections.read_text().splitlines()] == [[], []]
