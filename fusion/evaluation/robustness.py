"""Robustness: the conditions a trained model is scored under (sensors removed, LiDAR thinned, GPS noise), inference
over a split under one condition, and the table of NDS / mAP per condition.

`RobustnessCondition`: sensors removed via Batch.without, LiDAR thinned to fewer beams by the reader's
lidar_keep_rings, GPS noise via fusion.datasets.gps_noise.perturb_gps. Boxes are in the keyframe ego frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from fusion.types import MODALITIES, Batch, Boxes


@dataclass(frozen=True)
class GpsNoise:
    """GPS/CAN corruption for `perturb_gps`: pose error sigmas (meters, radians), CAN noise (m/s, rad/s), CAN
    dropout probability; `seed` makes every evaluation draw the same noise."""

    position_sigma_m: float = 1.0
    yaw_sigma_rad: float = 0.035
    speed_sigma_mps: float = 0.5
    yaw_rate_sigma_radps: float = 0.02
    can_dropout: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class RobustnessCondition:
    """One row of the robustness table: modalities removed for every sample (Batch.without), LiDAR thinned by the
    reader (keep rings with ring % lidar_keep_rings == 0), and/or GPS noise."""

    name: str
    description: str
    remove: tuple[str, ...] = ()
    lidar_keep_rings: int | None = None
    gps_noise: GpsNoise | None = None

    def modalities(self, model_modalities: Iterable[str]) -> list[str]:
        """The model's modalities still used under this condition."""
        return [m for m in model_modalities if m not in self.remove]


def robustness_conditions(model_modalities: Sequence[str], keep_rings: Sequence[int] = (2, 4),
                          gps_noise: GpsNoise = GpsNoise()) -> list[RobustnessCondition]:
    """The conditions that apply to a model: all sensors; each of its sensors removed (when it has more than one);
    LiDAR thinned to 1/k of its beams for each k (with a LiDAR branch); GPS noise (with a GPS branch)."""
    conditions = [RobustnessCondition("all_sensors", "every sensor of the model")]
    if len(model_modalities) > 1:
        for modality in MODALITIES:
            if modality in model_modalities:
                conditions.append(RobustnessCondition(f"no_{modality}", f"{modality} removed", remove=(modality,)))
    if "lidar" in model_modalities:
        for k in keep_rings:
            if int(k) < 2:
                raise ValueError(f"LiDAR thinning factors must be >= 2, got {k}")
            conditions.append(RobustnessCondition(f"lidar_1_{int(k)}_beams", f"LiDAR thinned to 1/{int(k)} of its "
                                                  "beams", lidar_keep_rings=int(k)))
    if "gps" in model_modalities:
        conditions.append(RobustnessCondition(
            "gps_noise", f"GPS noise (position {gps_noise.position_sigma_m} m, yaw {gps_noise.yaw_sigma_rad} rad, "
            f"CAN dropout {gps_noise.can_dropout})", gps_noise=gps_noise))
    return conditions


def apply_condition(batch: Batch, condition: RobustnessCondition, grid, generator: torch.Generator | None = None
                    ) -> Batch:
    """The batch as the model sees it under `condition` (sensor removal and GPS noise; LiDAR thinning happens in the
    reader). `grid` is the BEVGrid of batch.map_raster (needed to move the map by a pose error)."""
    if condition.remove:
        batch = batch.without(*condition.remove)
    if condition.gps_noise is not None:
        from fusion.datasets.gps_noise import perturb_gps

        noise = condition.gps_noise
        batch = perturb_gps(batch, noise.position_sigma_m, noise.yaw_sigma_rad, generator, grid=grid,
                            speed_sigma_mps=noise.speed_sigma_mps, yaw_rate_sigma_radps=noise.yaw_rate_sigma_radps,
                            can_dropout=noise.can_dropout)
    return batch


def predict_split(model, batches: Iterable[Batch], condition: RobustnessCondition | None = None,
                  progress: bool = False) -> tuple[dict[str, Boxes], dict[str, np.ndarray]]:
    """Run `model.predict_boxes` over batches: ({token: Boxes in the ego frame, on the CPU}, {token: 4x4
    ego_to_global}). The model's temporal history (if any) is reset first, so each pass starts fresh."""
    if getattr(model, "temporal", None) is not None:
        model.temporal.reset()
    generator = None
    if condition is not None and condition.gps_noise is not None:
        generator = torch.Generator().manual_seed(condition.gps_noise.seed)
    predictions, poses = {}, {}
    iterator = batches
    if progress:
        from tqdm import tqdm

        iterator = tqdm(batches, desc=condition.name if condition else "inference", leave=False)
    for batch in iterator:
        if condition is not None:
            batch = apply_condition(batch, condition, model.grid, generator)
        for token, boxes, pose in zip(batch.tokens, model.predict_boxes(batch), batch.ego.ego_to_global):
            predictions[token] = boxes.to("cpu")
            poses[token] = pose.detach().cpu().double().numpy()
    return predictions, poses


@dataclass
class RobustnessRow:
    """Scores of one condition: NDS and mAP from the devkit, the sensors used, where its files are."""

    name: str
    description: str
    modalities: list[str]
    nds: float
    map: float
    tp_errors: dict[str, float] = field(default_factory=dict)
    results_path: str = ""


def format_robustness_table(rows: Sequence[RobustnessRow]) -> str:
    """A plain-text table: condition, sensors used, NDS, mAP, and the change in NDS from the first row."""
    reference = rows[0].nds if rows else 0.0
    header = f"{'condition':<20} {'sensors':<26} {'NDS':>7} {'mAP':>7} {'dNDS':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row.name:<20} {','.join(row.modalities) or '-':<26} {row.nds:>7.4f} {row.map:>7.4f} "
                     f"{row.nds - reference:>+8.4f}")
    return "\n".join(lines)
