"""`FusionDetector`: branches -> cross-attention fuser -> CenterPoint head, as a LightningModule.

Composition is plain jsonargparse / LightningCLI `class_path` + `init_args` (no registry): the branches are a list of
callables that take the BEVGrid (a branch class with its options), the fuser a callable taking the grid and
{modality: channels}, the head a callable taking the grid and the fused channel count. The one BEVGrid is given once
(`model.grid`) and injected into every part; `FusionCLI` links it to the data module (`data.grid`). Example YAML:

    model:
      grid: {x_min: -32.0, x_max: 32.0, y_min: -32.0, y_max: 32.0, z_min: -5.0, z_max: 3.0, cell_size: 1.0}
      branches:
        - class_path: fusion.branches.lidar.PillarLidarBranch
          init_args: {out_channels: 32}
      fuser: {class_path: fusion.fuser.DeformableFuser, init_args: {channels: 64}}
      head: {class_path: fusion.heads.centerpoint.CenterHead, init_args: {shared_channels: 64}}

Everything is in the keyframe ego frame (x forward, y left, z up; meters, radians, seconds).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, is_dataclass
from typing import Any, Callable, Literal, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn

from fusion.fuser import DeformableFuser, FusionAttention
from fusion.grid import BEVGrid
from fusion.heads.centerpoint import CenterHead, HeadOutput
from fusion.heads.decode import decode_boxes, encode_targets
from fusion.heads.finish import finish_boxes
from fusion.heads.map_heading import map_heading_settings
from fusion.heads.point_motion import point_motion_settings
from fusion.losses import CenterPointLoss
from fusion.types import MODALITIES, Batch, Boxes

BranchFactory = Callable[[BEVGrid], nn.Module]
FuserFactory = Callable[[BEVGrid, dict[str, int]], nn.Module]
HeadFactory = Callable[[BEVGrid, int], nn.Module]


def dropout_probabilities(probability: float | Mapping[str, float], modalities: tuple[str, ...]) -> list[float]:
    """The dropout probability of each of `modalities` from one number or a {modality: probability} mapping
    (modalities it does not name: 0); ValueError unless every probability is in [0, 1)."""
    if isinstance(probability, Mapping):
        unknown = set(probability) - set(MODALITIES)
        if unknown:
            raise ValueError(f"modality_dropout names unknown modalities {sorted(unknown)}; expected {MODALITIES}")
        values = [float(probability.get(m, 0.0)) for m in modalities]
    else:
        values = [float(probability)] * len(modalities)
    for m, value in zip(modalities, values):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"modality_dropout for {m} must be in [0, 1), got {value}")
    return values


def drop_modalities(present: dict[str, Tensor], modalities: tuple[str, ...],
                    probability: float | Mapping[str, float], generator: torch.Generator | None = None
                    ) -> dict[str, Tensor]:
    """Per-sample modality dropout: each present modality of each sample is removed with its probability (one
    number for all, or {modality: probability}), but a sample never loses all of its modalities (one of its present
    ones, chosen at random, is kept).

    present: {modality: [B] bool}; only `modalities` take part (others are returned unchanged)."""
    probabilities = dropout_probabilities(probability, modalities)
    if not modalities or max(probabilities) <= 0.0:
        return dict(present)
    stacked = torch.stack([present[m].bool() for m in modalities], dim=1)  # [B, M]
    device = stacked.device
    draw = torch.rand(stacked.shape, generator=generator, device="cpu" if generator is not None else device)
    kept = stacked & (draw.to(device) >= torch.tensor(probabilities, device=device))
    lost_all = stacked.any(dim=1) & ~kept.any(dim=1)
    pick = torch.rand(stacked.shape, generator=generator, device="cpu" if generator is not None else device)
    pick = pick.to(device).masked_fill(~stacked, -1.0).argmax(dim=1)  # a random present modality per sample
    rescue = torch.zeros_like(stacked)
    rescue[torch.arange(stacked.shape[0], device=device), pick] = True
    kept = kept | (rescue & lost_all[:, None])
    out = dict(present)
    for i, m in enumerate(modalities):
        out[m] = kept[:, i]
    return out


def _plain(value: Any) -> Any:
    """A YAML/JSON-safe copy of a hyperparameter value, or None if it has no plain form (e.g. a callable)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else items
    if isinstance(value, dict):
        items = {k: _plain(v) for k, v in value.items()}
        return None if any(items[k] is None and value[k] is not None for k in value) else items
    return None


