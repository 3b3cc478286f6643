"""FusionDetector with the real branches: modality subsets, determinism, overfitting, temporal fusion, checkpoints,
the LightningCLI configs and the real scene-0061 frame."""
from __future__ import annotations

import itertools
import math
import os
from functools import partial
from pathlib import Path

import numpy as np
import lightning.pytorch as pl
import pytest
import torch
import yaml

from fusion.branches.camera import CameraBranch
from fusion.branches.gps import GpsBranch
from fusion.branches.lidar import LidarPillarBranch
from fusion.branches.radar import RadarBranch
from fusion.checkpoints import load_run
from fusion.datasets.collate import collate_samples
from fusion.fuser import DeformableFuser, contribution_maps, contribution_summary
from fusion.grid import BEVGrid
from fusion.heads.centerpoint import CenterHead
from fusion.module import FusionDetector, drop_modalities
from fusion.types import MODALITIES, Boxes, CameraImages, EgoState, Sample

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_torch_thread")
GRID = BEVGrid(-16.0, 16.0, -12.0, 12.0, z_min=-3.0, z_max=3.0, cell_size=1.0)  # H=24, W=32
IMAGE_HW = (32, 64)


# ------------------------------------------------------------------------------------------------ test data
def camera_rig(image_hw=IMAGE_HW) -> tuple[torch.Tensor, torch.Tensor]:
    """Six outward-looking pinhole cameras: intrinsics [6, 3, 3], cam_to_ego [6, 4, 4] (camera x right, y down,
    z forward; mounted 1.5 m up)."""
    h, w = image_hw
    intrinsics = torch.tensor([[w / 2, 0, w / 2 - 0.5], [0, w / 2, h / 2 - 0.5], [0, 0, 1]]).expand(6, 3, 3)
    poses = []
    for yaw in np.deg2rad([0, -55, 55, 180, 110, -110]):
        forward = [math.cos(yaw), math.sin(yaw), 0.0]
        right = [math.sin(yaw), -math.cos(yaw), 0.0]
        pose = torch.eye(4)
        pose[:3, :3] = torch.tensor([right, [0.0, 0.0, -1.0], forward]).T
        pose[:3, 3] = torch.tensor([1.0, 0.0, 1.5])
        poses.append(pose)
    return intrinsics.clone(), torch.stack(poses)


