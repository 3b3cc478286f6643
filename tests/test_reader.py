"""The nuScenes reader: the message-level SampleBuilder (frames, bad input) and the Dataset against the devkit on a
generated nuScenes-format dataroot (the `tiny_dataroot` fixture)."""
import math

import numpy as np
import pytest
import torch
from nuscenes.eval.common.data_classes import EvalBoxes
from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes
from nuscenes.eval.detection.data_classes import DetectionBox
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud
from nuscenes.utils.geometry_utils import transform_matrix, view_points
from nuscenes.utils.map_mask import MapMask
from PIL import Image
from pyquaternion import Quaternion

from fusion.datasets import nuscenes as reader
from fusion.datasets import nuscenes_index
from fusion.datasets.collate import collate_samples
from fusion.datasets.io import RADAR_PCD_FIELDS, write_radar_pcd
from fusion.datasets.nuscenes import (DETECTION_EVAL_RANGE, CanState, NuScenesDataset, SampleBuilder, SensorMessage,
                                      can_state_at, crop_map, load_map_layer)
from fusion.datasets.transforms import Compose, GlobalAugmentation, ImageResizeCrop, PointRangeFilter
from fusion.geometry import invert_transform, make_transform, rotation_z
from fusion.grid import BEVGrid
from fusion.types import ATTRIBUTES, CAMERA_NAMES, DETECTION_CLASSES, LIDAR_NAME, RADAR_NAMES, Batch

GRID = BEVGrid(-40.0, 40.0, -40.0, 40.0, -5.0, 3.0, 0.8)


# ================================================================================================================
# The message-level builder (no dataroot needed)
# ================================================================================================================

KEY_US, SWEEP_US, CAM_US = 1_000_000_000, 999_950_000, 999_980_000
EGO_KEY = make_transform(rotation_z(0.30), [100.0, 50.0, 0.0])
EGO_SWEEP = make_transform(rotation_z(0.27), [99.2, 49.7, 0.0])       # 50 ms earlier: moved and turned
LIDAR_CALIB = make_transform(Quaternion(axis=[0, 0, 1], angle=-math.pi / 2).elements, [0.94, 0.0, 1.84])
RADAR_CALIB = make_transform(rotation_z(0.8), [2.4, 0.8, 0.5])
CAM_CALIB = make_transform(np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), [1.7, 0.0, 1.5])  # looks +x
CAM_K = np.array([[300.0, 0.0, 160.0], [0.0, 300.0, 90.0], [0.0, 0.0, 1.0]])


def world_points(n=400, seed=0):
    """Static points in the global frame around the ego (5-40 m away)."""
    rng = np.random.default_rng(seed)
    angle, distance = rng.uniform(-math.pi, math.pi, n), rng.uniform(5, 40, n)
    local = np.stack([distance * np.cos(angle), distance * np.sin(angle), rng.uniform(-1.5, 2.0, n)], axis=1)
    return local @ EGO_KEY[:3, :3].T + EGO_KEY[:3, 3]


def to_sensor(points_global, ego_to_global, sensor_to_ego):
    inverse = invert_transform(ego_to_global @ sensor_to_ego)
    return points_global @ inverse[:3, :3].T + inverse[:3, 3]


def write_scan(path, points_sensor, seed=0):
    rng = np.random.default_rng(seed)
    scan = np.concatenate([points_sensor, rng.uniform(0, 100, (len(points_sensor), 1)),
                           rng.integers(0, 32, (len(points_sensor), 1))], axis=1).astype(np.float32)
    scan.tofile(path)
    return scan


