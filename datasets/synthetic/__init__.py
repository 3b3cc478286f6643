"""Synthetic nuScenes-format drives: a complete dataroot (13 tables, splits.json, LiDAR/radar/camera files, CAN bus,
map PNGs) of a generated town, deterministic per seed.

    from fusion.datasets.synthetic import SyntheticConfig, generate_dataroot
    info = generate_dataroot("data/synth", SyntheticConfig(scenes=10, seed=0))

Modules: config (knobs), rig (sensor mounting), roads (road grid, route, ground raster), shapes (object and
structure geometry), world (static structures, actors and their tracks), raycast (open3d ray casting), lidar,
radar (+ PCD writer), camera (rendering + JPEG), canbus, scene (one scene's files and table rows), writer (tables,
the dataroot), taxonomy (nuScenes categories/attributes/visibility).
"""
from .config import DatarootInfo, SyntheticConfig
from .writer import generate_dataroot

__all__ = ["DatarootInfo", "SyntheticConfig", "generate_dataroot"]
