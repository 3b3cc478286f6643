"""Velocities measured from LiDAR time lags and radar Doppler (fusion.heads.point_motion)."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings as hypothesis_settings, strategies as st

from fusion.grid import BEVGrid
from fusion.heads.finish import finish_boxes
from fusion.heads.point_motion import PointMotionSettings, measure_velocities, point_motion_settings
from fusion.types import Boxes

LAGS = (0.0, 0.15, 0.30, 0.45)  # the main job's sweeps, seconds


def make_boxes(centers, sizes, yaws, velocities) -> Boxes:
    n = len(centers)
    return Boxes(center=torch.tensor(centers, dtype=torch.float32), size=torch.tensor(sizes, dtype=torch.float32),
                 yaw=torch.tensor(yaws, dtype=torch.float32), velocity=torch.tensor(velocities, dtype=torch.float32),
                 labels=torch.zeros(n, dtype=torch.int64), attributes=torch.full((n,), -1, dtype=torch.int64),
                 scores=torch.ones(n), num_lidar_pts=torch.full((n,), -1), num_radar_pts=torch.full((n,), -1))


def surface_points(rng, center, size, yaw, velocity, spacing=0.1, lags=LAGS) -> np.ndarray:
    """LiDAR rows (x, y, z, intensity, time_lag) on the two sides of a box that face the ego origin, as a spinning
    LiDAR's rings sample them (three rings, a point every `spacing` meters, the phase shifting from sweep to sweep,
    2 cm noise), for a box moving at `velocity` (m/s): a sweep of lag t sees it where it was t seconds ago."""
    length, width, height = size
    cos, sin = math.cos(yaw), math.sin(yaw)
    to_ego = np.array([[cos, -sin], [sin, cos]])
    toward_ego = to_ego.T @ -np.asarray(center[:2])  # the ego's direction in the box frame
    side_x = math.copysign(length / 2, toward_ego[0])  # the visible end
    side_y = math.copysign(width / 2, toward_ego[1])  # the visible side
    rows = []
    for lag in lags:
        phase = rng.uniform(0, spacing)
        along = np.arange(-length / 2 + phase, length / 2, spacing)
        across = np.arange(-width / 2 + phase, width / 2, spacing)
        outline = np.concatenate([np.stack([along, np.full_like(along, side_y)], 1),
                                  np.stack([np.full_like(across, side_x), across], 1)])
        for ring_height in (0.3, 0.55, 0.8):
            xy = outline @ to_ego.T + np.asarray(center[:2]) - np.asarray(velocity) * lag
            xy = xy + rng.normal(0, 0.02, xy.shape)
            z = np.full(len(xy), center[2] - height / 2 + ring_height * height)
            rows.append(np.column_stack([xy, z, np.full(len(xy), 10.0), np.full(len(xy), lag)]))
    return np.concatenate(rows)


def ground_points(rng, n=3000, z=0.0) -> np.ndarray:
    lag = rng.choice(LAGS, n)
    return np.stack([rng.uniform(-30, 30, n), rng.uniform(-30, 30, n), np.full(n, z), np.ones(n), lag], 1)


def cloud(*parts) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(parts)).float()


def test_moving_and_static_boxes_measured_from_the_sweeps():
    rng = np.random.default_rng(0)
    car = ([10.0, 5.0, 0.9], [4.5, 1.9, 1.7], 0.4, [6.0, 2.5])
    parked = ([10.0, -4.0, 0.9], [4.5, 1.9, 1.7], 0.0, [0.0, 0.0])
    lidar = cloud(surface_points(rng, *car), surface_points(rng, *parked), ground_points(rng))
    # the head said 0 m/s for the moving car and 1 m/s for the parked one
    boxes = make_boxes([car[0], parked[0]], [car[1], parked[1]], [car[2], parked[2]], [[0, 0], [1.0, 0.0]])
    measured = measure_velocities(boxes, lidar, None)
    assert measured.lidar_fit.tolist() == [True, True]
    np.testing.assert_allclose(measured.velocity[0], car[3], atol=0.3)
    assert np.linalg.norm(measured.velocity[1]) < 0.3
    newest = [len(surface_points(rng, *b, lags=(0.0,))) for b in (car, parked)]
    assert measured.lidar_points.tolist() == newest  # the newest sweep's points of the box, none of the ground


def test_a_long_vehicle_moving_along_its_axis_is_not_taken_as_still():
    """An 11 m trailer at 11 m/s along its axis, seen broadside (its long side only), head velocity 0: after the first
    0.15 s it still overlaps itself by 85 % at zero displacement (a sweep-by-sweep still decision held it still),
    but over all three sweeps the motion wins. A parked trailer beside it stays still."""
    rng = np.random.default_rng(3)
    moving = ([-20.0, 8.0, 1.8], [11.0, 2.5, 3.5], 0.0, [11.0, 0.0])
    parked = ([-20.0, -6.0, 1.8], [11.0, 2.5, 3.5], 0.0, [0.0, 0.0])

    def side_only(points, box):  # broadside: the end faces are not seen, only the long side
        center, size, _, velocity = box
        along = points[:, 0] + velocity[0] * points[:, 4] - center[0]  # box frame at each sweep (yaw 0)
        return points[np.abs(along) < size[0] / 2 - 0.05]

    lidar = cloud(side_only(surface_points(rng, *moving), moving), side_only(surface_points(rng, *parked), parked),
                  ground_points(rng))
    boxes = make_boxes([moving[0], parked[0]], [moving[1], parked[1]], [0.0, 0.0], [[0.0, 0.0], [0.0, 0.0]])
    measured = measure_velocities(boxes, lidar, None)
    assert measured.lidar_fit.tolist() == [True, True]
    np.testing.assert_allclose(measured.velocity[0], moving[3], atol=0.5)
    assert np.linalg.norm(measured.velocity[1]) < 0.3


@hypothesis_settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(speed=st.floats(0, 15), direction=st.floats(-math.pi, math.pi), yaw=st.floats(-math.pi, math.pi),
       seed=st.integers(0, 2 ** 16))
def test_any_planar_velocity_is_recovered_from_a_zero_start(speed, direction, yaw, seed):
    """Any speed up to 15 m/s in any direction: the first older sweep (0.15 s) then lies within search_m (2.4 m)
    of a zero start. (Faster objects are beyond the first search; 19 m/s failed, as it should.) An object slower
    than 1 m/s may be taken as standing still (0.75 m/s moves a 4.8 m box by 0.34 m in 0.45 s, and zero
    displacement keeps over 80 % of the votes: the still preference that keeps parked cars at 0)."""
    vx, vy = speed * math.cos(direction), speed * math.sin(direction)
    rng = np.random.default_rng(seed)
    box = ([-20.0, 12.0, 1.0], [4.8, 2.0, 1.6], yaw, [vx, vy])
    lidar = cloud(surface_points(rng, *box), ground_points(rng, 500))
    measured = measure_velocities(make_boxes([box[0]], [box[1]], [yaw], [[0.0, 0.0]]), lidar, None)
    assert measured.lidar_fit[0]
    if speed < 1.0 and not measured.velocity[0].any():
        return  # taken as standing still
    np.testing.assert_allclose(measured.velocity[0], [vx, vy], atol=0.5)


@pytest.mark.parametrize("yaw", [0.0, 1.571, 2.5])
def test_the_joint_search_measures_what_the_sweep_by_sweep_fit_cannot(yaw):
    """A car at 19 m/s along its heading, head velocity 0: the first older sweep (0.15 s) lies 2.85 m back, beyond
    the sweep-by-sweep search (2.4 m per axis), so that fit finds nothing and, without the joint search, the head's 0 is
    kept. Scoring every velocity against all sweeps at once recovers it. A parked car beside it stays still."""
    rng = np.random.default_rng(5)
    velocity = [19.0 * math.cos(yaw), 19.0 * math.sin(yaw)]
    car = ([-15.0, 10.0, 0.9], [4.6, 1.9, 1.6], yaw, velocity)
    parked = ([12.0, -8.0, 0.9], [4.6, 1.9, 1.6], yaw, [0.0, 0.0])
    lidar = cloud(surface_points(rng, *car), surface_points(rng, *parked), ground_points(rng))
    boxes = make_boxes([car[0], parked[0]], [car[1], parked[1]], [yaw, yaw], [[0.0, 0.0], [0.0, 0.0]])
    without = measure_velocities(boxes, lidar, None, PointMotionSettings(joint_max_speed=0.0))
    assert not without.lidar_fit[0] and not without.velocity[0].any()
    measured = measure_velocities(boxes, lidar, None)
    assert measured.lidar_fit.tolist() == [True, True]
    np.testing.assert_allclose(measured.velocity[0], velocity, atol=1.0)
    assert np.linalg.norm(measured.velocity[1]) < 0.3


def test_the_joint_search_leaves_classes_without_velocity_alone_and_finds_still_objects():
    """Barriers and traffic cones have no velocity in nuScenes: the joint search does not spend time on them (the
    same fast points labelled barrier keep the head's velocity). A box whose points stand still is found still by
    the joint search alone (called directly)."""
    from fusion.heads.point_motion import _joint_fit
    from fusion.types import DETECTION_CLASSES
    rng = np.random.default_rng(6)
    car = ([-15.0, 10.0, 0.9], [4.6, 1.9, 1.6], 0.0, [18.0, 0.0])
    lidar = cloud(surface_points(rng, *car), ground_points(rng))
    boxes = make_boxes([car[0]], [car[1]], [0.0], [[0.0, 0.0]])
    barrier = replace(boxes, labels=torch.tensor([DETECTION_CLASSES.index("barrier")]))
    assert not measure_velocities(barrier, lidar, None).lidar_fit[0]
    still = cloud(surface_points(rng, car[0], car[1], 0.0, [0.0, 0.0]))
    velocity, found = _joint_fit(boxes, still.double().numpy()[:, [0, 1, 2, 4]], np.array([True]),
                                 PointMotionSettings())
    assert found[0] and not velocity[0].any()


def test_unsupported_fit_keeps_the_heads_velocity():
    rng = np.random.default_rng(1)
    box = ([5.0, 5.0, 0.9], [4.0, 1.8, 1.5], 0.0, [3.0, 0.0])
    single_sweep = cloud(surface_points(rng, *box, lags=(0.0,)))  # no time span
    few = cloud(surface_points(rng, *box)[::200])  # a point or two per sweep: fewer than min_points
    head = [[1.5, -0.5]]
    for lidar in (single_sweep, few, torch.zeros(0, 5), None):
        measured = measure_velocities(make_boxes([box[0]], [box[1]], [0.0], head), lidar, None)
        assert not measured.lidar_fit[0]
        np.testing.assert_allclose(measured.velocity[0], head[0], atol=1e-6)


def test_non_finite_points_are_ignored():
    rng = np.random.default_rng(2)
    box = ([8.0, 0.0, 0.9], [4.0, 1.8, 1.5], 0.0, [4.0, 0.0])
    points = surface_points(rng, *box)
    points[::7, 0] = np.nan
    points[1::7, 4] = np.inf
    measured = measure_velocities(make_boxes([box[0]], [box[1]], [0.0], [[0.0, 0.0]]), cloud(points), None)
    assert np.isfinite(measured.velocity).all()
    np.testing.assert_allclose(measured.velocity[0], box[3], atol=0.3)


def radar_returns(points_xy, velocity, lag=0.0) -> torch.Tensor:
    """[R, 8] radar rows (x, y, z, rcs, vx_comp, vy_comp, dyn_prop, time_lag) of an object moving at `velocity`:
    the compensated velocity is its radial component along the line of sight from the ego origin."""
    xy = np.asarray(points_xy, dtype=np.float64)
    sight = xy / np.linalg.norm(xy, axis=1, keepdims=True)
    radial = sight @ np.asarray(velocity)
    rows = np.zeros((len(xy), 8))
    rows[:, :2], rows[:, 2], rows[:, 3] = xy, 0.5, 5.0
    rows[:, 4:6] = radial[:, None] * sight
    rows[:, 7] = lag
    return torch.from_numpy(rows).float()


def test_radar_corrects_the_radial_component_only():
    # a car straight ahead moving away at 8 m/s and sideways at 3 m/s; no LiDAR, the head said 0
    box = make_boxes([[30.0, 0.0, 0.9]], [[4.5, 1.9, 1.7]], [0.0], [[0.0, 0.0]])
    radar = radar_returns([[28.0, 0.3], [28.5, -0.4], [29.0, 0.1]], [8.0, 3.0])
    measured = measure_velocities(box, None, radar)
    assert measured.radar_returns[0] == 3
    assert measured.velocity[0, 0] == pytest.approx(8.0, abs=0.3)  # radial: measured
    assert abs(measured.velocity[0, 1]) < 0.5  # tangential: radar cannot tell, the head's 0 stays


def test_radar_clutter_that_contradicts_the_lidar_is_left_out():
    rng = np.random.default_rng(3)
    car = ([30.0, 0.0, 0.9], [4.5, 1.9, 1.7], 0.0, [8.0, 0.0])
    lidar = cloud(surface_points(rng, *car))
    radar = radar_returns([[28.0, 0.3], [28.5, -0.4]], [-20.0, 0.0])  # 20 m/s towards the ego: clutter
    measured = measure_velocities(make_boxes([car[0]], [car[1]], [0.0], [[0.0, 0.0]]), lidar, radar)
    assert measured.radar_returns[0] == 0
    np.testing.assert_allclose(measured.velocity[0], car[3], atol=0.3)


def test_no_boxes_and_settings_errors():
    empty = make_boxes(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros((0, 2)))
    measured = measure_velocities(empty, torch.zeros(0, 5), torch.zeros(0, 8))
    assert measured.velocity.shape == (0, 2)
    assert point_motion_settings(None) is None
    assert point_motion_settings({}) == PointMotionSettings()
    with pytest.raises(ValueError, match="unknown field.*'margin'"):
        point_motion_settings({"margin": 1.0})
    with pytest.raises(ValueError, match="margin_m"):
        PointMotionSettings(margin_m=-1.0)
    with pytest.raises(ValueError, match="radar_sigma"):
        PointMotionSettings(radar_sigma=0.0)
    with pytest.raises(ValueError, match="joint_speed_bin"):
        PointMotionSettings(joint_speed_bin=0.0)
    with pytest.raises(ValueError, match="joint_sigma"):
        PointMotionSettings(joint_sigma=0.0)
    with pytest.raises(ValueError, match="joint_candidate_points"):
        PointMotionSettings(joint_candidate_points=0)


class _Batch:
    """The fields of fusion.types.Batch that finish_boxes reads for the motion."""

    def __init__(self, lidar: torch.Tensor, present_lidar: bool):
        self.lidar_points, self.lidar_batch = lidar, torch.zeros(len(lidar), dtype=torch.int64)
        self.radar_points, self.radar_batch = torch.zeros(0, 8), torch.zeros(0, dtype=torch.int64)
        self.present = {"lidar": torch.tensor([present_lidar]), "radar": torch.tensor([True])}


def test_finish_boxes_uses_only_present_sensors_then_turns_headings_to_the_motion():
    rng = np.random.default_rng(4)
    car = ([10.0, 5.0, 0.9], [4.5, 1.9, 1.7], 0.0, [-6.0, 0.0])  # drives towards -x
    lidar = cloud(surface_points(rng, *car))
    boxes = make_boxes([car[0]], [car[1]], [0.0], [[0.0, 0.0]])  # heading +x, head velocity 0
    finished = finish_boxes([boxes], _Batch(lidar, True), BEVGrid(), PointMotionSettings(), heading_from_motion=1.0)[0]
    np.testing.assert_allclose(finished.velocity[0].numpy(), car[3], atol=0.3)
    assert abs(abs(float(finished.yaw[0])) - math.pi) < 1e-5  # turned to face its motion
    unused = finish_boxes([boxes], _Batch(lidar, False), BEVGrid(), PointMotionSettings(), heading_from_motion=1.0)[0]
    assert unused.velocity.abs().max() == 0 and float(unused.yaw[0]) == 0.0  # LiDAR marked absent: not read


def test_the_model_measures_velocities_after_decoding(tiny):
    """FusionDetector.predict with point_motion = the head's boxes, then finish_boxes on the same batch; the
    setting travels into the ONNX export's decoding settings."""
    from dataclasses import asdict

    from fusion.datasets.collate import collate_samples
    from fusion.deploy.export import export_spec
    from fusion.deploy.spec import ExportSpec

    model, data = tiny
    data.setup("validate")
    batch = collate_samples([data.datasets["val"][0]])
    names = ("point_motion", "heading_from_motion", "map_heading", "attribute_from_motion", "vru_heading_from_motion")
    saved = {name: model.hparams.get(name) for name in names}
    try:
        model.hparams.update(point_motion=None, heading_from_motion=None, map_heading=None, attribute_from_motion=None,
                             vru_heading_from_motion=None)
        head_only, _ = model.predict(batch, score_threshold=0.0)
        model.hparams.update(point_motion=asdict(PointMotionSettings()), heading_from_motion=1.0)
        measured, _ = model.predict(batch, score_threshold=0.0)
        spec = ExportSpec.from_json(export_spec(model, (96, 256)).to_json())
    finally:
        model.hparams.update(saved)
    expected = finish_boxes(head_only, batch, model.grid, PointMotionSettings(), 1.0)
    assert len(measured[0]) == len(head_only[0]) > 0
    torch.testing.assert_close(measured[0].center, head_only[0].center)
    torch.testing.assert_close(measured[0].velocity, expected[0].velocity)
    torch.testing.assert_close(measured[0].yaw, expected[0].yaw)
    assert point_motion_settings(spec.decode.point_motion) == PointMotionSettings()


@pytest.mark.real_data
def test_real_scene_0061_frame_single_sweep_keeps_the_heads_velocity():
    """On the real nuScenes keyframe (one LiDAR sweep, no radar rows) there is no time span to measure motion
    over: every box keeps the head's velocity, and nothing breaks on real point clouds."""
    import real_frame  # tests/real_frame.py

    root = real_frame.real_data_root()
    if root is None:
        pytest.skip("real nuScenes files not found: set NUSCENES_REAL or provide ../shared/nuscenes-real")
    sample = real_frame.load_real_frame(root)
    head = torch.full_like(sample.boxes.velocity, 1.5)
    boxes = replace(sample.boxes, velocity=head)
    measured = measure_velocities(boxes, sample.lidar, sample.radar)
    assert len(boxes) > 50 and not measured.lidar_fit.any()
    np.testing.assert_allclose(measured.velocity, head.numpy(), atol=1e-6)