@pytest.fixture
def messages(tmp_path):
    """A keyframe scan and one sweep of the same static world, one radar, one camera."""
    world = world_points()
    key_scan = write_scan(tmp_path / "key.pcd.bin", to_sensor(world, EGO_KEY, LIDAR_CALIB))
    write_scan(tmp_path / "sweep.pcd.bin", to_sensor(world, EGO_SWEEP, LIDAR_CALIB), seed=1)
    radar = np.zeros((len(world), len(RADAR_PCD_FIELDS)))
    radar[:, :3] = to_sensor(world, EGO_SWEEP, RADAR_CALIB)
    velocity_global = np.array([3.0, -1.0, 0.0])
    radar_rotation = (EGO_SWEEP @ RADAR_CALIB)[:3, :3]
    radar[:, 8:10] = (velocity_global @ radar_rotation)[:2]                 # vx_comp, vy_comp in the sensor frame
    radar[:, 5] = 7.5
    radar[:, 3] = 2
    radar[:, RADAR_PCD_FIELDS.index("ambig_state")] = 3
    write_radar_pcd(tmp_path / "radar.pcd", radar, trailing_bytes=500)
    Image.fromarray(np.full((180, 320, 3), 90, np.uint8)).save(tmp_path / "cam.jpg")
    return {
        "world": world, "key_scan": key_scan, "velocity_global": velocity_global, "dir": tmp_path,
        "key": SensorMessage(LIDAR_NAME, KEY_US, str(tmp_path / "key.pcd.bin"), LIDAR_CALIB, EGO_KEY),
        "sweep": SensorMessage(LIDAR_NAME, SWEEP_US, str(tmp_path / "sweep.pcd.bin"), LIDAR_CALIB, EGO_SWEEP),
        "radar": SensorMessage("RADAR_FRONT", SWEEP_US, str(tmp_path / "radar.pcd"), RADAR_CALIB, EGO_SWEEP),
        "cam": SensorMessage("CAM_FRONT", CAM_US, str(tmp_path / "cam.jpg"), CAM_CALIB, EGO_SWEEP, CAM_K),
    }


def build(messages, **options):
    options = {"grid": GRID, "radars": ("RADAR_FRONT",), "cameras": ("CAM_FRONT",), "lidar_min_distance": 0.0,
               "radar_min_distance": 0.0, "radar_filters": "none", **options}
    builder = SampleBuilder(**options)
    return builder.build(token="tok", scene_name="scene-0001", keyframe_lidar=messages["key"],
                         lidar_sweeps=[messages["sweep"]], radar_messages={"RADAR_FRONT": [messages["radar"]]},
                         camera_messages={"CAM_FRONT": messages["cam"]},
                         can_state=CanState(5.0, 0.1, (0.2, 0.0, 9.8), True))


