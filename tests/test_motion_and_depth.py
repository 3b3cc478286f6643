"""The cues for velocity, heading and camera depth: strided LiDAR sweeps, per-sweep occupancy, heading from motion,
LiDAR depth targets for the camera, and the branch losses reaching the detector's loss."""
from __future__ import annotations

import math

import pytest
import torch

from fusion.branches.camera import CameraBranch
from fusion.branches.common import time_slice_occupancy
from fusion.branches.depth_supervision import NO_DEPTH, depth_loss, lidar_depth_targets
from fusion.datasets.collate import collate_samples
from fusion.datasets.sample_builder import SampleBuilder
from fusion.grid import BEVGrid
from fusion.heads.decode import align_heading_with_motion, attributes_from_motion, vru_headings_from_motion
from fusion.replay.policy import SyncPolicy
from fusion.types import LIDAR_NAME

from test_branches import GRID, IMAGE_SIZE, camera_to_ego, make_sample


def test_sweep_stride_selects_every_kth_previous_sweep():
    builder = SampleBuilder(lidar_sweeps=3, lidar_sweep_stride=3, cameras=(), radars=())
    previous = list(range(1, 13))  # newest first: 1 = 50 ms before the keyframe, 2 = 100 ms, ...
    assert builder.previous_sweeps_needed == 9
    assert builder.select_sweeps(previous) == [3, 6, 9]
    assert builder.select_sweeps(previous[:7]) == [3, 6]  # short history at the start of a drive: what exists
    assert SampleBuilder(lidar_sweeps=2, cameras=(), radars=()).select_sweeps(previous) == [1, 2]
    with pytest.raises(ValueError, match="lidar_sweep_stride"):
        SampleBuilder(lidar_sweep_stride=0)


def test_replay_buffers_enough_sweeps_for_the_stride():
    policy = SyncPolicy(lidar_sweeps=3, lidar_sweep_stride=3, max_pending_frames=2)
    assert policy.previous_sweeps_needed == 9
    assert policy.capacity(LIDAR_NAME) == 9 + 1 + 2
    with pytest.raises(ValueError, match="lidar_sweep_stride"):
        SyncPolicy(lidar_sweep_stride=0)


def test_time_slices_put_each_sweep_of_a_moving_object_in_its_own_channel():
    grid = BEVGrid(x_min=0.0, x_max=8.0, y_min=0.0, y_max=4.0, z_min=-2.0, z_max=2.0, cell_size=1.0)
    # An object moving +x at 10 m/s: 1.5 m further back in each older sweep (0.15 s apart); two points per sweep.
    lags = torch.tensor([0.0, 0.0, 0.15, 0.15, 0.30, 0.30])
    x = 6.5 - 10.0 * lags
    xyz = torch.stack([x, torch.full_like(x, 2.5), torch.zeros_like(x)], dim=1)
    occupancy = time_slice_occupancy(xyz, lags, torch.zeros(6, dtype=torch.long), 1, grid, 3, 0.15)
    assert occupancy.shape == (1, 3, 4, 8)
    expected_cols = [6, 5, 3]  # x = 6.5, 5.0, 3.5
    for k, col in enumerate(expected_cols):
        assert occupancy[0, k, 2, col] == pytest.approx(math.log1p(2))
        assert int((occupancy[0, k] > 0).sum()) == 1


def test_time_slices_leave_out_points_outside_the_grid_slices_or_finite_values():
    grid = BEVGrid(x_min=0.0, x_max=4.0, y_min=0.0, y_max=4.0, z_min=-2.0, z_max=2.0, cell_size=1.0)
    xyz = torch.tensor([[1.5, 1.5, 0.0], [9.0, 1.5, 0.0], [1.5, 1.5, 5.0], [1.5, 1.5, 0.0], [float("nan"), 1.0, 0.0],
                        [1.5, 1.5, 0.0]])
    lags = torch.tensor([0.0, 0.0, 0.0, 0.9, 0.0, float("nan")])
    occupancy = time_slice_occupancy(xyz, lags, torch.zeros(6, dtype=torch.long), 1, grid, 2, 0.15)
    assert occupancy.sum() == pytest.approx(math.log1p(1))  # only the first point counts
    empty = time_slice_occupancy(xyz[:0], lags[:0], torch.zeros(0, dtype=torch.long), 2, grid, 2, 0.15)
    assert empty.shape == (2, 2, 4, 4) and not empty.any()


