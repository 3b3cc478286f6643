"""Each hostile-input case of the hardening issue, once, on the tiny dataroot or small files: empty sensor files,
paths leaving the dataroot (symlinked folders inside it still read), missing map PNGs, one bad CAN record or file,
Pillow's pixel limit, radar PCD header checks, bounded voxelization, checkpoints that name foreign classes or
decide where files go, and the temporary files of a killed checkpoint save. (docs/reliability.md lists them.)"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tool_runner import load_tool
from fusion.checkpoint_allowlist import ClassAllowList, ClassNotAllowedError
from fusion.checkpoints import atomic_torch_save, load_run
from fusion.cuda_ops import hard_voxelize
from fusion.datasets.can_bus import open_can_bus, scene_can_messages
from fusion.datasets.io import RADAR_PCD_FIELDS, read_lidar_bin, read_radar_pcd, write_radar_pcd
from fusion.datasets.map_layer import load_map_layer
from fusion.datasets.nuscenes import NuScenesDataset
from fusion.datasets.nuscenes_tables import open_nuscenes
from fusion.datasets.safe_io import (DataPathError, EmptyFileError, data_path, fault_kind, image_pixel_limit,
                                     path_problem)

ROOT = Path(__file__).resolve().parents[1]


def dataroot_copy(tiny_dataroot, out: Path) -> Path:
    """The tiny dataroot with its tables, maps and CAN files copied and its sensor folders symlinked (the common
    layout of samples/ and sweeps/ on another disk)."""
    out.mkdir()
    for item in Path(tiny_dataroot.dataroot).iterdir():
        if item.name in ("samples", "sweeps"):
            (out / item.name).symlink_to(item, target_is_directory=True)
        elif item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy(item, out / item.name)
    return out


def edit_table(root: Path, version: str, table: str, edit) -> None:
    path = root / version / f"{table}.json"
    rows = json.loads(path.read_text())
    edit(rows)
    path.write_text(json.dumps(rows))


# ---------------------------------------------------------------------------------------------- file layer

def test_empty_lidar_file_is_a_named_error_not_a_type_error(tmp_path):
    path = tmp_path / "empty.pcd.bin"
    path.write_bytes(b"")
    with pytest.raises(EmptyFileError, match="empty.pcd.bin") as caught:
        read_lidar_bin(path)
    assert fault_kind(caught.value) == "empty"


@pytest.mark.parametrize("written, ok", [("samples/LIDAR_TOP/a.pcd.bin", True), ("/etc/passwd", False),
                                         ("../outside.pcd.bin", False), ("samples/../../x", False),
                                         ("samples/a\0b", False), ("", False), ("samples/..hidden/a", True)])
def test_table_paths_are_judged_as_written(written, ok, tmp_path):
    assert (path_problem(written) == "") is ok
    if ok:
        assert data_path(tmp_path, written) == os.path.join(str(tmp_path), written)
    else:
        with pytest.raises(DataPathError, match="filename"):
            data_path(tmp_path, written)


def test_paths_outside_the_dataroot_are_refused_unopened_and_symlinked_folders_read(tiny_dataroot, tmp_path):
    root = dataroot_copy(tiny_dataroot, tmp_path / "root")
    version = tiny_dataroot.version
    rows = json.loads((root / version / "sample_data.json").read_text())
    camera = next(r for r in rows if r["is_key_frame"] and r["filename"].startswith("samples/CAM_FRONT/"))
    target = tmp_path / "secret.jpg"  # a real JPEG outside the dataroot: it must not be read
    Image.new("RGB", (8, 8)).save(target)

    def escape(rows):
        for row in rows:
            if row["token"] == camera["token"]:
                row["filename"] = str(target)

    edit_table(root, version, "sample_data", escape)
    dataset = NuScenesDataset(str(root), version, tiny_dataroot.train_split, on_missing="mark_missing",
                              load_map=False, lidar_sweeps=1, radar_sweeps=1)
    index = next(i for i, t in enumerate(dataset.sample_tokens) if t == camera["sample_token"])
    sample = dataset[index]
    assert "is absolute" in sample.missing["CAM_FRONT"]
    assert sample.lidar is not None and len(sample.lidar) > 0  # read through the symlinked samples/ folder
    strict = NuScenesDataset(str(root), version, tiny_dataroot.train_split, load_map=False, lidar_sweeps=1,
                             radar_sweeps=1)
    with pytest.raises(DataPathError, match=f"sample_data of CAM_FRONT at {camera['timestamp']} us filename"):
        strict[index]


def test_decompression_bomb_map_is_refused_and_the_pixel_limit_stays_on(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None
    with image_pixel_limit(10**9):
        assert Image.MAX_IMAGE_PIXELS == 10**9
    assert Image.MAX_IMAGE_PIXELS == limit
    small = tmp_path / "map.png"
    Image.new("L", (40, 30), 255).save(small)
    assert load_map_layer(str(small)).mask.shape == (30, 40)
    assert Image.MAX_IMAGE_PIXELS == limit  # not switched off by a map read
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):
        load_map_layer(str(empty))


@pytest.mark.parametrize("case", ["duplicate_field", "points", "duplicate_key"])
def test_radar_header_is_checked_against_the_data(tmp_path, case):
    path = tmp_path / f"{case}.pcd"
    write_radar_pcd(path, np.zeros((3, len(RADAR_PCD_FIELDS))), trailing_bytes=8)
    text = path.read_bytes()
    header, data = text.split(b"DATA binary\n", 1)
    lines = header.decode().splitlines()
    if case == "duplicate_field":
        lines[2] = lines[2].replace(" vy ", " vx ")
    elif case == "points":
        lines = [("POINTS 99" if line.startswith("POINTS") else line) for line in lines]
    else:
        lines.insert(3, lines[3])
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"DATA binary\n" + data)
    with pytest.raises(ValueError, match=f"{case}.pcd"):
        read_radar_pcd(path)


def test_voxelization_max_points_is_bounded():
    points = torch.zeros((4, 4))
    with pytest.raises(ValueError, match="max_points must be <= 1024"):
        hard_voxelize(points, (1.0, 1.0, 1.0), (-2, -2, -2, 2, 2, 2), max_points=10**9, max_voxels=10)
    with pytest.raises(ValueError, match="voxel slots"):
        hard_voxelize(points, (1.0, 1.0, 1.0), (-2, -2, -2, 2, 2, 2), max_points=1024, max_voxels=10**7)


# --------------------------------------------------------------------------------------------- tables, CAN

def test_missing_map_png_is_marked_missing_not_an_assertion(tiny_dataroot, tmp_path):
    root = dataroot_copy(tiny_dataroot, tmp_path / "root")
    for png in (root / "maps").glob("*.png"):
        png.unlink()
    nusc = open_nuscenes(root, tiny_dataroot.version)  # the devkit alone asserts here
    assert nusc.map and all(row["mask"] is None for row in nusc.map)
    dataset = NuScenesDataset(str(root), tiny_dataroot.version, tiny_dataroot.train_split,
                              on_missing="mark_missing", lidar_sweeps=1, radar_sweeps=1, cameras=())
    assert "map raster not found" in dataset[0].missing["MAP"]


def test_one_bad_can_record_or_file_costs_only_itself(tiny_dataroot, tmp_path):
    root = dataroot_copy(tiny_dataroot, tmp_path / "root")
    scene = next(s for s in tiny_dataroot.scene_names if s not in tiny_dataroot.scenes_without_can)
    pose_file = root / "can_bus" / f"{scene}_pose.json"
    poses = json.loads(pose_file.read_text())
    poses[3]["utime"] = "soon"
    poses[5]["vel"] = [float("nan"), 0.0, 0.0]
    pose_file.write_text(json.dumps(poses))
    (root / "can_bus" / f"{scene}_ms_imu.json").write_text("{not json")
    dropped = Counter()
    messages = scene_can_messages(open_can_bus(str(root)), scene, dropped=dropped)
    assert len(messages["pose"]) == len(poses) - 2 and "ms_imu" not in messages
    assert dropped == {"pose: no integer 'utime'": 1, "pose: 'vel' is not finite": 1}
    with pytest.warns(UserWarning, match="dropped 2 bad record"):
        dataset = NuScenesDataset(str(root), tiny_dataroot.version, tiny_dataroot.train_split, load_map=False,
                                  lidar_sweeps=1, radar_sweeps=1, cameras=())
    assert json.loads(str(dataset.index.can_dropped)) == dict(dropped)
    assert dataset.index.sample_can_valid.any()  # the rest of the pose file still gives CAN states


# ------------------------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardening_ckpt")
    config = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    config["model"]["grid"]["cell_size"] = 3.2
    config["data"].update(image_size=[48, 128], lidar_sweeps=1, radar_sweeps=1, num_workers=0, cache_dir=None)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config, path


def test_checkpoint_class_paths_outside_the_allow_list_are_never_imported(tiny_config, tmp_path, monkeypatch):
    config, _ = tiny_config
    marker = tmp_path / "imported"
    (tmp_path / "evil_branch.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").close()
        class Evil:
            def __init__(self, *args, **kwargs):
                pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    hyper_parameters = json.loads(json.dumps(config["model"]))
    hyper_parameters["branches"][0]["class_path"] = "evil_branch.Evil"
    checkpoint = tmp_path / "evil.ckpt"
    atomic_torch_save({"state_dict": {}, "hyper_parameters": hyper_parameters}, checkpoint)
    with pytest.raises(ClassNotAllowedError, match=r"evil.ckpt.*branches\[0\].class_path.*--allow-class"):
        load_run(checkpoint)
    assert not marker.exists() and "evil_branch" not in sys.modules
    with pytest.raises(ValueError):  # allowed by the user: imported, then refused as not a branch
        load_run(checkpoint, allowed_classes=ClassAllowList.with_names(["evil_branch.Evil"]))
    assert marker.exists()


def test_lightning_resume_checks_the_allow_list_before_parsing(tiny_config, tmp_path):
    train_tool = load_tool("train")
    config, _ = tiny_config
    hyper_parameters = {**json.loads(json.dumps(config["model"])),
                        "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    hyper_parameters["head"]["class_path"] = "subprocess.Popen"
    checkpoint = tmp_path / "resume.ckpt"
    atomic_torch_save({"state_dict": {}, "hyper_parameters": hyper_parameters}, checkpoint)
    cli = object.__new__(train_tool.TrainCLI)
    cli.config = {"subcommand": "fit", "fit": {"ckpt_path": str(checkpoint)}}
    with pytest.raises(ClassNotAllowedError, match="head.class_path.*subprocess.Popen"):
        cli._parse_ckpt_path()
    assert train_tool.split_allow_class(["fit", "--allow-class", "a.B", "--allow-class=c.D", "-c", "x"]) == \
        (["fit", "-c", "x"], ["a.B", "c.D"])


def test_checkpoint_never_decides_where_files_are_written(tiny_config, tiny_dataroot, tmp_path):
    config, config_path = tiny_config
    torch.manual_seed(0)
    model = load_run(config=config_path).model
    checkpoint = tmp_path / "run.ckpt"
    atomic_torch_save({"state_dict": model.state_dict(), "hyper_parameters": config["model"],
                       "datamodule_hyper_parameters": {**config["data"], "cache_dir": str(tmp_path / "elsewhere")}},
                      checkpoint)
    run = load_run(checkpoint, dataroot=tiny_dataroot.dataroot, version=tiny_dataroot.version)
    assert run.data.cache_dir is None
    run = load_run(checkpoint, dataroot=tiny_dataroot.dataroot, version=tiny_dataroot.version,
                   cache_dir=str(tmp_path / "mine"))
    assert run.data.cache_dir == str(tmp_path / "mine")
    assert not (tmp_path / "elsewhere").exists()


def test_a_killed_checkpoint_save_leaves_no_temporary_file_behind(tmp_path):
    target = tmp_path / "last.ckpt"
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, torch
        from fusion.checkpoints import atomic_torch_save
        torch.save = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
        atomic_torch_save({{"x": 1}}, {str(target)!r})
    """)], cwd=ROOT)
    assert killed.returncode == -9
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and not target.exists()
    atomic_torch_save({"x": 2}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# -------------------------------------------------------------------------------------------------- tools

def test_evaluate_rejects_type_confused_results_with_exit_2_and_no_traceback(tiny_dataroot, tmp_path):
    from fusion.evaluation import load_nuscenes, split_sample_tokens

    evaluate_tool = load_tool("evaluate")
    tokens = split_sample_tokens(load_nuscenes(tiny_dataroot.dataroot, tiny_dataroot.version),
                                 tiny_dataroot.val_split)
    box = {"sample_token": tokens[0], "translation": [10**400, 0, 0], "size": [1, 1, 1], "rotation": [1, 0, 0, 0],
           "velocity": [0, 0], "detection_name": {"car": 1}, "detection_score": 0.5, "attribute_name": ""}
    results = {"meta": {k: False for k in ("use_camera", "use_lidar", "use_radar", "use_map", "use_external")},
               "results": {t: [box] if t == tokens[0] else [] for t in tokens}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = evaluate_tool.main(["--dataroot", str(tiny_dataroot.dataroot), "--version", tiny_dataroot.version,
                                   "--split", tiny_dataroot.val_split, "--out", str(tmp_path / "eval"),
                                   "--results", str(path), "--no-curves"])
    assert code == 2 and "Traceback" not in err.getvalue()
    assert f"results['{tokens[0]}'][0].detection_name: must be a string" in err.getvalue()
    assert f"results['{tokens[0]}'][0].translation" in err.getvalue()
