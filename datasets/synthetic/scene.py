"""Simulate one scene: sensor timelines, sensor files (LiDAR .pcd.bin, radar .pcd, camera .jpg, CAN bus JSON,
map PNG) and the scene's rows of the nuScenes tables.

Timing as in nuScenes: LIDAR_TOP sweeps at 20 Hz and every 10th is a keyframe (sample timestamp = that sweep's
timestamp); cameras at 12 Hz, each fired when the LiDAR sweeps past it (a fixed offset per camera), so each
keyframe has one image per camera within ~30 ms; radars free-running at ~13 Hz with their own phases. Every
sample_data has its own ego_pose at its own timestamp (same token, as in nuScenes).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

from fusion.geometry import pose_record_to_transform, yaw_to_quaternion

from .camera import CameraRenderer, encode_jpeg
from .canbus import can_messages, write_can_bus
from .config import SyntheticConfig
from .lidar import LidarSimulator
from .radar import RadarSimulator, radar_points_global, write_pcd
from .raycast import SceneGeometry
from .rig import CAMERAS, LIDAR, RADARS, SENSOR_TOKENS, log_calibration
from .roads import drivable_png
from .taxonomy import ATTRIBUTE_TOKENS, CATEGORY_TOKENS
from .actors import ATTRIBUTE_NAMES, NO_ATTR
from .world import World, build_world

#: Camera trigger offsets after the LiDAR keyframe timestamp, seconds (when the spinning LiDAR passes them).
CAMERA_OFFSETS = {"CAM_FRONT": 0.012, "CAM_FRONT_RIGHT": 0.020, "CAM_BACK_RIGHT": 0.028, "CAM_BACK": -0.010,
                  "CAM_BACK_LEFT": -0.001, "CAM_FRONT_LEFT": 0.004}
BASE_UTIME = 1_715_000_000_000_000  # 2024-05-06 12:53 UTC
VISIBILITY_LEVELS = (0.4, 0.6, 0.8)


def make_token(seed: int, *parts) -> str:
    """A deterministic 32-hex token (nuScenes-looking) for a table row."""
    return hashlib.md5(("synth|%d|" % seed + "|".join(str(p) for p in parts)).encode()).hexdigest()


@dataclass
class SceneResult:
    """Rows of every table contributed by one scene (plain dicts, as in the JSON files)."""

    name: str
    log: dict
    map: dict
    scene: dict
    calibrated_sensor: list[dict]
    ego_pose: list[dict] = field(default_factory=list)
    sample: list[dict] = field(default_factory=list)
    sample_data: list[dict] = field(default_factory=list)
    sample_annotation: list[dict] = field(default_factory=list)
    instance: list[dict] = field(default_factory=list)
    has_can: bool = True


def _timeline(cfg: SyntheticConfig, rng: np.random.Generator):
    n_key = max(1, int(round(cfg.scene_seconds * cfg.keyframe_hz)))
    n_sweeps = 9 + 10 * (n_key - 1) + 1 + 5
    lidar_t = np.arange(n_sweeps) / cfg.lidar_hz + rng.uniform(-3e-4, 3e-4, n_sweeps)
    lidar_t[0] = max(lidar_t[0], 0.0)
    key_idx = 9 + 10 * np.arange(n_key)
    t_last = float(lidar_t[-1])
    cams = {}
    for ch in CAMERAS:
        m = np.arange(-int(lidar_t[key_idx[0]] * cfg.camera_hz) - 1, int(t_last * cfg.camera_hz) + 2)
        t = lidar_t[key_idx[0]] + CAMERA_OFFSETS[ch] + m * (0.5 / round(cfg.camera_hz / cfg.keyframe_hz)) \
            + rng.uniform(-4e-4, 4e-4, len(m))
        cams[ch] = t[(t >= 0.0) & (t <= t_last)]
    radars = {}
    for ch in RADARS:
        period = 1.0 / cfg.radar_hz
        n = int(t_last / period) + 2
        t = rng.uniform(0, period) + np.arange(n) * period + rng.uniform(-2e-3, 2e-3, n)
        radars[ch] = t[(t >= 0.0) & (t <= t_last)]
    return lidar_t, key_idx, cams, radars, t_last


def _points_in_box(points: np.ndarray, centre, size_lwh, yaw) -> np.ndarray:
    """Bool mask of global points [N, 3] inside a box (devkit points_in_box semantics, boundary inclusive)."""
    c, s = np.cos(yaw), np.sin(yaw)
    d = points - np.asarray(centre)
    lx = c * d[:, 0] + s * d[:, 1]
    ly = -s * d[:, 0] + c * d[:, 1]
    return (np.abs(lx) <= size_lwh[0] / 2) & (np.abs(ly) <= size_lwh[1] / 2) & (np.abs(d[:, 2]) <= size_lwh[2] / 2)


def simulate_scene(cfg: SyntheticConfig, index: int, dataroot: Path) -> SceneResult:
    """Simulate scene `index` of the config, write its sensor files under dataroot, return its table rows."""
    cv2.setNumThreads(1)  # one scene per worker process: no nested thread pools
    with threadpool_limits(limits=1):
        return _simulate_scene(cfg, index, dataroot)


def _streams(cfg: SyntheticConfig, index: int) -> list[np.random.Generator]:
    """Independent random streams of a scene: time, world, lidar, radar, camera, can, calibration, spare."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence([cfg.seed, index, 20240506]).spawn(8)]


