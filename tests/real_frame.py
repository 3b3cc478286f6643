"""The real nuScenes frame in ../shared/nuscenes-real (v1.0-mini scene-0061, sample ca9a282c...) as a `Sample`.

Its devkit tables are hand-trimmed (NuScenes() cannot load them), so the frame is assembled from the trimmed
sample_data / calibrated_sensor / ego_pose tables (one SensorMessage per file) and fed to the same SampleBuilder
as the Dataset. Boxes come from the calibration JSON (mmdetection3d info convention). That JSON's note says
bbox_3d's z is the box bottom, but the values are the box centre (mmdet3d stores gravity centres for nuScenes):
with z as the centre, counting the scan's points in each box reproduces num_lidar_pts (mean |diff| 0.4 points,
against 7.8 with z as the bottom). yaw is counter-clockwise from the LiDAR's +x, size is (l, w, h).

What the frame lacks: LiDAR sweeps (only the keyframe scan is there), radar (the two radar files are from other
logs without calibration: they are marked missing), a map raster, and CAN acceleration (only vehicle_monitor
messages: the CAN state is absent, with the reason in Sample.missing["CAN"]).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from fusion.datasets.can_bus import CanState, can_state_at
from fusion.datasets.sample_builder import SampleBuilder, SensorMessage
from fusion.geometry import make_transform
from fusion.grid import BEVGrid
from fusion.types import CAMERA_NAMES, DETECTION_CLASSES, LIDAR_NAME, NO_ATTRIBUTE, Boxes, Sample

REAL_SAMPLE_TOKEN = "ca9a282c9e77460f8360f564131a8af5"
REAL_SCENE_NAME = "scene-0061"
REAL_CALIB_JSON = "scene-0061_sample_ca9a282c_calib_and_boxes.json"
REAL_TABLES = "v1.0-test-subset-scene0061"


def real_data_root() -> Path | None:
    """The real-files folder: $NUSCENES_REAL, else ../shared/nuscenes-real next to the repository; None if absent."""
    candidates = []
    if os.environ.get("NUSCENES_REAL"):
        candidates.append(Path(os.environ["NUSCENES_REAL"]))
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "nuscenes-real")
    for path in candidates:
        if (path / REAL_CALIB_JSON).is_file() and (path / REAL_TABLES).is_dir():
            return path
    return None


def _require_root(root: str | os.PathLike | None) -> Path:
    path = Path(root) if root is not None else real_data_root()
    if path is None or not (path / REAL_CALIB_JSON).is_file():
        raise FileNotFoundError(f"real nuScenes files not found (looked at {root or 'NUSCENES_REAL and '}"
                                "../shared/nuscenes-real)")
    return path


def real_frame_messages(root: str | os.PathLike | None = None) -> dict[str, SensorMessage]:
    """Channel -> SensorMessage of the frame's LIDAR_TOP scan and six camera images, from the trimmed tables."""
    root = _require_root(root)
    tables = root / REAL_TABLES

    def load(name):
        with open(tables / f"{name}.json") as f:
            return {row["token"]: row for row in json.load(f)}

    sample_data, calibrated, poses, sensors = (load("sample_data"), load("calibrated_sensor"), load("ego_pose"),
                                               load("sensor"))
    messages = {}
    for record in sample_data.values():
        if record["sample_token"] != REAL_SAMPLE_TOKEN:
            continue
        cs = calibrated[record["calibrated_sensor_token"]]
        channel = sensors[cs["sensor_token"]]["channel"]
        pose = poses[record["ego_pose_token"]]
        messages[channel] = SensorMessage(
            channel=channel, timestamp_us=int(record["timestamp"]), path=str(root / record["filename"]),
            sensor_to_ego=make_transform(cs["rotation"], cs["translation"]),
            ego_to_global=make_transform(pose["rotation"], pose["translation"]),
            intrinsics=np.asarray(cs["camera_intrinsic"], dtype=np.float64) if cs["camera_intrinsic"] else None)
    missing = [c for c in (LIDAR_NAME,) + CAMERA_NAMES if c not in messages]
    if missing:
        raise ValueError(f"{tables}: no sample_data rows for {missing}")
    return messages