def test_builder_motion_compensates_every_sensor_into_the_keyframe(messages):
    sample = build(messages)
    expected = to_sensor(messages["world"], EGO_KEY, np.eye(4))           # the world in the keyframe ego frame
    n = len(expected)
    assert sample.lidar.shape == (2 * n, 5)
    np.testing.assert_allclose(sample.lidar[:n, :3].numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(sample.lidar[n:, :3].numpy(), expected, atol=1e-4)   # the sweep, compensated
    np.testing.assert_array_equal(sample.lidar[:n, 3].numpy(), messages["key_scan"][:, 3])
    assert torch.all(sample.lidar[:n, 4] == 0)
    torch.testing.assert_close(sample.lidar[n:, 4], torch.full((n,), 0.05))
    # radar: positions compensated, velocities rotated into the keyframe ego frame, time lag
    np.testing.assert_allclose(sample.radar[:, :3].numpy(), expected, atol=1e-4)
    velocity = messages["velocity_global"] @ EGO_KEY[:3, :3]
    np.testing.assert_allclose(sample.radar[:, 4:6].numpy(), np.tile(velocity[:2], (n, 1)), atol=1e-5)
    assert torch.all(sample.radar[:, 3] == 7.5) and torch.all(sample.radar[:, 6] == 2)
    torch.testing.assert_close(sample.radar[:, 7], torch.full((n,), 0.05))
    # camera: a world point lands on the pixel the camera saw it at, at its own time
    cams = sample.cameras
    ego_to_cam = np.linalg.inv(cams.cam_to_ego[0].double().numpy())
    own = to_sensor(messages["world"], EGO_SWEEP, CAM_CALIB)
    ours = expected @ ego_to_cam[:3, :3].T + ego_to_cam[:3, 3]
    front = own[:, 2] > 1
    np.testing.assert_allclose(view_points(ours[front].T, cams.intrinsics[0].double().numpy(), True)[:2],
                               view_points(own[front].T, CAM_K, True)[:2], atol=1e-2)
    assert cams.time_offsets.tolist() == pytest.approx([-0.02])
    assert cams.images.shape == (1, 3, 180, 320) and cams.images.dtype == torch.uint8
    assert bool(sample.ego.can_valid) and float(sample.ego.speed) == 5.0
    torch.testing.assert_close(sample.ego.ego_to_global, torch.from_numpy(EGO_KEY))


def test_builder_drops_and_counts_nonfinite_and_close_points(messages):
    scan = np.fromfile(messages["key"].path, np.float32).reshape(-1, 5)
    scan[:3, 0] = np.nan
    scan[3, 2] = np.inf
    scan[4, :2] = (0.5, -0.3)                                         # within the devkit's 1 m box
    scan.tofile(messages["key"].path)
    sample = build(messages, lidar_sweeps=0, lidar_min_distance=1.0)
    assert sample.dropped_points["lidar_nonfinite"] == 4
    assert sample.dropped_points["lidar_close"] >= 1
    assert len(sample.lidar) == len(scan) - 4 - sample.dropped_points["lidar_close"]
    assert torch.isfinite(sample.lidar).all()


def test_builder_thins_lidar_rings(messages):
    sample = build(messages, lidar_sweeps=0, lidar_keep_rings=2)
    rings = messages["key_scan"][:, 4].astype(int)
    assert len(sample.lidar) == int((rings % 2 == 0).sum())
    np.testing.assert_array_equal(sample.lidar[:, 3].numpy(), messages["key_scan"][rings % 2 == 0, 3])


def test_missing_lidar_file_errors_or_is_marked(messages):
    messages["key"] = SensorMessage(LIDAR_NAME, KEY_US, str(messages["dir"] / "gone.pcd.bin"), LIDAR_CALIB, EGO_KEY)
    with pytest.raises(FileNotFoundError, match="gone.pcd.bin"):
        build(messages)
    sample = build(messages, on_missing="mark_missing")
    assert sample.lidar is None and "gone.pcd.bin" in sample.missing[LIDAR_NAME]
    assert sample.radar is not None and sample.cameras is not None


def test_missing_sweep_is_counted_when_marking(messages):
    messages["sweep"] = SensorMessage(LIDAR_NAME, SWEEP_US, str(messages["dir"] / "gone.pcd.bin"), LIDAR_CALIB,
                                      EGO_SWEEP)
    with pytest.raises(FileNotFoundError, match="gone.pcd.bin"):
        build(messages)
    sample = build(messages, on_missing="mark_missing")
    assert sample.dropped_points["lidar_sweeps_missing"] == 1 and len(sample.lidar) == len(messages["world"])


def test_truncated_lidar_names_the_file(messages):
    with open(messages["key"].path, "ab") as f:
        f.write(b"\0" * 7)
    with pytest.raises(ValueError, match="key.pcd.bin"):
        build(messages)


def test_bad_radar_header_errors_or_is_marked(messages):
    with open(messages["radar"].path, "wb") as f:
        f.write(b"# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nDATA ascii\n1 2 3\n")
    with pytest.raises(ValueError, match="radar.pcd"):
        build(messages)
    sample = build(messages, on_missing="mark_missing")
    assert sample.radar is None and "radar.pcd" in sample.missing["RADAR_FRONT"]


def test_corrupt_jpeg_errors_or_is_marked(messages):
    with open(messages["cam"].path, "r+b") as f:
        f.truncate(300)
    with pytest.raises(ValueError, match="cam.jpg"):
        build(messages)
    both = dict(messages, cam2=SensorMessage("CAM_BACK", CAM_US, str(messages["dir"] / "cam_back.jpg"), CAM_CALIB,
                                             EGO_SWEEP, CAM_K))
    Image.fromarray(np.full((180, 320, 3), 200, np.uint8)).save(messages["dir"] / "cam_back.jpg")
    builder = SampleBuilder(grid=GRID, radars=(), cameras=("CAM_FRONT", "CAM_BACK"), on_missing="mark_missing")
    sample = builder.build(token="t", scene_name="s", keyframe_lidar=both["key"],
                           camera_messages={"CAM_FRONT": both["cam"], "CAM_BACK": both["cam2"]})
    assert sample.cameras.valid.tolist() == [False, True]
    assert sample.cameras.images[0].sum() == 0 and sample.cameras.images[1].float().mean() > 150
    assert "cam.jpg" in sample.missing["CAM_FRONT"] and sample.present("camera")


def test_absent_can_and_map_are_nan_not_zeros(messages):
    builder = SampleBuilder(grid=GRID, radars=(), cameras=())
    sample = builder.build(token="t", scene_name="s", keyframe_lidar=messages["key"])
    assert not bool(sample.ego.can_valid) and torch.isnan(sample.ego.speed) and torch.isnan(sample.ego.yaw_rate)
    assert torch.isnan(sample.ego.acceleration).all() and "CAN" in sample.missing
    assert sample.map_raster is None and not sample.present("gps")
    assert sample.radar is None and sample.cameras is None


def test_can_state_interpolates_and_reports_gaps():
    pose = [{"utime": t, "vel": [10.0 + t * 1e-6, 0, 0], "accel": [0.1, 0.2, 9.8], "rotation_rate": [0, 0, 0.05]}
            for t in range(0, 1_000_001, 20_000)]
    imu = [{"utime": t, "linear_accel": [0.3, 0.0, 9.8], "rotation_rate": [0, 0, 0.07], "q": [1, 0, 0, 0]}
           for t in range(0, 1_000_001, 10_000)]
    state = can_state_at({"pose": pose, "ms_imu": imu}, 505_000)
    assert state.valid and state.speed == pytest.approx(10.505) and state.yaw_rate == pytest.approx(0.07)
    assert state.acceleration == pytest.approx((0.3, 0.0, 9.8))
    gap = [m for m in pose if not 400_000 < m["utime"] < 700_000]
    absent = can_state_at({"pose": gap}, 505_000)
    assert not absent.valid and math.isnan(absent.speed) and "speed" in absent.reason
    monitor = [{"utime": t, "vehicle_speed": 36.0, "yaw_rate": 10.0} for t in range(0, 1_000_001, 500_000)]
    state = can_state_at({"ms_imu": imu, "vehicle_monitor": monitor}, 250_000)
    assert state.valid and state.speed == pytest.approx(10.0) and state.yaw_rate == pytest.approx(0.07)
    only_monitor = can_state_at({"vehicle_monitor": monitor}, 250_000)
    assert not only_monitor.valid and "acceleration" in only_monitor.reason
    assert not can_state_at({}, 0).valid


def test_map_crop_matches_the_devkit_map_mask(tmp_path):
    rng = np.random.default_rng(0)
    mask = (np.kron(rng.uniform(size=(60, 80)) > 0.5, np.ones((25, 25))) * 255).astype(np.uint8)   # 1500 x 2000
    Image.fromarray(mask).save(tmp_path / "map.png")
    layer = load_map_layer(str(tmp_path / "map.png"))
    pose = make_transform(rotation_z(0.4), [100.0, 75.0, 0.0])
    raster = crop_map(layer, pose, GRID)
    assert raster.shape == (1, *GRID.shape) and 0.3 < raster.mean() < 0.7
    centers = GRID.cell_centers(dtype=torch.float64).reshape(-1, 2).numpy()
    global_xy = centers @ pose[:2, :2].T + pose[:2, 3]
    expected = MapMask(str(tmp_path / "map.png")).is_on_mask(global_xy[:, 0], global_xy[:, 1])
    np.testing.assert_array_equal(raster.reshape(-1) == 1.0, expected)
    cached = load_map_layer(str(tmp_path / "map.png"), cache_dir=str(tmp_path / "cache"))
    assert cached is layer                                              # one copy per process


class FakeTables:
    """Just enough of a NuScenes object for the ground-truth conversion: sample_annotation rows and velocities."""

    def __init__(self, annotations, velocities):
        self.annotations = {a["token"]: a for a in annotations}
        self.velocities = velocities

    def get(self, table, token):
        assert table == "sample_annotation"
        return self.annotations[token]

    def box_velocity(self, token):
        return np.asarray(self.velocities.get(token, (np.nan, np.nan, np.nan)), dtype=float)


def annotation(token, category, translation, size=(0.6, 1.8, 1.2), yaw=0.0, attributes=(), lidar=5, radar=0):
    return {"token": token, "category_name": category, "translation": list(translation), "size": list(size),
            "rotation": list(Quaternion(axis=[0, 0, 1], angle=yaw).elements), "attribute_tokens": list(attributes),
            "num_lidar_pts": lidar, "num_radar_pts": radar}


def test_ground_truth_conversion_follows_the_devkit_rules():
    ego = make_transform(rotation_z(0.5), [100.0, 200.0, 0.0])
    rows = [annotation("rack", "static_object.bicycle_rack", (110, 200, 0.5), size=(4.0, 2.0, 1.5)),
            annotation("bike_in", "vehicle.bicycle", (110.5, 200.2, 0.5), attributes=("a1",)),
            annotation("bike_out", "vehicle.bicycle", (120, 200, 0.5), yaw=1.0),
            annotation("car_in", "vehicle.car", (109.5, 199.8, 0.8), size=(1.9, 4.5, 1.6)),
            annotation("cone", "movable_object.trafficcone", (101, 201, 0.3), lidar=0),
            annotation("animal", "animal", (105, 205, 0.3))]
    nusc = FakeTables(rows, {"bike_out": (3.0, 4.0, 0.0)})
    columns = nuscenes_index._ground_truth(nusc, {"anns": [r["token"] for r in rows]}, ego,
                                           {"a1": "cycle.without_rider"})
    names = [DETECTION_CLASSES[label] for label in columns["label"]]
    assert names == ["bicycle", "bicycle", "car", "traffic_cone"]                  # rack and animal are not classes
    assert columns["bike_rack"] == [True, False, False, False]                     # only cycles inside a rack
    assert columns["attribute"] == [ATTRIBUTES.index("cycle.without_rider"), -1, -1, -1]
    np.testing.assert_allclose(columns["size"][2], (4.5, 1.9, 1.6))               # (l, w, h) from the devkit's wlh
    expected_center = invert_transform(ego) @ np.array([120.0, 200.0, 0.5, 1.0])
    np.testing.assert_allclose(columns["center"][1], expected_center[:3], atol=1e-9)
    assert columns["yaw"][1] == pytest.approx(0.5)                                 # 1.0 global - 0.5 ego heading
    np.testing.assert_allclose(columns["velocity"][1], rotation_z(-0.5)[:2, :2] @ [3.0, 4.0])
    assert np.isnan(columns["velocity"][0]).all()                                  # no estimate: NaN, not zeros
    assert columns["dist"][1] == pytest.approx(20.0) and columns["lidar"][3] == 0
    rows[1]["attribute_tokens"] = ["a1", "a1"]
    with pytest.raises(ValueError, match="bike_in"):
        nuscenes_index._ground_truth(nusc, {"anns": ["bike_in"]}, ego, {"a1": "cycle.without_rider"})


def test_dataroot_without_version_folder_is_a_clear_error(tmp_path):
    (tmp_path / "samples").mkdir()
    with pytest.raises(FileNotFoundError, match="v1.0-mini"):
        NuScenesDataset(str(tmp_path), "v1.0-mini", "mini_val")
    with pytest.raises(FileNotFoundError, match="dataroot not found"):
        NuScenesDataset(str(tmp_path / "absent"), "v1.0-mini", "mini_val")


def test_builder_rejects_bad_options():
    with pytest.raises(ValueError, match="on_missing"):
        SampleBuilder(on_missing="ignore")
    with pytest.raises(ValueError, match="camera"):
        SampleBuilder(cameras=("CAM_TOP",))
    with pytest.raises(ValueError, match="lidar_keep_rings"):
        SampleBuilder(lidar_keep_rings=0)


# ================================================================================================================
# The Dataset against the devkit on a generated dataroot
# ================================================================================================================

@pytest.fixture(scope="module")
def nusc(tiny_dataroot):
    from nuscenes.nuscenes import NuScenes
    return NuScenes(tiny_dataroot.version, tiny_dataroot.dataroot, verbose=False)


@pytest.fixture(scope="module")
def dataset(tiny_dataroot):
    return NuScenesDataset(tiny_dataroot.dataroot, tiny_dataroot.version, tiny_dataroot.train_split, grid=GRID)


@pytest.fixture(scope="module")
def picked(dataset):
    """A scene's first keyframe (fewer previous sweeps) and a later one, loaded once."""
    later = min(len(dataset) - 1, 2)
    return {i: dataset[i] for i in (0, later)}


def pose_matrix(record, inverse=False):
    return transform_matrix(record["translation"], Quaternion(record["rotation"]), inverse=inverse)


def reference(nusc, token):
    sample = nusc.get("sample", token)
    sd = nusc.get("sample_data", sample["data"][LIDAR_NAME])
    return sample, nusc.get("ego_pose", sd["ego_pose_token"]), nusc.get("calibrated_sensor",
                                                                          sd["calibrated_sensor_token"])


def test_lidar_equals_devkit_multisweep(nusc, picked):
    for sample in picked.values():
        record, _, calib = reference(nusc, sample.token)
        cloud, times = LidarPointCloud.from_file_multisweep(nusc, record, LIDAR_NAME, LIDAR_NAME, nsweeps=10)
        finite = np.isfinite(cloud.points).all(axis=0)
        ego = pose_matrix(calib) @ np.vstack([cloud.points[:3], np.ones(cloud.points.shape[1])])
        assert sample.dropped_points["lidar_nonfinite"] == int((~finite).sum())
        assert sample.lidar.shape == (int(finite.sum()), 5) and len(sample.lidar) > 1000
        np.testing.assert_allclose(sample.lidar[:, :3].numpy(), ego[:3, finite].T, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(sample.lidar[:, 3].numpy(), cloud.points[3, finite])
        np.testing.assert_allclose(sample.lidar[:, 4].numpy(), times[0, finite], atol=1e-6)


def test_radar_equals_devkit_multisweep_with_rotated_velocities(nusc, picked):
    for sample in picked.values():
        record, key_pose, calib = reference(nusc, sample.token)
        expected = []
        for channel in RADAR_NAMES:
            cloud, times = RadarPointCloud.from_file_multisweep(nusc, record, channel, LIDAR_NAME, nsweeps=6)
            xyz = pose_matrix(calib) @ np.vstack([cloud.points[:3], np.ones(cloud.points.shape[1])])
            # velocities: walk the same sweeps and rotate (vx_comp, vy_comp) sensor -> keyframe ego (pyquaternion)
            velocities, sd = [], nusc.get("sample_data", record["data"][channel])
            for _ in range(6):
                raw = RadarPointCloud.from_file(f"{nusc.dataroot}/{sd['filename']}")
                raw.remove_close(1.0)
                ego_pose = nusc.get("ego_pose", sd["ego_pose_token"])
                rotation = (pose_matrix(key_pose, inverse=True) @ pose_matrix(ego_pose)
                            @ pose_matrix(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])))[:3, :3]
                v = np.vstack([raw.points[8:10], np.zeros(raw.points.shape[1])])
                velocities.append((rotation @ v)[:2].T)
                if not sd["prev"]:
                    break
                sd = nusc.get("sample_data", sd["prev"])
            expected.append(np.concatenate([xyz[:3].T, cloud.points[5:6].T, np.concatenate(velocities),
                                            cloud.points[3:4].T, times.T], axis=1))
        expected = np.concatenate(expected)
        assert sample.radar.shape == expected.shape and len(expected) > 0
        np.testing.assert_allclose(sample.radar.numpy(), expected, atol=1e-4, rtol=1e-6)


