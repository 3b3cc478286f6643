"""Core types: geometry against pyquaternion (what the devkit uses), the BEV grid, Boxes, collate."""
import math

import numpy as np
import pytest
import torch
from pyquaternion import Quaternion

from fusion import geometry
from fusion.datasets.collate import collate_samples
from fusion.grid import BEVGrid
from fusion.types import CAMERA_NAMES, Boxes, CameraImages, EgoState, Sample


def random_quaternion(rng):
    q = rng.normal(size=4)
    return q / np.linalg.norm(q)


def test_quaternion_matrix_matches_pyquaternion_and_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(200):
        q = random_quaternion(rng)
        matrix = geometry.quaternion_to_matrix(q)
        np.testing.assert_allclose(matrix, Quaternion(q).rotation_matrix, atol=1e-12)
        back = geometry.matrix_to_quaternion(matrix)
        assert back[0] >= 0
        np.testing.assert_allclose(geometry.quaternion_to_matrix(back), matrix, atol=1e-12)
    # Near-180-degree rotations exercise every branch of Shepperd's method.
    for axis in np.eye(3):
        q = np.concatenate([[1e-9], axis])
        np.testing.assert_allclose(geometry.quaternion_to_matrix(geometry.matrix_to_quaternion(
            geometry.quaternion_to_matrix(q))), geometry.quaternion_to_matrix(q), atol=1e-9)


def test_bad_quaternion_is_rejected():
    with pytest.raises(ValueError, match="zero or not finite"):
        geometry.quaternion_to_matrix([0, 0, 0, 0])
    with pytest.raises(ValueError):
        geometry.quaternion_to_matrix([np.nan, 0, 0, 1])


def test_transforms_compose_invert_and_match_devkit_convention():
    rng = np.random.default_rng(1)
    q, t = random_quaternion(rng), rng.normal(size=3) * 10
    pose = geometry.make_transform(q, t)
    # The devkit's transform_matrix(translation, rotation) is the same matrix.
    from nuscenes.utils.geometry_utils import transform_matrix
    np.testing.assert_allclose(pose, transform_matrix(t, Quaternion(q)), atol=1e-12)
    np.testing.assert_allclose(geometry.invert_transform(pose), np.linalg.inv(pose), atol=1e-12)
    points = rng.normal(size=(50, 3)).astype(np.float32)
    moved = geometry.transform_points(pose, points)
    assert moved.dtype == np.float32
    np.testing.assert_allclose(geometry.transform_points(geometry.invert_transform(pose), moved), points, atol=1e-5)


def test_yaw_helpers():
    for yaw in np.linspace(-3.1, 3.1, 13):
        q = geometry.yaw_to_quaternion(yaw)
        assert math.isclose(Quaternion(q).yaw_pitch_roll[0], yaw, abs_tol=1e-12)
        assert math.isclose(float(geometry.yaw_of_matrix(geometry.rotation_z(yaw))), yaw, abs_tol=1e-12)
    assert np.allclose(geometry.wrap_angle([np.pi, -np.pi, 3 * np.pi, 0.5]), [-np.pi, -np.pi, -np.pi, 0.5])


def test_interpolate_pose_endpoints_and_midpoint():
    a = geometry.make_transform(geometry.yaw_to_quaternion(0.0), [0, 0, 0])
    b = geometry.make_transform(geometry.yaw_to_quaternion(1.0), [10, 2, 0])
    np.testing.assert_allclose(geometry.interpolate_pose(a, 0, b, 10, 0), a, atol=1e-12)
    np.testing.assert_allclose(geometry.interpolate_pose(a, 0, b, 10, 10), b, atol=1e-12)
    mid = geometry.interpolate_pose(a, 0, b, 10, 5)
    assert math.isclose(float(geometry.yaw_of_matrix(mid[:3, :3])), 0.5, abs_tol=1e-12)
    np.testing.assert_allclose(mid[:3, 3], [5, 1, 0], atol=1e-12)


def test_grid_shape_cells_and_centers():
    grid = BEVGrid(x_min=-10, x_max=20, y_min=-5, y_max=5, cell_size=0.5)
    assert grid.shape == (20, 60)
    xy = torch.tensor([[-10.0, -5.0], [19.99, 4.99], [0.26, 0.0], [20.0, 0.0], [float("nan"), 0.0]])
    row, col, inside = grid.cell_index(xy)
    assert inside.tolist() == [True, True, True, False, False]
    assert (row[:3].tolist(), col[:3].tolist()) == ([0, 19, 10], [0, 59, 20])
    centers = grid.cell_centers()
    assert centers.shape == (20, 60, 2)
    assert torch.allclose(centers[10, 20], torch.tensor([0.25, 0.25]))
    # Every cell center maps back to its own cell, and grid_sample coordinates hit the pixel centers.
    row, col, inside = grid.cell_index(centers)
    assert inside.all()
    assert torch.equal(row, torch.arange(20)[:, None].expand(20, 60))
    assert torch.equal(col, torch.arange(60)[None].expand(20, 60))
    values = torch.arange(20 * 60, dtype=torch.float32).reshape(1, 1, 20, 60)
    sampled = torch.nn.functional.grid_sample(values, grid.to_normalized(centers)[None], align_corners=False)
    assert torch.allclose(sampled, values, atol=1e-3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cell_size=0.0), "cell_size must be positive"),
    (dict(x_min=5.0, x_max=-5.0), "x_min"),
    (dict(z_min=3.0, z_max=-3.0), "z_min"),
    (dict(x_min=-1.0, x_max=1.05, cell_size=0.1), "whole number"),
    (dict(x_min=-1e6, x_max=1e6, y_min=-1e6, y_max=1e6, cell_size=1.0), "int32"),
    (dict(cell_size=float("nan")), "finite"),
])
def test_grid_rejects_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BEVGrid(**kwargs)