def make_sample(token: str, seed: int, scene: str = "scene-0001", timestamp_us: int = 0,
                modalities=MODALITIES, num_boxes: int = 4, pose_xy=(100.0, 200.0), grid=GRID) -> Sample:
    """A random but well-formed Sample: boxes of a few classes, LiDAR points on them and on the ground, radar
    returns at their centers with their velocity, camera images with a bright patch, a map raster and CAN."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 8, 9, 5], num_boxes)
    class_size = {0: [4.5, 1.9, 1.6], 8: [0.7, 0.7, 1.8], 9: [0.4, 0.4, 1.0], 5: [0.5, 2.5, 1.0]}
    sizes = np.array([class_size[int(label)] for label in labels])
    centers = np.c_[rng.uniform(grid.x_min + 3, grid.x_max - 3, num_boxes),
                    rng.uniform(grid.y_min + 3, grid.y_max - 3, num_boxes), sizes[:, 2] / 2 - 1.8]
    yaw = rng.uniform(-math.pi, math.pi, num_boxes)
    velocity = rng.normal(0, 2, (num_boxes, 2))
    attributes = np.array([{0: 0, 8: 5, 9: -1, 5: -1}[int(l)] for l in labels])
    boxes = Boxes(torch.tensor(centers, dtype=torch.float32), torch.tensor(sizes, dtype=torch.float32),
                  torch.tensor(yaw, dtype=torch.float32), torch.tensor(velocity, dtype=torch.float32),
                  torch.tensor(labels, dtype=torch.int64), torch.tensor(attributes, dtype=torch.int64),
                  torch.ones(num_boxes), torch.full((num_boxes,), 20), torch.full((num_boxes,), 1))
    lidar = radar = cameras = map_raster = None
    if "lidar" in modalities:
        local = rng.uniform(-0.5, 0.5, (num_boxes, 60, 3)) * sizes[:, None]
        c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
        on_boxes = np.stack([local[..., 0] * c - local[..., 1] * s, local[..., 0] * s + local[..., 1] * c,
                             local[..., 2]], -1) + centers[:, None]
        ground = np.c_[rng.uniform(grid.x_min, grid.x_max, 400), rng.uniform(grid.y_min, grid.y_max, 400),
                       np.full(400, -1.8)]
        xyz = np.concatenate([on_boxes.reshape(-1, 3), ground])
        lidar = torch.tensor(np.c_[xyz, rng.uniform(0, 100, len(xyz)), rng.choice([0.0, 0.05], len(xyz))],
                             dtype=torch.float32)
    if "radar" in modalities:
        radar = torch.tensor(np.c_[centers + rng.normal(0, 0.3, centers.shape), rng.uniform(-5, 15, num_boxes),
                                   velocity, np.full(num_boxes, 1.0), np.zeros(num_boxes)], dtype=torch.float32)
    if "camera" in modalities:
        intrinsics, cam_to_ego = camera_rig()
        images = torch.tensor(rng.integers(0, 60, (6, 3, *IMAGE_HW)), dtype=torch.uint8)
        images[:, :, IMAGE_HW[0] // 2:, :] += 80  # ground brighter than sky
        cameras = CameraImages(images, intrinsics, cam_to_ego, torch.ones(6, dtype=torch.bool), torch.zeros(6))
    can_valid = "gps" in modalities
    if "gps" in modalities:
        map_raster = torch.tensor(rng.random((1, *grid.shape)) > 0.5, dtype=torch.float32)
    pose = torch.eye(4, dtype=torch.float64)
    pose[:2, 3] = torch.tensor(pose_xy, dtype=torch.float64)
    nan = float("nan")
    ego = EgoState(pose, torch.tensor(5.0 if can_valid else nan), torch.tensor(0.1 if can_valid else nan),
                   torch.tensor([0.2, 0.0, 0.0]) if can_valid else torch.full((3,), nan), torch.tensor(can_valid))
    return Sample(token=token, scene_name=scene, timestamp_us=timestamp_us, lidar=lidar, radar=radar,
                  cameras=cameras, ego=ego, map_raster=map_raster, boxes=boxes)


BRANCHES = {
    "camera": partial(CameraBranch, out_channels=8, backbone_widths=(8, 16), backbone_blocks=(1, 1),
                      feature_channels=8, context_channels=8, depth_min=1.0, depth_max=25.0, depth_bins=8,
                      bev_blocks=1),
    "lidar": partial(LidarPillarBranch, out_channels=8, pillar_channels=8, hidden_channels=8, bev_blocks=1),
    "radar": partial(RadarBranch, out_channels=8, pillar_channels=8, hidden_channels=8, bev_blocks=1),
    "gps": partial(GpsBranch, out_channels=8, map_channels=(8,), ego_embedding=8, bev_blocks=1),
}


class CollectPredictions(pl.Callback):
    """Collects validation_step's returned predictions, as NuScenesDetectionMetrics does (without scoring)."""

    def __init__(self):
        self.predictions = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.predictions.update(outputs["predictions"])


def tiny_model(modalities=MODALITIES, seed: int = 0, gps_corruption: bool = True, **kwargs) -> FusionDetector:
    torch.manual_seed(seed)
    branches = [partial(BRANCHES[m], train_corruption=gps_corruption) if m == "gps" else BRANCHES[m]
                for m in modalities]
    return FusionDetector(GRID, branches,
                          fuser=partial(DeformableFuser, channels=16, heads=2, points=2),
                          head=partial(CenterHead, shared_channels=16, head_channels=16), **kwargs)


def make_batch(n=2, seed=0, **kwargs):
    return collate_samples([make_sample(f"tok{seed}_{i}", seed * 100 + i, **kwargs) for i in range(n)])


# ------------------------------------------------------------------------------------------------ modality subsets
SUBSETS = [s for r in range(1, 5) for s in itertools.combinations(MODALITIES, r)]


@pytest.fixture(scope="module")
def full_model():
    return tiny_model()


@pytest.fixture(scope="module")
def full_batch():
    return make_batch(2, seed=1)


