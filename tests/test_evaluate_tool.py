"""tools/evaluate.py end to end on the tiny dataroot: checkpoint -> inference -> submission -> devkit metrics; an
existing results file validated then evaluated (ground truth: perfect per class; broken: exit 2 with the offending
sample and field named); --robustness (slow)."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from tool_runner import call_tool, load_tool
from fusion.checkpoints import load_run
from fusion.evaluation import (ground_truth_submission, keyframe_ego_poses, load_nuscenes, split_sample_tokens,
                               validate_submission, write_submission)

ROOT = Path(__file__).resolve().parents[1]


def run_tool(argv: list[str]) -> tuple[int, str, str]:
    return call_tool("evaluate", argv)


@pytest.fixture(scope="module")
def nusc(tiny_dataroot):
    with contextlib.redirect_stdout(io.StringIO()):
        return load_nuscenes(tiny_dataroot.dataroot, tiny_dataroot.version)


def common_args(info, out: Path) -> list[str]:
    return ["--dataroot", str(info.dataroot), "--version", info.version, "--split", info.val_split, "--out", str(out)]


def test_checkpoint_inference_submission_and_devkit_metrics(tiny_dataroot, tiny_checkpoint, nusc, tmp_path):
    config, checkpoint = tiny_checkpoint
    # A config whose model section differs (1.6 m cells): the model must come from the checkpoint (3.2 m cells).
    document = yaml.safe_load(config.read_text())
    document["model"]["grid"]["cell_size"] = 1.6
    other_config = tmp_path / "other.yaml"
    other_config.write_text(yaml.safe_dump(document))
    out = tmp_path / "eval"
    code, stdout, stderr = run_tool(common_args(tiny_dataroot, out) + ["--config", str(other_config),
                                                                        "--checkpoint", str(checkpoint),
                                                                        "--no-curves"])
    assert code == 0, stderr
    assert "cells of 3.2 m" in stdout  # the checkpoint's grid, not the other config's 1.6 m
    assert "Per-class results:" in stdout and "NDS:" in stdout and "mAP:" in stdout and "mATE:" in stdout
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert 0.0 <= summary["nd_score"] <= 1.0 and math.isfinite(summary["mean_ap"])
    assert f"NDS {summary['nd_score']:.4f}" in stdout
    assert not (out / "plots").exists() or not list((out / "plots").iterdir())

    submission = json.loads((out / "results_nusc.json").read_text())
    tokens = split_sample_tokens(nusc, tiny_dataroot.val_split)
    validate_submission(submission, tokens)  # every sample, valid fields, <= 500 boxes
    assert submission["meta"] == {"use_camera": True, "use_lidar": True, "use_radar": True, "use_map": True,
                                  "use_external": False}
    assert summary["meta"] == submission["meta"]
    boxes = [b for token in tokens for b in submission["results"][token]]
    assert boxes, "a fresh model with threshold 0.05 should still output boxes"
    # Global frame: every box lies within the BEV grid's reach (51.2 m * sqrt(2)) of its keyframe's ego position,
    # and far from the ego-frame origin (the synthetic world sits away from the map origin).
    poses = keyframe_ego_poses(nusc, tokens)
    for token in tokens:
        for box in submission["results"][token]:
            offset = np.asarray(box["translation"][:2]) - poses[token][:2, 3]
            assert np.hypot(*offset) < 51.2 * math.sqrt(2) + 1e-3
    assert max(np.hypot(*poses[t][:2, 3]) for t in tokens) > 80.0

    # The written file goes through --results unchanged and scores the same.
    code, stdout, stderr = run_tool(common_args(tiny_dataroot, tmp_path / "again") + [
        "--results", str(out / "results_nusc.json"), "--no-curves"])
    assert code == 0, stderr
    again = json.loads((tmp_path / "again" / "metrics_summary.json").read_text())
    assert again["nd_score"] == pytest.approx(summary["nd_score"]) and again["mean_ap"] == pytest.approx(
        summary["mean_ap"])


def test_results_file_ground_truth_with_curves(tiny_dataroot, nusc, tmp_path):
    submission = ground_truth_submission(nusc, tiny_dataroot.val_split)
    path = write_submission(submission, tmp_path / "gt.json")
    out = tmp_path / "eval"
    code, stdout, stderr = run_tool(common_args(tiny_dataroot, out) + ["--results", str(path)])
    assert code == 0, stderr
    assert "valid submission" in stdout
    summary = json.loads((out / "metrics_summary.json").read_text())
    present = {b["detection_name"] for boxes in submission["results"].values() for b in boxes}
    found = {name for name, ap in summary["mean_dist_aps"].items() if ap > 0}
    assert found and found <= present  # ground truth is either found perfectly or absent from the split
    assert all(summary["mean_dist_aps"][name] == pytest.approx(1.0) for name in found)
    assert summary["mean_ap"] == pytest.approx(len(found) / 10)
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"summary.pdf", "car_pr.pdf", "car_tp.pdf", "dist_pr_2.0.pdf"} <= plots


def test_broken_results_file_is_rejected_with_exit_2(tiny_dataroot, nusc, tmp_path):
    submission = ground_truth_submission(nusc, tiny_dataroot.val_split)
    token = next(t for t, boxes in submission["results"].items() if boxes)
    submission["results"][token][0]["rotation"] = [2.0, 0.0, 0.0, 0.0]
    dropped = split_sample_tokens(nusc, tiny_dataroot.val_split)[-1]
    del submission["results"][dropped]
    path = write_submission(submission, tmp_path / "broken.json")
    code, stdout, stderr = run_tool(common_args(tiny_dataroot, tmp_path / "eval") + ["--results", str(path)])
    assert code == 2
    assert "broken.json: invalid nuScenes detection submission (2 problem(s))" in stderr
    assert f"results['{token}'][0].rotation" in stderr and "norm 2" in stderr
    assert dropped in stderr and "missing" in stderr
    assert not (tmp_path / "eval" / "metrics_summary.json").exists()


def test_bad_arguments_are_named(tiny_dataroot, tiny_checkpoint, tmp_path):
    config, checkpoint = tiny_checkpoint
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()) as err:
        load_tool("evaluate").main(common_args(tiny_dataroot, tmp_path) + ["--results", "x.json", "--robustness"])
    assert exit_info.value.code == 2 and "--robustness needs --checkpoint" in err.getvalue()
    code, _, stderr = run_tool(common_args(tiny_dataroot, tmp_path) + ["--results", str(tmp_path / "none.json")])
    assert code == 2 and "none.json" in stderr
    code, _, stderr = run_tool(["--dataroot", str(tiny_dataroot.dataroot), "--version", tiny_dataroot.version,
                                "--split", "no_such_split", "--out", str(tmp_path), "--results", str(config)])
    assert code == 2 and "no_such_split" in stderr


def test_lidar_thinning_loader_drops_rings(tiny_dataroot, tiny_checkpoint):
    config, checkpoint = tiny_checkpoint
    tool = load_tool("evaluate")
    datamodule = load_run(checkpoint, config, dataroot=tiny_dataroot.dataroot, version=tiny_dataroot.version,
                          split=tiny_dataroot.val_split, val_batch_size=2, num_workers=0).data
    full = next(iter(tool.condition_loader(datamodule, tiny_dataroot.val_split)))
    thinned_loader = tool.condition_loader(datamodule, tiny_dataroot.val_split, lidar_keep_rings=4)
    thinned = next(iter(thinned_loader))
    assert thinned_loader.dataset.builder.lidar_keep_rings == 4
    assert full.tokens == thinned.tokens
    ratio = thinned.lidar_points.shape[0] / full.lidar_points.shape[0]
    assert 0.1 < ratio < 0.4, ratio  # one ring in four kept (returns per ring vary with elevation)


def test_robustness_table(tiny_dataroot, tiny_checkpoint, nusc, tmp_path):
    config, checkpoint = tiny_checkpoint
    out = tmp_path / "eval"
    code, stdout, stderr = run_tool(common_args(tiny_dataroot, out) + [
        "--config", str(config), "--checkpoint", str(checkpoint), "--no-curves", "--robustness", "--thin-rings", "4"])
    assert code == 0, stderr
    report = json.loads((out / "robustness.json").read_text())
    rows = {row["name"]: row for row in report["conditions"]}
    assert list(rows) == ["all_sensors", "no_camera", "no_lidar", "no_radar", "no_gps", "lidar_1_4_beams",
                          "gps_noise"]
    assert rows["no_lidar"]["modalities"] == ["camera", "radar", "gps"]
    for name, row in rows.items():
        assert 0.0 <= row["nds"] <= 1.0 and 0.0 <= row["map"] <= 1.0, name
        assert name in stdout
    tokens = split_sample_tokens(nusc, tiny_dataroot.val_split)
    results = {name: json.loads(Path(row["results_path"]).read_text()) for name, row in rows.items()}
    for name, submission in results.items():
        validate_submission(submission, tokens)
    assert results["no_lidar"]["meta"]["use_lidar"] is False and results["no_gps"]["meta"]["use_map"] is False
    reference = results["all_sensors"]["results"]
    for name in ("no_camera", "no_lidar", "no_radar", "no_gps", "lidar_1_4_beams", "gps_noise"):
        assert results[name]["results"] != reference, f"{name} gave exactly the all-sensors predictions"
