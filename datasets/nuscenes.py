"""The Dataset: `NuScenesDataset`, one `Sample` per keyframe of a nuScenes split, read through the index and the
sample builder.

The reader's jobs live in their own modules: `fusion.datasets.can_bus` (CAN state), `fusion.datasets.map_layer` (map
rasters), `fusion.datasets.sample_builder` (messages -> Sample), `fusion.datasets.nuscenes_index` (the compact index
over the devkit tables). Their public names are re-exported here so `from fusion.datasets.nuscenes import ...`
keeps working.

Frames and units: meters, radians, seconds; poses are 4x4 float64 `T_parent_child` (fusion.geometry).
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import torch

from fusion.datasets.can_bus import CAN_MAX_GAP_S, CanState, can_state_at, open_can_bus, scene_can_messages
from fusion.datasets.io import RadarFilters
from fusion.datasets.map_layer import MapLayer, crop_map, load_map_layer
from fusion.datasets.nuscenes_index import (DETECTION_EVAL_RANGE, INDEX_FORMAT, NuScenesIndex, build_index,
                                            index_fingerprint)
from fusion.datasets.safe_io import data_path
from fusion.datasets.sample_builder import CHANNELS, ON_MISSING, SampleBuilder, SensorMessage
from fusion.grid import BEVGrid
from fusion.types import CAMERA_NAMES, LIDAR_NAME, RADAR_NAMES, Boxes, Sample

__all__ = ["CAN_MAX_GAP_S", "CHANNELS", "DETECTION_EVAL_RANGE", "INDEX_FORMAT", "ON_MISSING", "CanState", "MapLayer",
           "NuScenesDataset", "NuScenesIndex", "SampleBuilder", "SensorMessage", "build_index", "can_state_at",
           "crop_map", "load_map_layer", "open_can_bus", "scene_can_messages"]


class NuScenesDataset(torch.utils.data.Dataset):
    """One `Sample` per keyframe sample of a nuScenes split, every sensor in the ego frame at the LIDAR_TOP keyframe.

    dataroot / version: a nuScenes dataroot and its table folder (e.g. "v1.0-mini").
    split: a devkit split name (nuscenes.utils.splits: "mini_val", "train", ...) or a custom one from
        <dataroot>/<version>/splits.json (e.g. "synth_train").
    grid: the BEVGrid of the map crop. lidar_sweeps / lidar_sweep_stride / radar_sweeps / radar_filters / cameras / radars / on_missing /
        lidar_min_distance / lidar_keep_rings / camera_decode_size: see SampleBuilder.
    load_map: crop the scene's map raster (the dataroot's map PNGs) onto the grid.
    transforms: a callable Sample -> Sample applied to every item (fusion.datasets.transforms).
    cache_dir: where to keep the NPZ index (and memory-mapped map rasters); None keeps them in memory only.
    drop_empty_boxes / box_eval_range / drop_boxes_in_bike_rack: the devkit's rules for which boxes count; pass
        box_eval_range=DETECTION_EVAL_RANGE to also drop boxes beyond the eval distance of their class.
    Box velocities are NaN where the devkit's box_velocity has no estimate (single-frame tracks, long gaps).
    """

    def __init__(self, dataroot: str, version: str, split: str, grid: BEVGrid | None = None, lidar_sweeps: int = 9,
                 radar_sweeps: int = 6, radar_filters: RadarFilters | str | dict | None = "default",
                 lidar_sweep_stride: int = 1,
                 cameras: Sequence[str] = CAMERA_NAMES, radars: Sequence[str] = RADAR_NAMES,
                 load_map: bool = True, on_missing: str = "error",
                 transforms: Callable[[Sample], Sample] | None = None, cache_dir: str | None = None,
                 lidar_min_distance: float = 1.0, radar_min_distance: float = 1.0,
                 lidar_keep_rings: int | None = None, camera_decode_size: tuple[int, int] | None = None,
                 drop_empty_boxes: bool = True, box_eval_range: Mapping[str, float] | None = None,
                 drop_boxes_in_bike_rack: bool = True, can_max_gap_s: Mapping[str, float] | None = None):
        super().__init__()
        dataroot = os.fspath(dataroot)
        if not os.path.isdir(dataroot):
            raise FileNotFoundError(f"nuScenes dataroot not found: {dataroot}")
        if not os.path.isdir(os.path.join(dataroot, version)):
            raise FileNotFoundError(f"nuScenes dataroot {dataroot} has no version folder {version!r} "
                                    f"(found: {sorted(os.listdir(dataroot))})")
        self.dataroot, self.version, self.split = dataroot, version, split
        self.grid = grid if grid is not None else BEVGrid()
        self.builder = SampleBuilder(grid=self.grid, lidar_sweeps=lidar_sweeps, lidar_sweep_stride=lidar_sweep_stride,
                                     radar_sweeps=radar_sweeps,
                                     radar_filters=radar_filters, cameras=tuple(cameras), radars=tuple(radars),
                                     lidar_min_distance=lidar_min_distance, radar_min_distance=radar_min_distance,
                                     lidar_keep_rings=lidar_keep_rings, camera_decode_size=camera_decode_size,
                                     on_missing=on_missing)
        self.load_map = load_map
        self.transforms = transforms
        self.cache_dir = cache_dir
        self.drop_empty_boxes = drop_empty_boxes
        self.box_eval_range = dict(box_eval_range) if box_eval_range is not None else None
        self.drop_boxes_in_bike_rack = drop_boxes_in_bike_rack
        self.index = self._load_or_build_index(dict(can_max_gap_s or {}))

    def _load_or_build_index(self, can_max_gap_s: dict) -> NuScenesIndex:
        path = None
        if self.cache_dir is not None:
            key = index_fingerprint(self.dataroot, self.version, self.split, {"can_max_gap_s": can_max_gap_s})
            path = os.path.join(self.cache_dir, f"nuscenes_index_{self.version}_{self.split}_{key}.npz")
            if os.path.exists(path):
                return NuScenesIndex.load(path)
        index = build_index(self.dataroot, self.version, self.split, can_max_gap_s)
        if path is not None:
            index.save(path)
        return index

    def ground_truth(self, i: int) -> Boxes:
        """The ground-truth Boxes of sample i (keyframe ego frame) under this dataset's box rules, read from the
        index alone (no sensor file is opened)."""
        return self.index.boxes(i, self.drop_empty_boxes, self.box_eval_range, self.drop_boxes_in_bike_rack)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def sample_tokens(self) -> list[str]:
        return [str(t) for t in self.index.sample_token]

    def messages(self, i: int, sensors: Sequence[str] = ("lidar", "radar", "camera")) -> dict:
        """The keyword arguments of SampleBuilder.build for sample i, minus CAN, map and boxes: the LiDAR keyframe
        and sweeps, and (when in `sensors`) the radar and camera messages."""
        index, root = self.index, self.dataroot
        rows = index.sample_messages[i]
        key_row = int(rows[CHANNELS.index(LIDAR_NAME)])
        if key_row < 0:
            raise ValueError(f"sample {index.sample_token[i]} has no {LIDAR_NAME} message")
        lidar_rows = index.chain(key_row, self.builder.previous_sweeps_needed + 1)
        messages = dict(keyframe_lidar=index.message(lidar_rows[0], root),
                        lidar_sweeps=[index.message(r, root) for r in lidar_rows[1:]])
        if "radar" in sensors:
            messages["radar_messages"] = {
                c: [index.message(r, root) for r in index.chain(int(rows[CHANNELS.index(c)]),
                                                                self.builder.radar_sweeps)]
                for c in self.builder.radars}
        if "camera" in sensors:
            messages["camera_messages"] = {c: index.message(int(rows[CHANNELS.index(c)]), root)
                                           for c in self.builder.cameras if rows[CHANNELS.index(c)] >= 0}
        return messages

    def can_state(self, i: int) -> CanState:
        values = self.index.sample_can[i]
        if not bool(self.index.sample_can_valid[i]):
            return CanState.absent(str(self.index.sample_can_reason[i]))
        return CanState(float(values[0]), float(values[1]), tuple(float(v) for v in values[2:]), True, "")

    def map_layer(self, i: int) -> MapLayer | None:
        row = int(self.index.sample_map[i])
        if row < 0:
            return None
        path = data_path(self.dataroot, str(self.index.map_paths[row]), "map.filename")
        return load_map_layer(path, cache_dir=self.cache_dir)

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples")
        i = int(i) % len(self)
        map_layer = None
        map_reason = None
        if self.load_map:
            try:
                map_layer = self.map_layer(i)
                if map_layer is None:
                    map_reason = "the scene's log has no map"
            except (FileNotFoundError, ValueError) as error:
                if self.builder.on_missing == "error":
                    raise
                map_reason = str(error)
        else:
            map_reason = "map loading disabled (load_map=False)"
        sample = self.builder.build(
            token=str(self.index.sample_token[i]), scene_name=str(self.index.sample_scene[i]),
            can_state=self.can_state(i), map_layer=map_layer,
            boxes=self.ground_truth(i),
            **self.messages(i))
        if map_reason is not None:
            sample.missing["MAP"] = map_reason
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample
