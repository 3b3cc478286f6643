"""Scenario verdicts (fusion.scenarios): the YAML file and its errors, each criterion judged both ways over
hand-made replay records of the tiny dataroot's validation scene (ground-truth boxes and tracks as a perfect model,
then degraded), the table and the JUnit XML, and tools/replay.py --scenario end to end with an untrained model
(exit 3 on failure, 0 on success, 2 on a bad file) over the example scenarios of configs/scenarios/."""
from __future__ import annotations

import contextlib
import copy
import io
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import yaml

from tool_runner import call_tool
from fusion.evaluation import ground_truth_submission, keyframe_ego_poses, load_nuscenes, split_sample_tokens
from fusion.scenarios import (ScenarioError, format_table, judge_scenario, load_scenario, parse_scenario,
                              write_junit)
from fusion.tracking import ground_truth_tracking_submission

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "configs" / "scenarios").glob("*.yaml"))


@pytest.fixture(scope="module")
def nusc(tiny_dataroot):
    with contextlib.redirect_stdout(io.StringIO()):
        return load_nuscenes(tiny_dataroot.dataroot, tiny_dataroot.version)


@pytest.fixture(scope="module")
def val_scene(tiny_dataroot):
    return tiny_dataroot.val_scenes[0]


@pytest.fixture(scope="module")
def perfect_records(tiny_dataroot, nusc):
    """Replay records (as fusion.replay.sinks.frame_record writes them) of the validation scene's keyframes with
    the ground truth as detections and as tracks: a perfect model."""
    tokens = split_sample_tokens(nusc, tiny_dataroot.val_split)
    boxes = ground_truth_submission(nusc, tiny_dataroot.val_split)["results"]
    tracks = ground_truth_tracking_submission(nusc, tokens)["results"]
    poses = keyframe_ego_poses(nusc, tokens)
    records = []
    for index, token in enumerate(tokens):
        records.append({"frame": index, "timestamp_us": nusc.get("sample", token)["timestamp"],
                        "sample_token": token, "ego_to_global": poses[token].tolist(),
                        "boxes": [{k: v for k, v in b.items() if k != "sample_token"} for b in boxes[token]],
                        "tracks": [{**{k: v for k, v in t.items() if k != "sample_token"}, "age": 1}
                                   for t in tracks[token]]})
    return records


def summary(p95: float = 120.0, dropped: int = 0, processed: int = 6) -> dict:
    return {"latency_ms": {"count": processed, "p50": p95 / 2, "p95": p95, "p99": p95 * 1.1},
            "frames": {"triggered": processed + dropped, "processed": processed, "dropped": dropped, "late": 0,
                       "failed": 0}, "wall_time_s": 2.0}


def tracked_instance(records) -> tuple[str, str]:
    """(instance token, tracking class) of the instance tracked in the most keyframes."""
    counts = {}
    for record in records:
        for track in record["tracks"]:
            counts[(track["tracking_id"], track["tracking_name"])] = counts.get((track["tracking_id"],
                                                                              track["tracking_name"]), 0) + 1
    return max(counts, key=counts.get)


def scenario_document(scene: str, instance: str, name: str) -> dict:
    return {"name": "tiny gate", "drive": {"dataroot": "unused", "version": "unused", "scene": scene},
            "criteria": [
                {"type": "latency", "percentile": 95, "max_ms": 200},
                {"type": "no_dropped_frames"},
                {"type": "detection_metric", "metric": "mAP", "min": 0.3},  # ground truth: (classes present) / 10
                {"type": "detection_metric", "metric": "mAP", "min": 0.3, "window_s": [0.0, 1.0],
                 "name": "mAP first second"},
                {"type": "tracking_metric", "metric": "amota", "min": 0.9},
                {"type": "tracking_metric", "metric": "ids", "max": 0},
                {"type": "object_in_range", "class": name, "max_distance_m": 60.0, "min_frames": 4},
                {"type": "object_in_range", "class": name, "max_distance_m": 60.0, "min_frames": 4,
                 "source": "tracks", "min_score": 0.5, "name": "tracked"},
                {"type": "no_id_switches", "instance": instance, "min_matched_frames": 3}]}


