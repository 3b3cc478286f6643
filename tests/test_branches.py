"""The four BEV branches: shapes on the grid, gradients, empty/invalid inputs, determinism, geometry."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import spconv.pytorch as spconv
import torch

from fusion.branches.camera import CameraBranch
from fusion.branches.common import PillarEncoder
from fusion.branches.gps import GpsBranch
from fusion.branches.lidar import LidarBranch, LidarPillarBranch, _normalised_lidar_features
from fusion.branches.radar import RadarBranch
from fusion.datasets.collate import collate_samples
from fusion.datasets.gps_noise import perturb_gps
from fusion.grid import BEVGrid
from fusion.temporal import TemporalAligner
from fusion.types import CAMERA_NAMES, Boxes, CameraImages, EgoState, Sample

# A small non-square grid: 32 columns (x) by 24 rows (y), 0.8 m cells.
GRID = BEVGrid(x_min=-12.8, x_max=12.8, y_min=-9.6, y_max=9.6, z_min=-5.0, z_max=3.0, cell_size=0.8)
IMAGE_SIZE = (32, 64)  # H, W

# Camera axes (x right, y down, z forward) expressed in the ego frame (x forward, y left, z up) for a camera
# looking along +x: columns are the camera x, y, z axes.
CAMERA_FORWARD = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
CAMERA_YAWS_DEG = (0.0, -55.0, 55.0, 180.0, 110.0, -110.0)


def camera_to_ego(yaw_deg: float, position=(1.0, 0.0, 1.5)) -> torch.Tensor:
    yaw = math.radians(yaw_deg)
    rotation_z = np.array([[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0], [0, 0, 1.0]])
    pose = np.eye(4)
    pose[:3, :3] = rotation_z @ CAMERA_FORWARD
    pose[:3, 3] = position
    return torch.tensor(pose, dtype=torch.float32)


def make_sample(seed: int, grid: BEVGrid = GRID, num_lidar: int | None = 400, num_radar: int | None = 40,
                cameras: bool | list[bool] = True, map_raster: bool = True, can_valid: bool = True) -> Sample:
    """A random but well-formed Sample: points mostly inside the grid (some outside), six outward cameras, a map."""
    g = torch.Generator().manual_seed(seed)
    span = torch.tensor([grid.x_max - grid.x_min, grid.y_max - grid.y_min, 4.0])
    low = torch.tensor([grid.x_min, grid.y_min, -2.0])

    def positions(n):  # 10 % fall outside the grid's x/y extent
        return low - 0.05 * span + torch.rand(n, 3, generator=g) * span * 1.1

    lidar = None
    if num_lidar is not None:
        lidar = torch.cat([positions(num_lidar), torch.rand(num_lidar, 1, generator=g) * 255,
                           torch.rand(num_lidar, 1, generator=g) * 0.5], dim=1)
    radar = None
    if num_radar is not None:
        radar = torch.cat([positions(num_radar), torch.randn(num_radar, 1, generator=g) * 10,
                           torch.randn(num_radar, 2, generator=g) * 5,
                           torch.randint(0, 8, (num_radar, 1), generator=g).float(),
                           torch.rand(num_radar, 1, generator=g) * 0.3], dim=1)
    camera_images = None
    if cameras is not False:
        valid = torch.tensor([True] * 6 if cameras is True else cameras)
        height, width = IMAGE_SIZE
        intrinsics = torch.tensor([[0.8 * width, 0.0, width / 2], [0.0, 0.8 * width, height / 2], [0.0, 0.0, 1.0]])
        images = torch.randint(0, 256, (6, 3, height, width), generator=g, dtype=torch.uint8)
        images[~valid] = 0
        camera_images = CameraImages(images=images, intrinsics=intrinsics.expand(6, 3, 3).clone(),
                                     cam_to_ego=torch.stack([camera_to_ego(y) for y in CAMERA_YAWS_DEG]),
                                     valid=valid, time_offsets=torch.zeros(6), names=CAMERA_NAMES)
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, 3] = torch.tensor([400.0, 1100.0, 0.0])
    nan = float("nan")
    ego = EgoState(ego_to_global=pose,
                   speed=torch.tensor(float(torch.rand(1, generator=g)) * 10 if can_valid else nan),
                   yaw_rate=torch.tensor(float(torch.randn(1, generator=g)) * 0.1 if can_valid else nan),
                   acceleration=torch.randn(3, generator=g) if can_valid else torch.full((3,), nan),
                   can_valid=torch.tensor(can_valid))
    raster = (torch.rand(1, *grid.shape, generator=g) > 0.5).float() if map_raster else None
    return Sample(token=f"sample{seed}", scene_name="scene-test", timestamp_us=1_000_000 * seed, lidar=lidar,
                  radar=radar, cameras=camera_images, ego=ego, map_raster=raster, boxes=Boxes.empty())


def small_camera(grid=GRID, **kwargs):
    options = dict(out_channels=8, backbone_widths=(8, 16, 16), backbone_blocks=(1, 1, 1), feature_channels=16,
                   context_channels=8, depth_min=1.0, depth_max=30.0, depth_bins=29, bev_blocks=1)
    options.update(kwargs)
    return CameraBranch(grid, **options)


def small_lidar(grid=GRID, **kwargs):
    options = dict(out_channels=8, voxel_upsample=4, voxel_height=0.5, max_points_per_voxel=5, max_voxels=5000,
                   sparse_channels=(4, 8, 8), bev_blocks=1)
    options.update(kwargs)
    return LidarBranch(grid, **options)


BRANCHES = {
    "camera": small_camera,
    "lidar": small_lidar,
    "lidar_pointnet": lambda grid=GRID: small_lidar(grid, vfe="pointnet", vfe_channels=8),
    "lidar_pillar": lambda grid=GRID: LidarPillarBranch(grid, out_channels=8, pillar_channels=8, hidden_channels=8,
                                                        bev_blocks=1),
    "lidar_pillar_fine": lambda grid=GRID: LidarPillarBranch(grid, out_channels=8, pillar_upsample=2,
                                                             pillar_channels=8, hidden_channels=8, bev_blocks=1),
    "lidar_pillar_motion": lambda grid=GRID: LidarPillarBranch(grid, out_channels=8, pillar_upsample=2,
                                                               pillar_channels=8, hidden_channels=8, bev_blocks=1,
                                                               time_slices=4, time_slice_s=0.15),
    "lidar_pillar_flow": lambda grid=GRID: LidarPillarBranch(grid, out_channels=8, pillar_upsample=2,
                                                             pillar_channels=8, hidden_channels=8, bev_blocks=1,
                                                             time_slices=4, time_slice_s=0.15, flow={}),
    "lidar_motion": lambda grid=GRID: small_lidar(grid, time_slices=3, time_slice_s=0.2),
    "camera_depth_supervised": lambda grid=GRID: small_camera(grid, depth_loss_weight=1.0),
    "radar": lambda grid=GRID: RadarBranch(grid, out_channels=8, pillar_channels=8, hidden_channels=8, bev_blocks=1),
    "gps": lambda grid=GRID: GpsBranch(grid, out_channels=8, map_channels=(8, 8), ego_embedding=8),
}


def build(name: str, seed: int = 0, grid: BEVGrid = GRID):
    torch.manual_seed(seed)
    return BRANCHES[name](grid)


@pytest.fixture(scope="module")
def batch():
    return collate_samples([make_sample(1), make_sample(2)])


@pytest.mark.parametrize("name", sorted(BRANCHES))
def test_output_follows_grid_and_every_parameter_gets_a_gradient(name, batch):
    branch = build(name)
    branch.train()
    out = branch(batch)
    assert out.shape == (2, branch.out_channels, GRID.height, GRID.width)
    assert branch.modality in ("camera", "lidar", "radar", "gps")
    assert torch.isfinite(out).all()
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for parameter_name, parameter in branch.named_parameters():
        assert parameter.grad is not None, f"{name}: {parameter_name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name}: {parameter_name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name}: {parameter_name} has an all-zero gradient"


@pytest.mark.parametrize("name", sorted(BRANCHES))
def test_fixed_seed_gives_identical_outputs_and_gradients(name, batch):
    results = []
    for _ in range(2):
        branch = build(name, seed=3)
        branch.train()
        torch.manual_seed(7)  # the GPS branch's training corruption draws from the global RNG
        out = branch(batch)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in branch.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for first, second in zip(results[0][1], results[1][1]):
        assert torch.equal(first, second)
    other = build(name, seed=4).train()
    torch.manual_seed(7)
    assert not torch.equal(other(batch).detach(), results[0][0])


@pytest.mark.parametrize("name", sorted(BRANCHES))
def test_branches_run_under_mixed_precision(name, batch):
    """bfloat16 autocast on CPU (CUDA autocast cannot run on this machine): finite outputs and gradients; the camera
    geometry stays float32 (the frustum points are unchanged)."""
    branch = build(name).train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = branch(batch)
    assert out.shape == (2, branch.out_channels, GRID.height, GRID.width) and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in branch.parameters())
    if name == "camera":
        args = (batch.cameras.intrinsics[0], batch.cameras.cam_to_ego[0], IMAGE_SIZE, (4, 8))
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            mixed = branch.frustum_points(*args)
        assert mixed.dtype == torch.float32 and torch.equal(mixed, branch.frustum_points(*args))


EMPTY_CASES = {
    # branch name -> Sample options of a sample that has the modality but no usable data in it
    "lidar": dict(num_lidar=0),
    "lidar_pointnet": dict(num_lidar=0),
    "lidar_pillar": dict(num_lidar=0),
    "radar": dict(num_radar=0),
    "camera": dict(cameras=[False] * 6),
    "gps": dict(map_raster=False, can_valid=False),
}


@pytest.mark.parametrize("name", sorted(EMPTY_CASES))
def test_empty_sample_is_finite_and_does_not_disturb_the_others(name):
    branch = build(name).eval()
    full, empty = make_sample(5), make_sample(6, **EMPTY_CASES[name])
    with torch.no_grad():
        together = branch(collate_samples([full, empty]))
        alone_full = branch(collate_samples([full]))
        alone_empty = branch(collate_samples([empty, empty]))
    assert torch.isfinite(together).all() and torch.isfinite(alone_empty).all()
    torch.testing.assert_close(together[0], alone_full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[1], alone_empty[0], rtol=1e-5, atol=1e-5)
    # ... and in training mode (batch statistics) it runs and gives gradients too.
    branch.train()
    out = branch(collate_samples([empty, empty]))
    assert torch.isfinite(out).all()
    out.sum().backward()


@pytest.mark.parametrize("name", ["lidar", "lidar_pillar", "radar"])
def test_points_outside_the_grid_are_ignored(name):
    branch = build(name).eval()
    base = make_sample(8)
    column = {"lidar": "lidar", "lidar_pillar": "lidar", "radar": "radar"}[name]
    cloud = getattr(base, column)
    outside = cloud[:3].clone()
    outside[0, 0] = GRID.x_max + 5.0  # beyond x
    outside[1, 1] = GRID.y_min - 0.01  # beyond y
    outside[2, 2] = GRID.z_max + 1.0  # above the grid
    inside_only = getattr(base, column)
    inside_only = inside_only[GRID.contains(inside_only[:, :2]) & (inside_only[:, 2] >= GRID.z_min)
                              & (inside_only[:, 2] < GRID.z_max)]
    with_outside = torch.cat([inside_only, outside])
    with torch.no_grad():
        a = branch(collate_samples([_with(base, **{column: inside_only})]))
        b = branch(collate_samples([_with(base, **{column: with_outside})]))
    torch.testing.assert_close(a, b)


def _with(sample, **changes):
    """A copy of a dataclass (Sample, EgoState, CameraImages) with some fields changed."""
    return replace(sample, **changes)


# --- geometry -------------------------------------------------------------------------------------------------------

def test_lift_splat_puts_features_where_a_known_point_projects():
    """A known ego point, a camera calibrated so that the point lies on the ray of one feature pixel at the centre of
    one depth bin: one-hot depth and context there must land in exactly the point's BEV cell (and sample)."""
    branch = small_camera(depth_min=1.0, depth_max=30.0, depth_bins=29)  # bin centres 1.5, 2.5, ...
    height, width = 64, 128
    feature_size = (8, 16)  # stride 8
    stride = 8
    cases = [  # (ego point, camera yaw in degrees, camera position, feature pixel (row, col), sample)
        (torch.tensor([10.0, 2.3, 0.4]), 0.0, (0.5, 0.0, 1.5), (3, 11), 0),
        (torch.tensor([-7.2, -4.1, 1.1]), 180.0, (-0.5, 0.2, 1.5), (5, 2), 1),
    ]
    intrinsics, poses, depth, context = [], [], [], []
    for point, yaw, position, (row, col), _ in cases:
        pose = camera_to_ego(yaw, position)
        in_camera = torch.linalg.solve(pose, torch.cat([point, torch.ones(1)]))[:3]
        x, y, z = in_camera.tolist()
        bin_index = int(round(z - 1.5))
        # Move the camera along its optical axis so the point's depth is exactly the bin centre.
        shift = z - (1.5 + bin_index)
        pose[:3, 3] += pose[:3, 2] * shift
        z = 1.5 + bin_index
        # Intrinsics that put the point at the centre of feature pixel (row, col).
        focal = 90.0
        u_target, v_target = (col + 0.5) * stride - 0.5, (row + 0.5) * stride - 0.5
        intrinsics.append(torch.tensor([[focal, 0.0, u_target - focal * x / z], [0.0, focal, v_target - focal * y / z],
                                        [0.0, 0.0, 1.0]]))
        poses.append(pose)
        one_hot_depth = torch.zeros(branch.depth_bins, *feature_size)
        one_hot_depth[bin_index, row, col] = 1.0
        depth.append(one_hot_depth)
        one_hot_context = torch.zeros(branch.context_channels, *feature_size)
        one_hot_context[:, row, col] = torch.arange(1.0, branch.context_channels + 1)
        context.append(one_hot_context)
    intrinsics, poses = torch.stack(intrinsics), torch.stack(poses)
    points = branch.frustum_points(intrinsics, poses, (height, width), feature_size)
    for k, (point, _, _, (row, col), _) in enumerate(cases):
        bin_index = int(torch.argmin((points[k, :, row, col] - point).norm(dim=-1)))
        torch.testing.assert_close(points[k, bin_index, row, col], point, atol=1e-4, rtol=0)
    pooled = branch.splat(torch.stack(depth), torch.stack(context), points, torch.tensor([0, 1]), batch_size=2)
    assert pooled.shape == (2, branch.context_channels, GRID.height, GRID.width)
    for point, _, _, _, sample in cases:
        cell_row, cell_col, inside = GRID.cell_index(point[:2])
        assert inside
        expected = torch.zeros_like(pooled[sample])
        expected[:, cell_row, cell_col] = torch.arange(1.0, branch.context_channels + 1)
        torch.testing.assert_close(pooled[sample], expected)