@pytest.mark.parametrize("subset", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_every_modality_subset_runs_forward_and_backward(full_model, full_batch, subset):
    model = full_model.train()
    model.zero_grad()
    batch = full_batch.without(*[m for m in MODALITIES if m not in subset])
    losses, output = model.compute_losses(batch)
    assert torch.isfinite(losses["loss"]) and torch.isfinite(output.heatmap).all()
    losses["loss"].backward()
    for name, branch in model.branches.items():
        grads = [p.grad for p in branch.parameters() if p.requires_grad]
        if name in subset:
            assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name} got no gradient"
            assert all(torch.isfinite(g).all() for g in grads if g is not None)
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads), f"absent {name} got a gradient"
    _, attention = model(batch)
    for i, name in enumerate(attention.modalities):
        if name not in subset:
            assert torch.all(attention.weights[:, :, i] == 0)
    for p in model.fuser.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_per_sample_missing_modalities_and_an_empty_sample(full_model):
    """Sample 0 has LiDAR + camera, sample 1 radar + GPS, sample 2 nothing at all: all finite, masks respected."""
    samples = [make_sample("a", 1, modalities=("lidar", "camera")), make_sample("b", 2, modalities=("radar", "gps")),
               make_sample("c", 3, modalities=())]
    batch = collate_samples(samples)
    model = full_model.eval()
    with torch.no_grad():
        output, attention = model(batch)
    assert torch.isfinite(output.heatmap).all()
    present = attention.present
    order = attention.modalities
    assert present[0].tolist() == [m in ("lidar", "camera") for m in order]
    assert present[1].tolist() == [m in ("radar", "gps") for m in order]
    assert not present[2].any() and torch.all(attention.weights[2] == 0)
    maps = contribution_maps(attention)
    assert torch.allclose(maps[:2].sum(1), torch.ones(2, *GRID.shape), atol=1e-5)
    summary = contribution_summary(attention)
    assert set(summary) == set(order) and sum(summary.values()) == pytest.approx(1.0, abs=1e-5)
    boxes = model.predict_boxes(batch, score_threshold=0.0)
    assert len(boxes) == 3 and all(len(b) <= 500 for b in boxes)


def test_modality_dropout_never_removes_every_modality_of_a_sample():
    g = torch.Generator().manual_seed(0)
    present = {m: torch.rand(4000, generator=g) < 0.7 for m in MODALITIES}
    dropped = drop_modalities(present, MODALITIES, 0.5, generator=g)
    before = torch.stack([present[m] for m in MODALITIES], 1)
    after = torch.stack([dropped[m] for m in MODALITIES], 1)
    assert not (after & ~before).any()  # never adds a modality
    assert torch.equal(after.any(1), before.any(1))  # a sample that had one keeps at least one
    rate = 1 - after.sum() / before.sum()
    assert 0.35 < rate < 0.5  # about p, a bit less because of the rescued samples
    assert torch.equal(drop_modalities(present, MODALITIES, 0.0)["lidar"], present["lidar"])


def test_mixed_precision_keeps_attention_losses_and_decoding_in_float32(full_model, full_batch):
    """bf16 autocast (on the CPU here; the GPU path is the same code): the head maps are bf16, but the attention
    softmax, the sampling, the losses and the decoded boxes are float32 and finite."""
    model = full_model.train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, output = model.compute_losses(full_batch)
    assert output.heatmap.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, attention = model(full_batch)
    assert attention.weights.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        boxes = model.predict_boxes(full_batch)
    assert all(b.center.dtype == torch.float32 and b.scores.dtype == torch.float32 for b in boxes)