class TemporalFusion(nn.Module):
    """Fuses the previous keyframe's fused BEV of the same scene into the current fused BEV.

    It remembers, per scene (at most `max_scenes`, least recently used dropped), the last fused BEV (detached), its
    ego_to_global pose and timestamp. For a sample whose scene has a remembered BEV that is older by more than 0 and
    at most `max_gap_s` seconds, that BEV is warped into the current ego frame by fusion.temporal.TemporalAligner
    (ego poses, grid_sample on the shared grid) and added as
        fused + valid * conv([fused, warped])
    where valid [B, 1, H, W] is 1 only on cells the warp could fill for samples that have a history. Samples and
    cells without a history are left exactly as they were (never zeros that look like data). The last conv starts
    at zero, so switching temporal fusion on does not change a fresh model's output. The history is carried across
    calls, so it helps sequential inference (replay, evaluation with batch size 1); batches of shuffled training
    samples rarely find a previous keyframe of their scene.
    """

    def __init__(self, grid: BEVGrid, channels: int, max_gap_s: float = 0.75, max_scenes: int = 64):
        super().__init__()
        from fusion.temporal import TemporalAligner

        self.aligner = TemporalAligner(grid)
        self.max_gap_us = int(max_gap_s * 1e6)
        self.max_scenes = max_scenes
        self.mix = nn.Sequential(nn.Conv2d(2 * channels, channels, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                 nn.Conv2d(channels, channels, 1))
        nn.init.zeros_(self.mix[-1].weight)
        nn.init.zeros_(self.mix[-1].bias)
        self.history: OrderedDict[str, tuple[Tensor, Tensor, int]] = OrderedDict()

    def reset(self) -> None:
        self.history.clear()

    def forward(self, fused: Tensor, batch: Batch) -> Tensor:
        """fused [B, C, H, W] (current ego frame) -> [B, C, H, W]; remembers the result per scene."""
        previous, previous_pose, has_history = [], [], []
        for i, (scene, timestamp) in enumerate(zip(batch.scene_names, batch.timestamps_us.tolist())):
            entry = self.history.get(scene)
            usable = entry is not None and 0 < timestamp - entry[2] <= self.max_gap_us
            has_history.append(usable)
            previous.append(entry[0].to(fused.device) if usable else torch.zeros_like(fused[i]))
            previous_pose.append(entry[1].to(fused.device) if usable else batch.ego.ego_to_global[i].to(fused.device))
        out = fused
        if any(has_history):
            current_pose = batch.ego.ego_to_global.to(fused.device)
            warped, valid = self.aligner(torch.stack(previous).to(fused.dtype), torch.stack(previous_pose).to(
                fused.device), current_pose)
            valid = valid & torch.tensor(has_history, device=fused.device)[:, None, None, None]
            out = fused + valid.to(fused.dtype) * self.mix(torch.cat([fused, warped], dim=1))
        for i, (scene, timestamp) in enumerate(zip(batch.scene_names, batch.timestamps_us.tolist())):
            self.history[scene] = (out[i].detach(), batch.ego.ego_to_global[i].detach().to(fused.device), timestamp)
            self.history.move_to_end(scene)
        while len(self.history) > self.max_scenes:
            self.history.popitem(last=False)
        return out


class FusionDetector(pl.LightningModule):
    """Camera / LiDAR / radar / GPS fusion detector on one BEVGrid.

    Args:
        grid: the shared BEVGrid (ego frame, meters), given to every branch, the fuser and the head.
        branches: one factory per sensor branch (`class_path` + `init_args` in YAML); each is called with the grid
            and must give a module with `modality` (one of fusion.types.MODALITIES, each at most once) and
            `out_channels`, mapping a Batch to [B, out_channels, H, W].
        fuser: factory called as fuser(grid, {modality: channels}); default DeformableFuser(grid, channels, 64).
            The result must have `out_channels` and return (fused BEV, FusionAttention).
        head: factory called as head(grid, fused_channels); default CenterHead.
        loss: the head loss; default CenterPointLoss().
        modalities: use only the branches of these modalities (ablations: `--model.modalities [camera]`); None uses
            every branch.
        modality_dropout: training-time probability of removing each present modality of each sample, one number or
            {modality: probability} (e.g. a higher one for LiDAR teaches the others to carry on without it; never all of
            a sample's modalities); 0 disables it.
        temporal_fusion: fuse the previous keyframe's fused BEV of the same scene, warped into the current ego
            frame by the ego poses (fusion.temporal.TemporalAligner); see `TemporalFusion`.
        temporal_max_gap_s: the previous keyframe is used only if it is at most this much older.
        lr / weight_decay: AdamW (no weight decay on biases and norm parameters).
        scheduler: "onecycle" (OneCycleLR over all training steps), "cosine" (linear warm-up then cosine decay to
            1% of lr, per step) or "none".
        warmup_fraction: share of the training steps spent warming up (one-cycle's pct_start).
        score_threshold / max_boxes / pool_size / heading_from_motion: decoding (fusion.heads.decode.decode_boxes;
            heading_from_motion, m/s: a box predicted to move at least that fast takes its heading from its velocity,
            "flip": turned by pi if it points against the motion, "direction": the motion's direction).
        point_motion: measure each detected box's velocity from the LiDAR sweeps' time lags and the radar's Doppler
            and combine it with the head's (fusion.heads.point_motion; a dict of PointMotionSettings fields, {} for
            the defaults; None: the head's velocity as it is). Applied before heading_from_motion.
        map_heading: turn slow road vehicles to face along the side of the road traffic keeps to, read from the
            map crop (fusion.heads.map_heading; a dict of MapHeadingSettings fields, {} for the defaults, e.g.
            {"traffic": "left"}; None: off). Applied after heading_from_motion, to the boxes it leaves alone.
        attribute_from_motion: m/s; a box moving at least that fast (after point_motion) gets its class's moving
            attribute (vehicle.moving, cycle.with_rider, pedestrian.moving); None: the head's attribute as it is.
        vru_heading_from_motion: m/s; a pedestrian, bicycle or motorcycle moving at least that fast (after
            point_motion) faces the direction of its motion (fusion.heads.decode.vru_headings_from_motion); None: off.
        gaussian_overlap / min_radius: target heatmap Gaussians (CenterPoint's gaussian_radius).
    """

    def __init__(
        self,
        grid: BEVGrid,
        branches: list[BranchFactory],
        fuser: FuserFactory | None = None,
        head: HeadFactory | None = None,
        loss: CenterPointLoss | None = None,
        modalities: list[str] | None = None,
        modality_dropout: float | dict[str, float] = 0.0,
        temporal_fusion: bool = False,
        temporal_max_gap_s: float = 0.75,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        scheduler: Literal["onecycle", "cosine", "none"] = "onecycle",
        warmup_fraction: float = 0.1,
        score_threshold: float = 0.1,
        max_boxes: int = 500,
        pool_size: int = 3,
        heading_from_motion: float | None = None,
        heading_from_motion_mode: Literal["direction", "flip"] = "flip",
        point_motion: dict | None = None,
        map_heading: dict | None = None,
        attribute_from_motion: float | None = None,
        vru_heading_from_motion: float | None = None,
        gaussian_overlap: float = 0.1,
        min_radius: int = 2,
    ):
        super().__init__()
        self.save_hyperparameters()
        for key in list(self.hparams):  # keep checkpoints loadable with weights_only=True: plain values only
            plain = _plain(self.hparams[key])
            if plain is None and self.hparams[key] is not None:
                del self.hparams[key]
            else:
                self.hparams[key] = plain
        if not isinstance(grid, BEVGrid):
            raise ValueError(f"FusionDetector: grid must be a BEVGrid, got {type(grid).__name__}")
        if not branches:
            raise ValueError("FusionDetector needs at least one branch")
        dropout_probabilities(modality_dropout, MODALITIES)  # ValueError naming the bad entry
        self.grid = grid
        built = [factory(grid) for factory in branches]
        names = [getattr(b, "modality", None) for b in built]
        for branch, name in zip(built, names):
            if name not in MODALITIES:
                raise ValueError(f"branch {type(branch).__name__} has modality {name!r}; expected one of {MODALITIES}")
            if not isinstance(getattr(branch, "out_channels", None), int):
                raise ValueError(f"branch {type(branch).__name__} has no integer out_channels")
        if len(set(names)) != len(names):
            raise ValueError(f"FusionDetector: each modality may have one branch, got {names}")
        if modalities is not None:
            unknown = set(modalities) - set(names)
            if unknown or not modalities:
                raise ValueError(f"FusionDetector: modalities {list(modalities)} must be a non-empty subset of the "
                                 f"configured branches {names}")
            built = [b for b, name in zip(built, names) if name in modalities]
            names = [name for name in names if name in modalities]
        self.branches = nn.ModuleDict({name: branch for name, branch in zip(names, built)})
        self.modalities: tuple[str, ...] = tuple(names)
        # The resolved list (not None): equal to the data module's linked `modalities`, which Lightning checks.
        self.hparams["modalities"] = list(names)
        in_channels = {name: branch.out_channels for name, branch in zip(names, built)}
        self.fuser = fuser(grid, in_channels) if fuser is not None else DeformableFuser(grid, in_channels)
        fused_channels = getattr(self.fuser, "out_channels", None)
        if not isinstance(fused_channels, int):
            raise ValueError(f"fuser {type(self.fuser).__name__} has no integer out_channels")
        self.temporal = TemporalFusion(grid, fused_channels, temporal_max_gap_s) if temporal_fusion else None
        self.head = head(grid, fused_channels) if head is not None else CenterHead(grid, fused_channels)
        self.loss = loss if loss is not None else CenterPointLoss()
        self.modality_dropout = modality_dropout
        point_motion_settings(point_motion)  # ValueError naming an unknown field, at construction
        map_heading_settings(map_heading)
        for name, speed in (("heading_from_motion", heading_from_motion),
                            ("attribute_from_motion", attribute_from_motion),
                            ("vru_heading_from_motion", vru_heading_from_motion)):
            if speed is not None and (isinstance(speed, bool) or not isinstance(speed, (int, float))
                                      or not math.isfinite(speed) or speed < 0):
                raise ValueError(f"FusionDetector.{name} must be a finite speed >= 0 (m/s) or None, got {speed!r}")

    # ---------------------------------------------------------------- forward / inference
    def forward(self, batch: Batch, present: dict[str, Tensor] | None = None) -> tuple[HeadOutput, FusionAttention]:
        """Batch -> (raw head maps, attention weights). `present` overrides batch.present (e.g. after dropout).
        In eval mode a branch runs only if at least one sample of the batch may use its modality."""
        output, attention, _ = self.forward_with_losses(batch, present, branch_losses=False)
        return output, attention

    def forward_with_losses(self, batch: Batch, present: dict[str, Tensor] | None = None, branch_losses: bool = True
                            ) -> tuple[HeadOutput, FusionAttention, dict[str, Tensor]]:
        """`forward` plus the branches' own training losses (e.g. the camera's LiDAR-supervised depth), from the
        branches that have `forward_with_losses(batch) -> (bev, {name: loss})`, when branch_losses is True."""
        present = dict(batch.present if present is None else present)
        features: dict[str, Tensor] = {}
        masks: dict[str, Tensor] = {}
        losses: dict[str, Tensor] = {}
        for name, branch in self.branches.items():
            mask = present.get(name)
            # In training every branch runs, even when dropout or the data left its modality out of the whole batch
            # (the fuser masks it): all parameters take part in every step, as DDP requires.
            if mask is None or not (bool(mask.any()) or self.training):
                continue
            masks[name] = mask.to(self.device)
            if branch_losses and hasattr(branch, "forward_with_losses"):
                features[name], extra = branch.forward_with_losses(batch)
                losses.update(extra)
            else:
                features[name] = branch(batch)
        if not features:  # no sample has any modality: the fuser still gives a finite, defined BEV
            masks = {name: torch.zeros(batch.batch_size, dtype=torch.bool, device=self.device)
                     for name in self.modalities}
        fused, attention = self.fuser(features, masks)
        if self.temporal is not None:
            fused = self.temporal(fused, batch)
        output = self.head(fused)
        return output, attention, losses

    @torch.no_grad()
    def predict(self, batch: Batch, score_threshold: float | None = None) -> tuple[list[Boxes], FusionAttention]:
        """(detections per sample (ego frame, best first, at most max_boxes each), the fuser's attention weights of
        this batch) in eval mode; used by replay. The batch is moved to the module's device; results stay on it."""
        was_training = self.training
        self.eval()
        try:
            output, attention = self(batch.to(self.device))
        finally:
            self.train(was_training)
        return self.decode(output, score_threshold, batch), attention

    def predict_boxes(self, batch: Batch, score_threshold: float | None = None) -> list[Boxes]:
        """The detections of `predict` only; used by evaluation."""
        return self.predict(batch, score_threshold)[0]

    def decode(self, output: HeadOutput, score_threshold: float | None = None, batch: Batch | None = None
               ) -> list[Boxes]:
        """Raw head maps -> Boxes per sample (ego frame) with this model's decoding settings; `batch` (the one the
        maps came from) gives the point clouds the point_motion velocity measurement needs (skipped without it)."""
        threshold = self.hparams.get("score_threshold", 0.1) if score_threshold is None else score_threshold
        boxes = decode_boxes(output, self.grid, threshold, self.hparams.get("max_boxes", 500),
                             self.hparams.get("pool_size", 3))
        return finish_boxes(boxes, batch, self.grid, point_motion_settings(self.hparams.get("point_motion")),
                            self.hparams.get("heading_from_motion"),
                            self.hparams.get("heading_from_motion_mode", "flip"),
                            map_heading_settings(self.hparams.get("map_heading")),
                            self.hparams.get("attribute_from_motion"), self.hparams.get("vru_heading_from_motion"))

    # ---------------------------------------------------------------- training
    def compute_losses(self, batch: Batch, present: dict[str, Tensor] | None = None
                       ) -> tuple[dict[str, Tensor], HeadOutput]:
        """(the head's losses plus the branches' own training losses, each named, total under "loss"; the raw maps)."""
        output, _, branch_losses = self.forward_with_losses(batch, present, branch_losses=self.training)
        targets = encode_targets(batch.boxes, self.grid, self.hparams.get("gaussian_overlap", 0.1),
                                 self.hparams.get("min_radius", 2), device=self.device)
        losses = self.loss(output, targets)
        for name, value in branch_losses.items():
            losses["loss"] = losses["loss"] + value
            losses[name] = value.detach()
        return losses, output

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        present = drop_modalities(batch.present, self.modalities, self.modality_dropout)
        losses, _ = self.compute_losses(batch, present)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=batch.batch_size,
                      prog_bar=False)
        self.log("loss", losses["loss"], batch_size=batch.batch_size, prog_bar=True, logger=False)
        return losses["loss"]

    def on_validation_epoch_start(self) -> None:
        if self.temporal is not None:
            self.temporal.reset()

    def on_train_epoch_start(self) -> None:
        if self.temporal is not None:
            self.temporal.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, dict[str, Boxes]]:
        """Logs the validation losses and returns {"predictions": {sample token: Boxes (ego frame, CPU)}}, which
        the NuScenesDetectionMetrics callback collects and scores at the end of the epoch."""
        losses, output = self.compute_losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=batch.batch_size,
                      on_epoch=True, sync_dist=True)
        boxes = self.decode(output, batch=batch)
        return {"predictions": {token: sample_boxes.to("cpu") for token, sample_boxes in zip(batch.tokens, boxes)}}

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Boxes]:
        output, _ = self(batch)
        boxes = self.decode(output, batch=batch)
        return {token: b.to("cpu") for token, b in zip(batch.tokens, boxes)}

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
        lr = self.hparams.get("lr", 2e-3)
        optimizer = torch.optim.AdamW([
            {"params": decay, "weight_decay": self.hparams.get("weight_decay", 0.01)},
            {"params": no_decay, "weight_decay": 0.0},
        ], lr=lr)
        scheduler = self.hparams.get("scheduler", "onecycle")
        if scheduler == "none":
            return optimizer
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1000
        total = max(total, 2)
        warmup = self.hparams.get("warmup_fraction", 0.1)
        if scheduler == "onecycle":
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total,
                                                           pct_start=min(max(warmup, 0.01), 0.99),
                                                           div_factor=10.0, final_div_factor=100.0,
                                                           cycle_momentum=False)
        elif scheduler == "cosine":
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _WarmupCosine(total, warmup))
        else:
            raise ValueError(f"unknown scheduler {scheduler!r}; expected onecycle, cosine or none")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class _WarmupCosine:
    """lr factor at a step: linear warm-up over warmup_fraction of the steps, then cosine decay to 1%."""

    def __init__(self, total_steps: int, warmup_fraction: float):
        self.total = total_steps
        self.warmup = max(1, int(round(total_steps * warmup_fraction)))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))