def test_cameras_match_devkit_calibration_and_projection(nusc, picked):
    for sample in picked.values():
        record, key_pose, _ = reference(nusc, sample.token)
        cams = sample.cameras
        assert cams.names == CAMERA_NAMES and cams.valid.all()
        projected = 0
        for i, channel in enumerate(CAMERA_NAMES):
            sd = nusc.get("sample_data", record["data"][channel])
            calib = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            expected = (pose_matrix(key_pose, inverse=True) @ pose_matrix(nusc.get("ego_pose", sd["ego_pose_token"]))
                        @ pose_matrix(calib))
            np.testing.assert_allclose(cams.cam_to_ego[i].double().numpy(), expected, atol=1e-5)
            np.testing.assert_allclose(cams.intrinsics[i].double().numpy(), calib["camera_intrinsic"], rtol=1e-6)
            assert cams.images.shape[-2:] == (sd["height"], sd["width"])
            assert cams.time_offsets[i].item() == pytest.approx((sd["timestamp"] - sample.timestamp_us) * 1e-6,
                                                                abs=1e-6)
            # every annotation the devkit sees in this image projects to the same pixel through our calibration
            _, boxes, intrinsic = nusc.get_sample_data(sd["token"])
            for box in boxes:
                global_center = np.asarray(nusc.get("sample_annotation", box.token)["translation"])
                ego = pose_matrix(key_pose, inverse=True) @ np.append(global_center, 1.0)
                cam = np.linalg.inv(cams.cam_to_ego[i].double().numpy()) @ ego
                ours = view_points(cam[:3, None], cams.intrinsics[i].double().numpy(), True)[:2, 0]
                np.testing.assert_allclose(ours, view_points(box.center[:, None], intrinsic, True)[:2, 0], atol=0.05)
                projected += 1
        assert projected > 0