def scene_world(cfg: SyntheticConfig, index: int) -> World:
    """The World of scene `index` exactly as simulate_scene builds it (for tests and visual checks). Frames and
    times as in World: global map frame; scene seconds from the scene's first LiDAR sweep (see scene_time_origin)."""
    rng_time, rng_world = _streams(cfg, index)[:2]
    t_last = _timeline(cfg, rng_time)[4]
    return build_world(rng_world, cfg.scene_seconds, -0.2, t_last + 0.2, cfg.object_density)


def scene_time_origin(cfg: SyntheticConfig, index: int) -> int:
    """utime (microseconds) of scene time 0 of scene `index`: utime = origin + round(t * 1e6)."""
    rng_time = _streams(cfg, index)[0]
    _timeline(cfg, rng_time)
    return BASE_UTIME + cfg.seed * 86_400_000_000 + index * 3_600_000_000 + int(rng_time.integers(0, 10 ** 6))


def _simulate_scene(cfg: SyntheticConfig, index: int, dataroot: Path) -> SceneResult:
    seed = cfg.seed
    rng_time, rng_world, rng_lidar, rng_radar, rng_cam, rng_can, rng_calib, _ = _streams(cfg, index)
    name = cfg.scene_names()[index]
    lidar_t, key_idx, cam_t, radar_t, t_last = _timeline(cfg, rng_time)
    world: World = build_world(rng_world, cfg.scene_seconds, -0.2, t_last + 0.2, cfg.object_density)
    base_us = BASE_UTIME + seed * 86_400_000_000 + index * 3_600_000_000 + int(rng_time.integers(0, 10 ** 6))

    def utime(t: float) -> int:
        return int(base_us + round(float(t) * 1e6))

    stamp = np.datetime64(int(base_us // 1_000_000), "s").astype(object)
    log_name = f"s{seed % 1000:03d}-{stamp:%Y-%m-%d-%H-%M-%S}+0000"
    log_token = make_token(seed, "log", index)
    map_token = make_token(seed, "map", index)
    scene_token = make_token(seed, "scene", index)
    has_can = index not in cfg.resolved_no_can_scenes()

    # --- Calibration of this log.
    calibs = log_calibration(rng_calib, cfg.image_width, cfg.image_height)
    cs_rows, cs_token = [], {}
    for ch, cal in calibs.items():
        tok = make_token(seed, "calibrated_sensor", index, ch)
        cs_token[ch] = tok
        cs_rows.append({"token": tok, "sensor_token": SENSOR_TOKENS[ch], "translation": list(cal.translation),
                        "rotation": list(cal.rotation),
                        "camera_intrinsic": [list(r) for r in cal.intrinsic] if cal.intrinsic else []})
    sensor_to_ego = {ch: pose_record_to_transform({"rotation": cal.rotation, "translation": cal.translation})
                     for ch, cal in calibs.items()}

    # --- Map.
    maps_dir = dataroot / "maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(maps_dir / f"{map_token}.png"), drivable_png(world.raster), [cv2.IMWRITE_PNG_COMPRESSION, 9])

    result = SceneResult(
        name=name,
        log={"token": log_token, "logfile": log_name, "vehicle": "s%03d" % (seed % 1000),
             "date_captured": f"{stamp:%Y-%m-%d}", "location": f"synth-town-{index:02d}"},
        map={"category": "semantic_prior", "token": map_token, "filename": f"maps/{map_token}.png",
             "log_tokens": [log_token]},
        scene={}, calibrated_sensor=cs_rows, has_can=has_can)

    # --- Samples (keyframes).
    sample_tokens = [make_token(seed, "sample", index, j) for j in range(len(key_idx))]
    key_times = lidar_t[key_idx]
    for j, tok in enumerate(sample_tokens):
        result.sample.append({"token": tok, "timestamp": utime(key_times[j]),
                              "prev": sample_tokens[j - 1] if j > 0 else "",
                              "next": sample_tokens[j + 1] if j + 1 < len(sample_tokens) else "",
                              "scene_token": scene_token})

    def nearest_sample(t: float) -> str:
        return sample_tokens[int(np.argmin(np.abs(key_times - t)))]

    def ego_record(tok: str, t: float) -> dict:
        xy, yaw, *_ = world.ego.state(np.array([t]))
        rec = {"token": tok, "timestamp": utime(t), "rotation": [float(v) for v in yaw_to_quaternion(float(yaw[0]))],
               "translation": [float(xy[0, 0]), float(xy[0, 1]), 0.0]}
        result.ego_pose.append(rec)
        return rec

    def add_sample_data(ch: str, k: int, t: float, is_key: bool, ext: str, fileformat: str, width=0, height=0):
        tok = make_token(seed, "sample_data", index, ch, k)
        folder = "samples" if is_key else "sweeps"
        filename = f"{folder}/{ch}/{log_name}__{ch}__{utime(t)}.{ext}"
        rec = ego_record(tok, t)
        result.sample_data.append({
            "token": tok, "sample_token": nearest_sample(t), "ego_pose_token": tok,
            "calibrated_sensor_token": cs_token[ch], "timestamp": utime(t), "fileformat": fileformat,
            "is_key_frame": bool(is_key), "height": height, "width": width, "filename": filename,
            "prev": make_token(seed, "sample_data", index, ch, k - 1) if k > 0 else "", "next": ""})
        if k > 0:
            result.sample_data[-2]["next"] = tok
        path = dataroot / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, pose_record_to_transform(rec)

    geometry = SceneGeometry(world)
    lidar = LidarSimulator(geometry, cfg.lidar_azimuth_steps, cfg.lidar_max_range)
    key_set = set(int(k) for k in key_idx)
    key_points: dict[int, np.ndarray] = {}
    key_hit_kind: dict[int, np.ndarray] = {}
    key_dynamic = {}
    for k, t in enumerate(lidar_t):
        path, ego_to_global = add_sample_data(LIDAR, k, t, k in key_set, "pcd.bin", "pcd")
        dynamic = geometry.dynamic_scene(float(t), ego_to_global)
        pts, kinds, pts_global = lidar.sweep(ego_to_global @ sensor_to_ego[LIDAR], dynamic, rng_lidar)
        pts.tofile(path)
        if k in key_set:
            key_points[k] = pts_global
            key_hit_kind[k] = kinds
            key_dynamic[k] = (dynamic, ego_to_global @ sensor_to_ego[LIDAR])

    # Radar.
    radar = RadarSimulator(geometry)
    key_radar_points = {j: [] for j in range(len(key_idx))}
    for ch in RADARS:
        times = radar_t[ch]
        key_msgs = {int(np.argmin(np.abs(times - kt))): j for j, kt in enumerate(key_times)}
        for k, t in enumerate(times):
            is_key = k in key_msgs
            path, ego_to_global = add_sample_data(ch, k, t, is_key, "pcd", "pcd")
            xy, yaw, v, yaw_rate, *_ = world.ego.state(np.array([t]))
            s2g = ego_to_global @ sensor_to_ego[ch]
            r_off = ego_to_global[:3, :3] @ sensor_to_ego[ch][:3, 3]
            v_sensor = np.array([v[0] * np.cos(yaw[0]) - yaw_rate[0] * r_off[1],
                                 v[0] * np.sin(yaw[0]) + yaw_rate[0] * r_off[0], 0.0])
            dynamic = geometry.dynamic_scene(float(t), ego_to_global)
            pts = radar.scan(float(t), s2g, v_sensor, dynamic, rng_radar)
            write_pcd(path, pts)
            if is_key:
                key_radar_points[key_msgs[k]].append(radar_points_global(pts, s2g))

    # Cameras.
    renderer = CameraRenderer(geometry, calibs, cfg.image_width, cfg.image_height)
    for ch in CAMERAS:
        times = cam_t[ch]
        key_msgs = {int(np.argmin(np.abs(times - kt))) for kt in key_times}
        exposure = 1.0
        k_mat = calibs[ch].intrinsic_matrix()
        for k, t in enumerate(times):
            path, ego_to_global = add_sample_data(ch, k, t, k in key_msgs, "jpg", "jpg", cfg.image_width,
                                                  cfg.image_height)
            exposure = float(np.clip(exposure + 0.15 * (1.0 - exposure) + rng_cam.normal(0, 0.035), 0.7, 1.3))
            img = renderer.render(ch, float(t), ego_to_global @ sensor_to_ego[ch], k_mat, rng_cam, exposure)
            path.write_bytes(encode_jpeg(img, cfg.jpeg_quality))

    # --- Annotations at keyframes.
    instance_rows: dict[int, dict] = {}
    last_ann: dict[int, dict] = {}
    attr_tokens = {i: ATTRIBUTE_TOKENS[n] for i, n in enumerate(ATTRIBUTE_NAMES)}
    for j, k in enumerate(key_idx):
        t = float(key_times[j])
        xs, ys, zs, yaws, attrs = world.actor_poses(t) if world.actors else (np.zeros(0),) * 5
        ego_xy, *_ = world.ego.state(np.array([t]))
        dist = np.hypot(xs - ego_xy[0, 0], ys - ego_xy[0, 1])
        radar_pts = np.concatenate(key_radar_points[j]) if key_radar_points[j] else np.zeros((0, 3))
        lidar_pts = key_points[int(k)]
        dynamic, s2g = key_dynamic[int(k)]
        for ai in np.nonzero(dist < cfg.annotation_range)[0]:
            actor = world.actors[ai]
            l, w, h = (float(v) for v in actor.size)
            centre = np.array([xs[ai], ys[ai], zs[ai] + h / 2])
            near_l = lidar_pts[np.abs(lidar_pts[:, 0] - centre[0]) + np.abs(lidar_pts[:, 1] - centre[1]) < l + w + h]
            n_lidar = int(_points_in_box(near_l, centre, (l, w, h), yaws[ai]).sum())
            n_radar = int(_points_in_box(radar_pts, centre, (l, w, h), yaws[ai]).sum()) if len(radar_pts) else 0
            vis = _visibility(geometry, dynamic, s2g[:3, 3], centre, (l, w, h), yaws[ai], int(ai))
            if n_lidar == 0 and n_radar == 0 and (vis == 0.0 or dist[ai] > 50.0):
                continue  # nobody could annotate what no sensor sees
            level = 1 + int(np.searchsorted(VISIBILITY_LEVELS, vis, side="right"))
            tok = make_token(seed, "sample_annotation", index, int(ai), j)
            inst_tok = make_token(seed, "instance", index, int(ai))
            ann = {"token": tok, "sample_token": sample_tokens[j], "instance_token": inst_tok,
                   "visibility_token": str(level),
                   "attribute_tokens": [attr_tokens[int(attrs[ai])]] if attrs[ai] != NO_ATTR else [],
                   "translation": [float(v) for v in centre], "size": [w, l, h],
                   "rotation": [float(v) for v in yaw_to_quaternion(float(yaws[ai]))],
                   "prev": "", "next": "", "num_lidar_pts": n_lidar, "num_radar_pts": n_radar}
            if ai in last_ann:
                ann["prev"] = last_ann[ai]["token"]
                last_ann[ai]["next"] = tok
            else:
                instance_rows[int(ai)] = {"token": inst_tok, "category_token": CATEGORY_TOKENS[actor.category],
                                          "nbr_annotations": 0,
                                          "first_annotation_token": tok, "last_annotation_token": tok}
            inst = instance_rows[int(ai)]
            inst["nbr_annotations"] += 1
            inst["last_annotation_token"] = tok
            last_ann[ai] = ann
            result.sample_annotation.append(ann)
    result.instance = [instance_rows[i] for i in sorted(instance_rows)]

    result.scene = {"token": scene_token, "log_token": log_token, "nbr_samples": len(sample_tokens),
                    "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1], "name": name,
                    "description": _describe(world)}
    if has_can:
        msgs = can_messages(world.ego, 0.0, t_last, utime, rng_can)
        write_can_bus(dataroot / "can_bus", name, msgs)
    return result


def _visibility(geometry: SceneGeometry, dynamic, origin, centre, size, yaw, actor_index: int) -> float:
    """Fraction of 9 points inside the box that the LiDAR origin sees (first hit is the object or beyond)."""
    l, w, h = size
    local = np.array([[0, 0, 0]] + [[sx * 0.35 * l, sy * 0.35 * w, sz * 0.25 * h]
                                    for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    c, s = np.cos(yaw), np.sin(yaw)
    pts = np.stack([centre[0] + c * local[:, 0] - s * local[:, 1], centre[1] + s * local[:, 0] + c * local[:, 1],
                    centre[2] + local[:, 2]], 1)
    d = pts - origin
    dist = np.linalg.norm(d, axis=1)
    hits = geometry.cast(origin, d / dist[:, None], dynamic, 1e4)
    seen = (hits.kind == actor_index) | (hits.t >= dist - 0.05)
    return float(seen.mean())


def _describe(world: World) -> str:
    cats = [a.category for a in world.actors]
    parts = []
    if any(c == "vehicle.construction" or c == "movable_object.barrier" for c in cats):
        parts.append("construction zone")
    if sum(c.startswith("human") for c in cats) > 30:
        parts.append("many pedestrians")
    if any(c.startswith("vehicle.bus") for c in cats):
        parts.append("bus")
    times = np.arange(0.0, world.times[-1] - 1.0, 0.1)
    _, _, speed, yaw_rate, _, _ = world.ego.state(times)
    if speed.min() < 0.1:
        parts.append("stop at intersection")
    parts.append("turn" if np.abs(yaw_rate).max() > 0.25 else "straight road")
    if world.brightness < 0.8:
        parts.append("dusk")
    return ", ".join(parts)


__all__ = ["simulate_scene", "scene_world", "scene_time_origin", "SceneResult", "make_token"]
