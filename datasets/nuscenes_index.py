"""The index: a nuScenes split's keyframes, messages, calibrations, poses, CAN states and ground-truth boxes as flat
numpy arrays (`NuScenesIndex`), built once from the devkit tables (`build_index`) and cached as NPZ (never pickle).

Boxes are in each keyframe's ego frame (x forward, y left, z up; meters, radians, m/s); poses are 4x4 float64.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from fusion.datasets.can_bus import CanState, can_state_at, open_can_bus, scene_can_messages
from fusion.datasets.sample_builder import CHANNELS, SensorMessage, sensor_file_path
from fusion.geometry import invert_transform, make_transform, yaw_of_matrix
from fusion.types import ATTRIBUTES, CAMERA_NAMES, DETECTION_CLASSES, LIDAR_NAME, NO_ATTRIBUTE, Boxes

#: Eval ranges (meters, xy distance from the ego) of the nuScenes detection benchmark (detection_cvpr_2019).
DETECTION_EVAL_RANGE: dict[str, float] = {
    "car": 50.0, "truck": 50.0, "bus": 50.0, "trailer": 50.0, "construction_vehicle": 50.0,
    "pedestrian": 40.0, "motorcycle": 40.0, "bicycle": 40.0, "traffic_cone": 30.0, "barrier": 30.0,
}

INDEX_FORMAT = 2


@dataclass
class NuScenesIndex:
    """Everything the Dataset needs per keyframe, as flat numpy arrays (cheap to share with DataLoader workers,
    cached as NPZ). Messages are sample_data rows of the split's scenes (LiDAR and radar sweeps, keyframe images).

    msg_channel [M] int8 (index into CHANNELS); msg_timestamp [M] int64 us; msg_path [M] str (relative to the
    dataroot); msg_calib [M] int32 (row of calib_*); msg_ego_pose [M, 7] float64 (qw, qx, qy, qz, tx, ty, tz) ego
    pose at the message's time; msg_prev [M] int32 previous message of the same channel (-1 none).
    calib_sensor_to_ego [C, 4, 4] float64; calib_intrinsics [C, 3, 3] float64 (zeros for non-cameras).
    sample_token [S] str; sample_scene [S] str; sample_timestamp [S] int64 (LIDAR_TOP keyframe, us);
    sample_messages [S, len(CHANNELS)] int32 keyframe message per channel (-1 none); sample_map [S] int32 into
    map_paths (-1 none); sample_can [S, 5] float32 (speed, yaw_rate, ax, ay, az; NaN when invalid);
    sample_can_valid [S] bool; sample_can_reason [S] str; can_dropped: 0-d str, JSON {"<type>: <why>": count} of the
    CAN records dropped one by one (the rest of their files is used).
    box_offsets [S + 1] int64: boxes of sample i are rows box_offsets[i]:box_offsets[i + 1] of box_center [B, 3],
    box_size [B, 3] (l, w, h), box_yaw [B], box_velocity [B, 2] (NaN where the devkit has none), box_label [B],
    box_attribute [B], box_num_lidar_pts [B], box_num_radar_pts [B] (all in the keyframe ego frame, float32 /
    int64), box_ego_dist [B] float32 (xy distance to the ego, as the devkit's eval), box_in_bike_rack [B] bool.
    """

    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.arrays["sample_token"])

    def __getattr__(self, name: str) -> np.ndarray:
        arrays = self.__dict__.get("arrays")
        if arrays is not None and name in arrays:
            return arrays[name]
        raise AttributeError(name)

    def save(self, path: str) -> None:
        """Write as NPZ (no pickled objects) atomically."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(temporary, format=np.array(INDEX_FORMAT), **self.arrays)
        os.replace(temporary, path)

    @staticmethod
    def load(path: str) -> "NuScenesIndex":
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data or int(data["format"]) != INDEX_FORMAT:
                raise ValueError(f"index cache {path} has another format; delete it to rebuild")
            return NuScenesIndex({k: data[k] for k in data.files if k != "format"})

    @staticmethod
    def build(nusc, scene_names: Sequence[str], can_bus=None, can_max_gap_s: Mapping[str, float] | None = None
              ) -> "NuScenesIndex":
        """Index the keyframes of `scene_names` from a loaded `NuScenes`; `can_bus` a `NuScenesCanBus` or None."""
        scenes = {s["name"]: s for s in nusc.scene}
        unknown = [name for name in scene_names if name not in scenes]
        if unknown:
            raise ValueError(f"scenes {unknown[:5]}{'...' if len(unknown) > 5 else ''} of the split are not in "
                             f"{nusc.dataroot}/{nusc.version}")
        scene_tokens = {scenes[name]["token"] for name in scene_names}
        channel_index = {c: i for i, c in enumerate(CHANNELS)}

        # Messages: every LiDAR/radar sample_data of these scenes, keyframe camera images.
        calib_rows: dict[str, int] = {}
        calib_s2e, calib_k = [], []
        msg_rows: dict[str, int] = {}
        columns: dict[str, list] = {k: [] for k in ("channel", "timestamp", "path", "calib", "pose", "prev")}
        sample_scene_token = {s["token"]: s["scene_token"] for s in nusc.sample}
        for record in nusc.sample_data:
            channel = record.get("channel")
            if channel not in channel_index or sample_scene_token.get(record["sample_token"]) not in scene_tokens:
                continue
            if channel in CAMERA_NAMES and not record["is_key_frame"]:
                continue
            cs_token = record["calibrated_sensor_token"]
            if cs_token not in calib_rows:
                cs = nusc.get("calibrated_sensor", cs_token)
                calib_rows[cs_token] = len(calib_s2e)
                calib_s2e.append(make_transform(cs["rotation"], cs["translation"]))
                k = np.asarray(cs.get("camera_intrinsic") or np.zeros((3, 3)), dtype=np.float64)
                calib_k.append(k if k.shape == (3, 3) else np.zeros((3, 3)))
            pose = nusc.get("ego_pose", record["ego_pose_token"])
            msg_rows[record["token"]] = len(columns["channel"])
            columns["channel"].append(channel_index[channel])
            columns["timestamp"].append(record["timestamp"])
            columns["path"].append(record["filename"])
            columns["calib"].append(calib_rows[cs_token])
            columns["pose"].append(list(pose["rotation"]) + list(pose["translation"]))
            columns["prev"].append(record["prev"])
        msg_prev = np.array([msg_rows.get(p, -1) if p else -1 for p in columns["prev"]], dtype=np.int32)

        # Keyframes, in scene order then time order.
        attribute_names = {a["token"]: a["name"] for a in nusc.attribute}
        can_cache: dict[str, dict | str] = {}
        can_dropped: Counter = Counter()  # "<type>: <why>" -> CAN records dropped one by one
        samples: dict[str, list] = {k: [] for k in ("token", "scene", "timestamp", "messages", "map", "can",
                                                    "can_valid", "can_reason")}
        box_columns: dict[str, list] = {k: [] for k in ("center", "size", "yaw", "velocity", "label", "attribute",
                                                        "lidar", "radar", "dist", "bike_rack")}
        box_offsets = [0]
        map_paths: list[str] = []
        for scene_name in scene_names:
            scene = scenes[scene_name]
            log = nusc.get("log", scene["log_token"])
            map_path = ""
            if "map_token" in log:
                map_path = nusc.get("map", log["map_token"])["filename"]
            if map_path and map_path not in map_paths:
                map_paths.append(map_path)
            can_messages = scene_can_messages(can_bus, scene_name, can_cache, dropped=can_dropped)
            token = scene["first_sample_token"]
            while token:
                sample = nusc.get("sample", token)
                token = sample["next"]
                lidar_token = sample["data"].get(LIDAR_NAME)
                if lidar_token is None:
                    raise ValueError(f"sample {sample['token']} of {scene_name} has no {LIDAR_NAME} data; the reader "
                                     "needs it to define the sample's frame")
                lidar_record = nusc.get("sample_data", lidar_token)
                key_pose = nusc.get("ego_pose", lidar_record["ego_pose_token"])
                ego_to_global = make_transform(key_pose["rotation"], key_pose["translation"])
                samples["token"].append(sample["token"])
                samples["scene"].append(scene_name)
                samples["timestamp"].append(lidar_record["timestamp"])
                samples["messages"].append([msg_rows.get(sample["data"].get(c, ""), -1) for c in CHANNELS])
                samples["map"].append(map_paths.index(map_path) if map_path else -1)
                if isinstance(can_messages, str):
                    can = CanState.absent(can_messages)
                else:
                    can = can_state_at(can_messages, lidar_record["timestamp"], can_max_gap_s)
                samples["can"].append([can.speed, can.yaw_rate, *can.acceleration])
                samples["can_valid"].append(can.valid)
                samples["can_reason"].append(can.reason)

                for column, values in _ground_truth(nusc, sample, ego_to_global, attribute_names).items():
                    box_columns[column].extend(values)
                box_offsets.append(len(box_columns["label"]))

        def strings(values):
            return np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")

        n_boxes = len(box_columns["label"])
        arrays = {
            "msg_channel": np.array(columns["channel"], dtype=np.int8),
            "msg_timestamp": np.array(columns["timestamp"], dtype=np.int64),
            "msg_path": strings(columns["path"]),
            "msg_calib": np.array(columns["calib"], dtype=np.int32),
            "msg_ego_pose": np.array(columns["pose"], dtype=np.float64).reshape(-1, 7),
            "msg_prev": msg_prev,
            "calib_sensor_to_ego": np.array(calib_s2e, dtype=np.float64).reshape(-1, 4, 4),
            "calib_intrinsics": np.array(calib_k, dtype=np.float64).reshape(-1, 3, 3),
            "sample_token": strings(samples["token"]),
            "sample_scene": strings(samples["scene"]),
            "sample_timestamp": np.array(samples["timestamp"], dtype=np.int64),
            "sample_messages": np.array(samples["messages"], dtype=np.int32).reshape(-1, len(CHANNELS)),
            "sample_map": np.array(samples["map"], dtype=np.int32),
            "sample_can": np.array(samples["can"], dtype=np.float32).reshape(-1, 5),
            "sample_can_valid": np.array(samples["can_valid"], dtype=bool),
            "sample_can_reason": strings(samples["can_reason"]),
            "map_paths": strings(map_paths),
            "can_dropped": np.array(json.dumps(dict(sorted(can_dropped.items())))),
            "box_offsets": np.array(box_offsets, dtype=np.int64),
            "box_center": np.array(box_columns["center"], dtype=np.float32).reshape(n_boxes, 3),
            "box_size": np.array(box_columns["size"], dtype=np.float32).reshape(n_boxes, 3),
            "box_yaw": np.array(box_columns["yaw"], dtype=np.float32).reshape(n_boxes),
            "box_velocity": np.array(box_columns["velocity"], dtype=np.float32).reshape(n_boxes, 2),
            "box_label": np.array(box_columns["label"], dtype=np.int64),
            "box_attribute": np.array(box_columns["attribute"], dtype=np.int64),
            "box_num_lidar_pts": np.array(box_columns["lidar"], dtype=np.int64),
            "box_num_radar_pts": np.array(box_columns["radar"], dtype=np.int64),
            "box_ego_dist": np.array(box_columns["dist"], dtype=np.float32),
            "box_in_bike_rack": np.array(box_columns["bike_rack"], dtype=bool),
        }
        return NuScenesIndex(arrays)

    # -- per-sample accessors ---------------------------------------------------------------------------------

    def ego_to_global(self) -> np.ndarray:
        """[M, 4, 4] float64 ego pose of every message (computed once from msg_ego_pose, vectorised)."""
        cached = self.__dict__.get("_ego_to_global")
        if cached is None:
            q = self.msg_ego_pose[:, :4] / np.linalg.norm(self.msg_ego_pose[:, :4], axis=1, keepdims=True)
            w, x, y, z = q.T
            cached = np.zeros((len(q), 4, 4))
            cached[:, :3, :3] = np.stack([
                np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], axis=-1),
                np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], axis=-1),
                np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=-1)], axis=1)
            cached[:, :3, 3] = self.msg_ego_pose[:, 4:]
            cached[:, 3, 3] = 1.0
            self.__dict__["_ego_to_global"] = cached
        return cached

    def message(self, row: int, dataroot: str) -> SensorMessage:
        """The SensorMessage of message row `row` (a file name leaving the dataroot gives a message with
        `path_error` set, never opened)."""
        calib = int(self.msg_calib[row])
        channel = CHANNELS[int(self.msg_channel[row])]
        path, path_error = sensor_file_path(dataroot, str(self.msg_path[row]),
                                            f"of {channel} at {int(self.msg_timestamp[row])} us")
        return SensorMessage(
            channel=channel,
            timestamp_us=int(self.msg_timestamp[row]),
            path=path, path_error=path_error,
            sensor_to_ego=self.calib_sensor_to_ego[calib],
            ego_to_global=self.ego_to_global()[row],
            intrinsics=self.calib_intrinsics[calib] if channel in CAMERA_NAMES else None,
        )

    def chain(self, row: int, count: int) -> list[int]:
        """Message `row` and up to count - 1 previous messages of its channel, newest first."""
        rows = []
        while row >= 0 and len(rows) < count:
            rows.append(row)
            row = int(self.msg_prev[row])
        return rows

    def boxes(self, i: int, drop_empty: bool = True, eval_range: Mapping[str, float] | None = None,
              drop_in_bike_rack: bool = True) -> Boxes:
        """Ground-truth Boxes of sample i (keyframe ego frame) after the devkit's rules for which boxes count:
        no LiDAR and no radar point (filter_eval_boxes), beyond the class's eval range (optional), bicycles and
        motorcycles inside a bike rack."""
        rows = slice(int(self.box_offsets[i]), int(self.box_offsets[i + 1]))
        keep = np.ones(rows.stop - rows.start, dtype=bool)
        if drop_empty:
            keep &= (self.box_num_lidar_pts[rows] + self.box_num_radar_pts[rows]) != 0
        if eval_range is not None:
            limits = np.array([eval_range.get(name, np.inf) for name in DETECTION_CLASSES], dtype=np.float32)
            keep &= self.box_ego_dist[rows] < limits[self.box_label[rows]]
        if drop_in_bike_rack:
            keep &= ~self.box_in_bike_rack[rows]

        def take(name):
            return torch.from_numpy(np.ascontiguousarray(self.arrays[name][rows][keep]))

        n = int(keep.sum())
        return Boxes(center=take("box_center"), size=take("box_size"), yaw=take("box_yaw"),
                     velocity=take("box_velocity"), labels=take("box_label"), attributes=take("box_attribute"),
                     scores=torch.ones(n, dtype=torch.float32), num_lidar_pts=take("box_num_lidar_pts"),
                     num_radar_pts=take("box_num_radar_pts"))