def devkit_boxes(nusc, token, max_dist):
    """The devkit's evaluation ground truth of one sample (load_gt's construction + filter_eval_boxes), as
    (DetectionBox, annotation token) pairs."""
    attributes = {a["token"]: a["name"] for a in nusc.attribute}
    tokens = {}
    for ann_token in nusc.get("sample", token)["anns"]:
        ann = nusc.get("sample_annotation", ann_token)
        name = category_to_detection_name(ann["category_name"])
        if name is None:
            continue
        box = DetectionBox(sample_token=token, translation=ann["translation"], size=ann["size"],
                           rotation=ann["rotation"], velocity=nusc.box_velocity(ann_token)[:2],
                           num_pts=ann["num_lidar_pts"] + ann["num_radar_pts"], detection_name=name,
                           attribute_name=attributes[ann["attribute_tokens"][0]] if ann["attribute_tokens"] else "")
        tokens[id(box)] = (box, ann_token)
    if not tokens:
        return []
    eval_boxes = EvalBoxes()
    eval_boxes.add_boxes(token, [box for box, _ in tokens.values()])
    kept = filter_eval_boxes(nusc, add_center_dist(nusc, eval_boxes), max_dist)[token]
    return [tokens[id(box)] for box in kept]


@pytest.mark.parametrize("eval_range", [None, DETECTION_EVAL_RANGE], ids=["all", "eval_range"])
def test_boxes_match_devkit_ground_truth(tiny_dataroot, nusc, dataset, eval_range):
    data = dataset if eval_range is None else NuScenesDataset(
        tiny_dataroot.dataroot, tiny_dataroot.version, tiny_dataroot.train_split, grid=GRID, box_eval_range=eval_range)
    max_dist = {name: (eval_range or {}).get(name, np.inf) for name in DETECTION_CLASSES}
    total = 0
    for i in range(min(len(data), 6)):
        token = str(data.index.sample_token[i])
        ours = data.index.boxes(i, True, data.box_eval_range, True)
        theirs = devkit_boxes(nusc, token, max_dist)
        assert len(ours) == len(theirs)
        _, key_pose, _ = reference(nusc, token)
        to_ego = Quaternion(key_pose["rotation"]).inverse
        for j, (box, ann_token) in enumerate(theirs):
            center = to_ego.rotate(np.asarray(box.translation) - np.asarray(key_pose["translation"]))
            np.testing.assert_allclose(ours.center[j].numpy(), center, atol=1e-4)
            w, l, h = box.size
            np.testing.assert_allclose(ours.size[j].numpy(), (l, w, h), rtol=1e-6)
            yaw = (to_ego * Quaternion(box.rotation)).yaw_pitch_roll[0]
            assert abs((ours.yaw[j].item() - yaw + math.pi) % (2 * math.pi) - math.pi) < 1e-4
            velocity = nusc.box_velocity(ann_token)                           # global (vx, vy, vz) or NaN
            if np.isnan(velocity).any():
                assert torch.isnan(ours.velocity[j]).all()
            else:
                np.testing.assert_allclose(ours.velocity[j].numpy(), to_ego.rotate(velocity)[:2], atol=1e-3)
            assert DETECTION_CLASSES[ours.labels[j]] == box.detection_name
            assert ours.attributes[j] == (ATTRIBUTES.index(box.attribute_name) if box.attribute_name else -1)
            assert int(ours.num_lidar_pts[j] + ours.num_radar_pts[j]) == box.num_pts
        total += len(theirs)
    assert total > 0