def test_heading_follows_a_clear_motion_only():
    yaw = torch.tensor([0.0, 0.0, math.pi / 2, 0.0, 3.0])
    velocity = torch.tensor([[-5.0, 0.0], [5.0, 0.1], [0.0, -2.0], [-0.5, 0.0], [4.0, 0.5]])
    flipped = align_heading_with_motion(yaw, velocity, min_speed=1.0, mode="flip")
    assert flipped[0].abs() == pytest.approx(math.pi)       # drove backwards by its heading: turned
    assert flipped[1] == pytest.approx(0.0)                  # agrees: kept
    assert flipped[2] == pytest.approx(-math.pi / 2)         # turned to face its motion
    assert flipped[3] == pytest.approx(0.0)                  # too slow to tell: kept
    assert flipped[4] == pytest.approx(3.0 - math.pi)        # wrapped into (-pi, pi]
    direction = align_heading_with_motion(yaw, velocity, min_speed=1.0, mode="direction")
    assert direction[0].abs() == pytest.approx(math.pi)
    assert direction[1] == pytest.approx(math.atan2(0.1, 5.0))  # the direction of motion, not the regressed yaw
    assert direction[3] == pytest.approx(0.0)
    assert direction[4] == pytest.approx(math.atan2(0.5, 4.0))
    assert (direction.abs() <= math.pi + 1e-6).all()
    with pytest.raises(ValueError, match="mode"):
        align_heading_with_motion(yaw, velocity, 1.0, mode="average")


def test_pedestrians_and_two_wheelers_face_their_motion():
    """A walking pedestrian or a moving bicycle / motorcycle takes the direction of its motion, whatever the head's
    axis said (even 90 degrees off); a slower one, and any other class, keeps its yaw."""
    from fusion.types import DETECTION_CLASSES

    names = ["pedestrian", "bicycle", "motorcycle", "pedestrian", "car", "trailer"]
    labels = torch.tensor([DETECTION_CLASSES.index(name) for name in names])
    yaw = torch.tensor([math.pi / 2, 0.0, 3.0, 1.0, math.pi / 2, 0.0])
    velocity = torch.tensor([[1.2, 0.0], [0.0, -3.0], [-6.0, -0.1], [0.3, 0.2], [5.0, 0.0], [-8.0, 0.0]])
    result = vru_headings_from_motion(yaw, velocity, labels, min_speed=0.5)
    assert result[0] == pytest.approx(0.0)                      # walking along +x, the head said +y
    assert result[1] == pytest.approx(-math.pi / 2)
    assert result[2] == pytest.approx(math.atan2(-0.1, -6.0))
    assert result[3] == pytest.approx(1.0)                      # 0.36 m/s: too slow to tell, kept
    assert result[4] == pytest.approx(math.pi / 2) and result[5] == pytest.approx(0.0)  # vehicles: left alone


def test_attributes_state_the_measured_motion():
    """A box moving at least min_speed gets its class's moving attribute; slower boxes and classes without one
    (barrier, traffic cone) keep what the head said."""
    from fusion.types import ATTRIBUTES, DETECTION_CLASSES, NO_ATTRIBUTE

    names = ["car", "trailer", "motorcycle", "pedestrian", "barrier", "car", "pedestrian"]
    labels = torch.tensor([DETECTION_CLASSES.index(name) for name in names])
    head = ["vehicle.parked", "vehicle.stopped", "cycle.without_rider", "pedestrian.standing", None,
            "vehicle.parked", "pedestrian.sitting_lying_down"]
    attributes = torch.tensor([ATTRIBUTES.index(a) if a else NO_ATTRIBUTE for a in head])
    velocity = torch.tensor([[3.0, 0.0], [0.0, -8.0], [1.0, 0.0], [0.8, 0.8], [5.0, 0.0], [0.5, 0.0], [0.2, 0.0]])
    result = attributes_from_motion(labels, attributes, velocity, min_speed=1.0)
    named = [ATTRIBUTES[int(a)] if a != NO_ATTRIBUTE else None for a in result]
    assert named == ["vehicle.moving", "vehicle.moving", "cycle.with_rider", "pedestrian.moving", None,
                     "vehicle.parked", "pedestrian.sitting_lying_down"]


def _front_camera():
    cam_to_ego = camera_to_ego(0.0, position=(0.0, 0.0, 0.0))
    intrinsics = torch.tensor([[32.0, 0.0, 31.5], [0.0, 32.0, 15.5], [0.0, 0.0, 1.0]])
    return intrinsics, cam_to_ego