def branch_modalities(branches: list | None, modalities: list[str] | None = None) -> list[str]:
    """The modalities a model config will use, from its parsed `branches` (class_path entries or factories) and its
    optional `modalities` selection, without building anything; every modality when it cannot be told."""
    import importlib

    found = []
    for entry in branches or []:
        class_path = getattr(entry, "class_path", None) or (entry.get("class_path") if isinstance(entry, dict) else None)
        target = getattr(entry, "func", entry)
        if class_path:
            module_name, _, class_name = class_path.rpartition(".")
            target = getattr(importlib.import_module(module_name), class_name)
        modality = getattr(target, "modality", None)
        if modality not in MODALITIES:
            return list(MODALITIES)
        found.append(modality)
    if modalities is not None:
        found = [m for m in found if m in modalities]
    return found or list(MODALITIES)


class FusionCLI(LightningCLI):
    """LightningCLI over FusionDetector / FusionDataModule. The config gives the BEVGrid once (model.grid) and it is
    linked to data.grid; data.modalities (which sensors the reader loads) follows the model's branches and its
    `modalities` selection. Use it in tools: `FusionCLI(FusionDetector, FusionDataModule)`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.grid", "data.grid")
        parser.link_arguments(("model.branches", "model.modalities"), "data.modalities",
                              compute_fn=branch_modalities)