def test_map_raster_matches_devkit_map_mask(nusc, picked):
    for sample in picked.values():
        record, key_pose, _ = reference(nusc, sample.token)
        log = nusc.get("log", nusc.get("scene", record["scene_token"])["log_token"])
        mask = nusc.get("map", log["map_token"])["mask"]
        centers = GRID.cell_centers(dtype=torch.float64).reshape(-1, 2).numpy()
        global_xy = (pose_matrix(key_pose) @ np.vstack([centers.T, np.zeros(len(centers)), np.ones(len(centers))]))
        expected = mask.is_on_mask(global_xy[0], global_xy[1])
        assert sample.map_raster.shape == (1, *GRID.shape)
        mismatch = (sample.map_raster.reshape(-1).numpy() == 1.0) != expected
        assert mismatch.mean() < 1e-3        # only cells exactly on a pixel boundary may round the other way


def test_can_state_follows_the_can_bus(tiny_dataroot, dataset):
    """Speed is the CAN pose velocity interpolated at the keyframe, or vehicle_monitor's (km/h) where the pose
    stream has a gap; scenes without CAN files are absent (NaN), never zeros."""
    from nuscenes.can_bus.can_bus_api import NuScenesCanBus
    can_bus = NuScenesCanBus(dataroot=str(tiny_dataroot.dataroot))
    checked = 0
    for i in range(len(dataset)):
        state = dataset.can_state(i)
        sample = dataset[i] if i == 0 else None
        if not state.valid:
            assert math.isnan(state.speed) and state.reason
            continue
        scene, time = str(dataset.index.sample_scene[i]), int(dataset.index.sample_timestamp[i])
        pose = can_bus.get_messages(scene, "pose", print_warnings=False)
        times = np.array([m["utime"] for m in pose])
        after = int(np.searchsorted(times, time))
        if 0 < after < len(times) and times[after] - times[after - 1] <= 200_000:
            expected = np.interp(time, times, [m["vel"][0] for m in pose])
        else:
            monitor = can_bus.get_messages(scene, "vehicle_monitor", print_warnings=False)
            expected = np.interp(time, [m["utime"] for m in monitor], [m["vehicle_speed"] / 3.6 for m in monitor])
        assert state.speed == pytest.approx(expected, abs=1e-4)
        if sample is not None:
            assert bool(sample.ego.can_valid) and float(sample.ego.speed) == pytest.approx(expected, abs=1e-4)
        checked += 1
    assert checked > 0