def test_lidar_depth_target_is_the_nearest_keyframe_point_in_each_feature_pixel():
    intrinsics, cam_to_ego = _front_camera()
    # Straight ahead on the optical axis at 10 m and 20 m (same pixel: the nearest wins), a sweep point at 5 m (not
    # the keyframe: ignored), and a point behind the camera.
    points = torch.tensor([[20.0, 0.0, 0.0, 1.0, 0.0], [10.0, 0.0, 0.0, 1.0, 0.0], [5.0, 0.0, 0.0, 1.0, 0.15],
                           [-10.0, 0.0, 0.0, 1.0, 0.0]])
    target = lidar_depth_targets(points, torch.zeros(4, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                                 intrinsics[None], cam_to_ego[None], IMAGE_SIZE, (4, 8), 1.0, 30.0, 29)
    assert target.shape == (1, 4, 8)
    row, col = int(15.5 * 4 / 32 + 0.5 * 4 / 32), int(31.5 * 8 / 64 + 0.5 * 8 / 64)  # the principal point's cell
    assert target[0, row, col] == 9  # 10 m falls in bin [10, 11) of 1 m bins from 1 m
    assert int((target != NO_DEPTH).sum()) == 1
    # The point belongs to sample 0: a camera of sample 1 gets no target from it.
    other = lidar_depth_targets(points, torch.zeros(4, dtype=torch.long), torch.ones(1, dtype=torch.long),
                                intrinsics[None], cam_to_ego[None], IMAGE_SIZE, (4, 8), 1.0, 30.0, 29)
    assert (other == NO_DEPTH).all()


def test_depth_loss_ignores_pixels_without_a_target_and_prefers_the_right_bin():
    target = torch.full((1, 2, 2), NO_DEPTH)
    target[0, 0, 0] = 3
    right = torch.zeros(1, 5, 2, 2)
    right[0, 3, 0, 0] = 10.0
    wrong = torch.zeros(1, 5, 2, 2)
    wrong[0, 1, 0, 0] = 10.0
    wrong[0, 3, 1, 1] = -50.0  # an unsupervised pixel changes nothing
    assert depth_loss(right, target) < 0.01 < depth_loss(wrong, target)
    nothing = torch.zeros(1, 5, 2, 2, requires_grad=True)
    loss = depth_loss(nothing, torch.full((1, 2, 2), NO_DEPTH))
    loss.backward()
    assert loss.item() == 0.0 and nothing.grad is not None


def test_camera_depth_loss_only_in_training_and_only_when_asked():
    batch = collate_samples([make_sample(1), make_sample(2)])
    torch.manual_seed(0)
    branch = CameraBranch(GRID, out_channels=8, backbone_widths=(8, 16, 16), backbone_blocks=(1, 1, 1),
                          feature_channels=16, context_channels=8, depth_min=1.0, depth_max=30.0, depth_bins=29,
                          bev_blocks=1, depth_loss_weight=0.5)
    bev, losses = branch.forward_with_losses(batch)
    assert set(losses) == {"camera_depth"} and losses["camera_depth"] > 0
    losses["camera_depth"].backward()
    assert branch.depth_net.weight.grad.abs().sum() > 0
    branch.eval()
    eval_bev, eval_losses = branch.forward_with_losses(batch)
    assert eval_losses == {} and torch.equal(eval_bev, branch(batch))
    plain = CameraBranch(GRID, out_channels=8, backbone_widths=(8, 16, 16), backbone_blocks=(1, 1, 1),
                         feature_channels=16, context_channels=8, depth_min=1.0, depth_max=30.0, depth_bins=29,
                         bev_blocks=1)
    assert plain.forward_with_losses(batch)[1] == {}
    with pytest.raises(ValueError, match="depth_loss_weight"):
        CameraBranch(GRID, depth_loss_weight=-1.0)


def test_supervision_modalities_stay_in_training_samples_only(tiny_dataroot):
    from fusion.datasets.datamodule import FusionDataModule
    data = FusionDataModule(str(tiny_dataroot.dataroot), tiny_dataroot.version, tiny_dataroot.train_split,
                            tiny_dataroot.val_split, grid=BEVGrid(cell_size=1.6), modalities=["camera"],
                            image_size=(32, 64), supervision_modalities=["lidar"], num_workers=0)
    train = data.make_dataset(tiny_dataroot.train_split, train=True)[0]
    val = data.make_dataset(tiny_dataroot.val_split, train=False)[0]
    assert train.lidar is not None and train.lidar.shape[0] > 0 and train.cameras is not None
    assert val.lidar is None and val.cameras is not None
    with pytest.raises(ValueError, match="supervision_modalities"):
        FusionDataModule(str(tiny_dataroot.dataroot), modalities=["camera"], supervision_modalities=["sonar"])