# ------------------------------------------------------------------------------------------------ determinism, overfit
def _train_steps(seed: int, steps: int = 3) -> tuple[list[float], torch.Tensor]:
    model = tiny_model(seed=0, modality_dropout=0.3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = make_batch(2, seed=2)
    torch.manual_seed(seed)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        present = drop_modalities(batch.present, model.modalities, model.modality_dropout)
        loss = model.compute_losses(batch, present)[0]["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        heatmap = model(batch)[0].heatmap
    return losses, heatmap


def test_fixed_seed_gives_identical_training_and_outputs():
    losses_a, heat_a = _train_steps(seed=5)
    losses_b, heat_b = _train_steps(seed=5)
    assert losses_a == losses_b
    assert torch.equal(heat_a, heat_b)
    losses_c, _ = _train_steps(seed=6)  # GPS corruption and modality dropout draw from the seeded RNG
    assert losses_c != losses_a


def test_single_batch_can_be_overfit():
    model = tiny_model(seed=0, gps_corruption=False).train()
    batch = make_batch(2, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for step in range(40):
        optimizer.zero_grad()
        loss = model.compute_losses(batch)[0]["loss"]
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    final = model.compute_losses(batch)[0]["loss"].item()
    assert final < first / 10, (first, final)
    # and the overfit model finds the boxes it was trained on
    boxes = model.predict_boxes(batch, score_threshold=0.3)
    for truth, found in zip(batch.boxes, boxes):
        distance = torch.cdist(truth.center[:, :2], found.center[:, :2]).min(dim=1).values
        assert (distance < 1.0).float().mean() >= 0.75


# ------------------------------------------------------------------------------------------------ temporal fusion
def test_temporal_fusion_uses_the_previous_keyframe_of_the_same_scene():
    model = tiny_model(temporal_fusion=True, seed=0).eval()
    reference = tiny_model(seed=0).eval()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("temporal.")})
    first = collate_samples([make_sample("t0", 1, timestamp_us=1_000_000, pose_xy=(100.0, 200.0))])
    second = collate_samples([make_sample("t1", 2, timestamp_us=1_500_000, pose_xy=(102.0, 200.0))])
    with torch.no_grad():
        model(first)
        out_fresh = model(second)[0].heatmap
        # a fresh temporal block (zero-initialised last conv) changes nothing
        assert torch.allclose(out_fresh, reference(second)[0].heatmap, atol=1e-6)
        torch.nn.init.normal_(model.temporal.mix[-1].weight, std=0.5)
        model.temporal.reset()
        alone = model(second)[0].heatmap  # no history: identical to the reference
        assert torch.allclose(alone, reference(second)[0].heatmap, atol=1e-6)
        model.temporal.reset()
        model(first)
        with_history = model(second)[0].heatmap
        assert not torch.allclose(with_history, alone, atol=1e-4)
        # another scene, or a gap above temporal_max_gap_s, gives no history
        model.temporal.reset()
        model(first)
        other = collate_samples([make_sample("t1", 2, scene="scene-0002", timestamp_us=1_500_000,
                                             pose_xy=(102.0, 200.0))])
        assert torch.allclose(model(other)[0].heatmap, alone, atol=1e-6)
        model.temporal.reset()
        model(first)
        late = collate_samples([make_sample("t1", 2, timestamp_us=3_000_000, pose_xy=(102.0, 200.0))])
        assert torch.allclose(model(late)[0].heatmap, alone, atol=1e-6)
    assert len(model.temporal.history) <= model.temporal.max_scenes


# ------------------------------------------------------------------------------------------------ Lightning, checkpoints
TINY_MODEL_YAML = {
    "grid": {"x_min": -16.0, "x_max": 16.0, "y_min": -12.0, "y_max": 12.0, "z_min": -3.0, "z_max": 3.0,
             "cell_size": 1.0},
    "branches": [
        {"class_path": "fusion.branches.lidar.LidarPillarBranch",
         "init_args": {"out_channels": 8, "pillar_channels": 8, "hidden_channels": 8, "bev_blocks": 1}},
        {"class_path": "fusion.branches.radar.RadarBranch",
         "init_args": {"out_channels": 8, "pillar_channels": 8, "hidden_channels": 8, "bev_blocks": 1}},
    ],
    "fuser": {"class_path": "fusion.fuser.DeformableFuser", "init_args": {"channels": 16, "heads": 2, "points": 2}},
    "head": {"class_path": "fusion.heads.centerpoint.CenterHead",
             "init_args": {"shared_channels": 16, "head_channels": 16}},
    "scheduler": "cosine",
    "score_threshold": 0.05,
}


def test_lightning_fit_validate_and_weights_only_checkpoint(tmp_path):
    import lightning.pytorch as pl

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": TINY_MODEL_YAML, "data": {"dataroot": str(tmp_path)}}))
    pl.seed_everything(0)
    cli = _cli(["--config", str(config)])  # built as tools/train.py builds it: hparams are the plain config
    model = cli.model
    assert list(model.branches) == ["lidar", "radar"] and cli.datamodule.modalities == ("lidar", "radar")
    samples = [make_sample(f"s{i}", i, modalities=("lidar", "radar")) for i in range(4)]
    loader = torch.utils.data.DataLoader(samples, batch_size=2, collate_fn=collate_samples)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)
    metrics = CollectPredictions()
    trainer.callbacks.append(metrics)
    trainer.fit(model, loader, loader)
    assert set(metrics.predictions) == {s.token for s in samples}
    assert "val/loss" in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics["val/loss"])
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    state = torch.load(checkpoint, weights_only=True)  # no pickled objects
    assert state["hyper_parameters"]["grid"]["cell_size"] == 1.0
    batch = collate_samples(samples[:2])
    expected = model.predict_boxes(batch)
    assert sum(len(b) for b in expected) > 0
    overlay = tmp_path / "only_lidar.yaml"
    overlay.write_text("model:\n  modalities: [lidar]\n")
    for restored in (load_run(checkpoint, config).model, load_run(checkpoint).model):
        got = restored.predict_boxes(batch)
        for a, b in zip(expected, got):
            assert len(a) == len(b) and torch.allclose(a.center, b.center) and torch.equal(a.labels, b.labels)
    # overlays merge like repeated --config
    assert list(load_run(config=[config, overlay]).model.branches) == ["lidar"]
    bare = tmp_path / "bare.ckpt"  # weights only, no saved model settings: the config describes the model
    torch.save({"state_dict": state["state_dict"]}, bare)
    assert list(load_run(bare, config).model.branches) == list(model.branches)
    with pytest.raises(ValueError, match="bare.ckpt"):  # the lidar-only model does not fit those weights
        load_run(bare, [config, overlay])


