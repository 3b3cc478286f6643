"""The reader on REAL nuScenes files (../shared/nuscenes-real or $NUSCENES_REAL); skipped when they are absent."""
import json

import numpy as np
import pytest
import torch
from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud

from fusion.datasets.collate import collate_samples
from fusion.datasets.io import RadarFilters, read_jpeg, read_lidar_bin, read_radar_pcd
from real_frame import REAL_CALIB_JSON, load_real_frame, real_data_root, real_frame_messages
from fusion.types import CAMERA_NAMES, DETECTION_CLASSES, LIDAR_NAME, RADAR_NAMES

pytestmark = pytest.mark.real_data
ROOT = real_data_root()
if ROOT is None:
    pytest.skip("real nuScenes files not found: set NUSCENES_REAL or provide ../shared/nuscenes-real",
                allow_module_level=True)


@pytest.fixture(scope="module")
def frame():
    return load_real_frame(lidar_min_distance=0.0)


@pytest.fixture(scope="module")
def info():
    with open(ROOT / REAL_CALIB_JSON) as f:
        return json.load(f)["sample"]


def test_scan_parses_like_the_devkit():
    path = real_frame_messages()[LIDAR_NAME].path
    scan = read_lidar_bin(path)
    assert scan.shape == (34688, 5)
    np.testing.assert_array_equal(scan[:, :4].T, LidarPointCloud.from_file(path).points)
    assert set(np.unique(scan[:, 4]).astype(int)) == set(range(32))


@pytest.mark.parametrize("filters", ["default", "none"])
def test_real_radar_files_parse_exactly_like_the_devkit(filters):
    files = sorted((ROOT / "radar_split_unknown").glob("*/*.pcd"))
    assert len(files) == 2
    for path in files:
        ours = read_radar_pcd(path, RadarFilters.parse(filters))
        if filters == "none":
            RadarPointCloud.disable_filters()
        try:
            theirs = RadarPointCloud.from_file(str(path)).points
        finally:
            RadarPointCloud.default_filters()
        np.testing.assert_array_equal(ours.T, theirs)
        assert len(ours) == (125 if filters == "none" else {"RADAR_BACK_LEFT": 70, "RADAR_BACK_RIGHT": 69}[
            path.parent.name])


def test_scan_projects_into_every_camera(frame):
    """About 9-14 % of the scan lands inside each image (README), through our cam_to_ego and intrinsics."""
    points = frame.lidar[:, :3].double().numpy()
    height, width = frame.cameras.images.shape[-2:]
    assert (height, width) == (900, 1600)
    shares = {}
    for i, name in enumerate(frame.cameras.names):
        ego_to_cam = np.linalg.inv(frame.cameras.cam_to_ego[i].double().numpy())
        cam = points @ ego_to_cam[:3, :3].T + ego_to_cam[:3, 3]
        uvw = cam @ frame.cameras.intrinsics[i].double().numpy().T
        uv = uvw[:, :2] / uvw[:, 2:3]
        inside = (cam[:, 2] > 1.0) & (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
        shares[name] = inside.mean()
    assert all(0.07 < share < 0.17 for share in shares.values()), shares


def test_camera_extrinsics_match_the_json_lidar2cam(frame, info):
    """Our cam_to_ego (through the ego poses at each camera's time) agrees with mmdet3d's lidar2cam."""
    lidar_to_ego = np.asarray(info["lidar_points"]["lidar2ego"])
    for i, name in enumerate(frame.cameras.names):
        ours = np.linalg.inv(frame.cameras.cam_to_ego[i].double().numpy()) @ lidar_to_ego
        np.testing.assert_allclose(ours, np.asarray(info["images"][name]["lidar2cam"]), atol=1e-5)
        np.testing.assert_allclose(frame.cameras.intrinsics[i].double().numpy(),
                                   np.asarray(info["images"][name]["cam2img"])[:3, :3], rtol=1e-6)
    assert np.all(np.abs(frame.cameras.time_offsets.numpy()) < 0.05)


def test_boxes_contain_their_annotated_lidar_points(frame):
    """Counting the scan's points inside each ground-truth box (ego frame) reproduces num_lidar_pts."""
    boxes = frame.boxes
    assert len(boxes) == 65 and set(boxes.labels.tolist()) <= set(range(len(DETECTION_CLASSES)))
    offset = frame.lidar[:, None, :3].double() - boxes.center[None].double()
    yaw = boxes.yaw.double()
    along = offset[..., 0] * torch.cos(yaw) + offset[..., 1] * torch.sin(yaw)
    across = -offset[..., 0] * torch.sin(yaw) + offset[..., 1] * torch.cos(yaw)
    half = boxes.size.double() / 2
    inside = (along.abs() <= half[:, 0]) & (across.abs() <= half[:, 1]) & (offset[..., 2].abs() <= half[:, 2])
    counted = inside.sum(0)
    annotated = boxes.num_lidar_pts
    assert (counted - annotated).abs().double().mean() < 1.0
    many = annotated >= 20
    assert many.sum() >= 5
    assert ((counted[many] - annotated[many]).abs().double() / annotated[many]).max() < 0.1


def test_frame_marks_what_it_lacks(frame):
    assert frame.radar is None and all(frame.missing[name] for name in RADAR_NAMES)
    assert frame.map_raster is None and "MAP" in frame.missing
    assert not bool(frame.ego.can_valid) and "acceleration" in frame.missing["CAN"]
    assert torch.isnan(frame.ego.speed) and torch.isnan(frame.ego.acceleration).all()
    assert frame.cameras.valid.all() and frame.cameras.names == CAMERA_NAMES
    batch = collate_samples([frame])
    assert batch.present["lidar"].tolist() == [True] and batch.present["camera"].tolist() == [True]
    assert batch.present["radar"].tolist() == [False] and batch.present["gps"].tolist() == [False]


def test_ring_thinning_keeps_every_kth_beam():
    full = load_real_frame(lidar_min_distance=0.0, camera_decode_size=(200, 112))
    thinned = load_real_frame(lidar_min_distance=0.0, lidar_keep_rings=4, camera_decode_size=(200, 112))
    scan = read_lidar_bin(real_frame_messages()[LIDAR_NAME].path)
    assert len(thinned.lidar) == int((scan[:, 4].astype(int) % 4 == 0).sum())
    assert 0.15 < len(thinned.lidar) / len(full.lidar) < 0.35
    assert thinned.dropped_points["lidar_ring_thinned"] == len(full.lidar) - len(thinned.lidar)
    assert full.cameras.images.shape[-2:] == (113, 200)           # 1/8 DCT decode
    torch.testing.assert_close(full.cameras.intrinsics[:, 0, 0], frame_focals() / 8, rtol=1e-6, atol=0)


def frame_focals() -> torch.Tensor:
    return torch.tensor([real_frame_messages()[c].intrinsics[0, 0] for c in CAMERA_NAMES], dtype=torch.float32)


def test_real_images_decode_full_and_downscaled():
    path = real_frame_messages()["CAM_FRONT"].path
    full, factor = read_jpeg(path)
    half, half_factor = read_jpeg(path, decode_size=(704, 396))
    assert full.shape == (900, 1600, 3) and factor == 1
    assert half.shape == (450, 800, 3) and half_factor == 2
    assert abs(float(full.mean()) - float(half.mean())) < 2.0
