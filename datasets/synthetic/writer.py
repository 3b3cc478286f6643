"""Assemble a complete nuScenes-format dataroot: simulate every scene (in worker processes), then write the 13
tables, splits.json and a record of the config into <dataroot>/<version>/.

    info = generate_dataroot("data/synth", SyntheticConfig(scenes=10, seed=0))
    nusc = NuScenes(info.version, str(info.dataroot))
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import shutil
from pathlib import Path

from .config import DatarootInfo, SyntheticConfig
from .rig import CAMERAS, LIDAR, RADARS, SENSOR_TOKENS, modality_of
from .scene import SceneResult, simulate_scene
from .taxonomy import ATTRIBUTES, CATEGORIES, VISIBILITY

OUTPUT_FOLDERS = ("samples", "sweeps", "maps", "can_bus")


def _run_scene(args) -> SceneResult:
    config, index, dataroot = args
    return simulate_scene(config, index, Path(dataroot))


def _dump(path: Path, rows) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")


def generate_dataroot(out_dir: str | Path, config: SyntheticConfig | None = None, overwrite: bool = False,
                      progress=None) -> DatarootInfo:
    """Write a synthetic nuScenes-format dataroot to `out_dir` and describe it.

    out_dir must be absent or empty unless overwrite=True (then the generator's own folders are replaced).
    progress: optional callable(scene_name) called as each scene finishes.
    """
    config = config or SyntheticConfig()
    dataroot = Path(out_dir)
    if dataroot.exists() and not dataroot.is_dir():
        raise NotADirectoryError(f"--out {dataroot} exists and is not a directory")
    if dataroot.exists() and any(dataroot.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {dataroot} is not empty (pass overwrite=True / --overwrite)")
        for name in OUTPUT_FOLDERS + (config.version,):
            if (dataroot / name).exists():
                shutil.rmtree(dataroot / name)
    dataroot.mkdir(parents=True, exist_ok=True)

    jobs = [(config, i, str(dataroot)) for i in range(config.scenes)]
    workers = min(config.resolved_workers(), config.scenes)
    results: list[SceneResult] = []
    if workers <= 1:
        for job in jobs:
            results.append(_run_scene(job))
            if progress:
                progress(results[-1].name)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for res in pool.imap(_run_scene, jobs):
                results.append(res)
                if progress:
                    progress(res.name)

    table_dir = dataroot / config.version
    table_dir.mkdir(parents=True, exist_ok=True)
    tables = {
        "category": [{"token": t, "name": n, "description": d} for t, n, d in CATEGORIES],
        "attribute": [{"token": t, "name": n, "description": d} for t, n, d in ATTRIBUTES],
        "visibility": VISIBILITY,
        "sensor": [{"token": SENSOR_TOKENS[ch], "channel": ch, "modality": modality_of(ch)}
                   for ch in (LIDAR,) + CAMERAS + RADARS],
        "log": [r.log for r in results],
        "map": [r.map for r in results],
        "scene": [r.scene for r in results],
        "calibrated_sensor": [row for r in results for row in r.calibrated_sensor],
        "instance": [row for r in results for row in r.instance],
        "sample": [row for r in results for row in r.sample],
        "sample_data": [row for r in results for row in r.sample_data],
        "ego_pose": [row for r in results for row in r.ego_pose],
        "sample_annotation": [row for r in results for row in r.sample_annotation],
    }
    for name, rows in tables.items():
        _dump(table_dir / f"{name}.json", rows)
    val_idx = set(config.val_scene_indices())
    names = [r.name for r in results]
    train = [n for i, n in enumerate(names) if i not in val_idx]
    val = [n for i, n in enumerate(names) if i in val_idx]
    _dump(table_dir / "splits.json", {config.train_split: train, config.val_split: val})
    cfg = dataclasses.asdict(config)
    cfg["no_can_scenes"] = list(config.resolved_no_can_scenes())
    _dump(table_dir / "synthetic_config.json", cfg)
    return DatarootInfo(
        dataroot=dataroot, version=config.version, train_split=config.train_split, val_split=config.val_split,
        scene_names=tuple(names), train_scenes=tuple(train), val_scenes=tuple(val),
        scenes_without_can=tuple(r.name for r in results if not r.has_can),
        num_samples=len(tables["sample"]), num_annotations=len(tables["sample_annotation"]), seed=config.seed,
        config=config)
