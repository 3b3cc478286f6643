"""Shared pytest fixtures.

`tiny_dataroot` (session scope): a complete synthetic nuScenes-format dataroot generated once per test session into
a temporary folder: 2 scenes of 3 s (6 keyframes each; scene 1 in the train split with CAN bus data, scene 2 in the
validation split WITHOUT CAN bus files), 320x180 images, a coarse LiDAR. Returns a
`fusion.datasets.synthetic.DatarootInfo` whose first fields are (dataroot: Path, version: str, train_split: str,
val_split: str); it also lists scene names, which scenes lack CAN data, and the config used. Treat it as read-only.
"""
from __future__ import annotations

import pytest

from fusion.datasets.synthetic import DatarootInfo, SyntheticConfig, generate_dataroot

#: The tiny dataroot's config (seed 0). Tests may compare against it; do not change it lightly.
TINY_CONFIG = SyntheticConfig.tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_dataroot(tmp_path_factory) -> DatarootInfo:
    """A tiny synthetic nuScenes dataroot, generated once per session (about 10-20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("tiny_synthetic_dataroot")
    return generate_dataroot(out, TINY_CONFIG)


@pytest.fixture
def single_torch_thread():
    """One torch thread for the test, the previous count restored after. The tiny models of the model tests are as
    fast on one thread, and far faster when the machine's cores are busy (threads waiting on each other)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(config path, checkpoint path): configs/tiny_cpu.yaml made cheaper (3.2 m cells, 48x128 images, one sweep)
    and a checkpoint of a freshly initialised (seeded, untrained) model of it, with the model's config saved as
    hyper-parameters the way Lightning's CLI saves them."""
    from pathlib import Path

    import torch
    import yaml

    from fusion.checkpoints import atomic_torch_save, load_run

    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml").read_text())
    config["model"]["grid"]["cell_size"] = 3.2
    config["data"].update(image_size=[48, 128], lidar_sweeps=1, radar_sweeps=1, batch_size=2, num_workers=0,
                          cache_dir=None)
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    torch.manual_seed(0)
    model = load_run(config=config_path).model
    checkpoint = folder / "fresh.ckpt"
    hyper_parameters = {**config["model"], "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    atomic_torch_save({"state_dict": model.state_dict(), "global_step": 0, "hyper_parameters": hyper_parameters},
                      checkpoint)
    return config_path, checkpoint


@pytest.fixture(scope="module")
def tiny(tiny_dataroot):
    """A freshly initialised (seeded) configs/tiny_cpu.yaml model in eval mode and its data module (the config's data
    settings on the tiny drive), one per test module."""
    from pathlib import Path

    import torch

    from fusion.checkpoints import load_run

    torch.manual_seed(0)
    # cache_dir=None: the config's cache folder is relative to the working directory; keep tests out of it
    run = load_run(config=Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml",
                   dataroot=tiny_dataroot.dataroot, version=tiny_dataroot.version, cache_dir=None)
    return run.model.eval(), run.data
