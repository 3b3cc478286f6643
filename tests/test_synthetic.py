"""The synthetic nuScenes-format generator: the devkit loads its output, tables are consistent, sensors agree with
the annotations, CAN bus and map work, and output is deterministic per seed.

Most tests share the session's `tiny_dataroot` (tests/conftest.py); the determinism test generates two one-scene
dataroots of its own.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from nuscenes.can_bus.can_bus_api import NuScenesCanBus
from nuscenes.eval.detection.utils import category_to_detection_name, detection_name_to_rel_attributes
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.data_classes import Box, LidarPointCloud, RadarPointCloud
from nuscenes.utils.geometry_utils import points_in_box, view_points
from nuscenes.utils.map_mask import MapMask
from pyquaternion import Quaternion

from fusion.datasets.synthetic import SyntheticConfig, generate_dataroot
from fusion.datasets.synthetic.config import CAN_BLACKLIST
from fusion.datasets.synthetic.radar import PCD_HEADER, TRAILING_ZERO_BYTES

REPO = Path(__file__).resolve().parents[1]
TABLES = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
          "scene", "sample", "sample_data", "sample_annotation", "map")
CHANNELS = ("LIDAR_TOP", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT",
            "CAM_FRONT_LEFT", "RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT",
            "RADAR_BACK_RIGHT")


@pytest.fixture(scope="module")
def nusc(tiny_dataroot) -> NuScenes:
    return NuScenes(tiny_dataroot.version, str(tiny_dataroot.dataroot), verbose=False)


def _sensor_to_global(nusc: NuScenes, sd: dict) -> np.ndarray:
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    s2e = np.eye(4)
    s2e[:3, :3] = Quaternion(cs["rotation"]).rotation_matrix
    s2e[:3, 3] = cs["translation"]
    e2g = np.eye(4)
    e2g[:3, :3] = Quaternion(pose["rotation"]).rotation_matrix
    e2g[:3, 3] = pose["translation"]
    return e2g @ s2e


def _box(ann: dict) -> Box:
    return Box(ann["translation"], ann["size"], Quaternion(ann["rotation"]))


def _channel_records(nusc: NuScenes, scene: dict, channel: str) -> list[dict]:
    first = nusc.get("sample", scene["first_sample_token"])["data"][channel]
    sd = nusc.get("sample_data", first)
    while sd["prev"]:
        sd = nusc.get("sample_data", sd["prev"])
    out = [sd]
    while sd["next"]:
        sd = nusc.get("sample_data", sd["next"])
        out.append(sd)
    return out


def test_devkit_loads_every_table_split_and_sensor(tiny_dataroot, nusc):
    root = Path(tiny_dataroot.dataroot) / tiny_dataroot.version
    for table in TABLES:
        assert (root / f"{table}.json").is_file(), table
        assert len(getattr(nusc, table)) > 0, table
    splits = json.loads((root / "splits.json").read_text())
    assert splits == {tiny_dataroot.train_split: list(tiny_dataroot.train_scenes),
                      tiny_dataroot.val_split: list(tiny_dataroot.val_scenes)}
    assert tiny_dataroot.train_split == "synth_train" and tiny_dataroot.val_split == "synth_val"
    assert len(nusc.scene) == 2
    for scene in nusc.scene:
        assert re.match(r"^scene-\d{4}$", scene["name"])
        assert int(scene["name"][-4:]) not in CAN_BLACKLIST
    for sample in nusc.sample:
        assert set(sample["data"]) == set(CHANNELS)
        for channel, token in sample["data"].items():
            path = Path(nusc.get_sample_data_path(token))
            assert path.is_file() and path.stat().st_size > 0
            assert path.parts[-3] == "samples" and path.parent.name == channel
            assert re.match(rf"^.+__{channel}__\d{{16}}\.(pcd\.bin|pcd|jpg)$", path.name)
    assert len(nusc.map) == 2 and all(m["category"] == "semantic_prior" for m in nusc.map)
    for record in nusc.sample_data:
        assert re.match(r"^[0-9a-f]{32}$", record["token"])


def test_categories_attributes_and_sizes_are_nuscenes_like(nusc):
    per_class = defaultdict(list)
    for ann in nusc.sample_annotation:
        name = category_to_detection_name(ann["category_name"])
        attrs = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
        if name is None:
            assert ann["category_name"] == "movable_object.pushable_pullable"
            continue
        allowed = detection_name_to_rel_attributes(name)
        assert len(attrs) == (1 if allowed else 0), (name, attrs)
        assert set(attrs) <= set(allowed)
        per_class[name].append(ann["size"])
    assert {"car", "pedestrian"} <= set(per_class), set(per_class)
    expected_wlh = {"car": (1.9, 4.6, 1.6), "pedestrian": (0.6, 0.6, 1.7), "bus": (2.9, 11.5, 3.4),
                    "barrier": (2.5, 0.5, 1.0), "traffic_cone": (0.4, 0.4, 1.0), "truck": (2.5, 7.0, 3.0)}
    for name, wlh in expected_wlh.items():
        if name in per_class:
            median = np.median(np.array(per_class[name]), axis=0)
            np.testing.assert_allclose(median, wlh, rtol=0.45, err_msg=name)


def test_every_token_resolves_and_chains_are_consistent(nusc):
    for sd in nusc.sample_data:
        nusc.get("sample", sd["sample_token"])
        pose = nusc.get("ego_pose", sd["ego_pose_token"])
        assert pose["timestamp"] == sd["timestamp"]
        nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        for key in ("prev", "next"):
            if sd[key]:
                other = nusc.get("sample_data", sd[key])
                assert other["channel"] == sd["channel"]
                assert (other["timestamp"] > sd["timestamp"]) == (key == "next")
    for scene in nusc.scene:
        nusc.get("log", scene["log_token"])
        tokens, sample = [], nusc.get("sample", scene["first_sample_token"])
        assert sample["prev"] == ""
        while True:
            tokens.append(sample["token"])
            assert sample["scene_token"] == scene["token"]
            if not sample["next"]:
                break
            nxt = nusc.get("sample", sample["next"])
            assert nxt["prev"] == sample["token"] and nxt["timestamp"] > sample["timestamp"]
            sample = nxt
        assert tokens[-1] == scene["last_sample_token"] and len(tokens) == scene["nbr_samples"]
    for inst in nusc.instance:
        nusc.get("category", inst["category_token"])
        ann = nusc.get("sample_annotation", inst["first_annotation_token"])
        assert ann["prev"] == ""
        count = 1
        while ann["next"]:
            nxt = nusc.get("sample_annotation", ann["next"])
            assert nxt["prev"] == ann["token"] and nxt["instance_token"] == inst["token"]
            assert nusc.get("sample", nxt["sample_token"])["timestamp"] > \
                nusc.get("sample", ann["sample_token"])["timestamp"]
            ann = nxt
            count += 1
        assert ann["token"] == inst["last_annotation_token"] and count == inst["nbr_annotations"]
    for ann in nusc.sample_annotation:
        nusc.get("visibility", ann["visibility_token"])
        for t in ann["attribute_tokens"]:
            nusc.get("attribute", t)
    for m in nusc.map:
        for t in m["log_tokens"]:
            nusc.get("log", t)


def test_sensor_rates_and_keyframe_timing(nusc):
    expected_hz = {"LIDAR_TOP": 20.0, "CAM_FRONT": 12.0, "CAM_BACK": 12.0, "RADAR_FRONT": 13.0,
                   "RADAR_BACK_LEFT": 13.0}
    for scene in nusc.scene:
        for channel, hz in expected_hz.items():
            records = _channel_records(nusc, scene, channel)
            dt = np.diff([r["timestamp"] for r in records]) / 1e6
            assert abs(np.median(dt) - 1.0 / hz) < 0.1 / hz, channel
            assert all(r["token"] == r["ego_pose_token"] for r in records)
        lidar = _channel_records(nusc, scene, "LIDAR_TOP")
        key_positions = [i for i, r in enumerate(lidar) if r["is_key_frame"]]
        assert np.all(np.diff(key_positions) == 10), "a LiDAR keyframe every 10th sweep (2 Hz)"
        assert key_positions[0] >= 9, "the first keyframe has 9 sweeps before it"
    for sample in nusc.sample:
        lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        assert lidar["timestamp"] == sample["timestamp"] and lidar["is_key_frame"]
        for channel in CHANNELS:
            sd = nusc.get("sample_data", sample["data"][channel])
            limit = 0.045 if channel.startswith("CAM") else 0.04
            assert abs(sd["timestamp"] - sample["timestamp"]) / 1e6 < limit, channel


def test_lidar_points_match_num_lidar_pts_and_hit_objects_and_ground(nusc):
    cs = nusc.get("calibrated_sensor", nusc.get("sample_data", nusc.sample[0]["data"]["LIDAR_TOP"])
                  ["calibrated_sensor_token"])
    yaw = Quaternion(cs["rotation"]).yaw_pitch_roll[0]
    assert abs(abs(np.degrees(yaw)) - 90.0) < 3.0, "LIDAR_TOP is rotated ~90 deg about z like nuScenes"
    total_in_boxes, checked, zero = 0, 0, 0
    for sample in nusc.sample:
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        raw = np.fromfile(nusc.get_sample_data_path(sd["token"]), dtype=np.float32)
        assert raw.size % 5 == 0
        points = raw.reshape(-1, 5)
        assert 5_000 < len(points) < 60_000
        assert set(np.unique(points[:, 4])) <= set(range(32)) and points[:, 3].max() <= 255
        pc = LidarPointCloud.from_file(nusc.get_sample_data_path(sd["token"]))
        pc.transform(_sensor_to_global(nusc, sd))
        xyz = pc.points[:3]
        ground = np.abs(xyz[2]) < 0.25
        assert 0.1 < ground.mean() < 0.8, ground.mean()
        for token in sample["anns"]:
            ann = nusc.get("sample_annotation", token)
            near = np.linalg.norm(xyz[:2] - np.array(ann["translation"][:2])[:, None], axis=0) < max(ann["size"])
            inside = int(points_in_box(_box(ann), xyz[:, near]).sum())
            assert abs(inside - ann["num_lidar_pts"]) <= 1, (ann["category_name"], inside, ann["num_lidar_pts"])
            total_in_boxes += inside
            checked += 1
            zero += ann["num_lidar_pts"] == 0
    assert checked > 50 and total_in_boxes > 500
    assert 0 < zero < checked, "some annotations (far or occluded) have no LiDAR points, most do not"


def test_radar_files_parse_like_the_devkit_and_include_filtered_points(nusc, tiny_dataroot):
    RadarPointCloud.default_filters()
    kept_total = all_total = 0
    for sample in nusc.sample[:4]:
        for channel in CHANNELS[7:]:
            path = nusc.get_sample_data_path(sample["data"][channel])
            raw = Path(path).read_bytes()
            header_end = raw.index(b"DATA binary\n") + len(b"DATA binary\n")
            width = int(re.search(rb"WIDTH (\d+)", raw).group(1))
            assert raw[:header_end].decode() == PCD_HEADER.format(n=width)
            assert len(raw) == header_end + 43 * width + TRAILING_ZERO_BYTES
            assert raw[header_end + 43 * width:] == b"\x00" * TRAILING_ZERO_BYTES
            kept = RadarPointCloud.from_file(path)
            everything = RadarPointCloud.from_file(path, invalid_states=list(range(18)),
                                                   dynprop_states=list(range(8)), ambig_states=list(range(5)))
            assert everything.points.shape == (18, width)
            kept_total += kept.nbr_points()
            all_total += everything.nbr_points()
    assert 0 < kept_total < all_total, "the devkit's default filters drop some points, not all"
    assert all_total / (4 * 5) > 10, "tens of returns per radar message"


def test_radar_counts_doppler_and_ego_motion_compensation(nusc):
    differences, counted, mismatches = [], 0, 0
    for sample in nusc.sample:
        points = []
        for channel in CHANNELS[7:]:
            sd = nusc.get("sample_data", sample["data"][channel])
            pc = RadarPointCloud.from_file(nusc.get_sample_data_path(sd["token"]), invalid_states=list(range(18)),
                                           dynprop_states=list(range(8)), ambig_states=list(range(5)))
            v_raw, v_comp = pc.points[6:8], pc.points[8:10]
            differences.append(np.linalg.norm(v_raw - v_comp, axis=0))
            pc.transform(_sensor_to_global(nusc, sd))
            points.append(pc.points[:3])
        xyz = np.concatenate(points, axis=1)
        for token in sample["anns"]:
            ann = nusc.get("sample_annotation", token)
            inside = int(points_in_box(_box(ann), xyz).sum())
            mismatches += abs(inside - ann["num_radar_pts"]) > 1
            counted += ann["num_radar_pts"]
    assert mismatches == 0 and counted > 0
    ego_speed = _ego_speeds(nusc)
    if np.median(ego_speed) > 2.0:
        assert np.median(np.concatenate(differences)) > 0.5, "raw Doppler includes the ego motion"


def _ego_speeds(nusc: NuScenes) -> np.ndarray:
    speeds = []
    for scene in nusc.scene:
        lidar = _channel_records(nusc, scene, "LIDAR_TOP")
        pos = np.array([nusc.get("ego_pose", r["ego_pose_token"])["translation"][:2] for r in lidar])
        t = np.array([r["timestamp"] for r in lidar]) / 1e6
        speeds.append(np.linalg.norm(np.diff(pos, axis=0), axis=1) / np.diff(t))
    return np.concatenate(speeds)


def test_attributes_agree_with_annotation_motion(nusc):
    checked = Counter()
    for ann in nusc.sample_annotation:
        if not ann["attribute_tokens"] or not (ann["prev"] and ann["next"]):
            continue
        attr = nusc.get("attribute", ann["attribute_tokens"][0])["name"]
        speed = np.linalg.norm(nusc.box_velocity(ann["token"])[:2])
        if attr in ("vehicle.parked", "pedestrian.sitting_lying_down"):
            assert speed < 0.3, (attr, speed)
        elif attr in ("vehicle.moving", "pedestrian.moving"):
            assert speed > 0.2, (attr, speed)
        checked[attr] += 1
    assert checked["vehicle.parked"] > 0 and checked["pedestrian.moving"] > 0, checked


def test_camera_images_show_objects_where_boxes_project(nusc, tiny_dataroot):
    """Render each camera with an empty world (no actors) and check the JPEG differs at projected boxes."""
    from fusion.datasets.synthetic.camera import CameraRenderer
    from fusion.datasets.synthetic.raycast import SceneGeometry
    from fusion.datasets.synthetic.rig import CAMERAS, SensorCalibration
    from fusion.datasets.synthetic.scene import scene_time_origin, scene_world
    from PIL import Image

    cfg = tiny_dataroot.config
    scene = nusc.scene[0]
    world = scene_world(cfg, 0)
    t0 = scene_time_origin(cfg, 0)
    first = nusc.get("sample", scene["first_sample_token"])
    calibrations = {}
    for channel in CAMERAS:
        cs = nusc.get("calibrated_sensor", nusc.get("sample_data", first["data"][channel])["calibrated_sensor_token"])
        calibrations[channel] = SensorCalibration(channel, "camera", tuple(cs["translation"]), tuple(cs["rotation"]),
                                                  tuple(tuple(r) for r in cs["camera_intrinsic"]))
    renderer = CameraRenderer(SceneGeometry(replace(world, actors=[])), calibrations, cfg.image_width,
                              cfg.image_height)
    differing, checked, token = 0, 0, first["token"]
    while token:
        sample = nusc.get("sample", token)
        token = sample["next"]
        for channel in CAMERAS:
            sd = nusc.get("sample_data", sample["data"][channel])
            k = calibrations[channel].intrinsic_matrix()
            cam_to_global = _sensor_to_global(nusc, sd)
            background = renderer.render(channel, (sd["timestamp"] - t0) / 1e6, cam_to_global, k,
                                         np.random.default_rng(0), 1.0)[..., ::-1].astype(np.float32)
            image = np.asarray(Image.open(nusc.get_sample_data_path(sd["token"])), dtype=np.float32)
            assert image.shape == (sd["height"], sd["width"], 3)
            # Where no object stands the image matches the empty-world rendering (same ground, sky, buildings).
            agree = (np.abs(image - background).mean(axis=2) < 15.0).mean()
            assert agree > 0.3, (channel, agree)
            global_to_cam = np.linalg.inv(cam_to_global)
            for ann_token in sample["anns"]:
                ann = nusc.get("sample_annotation", ann_token)
                if ann["visibility_token"] not in ("3", "4") or ann["num_lidar_pts"] < 1:
                    continue
                centre = global_to_cam[:3, :3] @ np.array(ann["translation"]) + global_to_cam[:3, 3]
                if not 3.0 < centre[2] < 30.0:
                    continue
                u, v = view_points(centre[:, None], k, normalize=True)[:2, 0]
                if not (3 <= u < sd["width"] - 3 and 3 <= v < sd["height"] - 3):
                    continue
                win = (slice(int(v) - 1, int(v) + 2), slice(int(u) - 1, int(u) + 2))
                checked += 1
                differing += np.abs(image[win] - background[win]).mean() > 12.0
    assert checked >= 10, checked
    assert differing >= 0.85 * checked, (differing, checked)


def test_can_bus_loads_and_agrees_with_ego_poses(tiny_dataroot, nusc):
    can = NuScenesCanBus(dataroot=str(tiny_dataroot.dataroot))
    with_can = [n for n in tiny_dataroot.scene_names if n not in tiny_dataroot.scenes_without_can]
    assert with_can and tiny_dataroot.scenes_without_can
    for name in tiny_dataroot.scenes_without_can:
        assert not list((Path(tiny_dataroot.dataroot) / "can_bus").glob(f"{name}_*"))
    name = with_can[0]
    route, pose_xy = can.get_pose_and_route(name)
    assert route.shape[1] == 2 and pose_xy.shape[1] == 2 and len(pose_xy) > 50
    assert np.max(np.min(np.linalg.norm(pose_xy[:, None] - route[None], axis=2), axis=1)) < 5.0
    rates = {"pose": 50.0, "ms_imu": 100.0, "vehicle_monitor": 2.0}
    for message, hz in rates.items():
        msgs = can.get_messages(name, message)
        dt = np.diff([m["utime"] for m in msgs]) / 1e6
        assert abs(np.median(dt) - 1.0 / hz) < 0.05 / hz, message
    meta = can.get_messages(name, "meta")
    assert meta["pose"]["message_count"] == len(can.get_messages(name, "pose"))
    monitor = can.get_messages(name, "vehicle_monitor")
    assert set(monitor[0]) >= {"vehicle_speed", "yaw_rate", "steering", "brake", "throttle", "utime",
                               "rear_left_rpm", "gear_position"}
    # Speed from the ego poses (finite differences) vs CAN speeds at the same times.
    scene = next(s for s in nusc.scene if s["name"] == name)
    lidar = _channel_records(nusc, scene, "LIDAR_TOP")
    t = np.array([r["timestamp"] for r in lidar], dtype=np.float64)
    xy = np.array([nusc.get("ego_pose", r["ego_pose_token"])["translation"][:2] for r in lidar])
    speed = np.linalg.norm(np.gradient(xy, t / 1e6, axis=0), axis=1)
    for m in monitor:
        if t[0] < m["utime"] < t[-1]:
            assert abs(m["vehicle_speed"] / 3.6 - np.interp(m["utime"], t, speed)) < 0.5
    pose = can.get_messages(name, "pose")
    pose_t = np.array([p["utime"] for p in pose], dtype=np.float64)
    inside = (pose_t > t[0]) & (pose_t < t[-1])
    vel = np.array([p["vel"][0] for p in pose])[inside]
    np.testing.assert_allclose(vel, np.interp(pose_t[inside], t, speed), atol=0.3)
    acc_z = np.array([p["accel"][2] for p in pose])
    assert abs(np.mean(acc_z) - 9.81) < 0.1, "pose accel carries gravity on z as in nuScenes"
    with pytest.raises(FileNotFoundError):
        can.get_messages(tiny_dataroot.scenes_without_can[0], "pose")


def test_map_mask_covers_the_drive_with_drivable_area(nusc, tiny_dataroot):
    for log in nusc.log:
        map_record = nusc.get("map", log["map_token"])
        mask = MapMask(str(Path(tiny_dataroot.dataroot) / map_record["filename"]), resolution=0.1)
        raw = mask.mask()
        assert raw.dtype == np.uint8 and set(np.unique(raw)) <= {0, 255}
        assert 0.1 < (raw == 255).mean() < 0.9
        scene = next(s for s in nusc.scene if s["log_token"] == log["token"])
        poses = [nusc.get("ego_pose", sd["ego_pose_token"]) for sd in _channel_records(nusc, scene, "LIDAR_TOP")]
        xy = np.array([p["translation"][:2] for p in poses])
        assert mask.is_on_mask(xy[:, 0], xy[:, 1]).all(), "the ego drives on the drivable area"
        h, w = raw.shape
        assert xy.min() > 30.0 and xy[:, 0].max() < w * 0.1 - 30 and xy[:, 1].max() < h * 0.1 - 30
        peds = [a for a in nusc.sample_annotation if a["category_name"].startswith("human.pedestrian")
                and nusc.get("sample", a["sample_token"])["scene_token"] == scene["token"]]
        if len(peds) > 10:
            on_road = mask.is_on_mask([p["translation"][0] for p in peds], [p["translation"][1] for p in peds])
            assert on_road.mean() < 0.4, "pedestrians are mostly on sidewalks"


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_output_is_deterministic_per_seed(tmp_path):
    config = SyntheticConfig.tiny(seed=5, scenes=1, scene_seconds=1.0, image_width=160, image_height=90,
                                  lidar_azimuth_steps=180, no_can_scenes=(), workers=1)
    a = generate_dataroot(tmp_path / "a", config)
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "tools" / "make_synthetic.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--out", str(tmp_path / "b"), "--tiny", "--seed", "5", "--scenes", "1", "--scene-seconds", "1",
                 "--image-size", "160x90", "--lidar-azimuth-steps", "180", "--no-can-scenes", "",
                 "--workers", "1"]) == 0
    c = generate_dataroot(tmp_path / "c", replace(config, seed=6))
    digest_a, digest_b = _tree_digest(a.dataroot), _tree_digest(tmp_path / "b")
    assert len(digest_a) > 100 and digest_a == digest_b
    digest_c = _tree_digest(c.dataroot)
    assert digest_c["v1.0-synth/sample.json"] != digest_a["v1.0-synth/sample.json"]


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="scenes"):
        SyntheticConfig(scenes=0)
    with pytest.raises(ValueError, match="no_can_scenes"):
        SyntheticConfig(scenes=2, no_can_scenes=(5,))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=str(tmp_path / "x")):
        generate_dataroot(tmp_path / "x", SyntheticConfig.tiny())


def _real_nuscenes() -> Path | None:
    import os
    root = Path(os.environ.get("NUSCENES_REAL", REPO.parent / "shared" / "nuscenes-real"))
    return root if root.is_dir() else None


@pytest.mark.real_data
def test_radar_header_and_padding_match_real_nuscenes_files(tiny_dataroot, nusc):
    real = _real_nuscenes()
    if real is None:
        pytest.skip("real nuScenes files not found (set NUSCENES_REAL or provide ../shared/nuscenes-real)")
    real_files = sorted(real.glob("radar_split_unknown/*/*.pcd"))
    if not real_files:
        pytest.skip(f"no radar .pcd files under {real}")
    ours = Path(nusc.get_sample_data_path(nusc.sample[0]["data"]["RADAR_FRONT"])).read_bytes()
    for path in real_files:
        raw = path.read_bytes()
        end = raw.index(b"DATA binary\n") + len(b"DATA binary\n")
        width = int(re.search(rb"WIDTH (\d+)", raw).group(1))
        ours_width = int(re.search(rb"WIDTH (\d+)", ours).group(1))
        ours_end = ours.index(b"DATA binary\n") + len(b"DATA binary\n")
        assert ours[:ours_end].replace(b"%d" % ours_width, b"%d" % width) == raw[:end]
        assert len(raw) - end - 43 * width == len(ours) - ours_end - 43 * ours_width
