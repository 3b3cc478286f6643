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
