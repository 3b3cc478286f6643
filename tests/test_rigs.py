"""Articulated rigs share one velocity (fusion.heads.rigs, used by fusion.heads.point_motion)."""
from __future__ import annotations

import math

import numpy as np
import torch

from fusion.heads.point_motion import PointMotionSettings, measure_velocities
from fusion.heads.rigs import rig_partners, share_rig_velocities
from fusion.types import DETECTION_CLASSES, Boxes

TRAILER, TRUCK, CAR = (DETECTION_CLASSES.index(name) for name in ("trailer", "truck", "car"))


def boxes_of(rows) -> Boxes:
    """rows of (label, x, y, length, yaw): boxes 2.5 m wide, 3.5 m high, 0 m/s."""
    n = len(rows)
    label, x, y, length, yaw = (torch.tensor(column, dtype=torch.float32) for column in zip(*rows))
    center = torch.stack([x, y, torch.full((n,), 1.75)], 1)
    size = torch.stack([length, torch.full((n,), 2.5), torch.full((n,), 3.5)], 1)
    return Boxes(center=center, size=size, yaw=yaw, velocity=torch.zeros(n, 2), labels=label.long(),
                 attributes=torch.full((n,), -1), scores=torch.ones(n), num_lidar_pts=torch.full((n,), -1),
                 num_radar_pts=torch.full((n,), -1))


def rig(yaw: float, gap: float = 0.6, across: float = 0.0, tractor_turn: float = 0.0, tractor=TRUCK):
    """A 10 m trailer at (20, 5) heading `yaw` and a 7 m tractor ahead of it, `gap` meters between them."""
    ahead = (10.0 + 7.0) / 2 + gap
    cos, sin = math.cos(yaw), math.sin(yaw)
    x, y = 20.0 + ahead * cos - across * sin, 5.0 + ahead * sin + across * cos
    return [(TRAILER, 20.0, 5.0, 10.0, yaw), (tractor, x, y, 7.0, yaw + tractor_turn)]


def test_a_trailer_and_the_truck_ahead_of_it_are_one_rig_at_any_heading():
    for yaw in (0.0, 0.9, -2.4):
        assert rig_partners(boxes_of(rig(yaw))).tolist() == [1, -1]
        # the detector's front / back does not matter; a detected box's ends are not exact
        assert rig_partners(boxes_of(rig(yaw, tractor_turn=math.pi))).tolist() == [1, -1]
        assert rig_partners(boxes_of(rig(yaw, gap=-1.0))).tolist() == [1, -1]


def test_boxes_that_are_not_end_to_end_or_not_a_truck_are_not_a_rig():
    for layout in (rig(0.3, gap=4.0), rig(0.3, across=2.0), rig(0.3, tractor_turn=0.8), rig(0.3, tractor=CAR)):
        assert rig_partners(boxes_of(layout)).tolist() == [-1, -1]
    assert rig_partners(boxes_of([(TRUCK, 0.0, 0.0, 7.0, 0.0)])).tolist() == [-1]


def test_the_nearest_truck_is_the_partner():
    layout = rig(0.0) + [(TRUCK, 20.0 - 8.5 - 1.5, 5.0, 7.0, 0.0)]  # a second truck behind, 1.5 m away
    assert rig_partners(boxes_of(layout)).tolist() == [1, -1, -1]


def test_both_halves_take_the_better_measurement():
    boxes = boxes_of(rig(0.0) + [(TRUCK, -30.0, -30.0, 7.0, 0.0)])
    velocity = np.array([[9.0, 0.1], [0.0, 0.0], [3.0, 0.0]])
    shared, sigma = share_rig_velocities(boxes, velocity, np.array([0.3, np.inf, np.inf]))
    np.testing.assert_allclose(shared, [[9.0, 0.1], [9.0, 0.1], [3.0, 0.0]])
    np.testing.assert_allclose(sigma, [0.3, 0.3, np.inf])
    shared, sigma = share_rig_velocities(boxes, velocity, np.array([1.0, 0.4, 0.4]))
    np.testing.assert_allclose(shared[0], [0.0, 0.0])  # the tractor was measured better
    unmeasured, _ = share_rig_velocities(boxes, velocity, np.full(3, np.inf))
    np.testing.assert_allclose(unmeasured, velocity)


def test_point_motion_gives_a_hidden_tractor_its_trailers_velocity():
    """A trailer at 9 m/s seen from behind (its back and side), its tractor hidden behind it (no points): with rigs
    the tractor moves with the trailer; without, it keeps the head's 0 m/s."""
    rng = np.random.default_rng(0)
    boxes = boxes_of(rig(0.0))
    rows = []
    for lag in (0.0, 0.15, 0.30, 0.45):
        along = np.arange(-5.0 + rng.uniform(0, 0.1), 5.0, 0.1)
        side = np.stack([20.0 + along, np.full_like(along, 5.0 - 1.25)], 1)
        across = np.arange(-1.25, 1.25, 0.1)
        back = np.stack([np.full_like(across, 15.0), 5.0 + across], 1)
        for height in (1.0, 2.0, 3.0):
            xy = np.concatenate([side, back]) - np.array([9.0, 0.0]) * lag
            xy = xy + rng.normal(0, 0.02, xy.shape)
            rows.append(np.column_stack([xy, np.full(len(xy), height), np.ones(len(xy)), np.full(len(xy), lag)]))
    lidar = torch.from_numpy(np.concatenate(rows)).float()
    measured = measure_velocities(boxes, lidar, None)
    np.testing.assert_allclose(measured.velocity, [[9.0, 0.0], [9.0, 0.0]], atol=0.5)
    alone = measure_velocities(boxes, lidar, None, PointMotionSettings(rig_max_gap_m=0.0))
    np.testing.assert_allclose(alone.velocity[1], [0.0, 0.0], atol=1e-6)