def test_scene_without_can_files_is_absent_not_zero(tiny_dataroot):
    data = NuScenesDataset(tiny_dataroot.dataroot, tiny_dataroot.version, tiny_dataroot.val_split, grid=GRID,
                           cameras=(), lidar_sweeps=0, radar_sweeps=1)
    rows = [i for i in range(len(data)) if str(data.index.sample_scene[i]) in tiny_dataroot.scenes_without_can]
    assert rows, "the tiny dataroot's validation scene is documented to have no CAN bus files"
    sample = data[rows[0]]
    assert not bool(sample.ego.can_valid) and torch.isnan(sample.ego.speed) and "CAN" in sample.missing
    assert torch.equal(sample.ego.vector(), torch.zeros(5))


def test_index_is_cached_as_npz_and_reused(tiny_dataroot, dataset, tmp_path, monkeypatch):
    first = NuScenesDataset(tiny_dataroot.dataroot, tiny_dataroot.version, tiny_dataroot.train_split, grid=GRID,
                            cache_dir=str(tmp_path), cameras=())
    files = list(tmp_path.glob("nuscenes_index_*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as data:
        assert len(data["sample_token"]) == len(dataset)
    monkeypatch.setattr(reader, "build_index", lambda *a, **k: pytest.fail("index rebuilt despite the cache"))
    second = NuScenesDataset(tiny_dataroot.dataroot, tiny_dataroot.version, tiny_dataroot.train_split, grid=GRID,
                             cache_dir=str(tmp_path), cameras=())
    a, b = first[1], second[1]
    assert torch.equal(a.lidar, b.lidar) and torch.equal(a.radar, b.radar) and torch.equal(a.boxes.center,
                                                                                            b.boxes.center)
    assert a.missing["CAMERA"] and a.cameras is None


def test_splits_and_unknown_split(tiny_dataroot, dataset):
    val = NuScenesDataset(tiny_dataroot.dataroot, tiny_dataroot.version, tiny_dataroot.val_split, grid=GRID)
    assert len(val) > 0 and not set(val.sample_tokens) & set(dataset.sample_tokens)
    with pytest.raises(ValueError, match="no_such_split"):
        NuScenesDataset(tiny_dataroot.dataroot, tiny_dataroot.version, "no_such_split", grid=GRID)


def test_missing_camera_file_in_the_dataroot(tiny_dataroot):
    data = NuScenesDataset(tiny_dataroot.dataroot, tiny_dataroot.version, tiny_dataroot.train_split, grid=GRID,
                           on_missing="mark_missing", lidar_sweeps=0, radar_sweeps=1)
    row = int(data.index.sample_messages[0][reader.CHANNELS.index("CAM_BACK")])
    paths = data.index.msg_path.tolist()
    paths[row] = "samples/CAM_BACK/deleted.jpg"
    data.index.arrays["msg_path"] = np.array(paths)
    sample = data[0]
    assert sample.cameras.valid.tolist() == [name != "CAM_BACK" for name in CAMERA_NAMES]
    assert "deleted.jpg" in sample.missing["CAM_BACK"]
    data.builder.on_missing = "error"
    with pytest.raises(FileNotFoundError, match="deleted.jpg"):
        data[0]


def test_dataloader_with_transforms_collates_batches(tiny_dataroot):
    transforms = Compose([GlobalAugmentation(grid=GRID), PointRangeFilter(GRID), ImageResizeCrop((192, 96))])
    data = NuScenesDataset(tiny_dataroot.dataroot, tiny_dataroot.version, tiny_dataroot.train_split, grid=GRID,
                           transforms=transforms, camera_decode_size=(200, 100))
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=collate_samples)
    batch = next(iter(loader))
    assert isinstance(batch, Batch) and batch.batch_size == 2
    assert batch.cameras.images.shape == (2, 6, 3, 96, 192)
    assert batch.present["lidar"].all() and batch.present["radar"].all()
    assert GRID.contains(batch.lidar_points[:, :2]).all()
    assert set(batch.lidar_batch.unique().tolist()) == {0, 1}
    assert batch.map_raster.shape == (2, 1, *GRID.shape)