def test_a_perfect_model_passes_and_a_degraded_one_fails_each_criterion(nusc, val_scene, perfect_records, tmp_path):
    instance, name = tracked_instance(perfect_records)
    scenario = parse_scenario(scenario_document(val_scene, instance, name), "tiny.yaml")
    verdicts = judge_scenario(scenario, perfect_records, summary(), nusc)
    assert [v.passed for v in verdicts] == [True] * 9, format_table(scenario, verdicts)
    assert "3 keyframes" in verdicts[3].detail  # the window [0, 1] s holds the keyframes at 0, 0.5, 1.0 s
    assert verdicts[8].measured.startswith("0 switches, matched in 6 of 6")

    # Degraded: slow, one frame dropped, no detections, and from the 4th keyframe on only the instance's track is
    # left, renamed (an ID switch) and weakly scored (its class is then seen by the tracks in 3 frames only).
    degraded = copy.deepcopy(perfect_records)
    for record in degraded:
        record["boxes"] = []
    for record in degraded[3:]:
        record["tracks"] = [{**t, "tracking_id": "someone else", "tracking_score": 0.3} for t in record["tracks"]
                            if t["tracking_id"] == instance]
        assert len(record["tracks"]) == 1
    verdicts = judge_scenario(scenario, degraded, summary(p95=250.0, dropped=1), nusc)
    assert [v.passed for v in verdicts] == [False] * 9, format_table(scenario, verdicts)
    assert verdicts[0].measured == "250.0 ms"
    assert verdicts[1].measured == "1 dropped + failed of 7 triggered"
    assert verdicts[2].measured == "no detections in the window"
    assert verdicts[6].measured == "0 of 6 frames"  # no detections at all
    assert verdicts[7].measured == "3 of 6 frames"
    assert verdicts[8].measured.startswith("1 switches, matched in 6 of 6")

    table = format_table(scenario, verdicts)
    assert "FAIL" in table and "scenario FAILED (9 of 9 criteria)" in table
    junit = write_junit(scenario, verdicts, tmp_path / "junit.xml", seconds=2.0)
    root = ElementTree.parse(junit).getroot()
    suite = root.find("testsuite")
    assert suite.get("name") == "tiny gate" and suite.get("tests") == "9" and suite.get("failures") == "9"
    cases = suite.findall("testcase")
    assert len(cases) == 9 and all(case.find("failure") is not None for case in cases)
    assert "measured 250.0 ms; expected p95 <= 200 ms" in cases[0].find("failure").get("message")