def make_boxes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Boxes(center=torch.randn(n, 3, generator=g) * 10, size=torch.rand(n, 3, generator=g) + 0.5,
                 yaw=torch.rand(n, generator=g) * 6 - 3, velocity=torch.randn(n, 2, generator=g),
                 labels=torch.randint(0, 10, (n,), generator=g), attributes=torch.full((n,), -1),
                 scores=torch.ones(n), num_lidar_pts=torch.full((n,), 5), num_radar_pts=torch.zeros(n, dtype=torch.long))


def test_boxes_corners_match_devkit_box_corners():
    from nuscenes.utils.data_classes import Box
    boxes = make_boxes(5)
    corners = boxes.corners()
    for i in range(5):
        length, width, height = boxes.size[i].tolist()
        box = Box(boxes.center[i].tolist(), [width, length, height], Quaternion(axis=[0, 0, 1], angle=float(boxes.yaw[i])))
        expected = np.sort(box.corners().T.round(4), axis=0)
        np.testing.assert_allclose(np.sort(corners[i].numpy().round(4), axis=0), expected, atol=1e-3)


def test_boxes_validate_shapes_select_and_cat():
    boxes = make_boxes(4)
    assert len(Boxes.cat([boxes, boxes.select(torch.tensor([True, False, True, False]))])) == 6
    assert len(Boxes.empty()) == 0
    with pytest.raises(ValueError, match="Boxes.yaw"):
        Boxes(**{**boxes.__dict__, "yaw": torch.zeros(3)})


def make_sample(token, n_points, with_cameras=True, with_radar=True):
    g = torch.Generator().manual_seed(len(token))
    cameras = CameraImages(images=torch.zeros(6, 3, 8, 16, dtype=torch.uint8), intrinsics=torch.eye(3).repeat(6, 1, 1),
                           cam_to_ego=torch.eye(4).repeat(6, 1, 1), valid=torch.ones(6, dtype=torch.bool),
                           time_offsets=torch.zeros(6)) if with_cameras else None
    ego = EgoState(ego_to_global=torch.eye(4, dtype=torch.float64), speed=torch.tensor(3.0),
                   yaw_rate=torch.tensor(float("nan")), acceleration=torch.zeros(3), can_valid=torch.tensor(False))
    return Sample(token=token, scene_name="scene-0001", timestamp_us=1000, lidar=torch.randn(n_points, 5, generator=g),
                  radar=torch.randn(2, 8, generator=g) if with_radar else None, cameras=cameras, ego=ego,
                  map_raster=torch.ones(1, 4, 4), boxes=make_boxes(3))


def test_collate_concatenates_points_with_batch_index_and_masks_absent_sensors():
    samples = [make_sample("a", 5), make_sample("bb", 0, with_cameras=False, with_radar=False), make_sample("ccc", 7)]
    batch = collate_samples(samples)
    assert batch.batch_size == 3
    assert batch.lidar_points.shape == (12, 5)
    assert batch.lidar_batch.tolist() == [0] * 5 + [2] * 7
    assert batch.radar_batch.tolist() == [0, 0, 2, 2]
    assert batch.present["camera"].tolist() == [True, False, True]
    assert batch.present["radar"].tolist() == [True, False, True]
    assert batch.present["lidar"].tolist() == [True, True, True]
    assert batch.cameras.images.shape == (3, 6, 3, 8, 16)
    assert batch.cameras.valid[1].sum() == 0
    assert batch.cameras.names == CAMERA_NAMES
    # Invalid CAN state is NaN in the sample and zero (with can_valid False) in the model's vector.
    assert torch.isnan(batch.ego.yaw_rate).all() and not batch.ego.can_valid.any()
    assert torch.equal(batch.ego.vector(), torch.zeros(3, 5))
    assert batch.without("lidar").present["lidar"].sum() == 0
    with pytest.raises(ValueError, match="unknown modality"):
        batch.without("sonar")
    with pytest.raises(ValueError, match="at least one sample"):
        collate_samples([])
