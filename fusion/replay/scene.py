"""Replay of one scene with a trained model's data settings: the wiring of drive stream, builder, transforms, CAN bus
and map layer into a `ReplayEngine`, so that live and offline samples are made the same way."""
from __future__ import annotations

from fusion.datasets.can_bus import open_can_bus
from fusion.datasets.drive_stream import SceneSource
from fusion.datasets.map_layer import load_map_layer
from fusion.datasets.sample_builder import SampleBuilder
from fusion.replay.engine import ReplayEngine
from fusion.replay.policy import SyncPolicy
from fusion.tracking.tracker import Tracker
from fusion.types import MODALITIES


def engine_for_scene(nusc, scene_name: str, detector, data, policy: SyncPolicy | None = None, rate: float = 0.0,
                     can_bus=None, **engine_options) -> ReplayEngine:
    """A ReplayEngine over one scene, with the model's data settings (a FusionDataModule): its builder, its
    inference transforms, the scene's CAN bus (if the model uses GPS) and map layer. `policy` defaults to the data's
    LiDAR / radar sweep counts; engine_options go to ReplayEngine (tracker defaults to a new CenterPoint-style
    fusion.tracking.Tracker; pass tracker=None for no tracks)."""
    modalities = tuple(data.modalities)
    unknown = set(modalities) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}")
    builder = SampleBuilder(**{**data.reader_options(train=False), "on_missing": "mark_missing"})
    if policy is None:
        policy = SyncPolicy(lidar_sweeps=builder.lidar_sweeps, lidar_sweep_stride=builder.lidar_sweep_stride,
                            radar_sweeps=builder.radar_sweeps)
    use_gps = "gps" in modalities
    if use_gps and can_bus is None:
        can_bus = open_can_bus(nusc.dataroot)
    source = SceneSource(nusc, scene_name, can_bus if use_gps else None)
    map_layer, map_reason = None, "modality not used by the model"
    if use_gps:
        map_reason = source.map_path_error or "the scene's log has no map"
        if source.map_path is not None:
            try:
                map_layer = load_map_layer(source.map_path)
            except (FileNotFoundError, ValueError) as error:
                map_reason = str(error)
    engine_options.setdefault("tracker", Tracker())
    return ReplayEngine(source, detector, builder, data.transforms(train=False), policy, rate=rate,
                        scene_name=scene_name, use_can=use_gps, map_layer=map_layer, map_reason=map_reason,
                        **engine_options)