def _ground_truth(nusc, sample: dict, ego_to_global: np.ndarray, attribute_names: dict[str, str]) -> dict[str, list]:
    """Column -> values of the detection-class boxes of one devkit sample, in its keyframe ego frame (the columns of
    NuScenesIndex's box_* arrays). Velocity: the devkit's box_velocity (global, NaN where it has none) rotated into
    the ego frame. in_bike_rack: a bicycle/motorcycle whose center lies in a static_object.bicycle_rack box
    (the devkit's filter_eval_boxes rule)."""
    from nuscenes.eval.detection.utils import category_to_detection_name
    from nuscenes.utils.data_classes import Box
    from nuscenes.utils.geometry_utils import points_in_box
    from pyquaternion import Quaternion

    global_to_ego = invert_transform(ego_to_global)
    annotations = [nusc.get("sample_annotation", token) for token in sample["anns"]]
    bike_racks = [Box(a["translation"], a["size"], Quaternion(a["rotation"])) for a in annotations
                  if a["category_name"] == "static_object.bicycle_rack"]
    columns: dict[str, list] = {k: [] for k in ("center", "size", "yaw", "velocity", "label", "attribute", "lidar",
                                                "radar", "dist", "bike_rack")}
    for ann in annotations:
        name = category_to_detection_name(ann["category_name"])
        if name is None:
            continue
        if len(ann["attribute_tokens"]) > 1:
            raise ValueError(f"annotation {ann['token']} has {len(ann['attribute_tokens'])} attributes; the devkit "
                             "allows at most one")
        attribute = ATTRIBUTES.index(attribute_names[ann["attribute_tokens"][0]]) if ann["attribute_tokens"] \
            else NO_ATTRIBUTE
        translation = np.asarray(ann["translation"], dtype=np.float64)
        box_ego = global_to_ego @ make_transform(ann["rotation"], translation)
        velocity = global_to_ego[:3, :3] @ np.asarray(nusc.box_velocity(ann["token"]), dtype=np.float64)
        width, length, height = ann["size"]
        offset = translation - ego_to_global[:3, 3]
        columns["center"].append(box_ego[:3, 3])
        columns["size"].append((length, width, height))
        columns["yaw"].append(yaw_of_matrix(box_ego[:3, :3]))
        columns["velocity"].append(velocity[:2])
        columns["label"].append(DETECTION_CLASSES.index(name))
        columns["attribute"].append(attribute)
        columns["lidar"].append(ann["num_lidar_pts"])
        columns["radar"].append(ann["num_radar_pts"])
        columns["dist"].append(np.hypot(offset[0], offset[1]))
        columns["bike_rack"].append(name in ("bicycle", "motorcycle") and any(
            points_in_box(rack, translation[:, None]).any() for rack in bike_racks))
    return columns