def test_camera_branch_ignores_invalid_cameras_pixels():
    """An invalid camera's pixels (whatever garbage they hold) never reach the output."""
    branch = build("camera").eval()
    valid = [True, False, True, True, False, True]
    sample = make_sample(11, cameras=valid)
    garbage = _with(sample, cameras=_with_images(sample.cameras, 1, 255))
    with torch.no_grad():
        torch.testing.assert_close(branch(collate_samples([sample])), branch(collate_samples([garbage])))
        changed_valid = _with(sample, cameras=_with_images(sample.cameras, 0, 255))
        assert not torch.equal(branch(collate_samples([sample])), branch(collate_samples([changed_valid])))


def _with_images(cameras: CameraImages, index: int, value: int) -> CameraImages:
    images = cameras.images.clone()
    images[index] = value
    return replace(cameras, images=images)


def test_pillar_encoder_fills_exactly_the_cells_of_the_points():
    encoder = PillarEncoder(GRID, in_features=2, out_channels=6, hidden_channels=4)
    cells = [(0, 3, 5, 3), (1, 20, 30, 1), (1, 0, 0, 2)]  # (sample, row, col, number of points)
    xyz, batch_index = [], []
    g = torch.Generator().manual_seed(0)
    for sample, row, col, count in cells:
        corner = torch.tensor([GRID.x_min + col * GRID.cell_size, GRID.y_min + row * GRID.cell_size, -1.0])
        xyz.append(corner + torch.rand(count, 3, generator=g) * torch.tensor([GRID.cell_size, GRID.cell_size, 2.0]))
        batch_index += [sample] * count
    xyz = torch.cat(xyz)
    bev = encoder(xyz, torch.randn(len(xyz), 2, generator=g), torch.tensor(batch_index), batch_size=2)
    assert bev.shape == (2, 6, GRID.height, GRID.width)
    occupied = bev.abs().sum(1) > 0
    expected = torch.zeros_like(occupied)
    for sample, row, col, count in cells:
        expected[sample, row, col] = True
        assert float(bev[sample, -1, row, col]) == pytest.approx(math.log1p(count))
    assert torch.equal(occupied, expected)