def real_frame_boxes(root: str | os.PathLike | None = None) -> Boxes:
    """The frame's annotated boxes (those with at least one LiDAR or radar point) in the ego frame at the keyframe."""
    root = _require_root(root)
    with open(root / REAL_CALIB_JSON) as f:
        info = json.load(f)
    id_to_name = {index: name for name, index in info["metainfo"]["categories"].items()}
    lidar_to_ego = np.asarray(info["sample"]["lidar_points"]["lidar2ego"], dtype=np.float64)
    rows = [b for b in info["sample"]["instances"]  # label -1: a category outside the 10 detection classes
            if b.get("bbox_3d_isvalid", True) and b["bbox_label_3d"] in id_to_name]
    if not rows:
        return Boxes.empty()
    boxes = np.asarray([b["bbox_3d"] for b in rows], dtype=np.float64)          # x, y, z (centre), l, w, h, yaw
    center = boxes[:, :3] @ lidar_to_ego[:3, :3].T + lidar_to_ego[:3, 3]
    heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6]), np.zeros(len(boxes))], axis=1)
    heading = heading @ lidar_to_ego[:3, :3].T
    velocity = np.concatenate([np.asarray([b["velocity"] for b in rows], dtype=np.float64),
                               np.zeros((len(rows), 1))], axis=1) @ lidar_to_ego[:3, :3].T
    labels = [DETECTION_CLASSES.index(id_to_name[b["bbox_label_3d"]]) for b in rows]
    n = len(rows)
    return Boxes(
        center=torch.tensor(center, dtype=torch.float32),
        size=torch.tensor(boxes[:, 3:6], dtype=torch.float32),
        yaw=torch.tensor(np.arctan2(heading[:, 1], heading[:, 0]), dtype=torch.float32),
        velocity=torch.tensor(velocity[:, :2], dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.int64),
        attributes=torch.full((n,), NO_ATTRIBUTE, dtype=torch.int64),
        scores=torch.ones(n, dtype=torch.float32),
        num_lidar_pts=torch.tensor([b["num_lidar_pts"] for b in rows], dtype=torch.int64),
        num_radar_pts=torch.tensor([b["num_radar_pts"] for b in rows], dtype=torch.int64),
    )


def real_frame_can_state(root: str | os.PathLike | None = None, timestamp_us: int | None = None) -> CanState:
    """CAN state at the keyframe from the folder's vehicle_monitor messages (absent: they carry no acceleration)."""
    root = _require_root(root)
    path = root / "can_bus" / f"{REAL_SCENE_NAME}_vehicle_monitor.json"
    if not path.is_file():
        return CanState.absent(f"no CAN file {path}")
    with open(path) as f:
        vehicle_monitor = json.load(f)
    if timestamp_us is None:
        timestamp_us = real_frame_messages(root)[LIDAR_NAME].timestamp_us
    return can_state_at({"vehicle_monitor": vehicle_monitor}, timestamp_us)


def load_real_frame(root: str | os.PathLike | None = None, grid: BEVGrid | None = None,
                    lidar_min_distance: float = 1.0, camera_decode_size: tuple[int, int] | None = None,
                    lidar_keep_rings: int | None = None) -> Sample:
    """The real scene-0061 keyframe as a Sample (ego frame at the LIDAR_TOP timestamp): the 34,688-point scan (no
    sweeps), six 1600x900 images with calibration, ground-truth boxes; radar and map marked missing."""
    root = _require_root(root)
    messages = real_frame_messages(root)
    builder = SampleBuilder(grid=grid if grid is not None else BEVGrid(), lidar_sweeps=0,
                            lidar_min_distance=lidar_min_distance, lidar_keep_rings=lidar_keep_rings,
                            camera_decode_size=camera_decode_size, on_missing="mark_missing")
    keyframe = messages[LIDAR_NAME]
    sample = builder.build(
        token=REAL_SAMPLE_TOKEN, scene_name=REAL_SCENE_NAME, keyframe_lidar=keyframe,
        camera_messages={c: messages[c] for c in CAMERA_NAMES},
        can_state=real_frame_can_state(root, keyframe.timestamp_us), map_layer=None,
        boxes=real_frame_boxes(root))
    sample.missing["MAP"] = "the real-files folder has no map raster"
    return sample