def index_fingerprint(dataroot: str, version: str, split: str, extra: dict) -> str:
    """Hash of what the index depends on: the tables' and CAN files' sizes and times, split, options."""
    parts = [os.path.abspath(dataroot), version, split, json.dumps(extra, sort_keys=True), str(INDEX_FORMAT)]
    for folder in (os.path.join(dataroot, version), os.path.join(dataroot, "can_bus")):
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                stat = os.stat(os.path.join(folder, name))
                parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def build_index(dataroot: str, version: str, split: str, can_max_gap_s: Mapping[str, float] | None = None
                ) -> NuScenesIndex:
    """Load the devkit tables once and index the keyframes of `split` (the NuScenes object is dropped after)."""
    from nuscenes.utils.splits import get_scenes_of_split

    from fusion.datasets.nuscenes_tables import open_nuscenes

    table_root = os.path.join(dataroot, version)
    nusc = open_nuscenes(dataroot, version)
    try:
        scene_names = list(get_scenes_of_split(split, nusc))
    except ValueError as error:
        raise ValueError(f"split {split!r} of {table_root}: {error}") from error
    present = {s["name"] for s in nusc.scene}
    scene_names = [name for name in scene_names if name in present] if _is_predefined(split) else scene_names
    if not scene_names:
        raise ValueError(f"split {split!r} has no scenes in {table_root}")
    try:
        index = NuScenesIndex.build(nusc, scene_names, open_can_bus(dataroot), can_max_gap_s)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, OverflowError) as error:  # a bad table row
        raise ValueError(f"nuScenes tables of {table_root}: broken record ({type(error).__name__}: "
                         f"{str(error)[:200]})") from None
    dropped = json.loads(str(index.can_dropped))
    if dropped:
        warnings.warn(f"CAN bus of {dataroot}: dropped {sum(dropped.values())} bad record(s), the rest kept: "
                      f"{dropped}")
    return index


def _is_predefined(split: str) -> bool:
    from nuscenes.utils.splits import is_predefined_split
    return is_predefined_split(split)