@pytest.mark.parametrize("name", ["lidar", "lidar_pillar", "radar"])
def test_shifting_the_points_one_cell_along_x_shifts_the_occupied_cells_one_column(name):
    """Checks the (z, y, x) / (row, col) conventions end to end: a shift of +1 cell in x moves the occupied BEV
    cells by +1 column (and not by a row)."""
    branch = build(name).eval()
    sample = make_sample(12)
    column = "radar" if name == "radar" else "lidar"
    cloud = getattr(sample, column)
    cloud = cloud[(cloud[:, 0] > GRID.x_min + 2) & (cloud[:, 0] < GRID.x_max - 2) & GRID.contains(cloud[:, :2])
                  & (cloud[:, 2] >= GRID.z_min) & (cloud[:, 2] < GRID.z_max)]
    shifted = cloud.clone()
    shifted[:, 0] += GRID.cell_size
    occupancy = []
    for points in (cloud, shifted):
        batch = collate_samples([_with(sample, **{column: points})])
        with torch.no_grad():
            if name == "lidar":
                features, coords = branch.voxelize(batch)
                dense = branch.sparse_encoder(spconv.SparseConvTensor(features, coords, branch.spatial_shape, 1))
                occupancy.append(dense.dense().flatten(1, 2).abs().sum(1) > 0)
            else:
                occupancy.append(branch.pillars(points[:, :3], _point_features(branch, points),
                                                batch.radar_batch if name == "radar" else batch.lidar_batch,
                                                1).abs().sum(1) > 0)
    before, after = occupancy
    assert before.any()
    assert torch.equal(after[..., 1:], before[..., :-1])
    assert not after[..., 0].any()