def test_missing_instance_and_empty_window_fail_with_a_reason(nusc, val_scene, perfect_records):
    document = {"name": "x", "drive": {"dataroot": "d", "version": "v", "scene": val_scene}, "criteria": [
        {"type": "no_id_switches", "instance": "0" * 32},
        {"type": "detection_metric", "metric": "NDS", "min": 0.1, "window_s": [100, 200]},
        {"type": "no_dropped_frames"}]}
    verdicts = judge_scenario(parse_scenario(document), perfect_records, summary(processed=0), nusc)
    assert [v.passed for v in verdicts] == [False, False, False]
    assert "is not in" in verdicts[0].detail
    assert verdicts[1].measured == "no keyframe processed in the window"
    document["drive"]["scene"] = "scene-9999"
    with pytest.raises(ScenarioError, match="drive.scene: no scene 'scene-9999'"):
        judge_scenario(parse_scenario(document), perfect_records, summary(), nusc)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("name"), "scenario.name: missing"),
    (lambda d: d["drive"].pop("scene"), "drive.scene: missing"),
    (lambda d: d.update(criteria=[]), "scenario.criteria: must be a non-empty list"),
    (lambda d: d["criteria"].append({"type": "speed"}), "criteria[1].type: 'speed' is not one of"),
    (lambda d: d["criteria"].append({"type": "latency"}), "criteria[1].max_ms: missing"),
    (lambda d: d["criteria"].append({"type": "latency", "max_ms": 1, "percentile": 90}),
     "criteria[1].percentile: must be one of [50, 95, 99]"),
    (lambda d: d["criteria"].append({"type": "detection_metric", "metric": "AMOTA", "min": 1}),
     "criteria[1].metric: 'AMOTA' is not one of"),
    (lambda d: d["criteria"].append({"type": "tracking_metric", "metric": "amota"}), "criteria[1].min: give min"),
    (lambda d: d["criteria"].append({"type": "object_in_range", "class": "car", "max_distance_m": 5,
                                     "window_s": [3, 1]}), "criteria[1].window_s: must be [start, end]"),
    (lambda d: d["criteria"].append({"type": "object_in_range", "class": "barrier", "max_distance_m": 5,
                                     "source": "tracks"}), "criteria[1].class: 'barrier' is not one of"),
    (lambda d: d["criteria"].append({"type": "no_dropped_frames", "colour": "red"}),
     "criteria[1].colour: unknown key"),
    (lambda d: d["criteria"].append({"type": "no_id_switches", "instance": "abc", "min_matched_frames": 0}),
     "criteria[1].min_matched_frames: must be an integer >= 1"),
])
def test_bad_scenario_files_name_the_field(tmp_path, change, message):
    document = {"name": "x", "drive": {"dataroot": "d", "version": "v", "scene": "s"},
                "criteria": [{"type": "no_dropped_frames"}]}
    change(document)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ScenarioError) as error:
        load_scenario(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
    (tmp_path / "broken.yaml").write_text("name: [unclosed")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(tmp_path / "broken.yaml")


def test_example_scenarios_parse():
    assert len(EXAMPLES) >= 2
    for path in EXAMPLES:
        scenario = load_scenario(path)
        assert scenario.drive.dataroot == "data/synthetic" and scenario.criteria


# ----------------------------------------------------------------------------------------------------------------
# tools/replay.py --scenario
# ----------------------------------------------------------------------------------------------------------------

def run_replay_tool(argv: list[str]) -> tuple[int, str, str]:
    return call_tool("replay", argv)


def replay_args(info, checkpoint, config, out: Path) -> list[str]:
    return ["--dataroot", str(info.dataroot), "--version", info.version, "--checkpoint", str(checkpoint),
            "--config", str(config), "--out", str(out), "--keyframes-only", "--video", "none", "--png-every", "0",
            "--device", "cpu"]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_scenarios_run_on_the_tiny_drive(tiny_dataroot, tiny_checkpoint, val_scene, example, tmp_path,
                                                 single_torch_thread):
    """Each example, its drive pointed at the tiny dataroot's validation scene, replayed with an untrained model:
    every criterion gets a verdict in the table and the JUnit XML; the quality criteria (meant for a trained
    model) fail, so the tool exits 3."""
    config, checkpoint = tiny_checkpoint
    scenario = load_scenario(example)
    code, stdout, stderr = run_replay_tool(replay_args(tiny_dataroot, checkpoint, config, tmp_path) + [
        "--scene", val_scene, "--scenario", str(example)])
    assert code == 3, stdout + stderr
    assert f"scenario: {scenario.name} ({val_scene})" in stdout and "scenario FAILED" in stdout
    suite = ElementTree.parse(tmp_path / "scenario_junit.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases] == [c.title() for c in scenario.criteria]
    assert int(suite.get("failures")) >= 1
    for line in (tmp_path / "detections.jsonl").read_text().splitlines():
        assert "tracks" in yaml.safe_load(line)


def test_replay_scenario_exit_codes(tiny_dataroot, tiny_checkpoint, val_scene, tmp_path, single_torch_thread):
    config, checkpoint = tiny_checkpoint
    passing = {"name": "replays cleanly", "drive": {"dataroot": str(tiny_dataroot.dataroot),
                                                    "version": tiny_dataroot.version, "scene": val_scene},
               "criteria": [{"type": "latency", "max_ms": 1e9}, {"type": "no_dropped_frames"}]}
    path = tmp_path / "passing.yaml"
    path.write_text(yaml.safe_dump(passing))
    argv = ["--checkpoint", str(checkpoint), "--config", str(config), "--keyframes-only", "--video", "none",
            "--png-every", "0", "--device", "cpu", "--scenario", str(path)]
    code, stdout, stderr = run_replay_tool(argv + ["--out", str(tmp_path / "ok"), "--junit",
                                                   str(tmp_path / "ci" / "junit.xml")])
    assert code == 0, stdout + stderr
    assert "scenario PASSED" in stdout and f"replaying {val_scene}" in stdout
    suite = ElementTree.parse(tmp_path / "ci" / "junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0" and len(suite.findall("testcase")) == 2
    properties = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert properties["scene"] == val_scene and properties["dataroot"] == str(tiny_dataroot.dataroot)

    failing = copy.deepcopy(passing)
    failing["criteria"].append({"type": "object_in_range", "class": "bus", "max_distance_m": 1.0, "min_frames": 6,
                                "min_score": 0.99})
    path.write_text(yaml.safe_dump(failing))
    code, stdout, _ = run_replay_tool(argv + ["--out", str(tmp_path / "fail")])
    assert code == 3
    assert any(line.startswith("FAIL") and "bus within 1 m in >= 6 frames" in line for line in stdout.splitlines())

    path.write_text("name: x\ndrive: {dataroot: d, version: v, scene: s}\ncriteria: [{type: latency}]\n")
    code, stdout, stderr = run_replay_tool(argv + ["--out", str(tmp_path / "bad")])
    assert code == 2 and stderr.strip().endswith("criteria[0].max_ms: missing") and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
