"""Velocity / heading diagnostics: matching like the devkit, and the shares that tell collapse and flips apart."""
from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fusion.evaluation.motion import match_pairs, motion_diagnostics

ROOT = Path(__file__).resolve().parents[1]


def box(x, y, yaw, vx, vy, name="car", score=1.0):
    return {"translation": [x, y, 0.8], "size": [1.9, 4.5, 1.6],
            "rotation": [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)], "velocity": [vx, vy],
            "detection_name": name, "detection_score": score, "attribute_name": ""}


TRUTH = {"s1": [box(0, 0, 0.0, 5.0, 0.0), box(10, 0, 1.0, 0.0, 0.0), box(20, 5, 0.0, 0.0, 0.0, "barrier")],
         "s2": [box(0, 0, -2.0, 0.0, 3.0, "pedestrian")]}


def test_the_ground_truth_scores_perfectly():
    figures = motion_diagnostics(TRUTH, TRUTH)
    assert figures.matched == 4 and figures.moving_matched == 2
    assert figures.mean_predicted_speed == pytest.approx(figures.mean_true_speed)
    assert figures.moving_predicted_moving == 1.0 and figures.moving_velocity_error == pytest.approx(0.0)
    assert figures.heading_right == 1.0 and figures.heading_flipped == 0.0


def test_a_zero_velocity_head_and_flipped_headings_are_told_apart():
    predictions = copy.deepcopy(TRUTH)
    for boxes in predictions.values():
        for b in boxes:
            b["velocity"] = [0.0, 0.0]
    predictions["s1"][0] = box(0.5, 0, math.pi, 0.0, 0.0)  # the moving car: flipped and predicted standing
    figures = motion_diagnostics(predictions, TRUTH)
    assert figures.mean_predicted_speed == 0.0 and figures.moving_predicted_moving == 0.0
    assert figures.moving_velocity_error == pytest.approx(4.0)  # (5 + 3) / 2
    assert figures.heading_flipped == pytest.approx(1 / 3)  # the barrier's heading is not counted
    assert figures.moving_heading_flipped == pytest.approx(1 / 2)


def test_matching_is_per_class_within_two_metres_best_score_first():
    truth = {"s": [box(0, 0, 0, 0, 0), box(1.0, 0, 0, 0, 0)]}
    predictions = {"s": [box(0.9, 0, 0, 0, 0, score=0.9), box(0.1, 0, 0, 0, 0, score=0.5),
                         box(0.0, 0, 0, 0, 0, name="truck"), box(5.0, 0, 0, 0, 0)]}
    pairs = match_pairs(predictions, truth)
    assert [(p["detection_score"], t["translation"][0]) for p, t in pairs] == [(0.9, 1.0), (0.5, 0.0)]
    assert motion_diagnostics({}, truth).matched == 0


def test_the_tool_refuses_a_missing_results_file(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "diagnose.py"), "--dataroot", str(tmp_path),
                             "--version", "v", "--split", "x", "--results", str(tmp_path / "none.json")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "none.json" in result.stderr and "Traceback" not in result.stderr