def _point_features(branch, points):
    if isinstance(branch, RadarBranch):
        return branch.point_features(points)
    return _normalised_lidar_features(points, GRID)


# --- GPS ------------------------------------------------------------------------------------------------------------

def test_perturb_gps_moves_the_map_like_a_pose_error():
    """With a pose error of +1 cell in x the map seen at ego point p is the true map at p + (cell, 0): the raster
    moves one column towards -x; with yaw +90 degrees on a square grid centred on the ego it is rotated by 90."""
    from fusion.grid import rigid_2d

    def _shift_map_raster(raster, grid, yaw, translation):  # how perturb_gps moves the map by a pose error
        return grid.warp(raster, rigid_2d(yaw, translation), mode="bilinear")[0]

    grid = BEVGrid(-4.0, 4.0, -4.0, 4.0, -5.0, 3.0, 1.0)
    raster = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    moved = _shift_map_raster(raster, grid, yaw=torch.zeros(2), translation=torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    torch.testing.assert_close(moved[0, :, :, :-1], raster[0, :, :, 1:])
    assert (moved[0, :, :, -1] == 0).all()
    torch.testing.assert_close(moved[1, :, 1:, :], raster[1, :, :-1, :])
    rotated = _shift_map_raster(raster, grid, yaw=torch.full((2,), math.pi / 2), translation=torch.zeros(2, 2))
    # new(x, y) = old(-y, x); with row i <-> y = i - 3.5 and column j <-> x = j - 3.5: new[i, j] = old[j, 7 - i].
    torch.testing.assert_close(rotated, torch.rot90(raster, k=1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_perturb_gps_noise_is_seeded_and_leaves_the_input_alone():
    batch = collate_samples([make_sample(21), make_sample(22)])
    original_raster, original_speed = batch.map_raster.clone(), batch.ego.speed.clone()
    kwargs = dict(grid=GRID, speed_sigma_mps=0.5, yaw_rate_sigma_radps=0.05)
    a = perturb_gps(batch, 0.5, 0.02, torch.Generator().manual_seed(1), **kwargs)
    b = perturb_gps(batch, 0.5, 0.02, torch.Generator().manual_seed(1), **kwargs)
    c = perturb_gps(batch, 0.5, 0.02, torch.Generator().manual_seed(2), **kwargs)
    assert torch.equal(a.map_raster, b.map_raster) and torch.equal(a.ego.speed, b.ego.speed)
    assert not torch.equal(a.map_raster, c.map_raster)
    assert not torch.equal(a.map_raster, batch.map_raster) and not torch.equal(a.ego.speed, batch.ego.speed)
    assert torch.equal(batch.map_raster, original_raster) and torch.equal(batch.ego.speed, original_speed)
    assert torch.equal(a.ego.ego_to_global, batch.ego.ego_to_global)
    unchanged = perturb_gps(batch, 0.0, 0.0, torch.Generator().manual_seed(1), grid=GRID)
    torch.testing.assert_close(unchanged.map_raster, batch.map_raster)
    assert torch.equal(unchanged.ego.speed, batch.ego.speed)
    dropped = perturb_gps(batch, 0.0, 0.0, torch.Generator().manual_seed(1), grid=GRID, can_dropout=1.0)
    assert not dropped.ego.can_valid.any() and torch.isnan(dropped.ego.speed).all()
    assert torch.equal(dropped.ego.vector(), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="grid"):
        perturb_gps(batch, 0.5, 0.0, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="position_sigma_m"):
        perturb_gps(batch, -1.0, 0.0, None, grid=GRID)


def test_gps_branch_uses_the_ego_state_and_corrupts_only_in_training():
    branch = build("gps").eval()
    sample = make_sample(31)
    faster = _with(sample, ego=_with(sample.ego, speed=sample.ego.speed + 5.0))
    no_can = make_sample(31, can_valid=False)
    with torch.no_grad():
        base = branch(collate_samples([sample]))
        assert torch.equal(base, branch(collate_samples([sample])))  # no corruption in eval mode
        assert not torch.allclose(base, branch(collate_samples([faster])))
        assert torch.isfinite(branch(collate_samples([no_can]))).all()
    branch.train()
    for module in branch.modules():  # keep batch-norm in eval to isolate the corruption
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        assert not torch.allclose(base, branch(collate_samples([sample])))
        branch.train_corruption = False
        assert torch.equal(base, branch(collate_samples([sample])))


def test_temporal_aligner_warps_by_the_ego_motion():
    aligner = TemporalAligner(GRID)
    previous = torch.randn(2, 3, GRID.height, GRID.width, generator=torch.Generator().manual_seed(0))
    yaw = 0.7
    previous_pose = torch.eye(4, dtype=torch.float64)
    previous_pose[:2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    previous_pose[:3, 3] = torch.tensor([1234.5, -876.25, 3.0])
    # Identity motion: unchanged and all valid.
    aligned, valid = aligner(previous, previous_pose.expand(2, 4, 4), previous_pose.expand(2, 4, 4))
    torch.testing.assert_close(aligned, previous, atol=1e-5, rtol=0)
    assert valid.all()
    # The ego drove one cell forward (sample 0) / one cell to the left (sample 1) in its own frame.
    current_pose = torch.stack([previous_pose.clone(), previous_pose.clone()])
    current_pose[0, :3, 3] += previous_pose[:3, 0] * GRID.cell_size
    current_pose[1, :3, 3] += previous_pose[:3, 1] * GRID.cell_size
    aligned, valid = aligner(previous, previous_pose.expand(2, 4, 4), current_pose)
    assert valid.shape == (2, 1, GRID.height, GRID.width)
    torch.testing.assert_close(aligned[0, :, :, :-1], previous[0, :, :, 1:], atol=1e-4, rtol=0)
    assert not valid[0, :, :, -1].any() and valid[0, :, :, :-1].all() and (aligned[0, :, :, -1] == 0).all()
    torch.testing.assert_close(aligned[1, :, :-1, :], previous[1, :, 1:, :], atol=1e-4, rtol=0)
    assert not valid[1, :, -1, :].any() and valid[1, :, :-1, :].all()
    with pytest.raises(ValueError, match="previous BEV"):
        aligner(previous[:, :, :5], previous_pose.expand(2, 4, 4), current_pose)


def test_branch_arguments_are_plain_types_for_yaml_configs():
    import inspect
    for cls in (CameraBranch, LidarBranch, LidarPillarBranch, RadarBranch, GpsBranch):
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert parameters[0].name == "grid"
        for parameter in parameters[1:]:
            assert parameter.default is not inspect.Parameter.empty, f"{cls.__name__}.{parameter.name}"
            values = parameter.default if isinstance(parameter.default, tuple) else (parameter.default,)
            plain = (int, float, bool, str, type(None))
            assert all(isinstance(v, plain) for v in values), f"{cls.__name__}.{parameter.name}"


def test_bad_branch_options_raise_clear_errors():
    with pytest.raises(ValueError, match="sparse_channels"):
        LidarBranch(GRID, voxel_upsample=4, sparse_channels=(4, 8))
    with pytest.raises(ValueError, match="voxel_height"):
        LidarBranch(GRID, voxel_upsample=2, sparse_channels=(4, 8), voxel_height=0.3)
    with pytest.raises(ValueError, match="pool_upsample"):
        CameraBranch(GRID, pool_upsample=3)
    with pytest.raises(ValueError, match="depth_min"):
        CameraBranch(GRID, depth_min=5.0, depth_max=2.0)
    with pytest.raises(ValueError, match="map_raster"):
        bad = collate_samples([make_sample(1, grid=BEVGrid(-4.0, 4.0, -4.0, 4.0, -5.0, 3.0, 1.0))])
        build("gps").eval()(bad)


# --- the real scene-0061 frame --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_sample():
    from real_frame import load_real_frame, real_data_root
    from fusion.datasets.transforms import ImageResizeCrop
    if real_data_root() is None:
        pytest.skip("real nuScenes files not found: set NUSCENES_REAL or provide ../shared/nuscenes-real")
    resize = ImageResizeCrop(output_size=(352, 128))
    sample = load_real_frame(grid=BEVGrid(), camera_decode_size=resize.decode_size((1600, 900)))
    return resize(sample)


@pytest.mark.real_data
def test_real_frame_frustum_reaches_the_real_lidar_points(real_sample):
    """Lift-splat geometry with the reader's real calibration (post-resize intrinsics, cam_to_ego)."""
    assert_frustum_reaches_lidar_points(real_sample, BEVGrid())


def assert_frustum_reaches_lidar_points(sample: Sample, grid: BEVGrid) -> None:
    """Every LiDAR point a camera sees lies within quantisation error of the frustum point of its feature pixel and
    depth bin, and splatting the LiDAR depth puts the BEV mass where the points are."""
    real_sample = sample
    branch = CameraBranch(grid, depth_min=1.0, depth_max=60.0, depth_bins=59, context_channels=1)
    cameras = real_sample.cameras
    assert cameras.valid.all()
    height, width = cameras.images.shape[-2:]
    stride = 8
    feature_size = (height // stride, width // stride)
    points = real_sample.lidar[:, :3]
    # Points well inside the grid (height included), so that quantisation never pushes them out of it.
    points = points[(points[:, 0].abs() < grid.x_max - 2) & (points[:, 1].abs() < grid.y_max - 2)
                    & (points[:, 2] > grid.z_min + 0.5) & (points[:, 2] < grid.z_max - 0.5)]

    def seen_by_cameras(cam_to_ego):
        """Per camera: (points seen [n, 3], their (bin, row, col) [n, 3], error bound [n] meters)."""
        seen = []
        for k in range(6):
            pose, intrinsics = cameras.cam_to_ego[k].double(), cameras.intrinsics[k].double()
            in_camera = (points.double() - pose[:3, 3]) @ pose[:3, :3]
            z = in_camera[:, 2]
            u = (in_camera @ intrinsics[0]) / z
            v = (in_camera @ intrinsics[1]) / z
            row, col = torch.floor((v + 0.5) / stride).long(), torch.floor((u + 0.5) / stride).long()
            bin_index = torch.floor(z - 1.0).long()
            mask = (z > 1.0) & (z < 60.0) & (row >= 0) & (row < feature_size[0]) & (col >= 0) & (col < feature_size[1])
            # |frustum - point| <= |d_bin - z| |K^-1 (u_c, v_c, 1)| + z |K^-1 (u_c - u, v_c - v, 0)|, with
            # |d_bin - z| <= 0.5 m and |u_c - u|, |v_c - v| <= stride / 2 pixels.
            ray = torch.linalg.solve(intrinsics, torch.stack([(col + 0.5) * stride - 0.5, (row + 0.5) * stride - 0.5,
                                                              torch.ones_like(z)]).double())
            bound = 0.5 * ray.norm(dim=0) + z * (stride / 2) * math.hypot(1 / intrinsics[0, 0], 1 / intrinsics[1, 1])
            seen.append((points[mask], torch.stack([bin_index, row, col], 1)[mask], bound[mask]))
        return seen

    seen = seen_by_cameras(cameras.cam_to_ego)
    assert all(0.02 * len(points) < len(p) < 0.4 * len(points) for p, _, _ in seen), "each camera sees a fair share"

    def errors(cam_to_ego):
        frustum = branch.frustum_points(cameras.intrinsics, cam_to_ego, (height, width), feature_size)
        return [((frustum[k][tuple(index.T)].double() - p.double()).norm(dim=1), bound)
                for k, (p, index, bound) in enumerate(seen)]

    for error, bound in errors(cameras.cam_to_ego):
        assert (error <= bound + 1e-3).all(), f"max excess {float((error - bound).max())} m"
    # Teeth: a rig turned by 10 degrees, or ego_to_cam used in place of cam_to_ego, breaks the bound for most points
    # (over 98 % of the points of the real frame and of the synthetic drive).
    turn = math.radians(10.0)
    turned = cameras.cam_to_ego.clone()
    turned[:, :3, :] = torch.tensor([[math.cos(turn), -math.sin(turn), 0.0], [math.sin(turn), math.cos(turn), 0.0],
                                     [0.0, 0.0, 1.0]]) @ turned[:, :3, :]
    for wrong in (turned, torch.linalg.inv(cameras.cam_to_ego)):
        outside = torch.cat([error > bound + 1e-3 for error, bound in errors(wrong)]).float().mean()
        assert outside > 0.8

    # Splat the LiDAR depth (one count per point, camera, bin and pixel): the BEV mass lands on the points' cells.
    depth = torch.zeros(6, branch.depth_bins, *feature_size)
    lidar_cells = torch.zeros(grid.height, grid.width)
    for k, (p, index, _) in enumerate(seen):
        depth[k].index_put_(tuple(index.T), torch.ones(len(p)), accumulate=True)
        cell_row, cell_col, _ = grid.cell_index(p[:, :2])
        lidar_cells.index_put_((cell_row, cell_col), torch.ones(len(p)), accumulate=True)
    frustum = branch.frustum_points(cameras.intrinsics, cameras.cam_to_ego, (height, width), feature_size)
    pooled = branch.splat(depth, torch.ones(6, 1, *feature_size), frustum, torch.zeros(6, dtype=torch.long), 1)[0, 0]
    assert float(pooled.sum()) > 0.999 * float(depth.sum())  # all but quantisation strays at the height limits
    assert overlap(pooled, lidar_cells) > 0.85


def overlap(splatted: torch.Tensor, reference: torch.Tensor) -> float:
    """Histogram intersection (0..1) of two BEV count maps after a 3x3 box blur (absorbs one cell of quantisation)."""
    def blur(x):
        x = torch.nn.functional.avg_pool2d(x[None, None], 3, stride=1, padding=1)[0, 0]
        return x / x.sum()
    return float(torch.minimum(blur(splatted), blur(reference)).sum())


@pytest.mark.real_data
def test_real_frame_runs_through_camera_and_lidar_branches(real_sample):
    grid = BEVGrid()
    batch = collate_samples([real_sample])
    torch.manual_seed(0)
    for branch in (small_camera(grid), small_lidar(grid, voxel_upsample=2, sparse_channels=(8, 8), voxel_height=0.4),
                   LidarPillarBranch(grid, out_channels=8, pillar_channels=8, hidden_channels=8, bev_blocks=1)):
        out = branch.train()(batch)
        assert out.shape == (1, branch.out_channels, grid.height, grid.width)
        assert torch.isfinite(out).all()
        out.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in branch.parameters())


# --- the synthetic nuScenes-format drives (tiny_dataroot fixture of tests/conftest.py) --------------------------------

@pytest.fixture(scope="module")
def synthetic_batch(tiny_dataroot):
    """The first and last training keyframes of the tiny synthetic dataroot, read by NuScenesDataset."""
    from fusion.datasets.nuscenes import NuScenesDataset
    from fusion.datasets.transforms import ImageResizeCrop
    root = tiny_dataroot
    grid = BEVGrid(cell_size=1.6)
    resize = ImageResizeCrop(output_size=(256, 96))
    dataset = NuScenesDataset(root.dataroot, root.version, root.train_split, grid=grid, lidar_sweeps=3,
                              radar_sweeps=3, transforms=resize)
    samples = [dataset[i] for i in (0, len(dataset) - 1)]
    return grid, samples


def test_synthetic_drive_frustum_reaches_the_lidar_points(synthetic_batch):
    grid, samples = synthetic_batch
    assert_frustum_reaches_lidar_points(samples[0], grid)


def test_synthetic_drive_runs_through_every_branch(synthetic_batch):
    grid, samples = synthetic_batch
    batch = collate_samples(samples)
    for modality in ("camera", "lidar", "radar", "gps"):
        assert batch.present[modality].all(), f"the synthetic drive should have {modality}"
    torch.manual_seed(0)
    branches = [small_camera(grid), small_lidar(grid, voxel_upsample=2, sparse_channels=(8, 8), voxel_height=0.4),
                LidarPillarBranch(grid, out_channels=8, pillar_channels=8, hidden_channels=8, bev_blocks=1),
                RadarBranch(grid, out_channels=8, pillar_channels=8, hidden_channels=8, bev_blocks=1),
                GpsBranch(grid, out_channels=8, map_channels=(8,), ego_embedding=8)]
    for branch in branches:
        out = branch.train()(batch)
        assert out.shape == (2, branch.out_channels, grid.height, grid.width)
        assert torch.isfinite(out).all()
        out.square().mean().backward()
        for name, parameter in branch.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


# --- the branch interface (fusion/branches/base.py) ----------------------------------------------------------------

def test_every_branch_follows_the_branch_protocol():
    from fusion.branches.base import BATCH_FIELDS, Branch
    from fusion.branches.camera import CameraBranch
    from fusion.branches.gps import GpsBranch
    from fusion.branches.lidar import LidarPillarBranch
    from fusion.branches.radar import RadarBranch
    from fusion.types import MODALITIES, Batch

    grid = BEVGrid(-8.0, 8.0, -8.0, 8.0, -3.0, 3.0, 1.0)
    for cls in (CameraBranch, LidarPillarBranch, RadarBranch, GpsBranch):
        branch = cls(grid)
        assert isinstance(branch, Branch), cls.__name__
        assert branch.modality in MODALITIES and isinstance(branch.out_channels, int)
        assert set(BATCH_FIELDS[branch.modality]) <= set(Batch.__dataclass_fields__)
    assert set(BATCH_FIELDS) == set(MODALITIES)