def test_load_run_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_run(config=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {}\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_run(config=bad)
    with pytest.raises(ValueError, match="modality"):
        FusionDetector(GRID, [BRANCHES["lidar"], BRANCHES["lidar"]])


# ------------------------------------------------------------------------------------------------ configs and the CLI
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
ABLATIONS = {
    "tiny_cpu.yaml": set(MODALITIES),
    **{f"tiny_cpu_only_{m}.yaml": {m} for m in MODALITIES},
    **{f"tiny_cpu_no_{m}.yaml": set(MODALITIES) - {m} for m in MODALITIES},
}


def _cli(args):
    from unittest import mock

    from fusion.datasets.datamodule import FusionDataModule
    from fusion.module import FusionCLI

    with mock.patch("sys.argv", ["train.py"]):
        return FusionCLI(FusionDetector, FusionDataModule, run=False, args=args)


def test_every_config_is_there():
    names = {c.name for c in CONFIGS}
    assert set(ABLATIONS) | {"nuscenes.yaml"} <= names


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_tiny_cpu_configs_instantiate_through_lightning_cli(name):
    """tiny_cpu.yaml alone, and each ablation overlay given after it (--config base --config overlay)."""
    args = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml")]
    if name != "tiny_cpu.yaml":
        args += ["--config", str(ROOT / "configs" / name)]
    cli = _cli(args)
    model, data = cli.model, cli.datamodule
    assert set(model.branches) == ABLATIONS[name]
    assert data.grid == model.grid  # the one grid, linked from model.grid to data.grid
    assert set(data.modalities) == ABLATIONS[name]
    assert cli.trainer.max_epochs >= 1


def test_nuscenes_config_instantiates_at_full_resolution():
    cli = _cli(["--config", str(ROOT / "configs" / "nuscenes.yaml")])
    model, data = cli.model, cli.datamodule
    assert model.grid.shape == (180, 180) and model.grid.cell_size == pytest.approx(0.6)
    assert set(model.branches) == set(MODALITIES)
    lidar = model.branches["lidar"]
    assert lidar.voxel_size[0] == pytest.approx(0.075) and lidar.voxel_size[1] == pytest.approx(0.075)
    assert tuple(data.image_size) == (256, 704)
    assert data.lidar_sweeps == 9 and data.radar_sweeps == 6


# ------------------------------------------------------------------------------------------------ real data
def _real_root() -> Path | None:
    candidates = [os.environ.get("NUSCENES_REAL"), ROOT.parent / "shared" / "nuscenes-real"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


@pytest.mark.real_data
def test_real_scene_0061_frame_runs_through_the_full_model():
    root = _real_root()
    if root is None:
        pytest.skip("real nuScenes files not found: set NUSCENES_REAL or provide ../shared/nuscenes-real")
    import real_frame  # tests/real_frame.py
    from fusion.datasets.transforms import ImageResizeCrop

    grid = BEVGrid(-51.2, 51.2, -51.2, 51.2, -5.0, 3.0, cell_size=1.6)
    resize = ImageResizeCrop((352, 128))  # (width, height)
    sample = real_frame.load_real_frame(root, grid=grid, camera_decode_size=resize.decode_size((1600, 900)))
    sample = resize(sample)
    assert sample.present("lidar") and sample.present("camera")
    assert not sample.present("radar") and not sample.present("gps")
    torch.manual_seed(0)
    branches = [partial(CameraBranch, out_channels=8, backbone_widths=(8, 16), backbone_blocks=(1, 1),
                        feature_channels=8, context_channels=8, depth_bins=16, bev_blocks=1),
                partial(LidarPillarBranch, out_channels=8, pillar_channels=8, hidden_channels=8, bev_blocks=1),
                BRANCHES["radar"], partial(GpsBranch, out_channels=8, map_channels=(8,), ego_embedding=8,
                                           bev_blocks=1)]
    model = FusionDetector(grid, branches, fuser=partial(DeformableFuser, channels=16, heads=2, points=2),
                           head=partial(CenterHead, shared_channels=16, head_channels=16)).eval()
    batch = collate_samples([sample])
    boxes = model.predict_boxes(batch, score_threshold=0.0)[0]
    assert len(boxes) == 500
    # decoded in the ego frame on the grid: each center within its peak cell's reach (untrained offsets are small)
    margin = 2 * grid.cell_size
    x, y = boxes.center[:, 0], boxes.center[:, 1]
    assert ((x > grid.x_min - margin) & (x < grid.x_max + margin) & (y > grid.y_min - margin)
            & (y < grid.y_max + margin)).all()
    assert torch.isfinite(boxes.center).all() and (boxes.size > 0).all()
    _, attention = model.predict(batch, score_threshold=0.0)
    for i, name in enumerate(attention.modalities):
        assert bool(attention.present[0, i]) == (name in ("lidar", "camera"))
        if name in ("radar", "gps"):
            assert torch.all(attention.weights[0, :, i] == 0)
    # The frame's ground truth (69 boxes in the LIDAR_TOP frame) comes back in the ego frame: LiDAR points fall in
    # the annotated boxes, so ego-frame boxes and points agree.
    truth = sample.boxes
    assert len(truth) > 0
    points = sample.lidar[:, :3]
    corners = truth.corners()
    inside = 0
    for b in range(len(truth)):
        lo, hi = corners[b].min(0).values, corners[b].max(0).values
        inside += int(((points >= lo) & (points <= hi)).all(1).any())
    assert inside / len(truth) > 0.5


# ------------------------------------------------------------------------------------------------ data module
def test_datamodule_over_the_tiny_dataroot_feeds_the_model(tiny_dataroot, tmp_path):
    import lightning.pytorch as pl

    from fusion.datasets.datamodule import FusionDataModule

    grid = BEVGrid(-32.0, 32.0, -32.0, 32.0, -5.0, 3.0, cell_size=2.0)
    data = FusionDataModule(str(tiny_dataroot.dataroot), tiny_dataroot.version, tiny_dataroot.train_split,
                            tiny_dataroot.val_split, grid=grid, modalities=["camera", "lidar", "radar"],
                            image_size=(48, 128), lidar_sweeps=1, radar_sweeps=2, batch_size=2, num_workers=0)
    data.setup("fit")
    assert len(data.datasets["train"]) > 0 and len(data.datasets["val"]) > 0
    batch = next(iter(data.train_dataloader()))
    assert batch.batch_size == 2
    assert tuple(batch.cameras.images.shape[-2:]) == (48, 128) and batch.cameras.images.dtype == torch.uint8
    assert batch.present["lidar"].all() and batch.present["camera"].all()
    assert not batch.present["gps"].any()  # not a model modality: map and CAN removed from the samples
    assert grid.contains(batch.lidar_points[:, :2]).all()  # point-range filtered to the grid
    assert batch.lidar_points[:, 4].max() > 0  # one previous sweep with its time lag
    val = next(iter(data.val_dataloader()))
    assert val.tokens == data.datasets["val"].sample_tokens[:2]  # validation is not shuffled

    # training samples are augmented (a fixed torch seed repeats it); validation samples are not
    torch.manual_seed(3)
    first = data.datasets["train"][0]
    torch.manual_seed(3)
    again = data.datasets["train"][0]
    assert torch.equal(first.lidar, again.lidar)
    torch.manual_seed(4)
    other = data.datasets["train"][0]
    assert not torch.equal(first.lidar, other.lidar)
    assert torch.equal(data.datasets["val"][0].lidar, data.datasets["val"][0].lidar)

    torch.manual_seed(0)
    model = FusionDetector(grid, [BRANCHES["camera"], BRANCHES["lidar"], BRANCHES["radar"]],
                           fuser=partial(DeformableFuser, channels=16, heads=2, points=2),
                           head=partial(CenterHead, shared_channels=16, head_channels=16))
    metrics = CollectPredictions()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
                         accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[metrics])
    trainer.fit(model, datamodule=data)
    assert set(metrics.predictions) == set(data.datasets["val"].sample_tokens[:2])
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_model_benchmark_runs_on_random_samples(tmp_path):
    """tools/benchmark.py model end to end on its built-in random samples (no dataroot): figures are written."""
    import json
    import sys

    sys.path.insert(0, str(ROOT))
    from tools.benchmarks import model as benchmark

    out = tmp_path / "model.json"
    code = benchmark.main(["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--dataroot", str(tmp_path / "none"),
                           "--samples", "2", "--warmup", "0", "--iterations", "2", "--batch-size", "1",
                           "--threads", "1", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert code == 0 and figures["samples"].startswith("random samples")
    assert figures["inference_frames_per_s"] > 0 and figures["train_samples_per_s"] > 0
    assert figures["modalities"] == ["camera", "lidar", "radar", "gps"]


def test_branch_losses_join_the_training_loss_only_in_training():
    torch.manual_seed(0)
    branches = [partial(BRANCHES["camera"], depth_loss_weight=2.0), BRANCHES["lidar"]]
    model = FusionDetector(GRID, branches, fuser=partial(DeformableFuser, channels=16, heads=2, points=2),
                           head=partial(CenterHead, shared_channels=16, head_channels=16))
    batch = make_batch(2, seed=3)
    model.train()
    losses, _ = model.compute_losses(batch)
    assert "camera_depth" in losses and losses["camera_depth"] > 0
    head_only = losses["heatmap"] * model.loss.heatmap_weight + losses["regression"] * model.loss.regression_weight \
        + losses["attribute"] * model.loss.attribute_weight
    assert losses["loss"].item() == pytest.approx((head_only + losses["camera_depth"]).item(), rel=1e-5)
    model.eval()
    eval_losses, _ = model.compute_losses(batch)
    assert "camera_depth" not in eval_losses
    # With the camera masked out of the whole batch (dropout) the branch still runs in training, so that every
    # parameter takes part in every step (DDP), and its depth supervision still applies; the fuser ignores it.
    model.train()
    model.zero_grad()
    masked_losses, _ = model.compute_losses(batch.without("camera"))
    assert "camera_depth" in masked_losses
    masked_losses["loss"].backward()
    assert all(p.grad is not None for p in model.branches["camera"].parameters() if p.requires_grad)


def test_modality_dropout_per_modality():
    g = torch.Generator().manual_seed(1)
    present = {m: torch.ones(6000, dtype=torch.bool) for m in MODALITIES}
    dropped = drop_modalities(present, MODALITIES, {"lidar": 0.5, "camera": 0.1}, generator=g)
    assert 0.45 < 1 - dropped["lidar"].float().mean() < 0.55
    assert 0.05 < 1 - dropped["camera"].float().mean() < 0.15
    assert dropped["radar"].all() and dropped["gps"].all()  # not named: never dropped
    with pytest.raises(ValueError, match="sonar"):
        drop_modalities(present, MODALITIES, {"sonar": 0.5})
    with pytest.raises(ValueError, match="lidar"):
        tiny_model(modality_dropout={"lidar": 1.0})
    with pytest.raises(ValueError, match="modality_dropout"):
        tiny_model(modality_dropout=1.5)
