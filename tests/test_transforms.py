"""Augmentations stay consistent across sensors, boxes, cameras, the map raster and the ego state."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fusion.datasets.io import read_jpeg, scale_intrinsics
from fusion.datasets.transforms import (Compose, GlobalAugmentation, ImageResizeCrop, PointRangeFilter,
                                        apply_bev_augmentation, augmentation_matrix)
from fusion.geometry import make_transform, rotation_z
from fusion.grid import BEVGrid
from fusion.types import CAMERA_NAMES, Boxes, CameraImages, EgoState, Sample

GRID = BEVGrid(-40.0, 40.0, -40.0, 40.0, -5.0, 3.0, 0.8)
CAMERA_YAWS = (0.0, -0.96, 0.96, math.pi, 1.92, -1.92)
K = np.array([[400.0, 0.0, 320.0], [0.0, 400.0, 180.0], [0.0, 0.0, 1.0]])


def camera_to_ego(yaw: float) -> np.ndarray:
    """A camera at 1.5 m height looking along `yaw` (camera frame: x right, y down, z forward)."""
    forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    return make_transform(np.stack([right, down, forward], axis=1), [0.5 * math.cos(yaw), 0.5 * math.sin(yaw), 1.5])


def points_in_boxes(points: torch.Tensor, boxes: Boxes, margin: float = 1e-3) -> torch.Tensor:
    """[N, B] bool: point n inside box b (box frame test; the margin absorbs float32 rounding)."""
    offset = points[:, None, :3] - boxes.center[None]
    cos, sin = torch.cos(boxes.yaw), torch.sin(boxes.yaw)
    along = offset[..., 0] * cos + offset[..., 1] * sin
    across = -offset[..., 0] * sin + offset[..., 1] * cos
    half = boxes.size / 2
    return ((along.abs() <= half[:, 0] + margin) & (across.abs() <= half[:, 1] + margin)
            & (offset[..., 2].abs() <= half[:, 2] + margin))


def make_sample(seed: int = 0) -> Sample:
    """A hand-made sample: LiDAR points inside and around 6 boxes, radar returns on the boxes carrying their
    velocity, six cameras, a random map raster, a valid CAN state."""
    rng = np.random.default_rng(seed)
    n = 6
    centers = np.concatenate([rng.uniform(-25, 25, (n, 2)), rng.uniform(0.5, 1.0, (n, 1))], axis=1)
    sizes = np.stack([rng.uniform(3, 6, n), rng.uniform(1.5, 2.5, n), rng.uniform(1.4, 2.0, n)], axis=1)
    yaws = rng.uniform(-math.pi, math.pi, n)
    velocities = rng.normal(0, 5, (n, 2))
    boxes = Boxes(center=torch.tensor(centers, dtype=torch.float32), size=torch.tensor(sizes, dtype=torch.float32),
                  yaw=torch.tensor(yaws, dtype=torch.float32), velocity=torch.tensor(velocities, dtype=torch.float32),
                  labels=torch.arange(n) % 10, attributes=torch.full((n,), -1), scores=torch.ones(n),
                  num_lidar_pts=torch.full((n,), 50), num_radar_pts=torch.full((n,), 2))
    inside = []
    for c, s, yaw in zip(centers, sizes, yaws):
        local = rng.uniform(-0.45, 0.45, (50, 3)) * s
        inside.append(local @ rotation_z(yaw).T + c)
    background = np.concatenate([rng.uniform(-39, 39, (3000, 2)), rng.uniform(-2, 2.5, (3000, 1))], axis=1)
    xyz = np.concatenate(inside + [background])
    lidar = np.concatenate([xyz, rng.uniform(0, 255, (len(xyz), 1)), rng.uniform(0, 0.5, (len(xyz), 1))], axis=1)
    radar = np.zeros((n + 20, 8))
    radar[:n, :3] = centers
    radar[:n, 4:6] = velocities
    radar[n:, :3] = rng.uniform(-30, 30, (20, 3))
    radar[n:, 4:6] = rng.normal(0, 3, (20, 2))
    radar[:, 3] = rng.normal(5, 3, n + 20)
    images = torch.from_numpy(rng.integers(0, 255, (6, 3, 360, 640), dtype=np.uint8))
    cameras = CameraImages(images=images, intrinsics=torch.tensor(np.stack([K] * 6), dtype=torch.float32),
                           cam_to_ego=torch.tensor(np.stack([camera_to_ego(y) for y in CAMERA_YAWS]),
                                                   dtype=torch.float32),
                           valid=torch.ones(6, dtype=torch.bool), time_offsets=torch.zeros(6), names=CAMERA_NAMES)
    ego = EgoState(ego_to_global=torch.from_numpy(make_transform(rotation_z(0.7), [400.0, 1100.0, 0.0])),
                   speed=torch.tensor(5.0), yaw_rate=torch.tensor(0.2), acceleration=torch.tensor([0.5, 0.1, 9.8]),
                   can_valid=torch.tensor(True))
    map_raster = torch.from_numpy((rng.uniform(size=(1, *GRID.shape)) > 0.5).astype(np.float32))
    return Sample(token="t", scene_name="s", timestamp_us=0, lidar=torch.tensor(lidar, dtype=torch.float32),
                  radar=torch.tensor(radar, dtype=torch.float32), cameras=cameras, ego=ego, map_raster=map_raster,
                  boxes=boxes)


AUGMENTATIONS = {
    "rotation": augmentation_matrix(rotation=0.7),
    "scale": augmentation_matrix(scale=1.1),
    "flip_x": augmentation_matrix(flip_x=True),
    "flip_y": augmentation_matrix(flip_y=True),
    "translation": augmentation_matrix(translation=(1.5, -2.0, 0.3)),
    "combined": augmentation_matrix(rotation=-2.3, scale=0.93, flip_x=False, flip_y=True, translation=(0.4, 1, 0)),
    **{f"random_seed_{seed}": GlobalAugmentation(translation_std=(0.5, 0.5, 0.2)).sample_matrix(
        torch.Generator().manual_seed(seed)) for seed in (1, 2)},
}


def project(points: torch.Tensor, cameras: CameraImages, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels [N, 2] of ego points through camera `index` and the in-front mask."""
    ego_to_cam = np.linalg.inv(cameras.cam_to_ego[index].double().numpy())
    cam = points.double().numpy() @ ego_to_cam[:3, :3].T + ego_to_cam[:3, 3]
    pixels = cam @ cameras.intrinsics[index].double().numpy().T
    return pixels[:, :2] / pixels[:, 2:3], cam[:, 2] > 0.5


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_points_stay_inside_their_boxes(name):
    sample = make_sample()
    augmented = apply_bev_augmentation(sample, AUGMENTATIONS[name], GRID)
    before = points_in_boxes(sample.lidar, sample.boxes)
    after = points_in_boxes(augmented.lidar, augmented.boxes)
    assert before.sum() >= 6 * 50
    assert torch.equal(before, after)
    assert torch.equal(points_in_boxes(sample.radar, sample.boxes), points_in_boxes(augmented.radar, augmented.boxes))


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_box_corners_move_with_the_augmentation(name):
    sample = make_sample()
    matrix = AUGMENTATIONS[name]
    augmented = apply_bev_augmentation(sample, matrix, GRID)
    corners = sample.boxes.corners().double().numpy()
    expected = corners @ matrix[:3, :3].T + matrix[:3, 3]
    got = augmented.boxes.corners().double().numpy()
    for box_expected, box_got in zip(expected, got):   # a reflection reorders the corners: compare as sets
        distance = np.linalg.norm(box_expected[:, None] - box_got[None], axis=-1)
        assert distance.min(axis=1).max() < 1e-4


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_box_centres_project_to_the_same_pixels(name):
    sample = make_sample()
    augmented = apply_bev_augmentation(sample, AUGMENTATIONS[name], GRID)
    seen = 0
    for i in range(6):
        before, front = project(sample.boxes.center, sample.cameras, i)
        after, front_after = project(augmented.boxes.center, augmented.cameras, i)
        assert np.array_equal(front, front_after)
        np.testing.assert_allclose(after[front], before[front], atol=2e-2)
        seen += int(front.sum())
    assert seen >= 6
    assert torch.equal(augmented.cameras.images, sample.cameras.images)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_radar_and_box_velocities_stay_paired(name):
    sample = make_sample()
    matrix = AUGMENTATIONS[name]
    augmented = apply_bev_augmentation(sample, matrix, GRID)
    torch.testing.assert_close(augmented.radar[:6, 4:6], augmented.boxes.velocity, atol=1e-4, rtol=0)
    expected = sample.boxes.velocity.double().numpy() @ matrix[:2, :2].T
    np.testing.assert_allclose(augmented.boxes.velocity.numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_global_positions_are_unchanged(name):
    sample = make_sample()
    augmented = apply_bev_augmentation(sample, AUGMENTATIONS[name], GRID)

    def to_global(s):
        pose = s.ego.ego_to_global.numpy()
        return s.lidar[:, :3].double().numpy() @ pose[:3, :3].T + pose[:3, 3]

    np.testing.assert_allclose(to_global(augmented), to_global(sample), atol=2e-3)


@pytest.mark.parametrize("matrix", [augmentation_matrix(flip_x=True), augmentation_matrix(flip_y=True),
                                    augmentation_matrix(rotation=math.pi / 2), augmentation_matrix(rotation=math.pi),
                                    augmentation_matrix(translation=(1.6, -2.4, 0.0))],
                         ids=["flip_x", "flip_y", "rot90", "rot180", "shift_2_3_cells"])
def test_map_raster_moves_with_the_points(matrix):
    """For maps that take cell centres onto cell centres, the raster under each moved point is the raster that was
    under it before."""
    sample = make_sample()
    augmented = apply_bev_augmentation(sample, matrix, GRID)
    row, col, inside = GRID.cell_index(sample.lidar[:, :2])
    row2, col2, inside2 = GRID.cell_index(augmented.lidar[:, :2])
    both = inside & inside2
    assert both.sum() > 1000
    before = sample.map_raster[0, row[both], col[both]]
    after = augmented.map_raster[0, row2[both], col2[both]]
    assert torch.equal(before, after)
    assert set(augmented.map_raster.unique().tolist()) <= {0.0, 1.0}


def test_ego_state_follows_the_augmentation():
    sample = make_sample()
    flip_y = apply_bev_augmentation(sample, augmentation_matrix(flip_y=True), GRID)
    assert float(flip_y.ego.yaw_rate) == pytest.approx(-0.2)
    torch.testing.assert_close(flip_y.ego.acceleration, torch.tensor([0.5, -0.1, 9.8]))
    assert float(flip_y.ego.speed) == pytest.approx(5.0)
    both = apply_bev_augmentation(sample, augmentation_matrix(flip_x=True, flip_y=True), GRID)
    assert float(both.ego.yaw_rate) == pytest.approx(0.2)                      # a 180 degree rotation
    rotated = apply_bev_augmentation(sample, augmentation_matrix(rotation=0.5, scale=1.1), GRID)
    assert float(rotated.ego.yaw_rate) == pytest.approx(0.2)
    assert float(rotated.ego.speed) == pytest.approx(5.5)
    expected = 1.1 * rotation_z(0.5) @ np.array([0.5, 0.1, 9.8])
    np.testing.assert_allclose(rotated.ego.acceleration.numpy(), expected, rtol=1e-5)


def test_nan_velocities_and_absent_sensors_pass_through():
    sample = make_sample()
    sample.boxes.velocity[0] = float("nan")
    sample = Sample(**{**sample.__dict__, "radar": None, "cameras": None, "map_raster": None})
    augmented = apply_bev_augmentation(sample, augmentation_matrix(rotation=1.0, flip_y=True), GRID)
    assert torch.isnan(augmented.boxes.velocity[0]).all() and torch.isfinite(augmented.boxes.velocity[1:]).all()
    assert augmented.radar is None and augmented.cameras is None and augmented.map_raster is None


def test_seeded_augmentation_is_reproducible():
    augmentation = GlobalAugmentation(translation_std=(0.5, 0.5, 0.1), grid=GRID)
    sample = make_sample()
    first = augmentation(sample, torch.Generator().manual_seed(7))
    second = augmentation(sample, torch.Generator().manual_seed(7))
    other = augmentation(sample, torch.Generator().manual_seed(8))
    assert torch.equal(first.lidar, second.lidar) and torch.equal(first.boxes.yaw, second.boxes.yaw)
    assert not torch.equal(first.lidar, other.lidar)
    torch.manual_seed(3)
    global_first = augmentation(sample)
    torch.manual_seed(3)
    assert torch.equal(global_first.lidar, augmentation(sample).lidar)


def test_image_resize_crop_keeps_points_on_their_pixels():
    """A marker drawn where a box centre projects stays where the updated intrinsics project it."""
    sample = make_sample()
    centre = torch.tensor([[12.0, 1.0, 1.0]])
    (u, v), = project(centre, sample.cameras, 0)[0]
    images = sample.cameras.images.clone()
    images[0] = 0
    images[0, :, int(v) - 4:int(v) + 5, int(u) - 4:int(u) + 5] = 255
    sample.cameras.images = images
    for transform, generator in ((ImageResizeCrop((352, 128)), None),
                                 (ImageResizeCrop((352, 128), resize_range=(0.9, 1.3), crop_x="random",
                                                  crop_y="random"), torch.Generator().manual_seed(4))):
        out = transform(sample, generator)
        assert out.cameras.images.shape == (6, 3, 128, 352)
        (u2, v2), = project(centre, out.cameras, 0)[0]
        marker = out.cameras.images[0, 0].double()
        rows, cols = torch.nonzero(marker > 128, as_tuple=True)
        assert len(rows) > 4
        # the marker is centred on source pixel (int(u), int(v)), (int(u) - u, int(v) - v) from the projection
        assert abs(cols.double().mean() - u2 - (int(u) - u) * out.cameras.intrinsics[0, 0, 0] / K[0, 0]) < 0.75
        assert abs(rows.double().mean() - v2 - (int(v) - v) * out.cameras.intrinsics[0, 1, 1] / K[1, 1]) < 0.75


def test_image_resize_crop_is_seeded():
    sample = make_sample()
    transform = ImageResizeCrop((320, 160), resize_range=(0.8, 1.2), crop_x="random", crop_y="random")
    a = transform(sample, torch.Generator().manual_seed(1))
    b = transform(sample, torch.Generator().manual_seed(1))
    assert torch.equal(a.cameras.images, b.cameras.images) and torch.equal(a.cameras.intrinsics, b.cameras.intrinsics)


def test_draft_decode_then_resize_matches_full_decode(tmp_path):
    """Decoding a JPEG at 1/2 scale (what camera_decode_size asks for) then resizing gives the same intrinsics and
    nearly the same pixels as decoding at full size."""
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 255, (45, 80, 3)), np.ones((20, 20, 1))).astype(np.uint8)
    path = tmp_path / "cam.jpg"
    Image.fromarray(image).save(path, quality=95)
    transform = ImageResizeCrop((704, 256))
    decode = transform.decode_size((1600, 900))
    assert decode == (704, 396)
    results = []
    for size in (None, decode):
        pixels, factor = read_jpeg(path, size)
        k = scale_intrinsics(np.array([[1266.0, 0, 816.0], [0, 1266.0, 491.0], [0, 0, 1]]), 1.0 / factor)
        cams = CameraImages(images=torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].contiguous(),
                            intrinsics=torch.tensor(k, dtype=torch.float32)[None], cam_to_ego=torch.eye(4)[None],
                            valid=torch.ones(1, dtype=torch.bool), time_offsets=torch.zeros(1),
                            names=("CAM_FRONT",))
        sample = Sample(**{**make_sample().__dict__, "cameras": cams})
        results.append((factor, transform(sample).cameras))
    (full_factor, full), (draft_factor, draft) = results
    assert full_factor == 1 and draft_factor == 2
    torch.testing.assert_close(draft.intrinsics, full.intrinsics, atol=0.5, rtol=1e-3)
    assert (draft.images.double() - full.images.double()).abs().mean() < 12


def test_point_range_filter_drops_and_counts():
    sample = make_sample()
    sample.lidar[0, :3] = torch.tensor([60.0, 0.0, 0.0])
    sample.lidar[1, :3] = torch.tensor([0.0, 0.0, 4.0])
    sample.boxes.center[0, :2] = torch.tensor([45.0, 0.0])
    out = Compose([PointRangeFilter(GRID)])(sample)
    assert out.dropped_points["lidar_out_of_range"] >= 2
    assert len(out.lidar) == len(sample.lidar) - out.dropped_points["lidar_out_of_range"]
    assert GRID.contains(out.lidar[:, :2]).all() and (out.lidar[:, 2] < GRID.z_max).all()
    assert len(out.boxes) == len(sample.boxes) - 1
