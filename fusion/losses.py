"""Losses of the CenterPoint head: Gaussian focal loss on the heatmaps, L1 on the regressions at object centers,
cross-entropy on the class-relevant attributes. Always computed in float32 (safe under mixed precision)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.heads.centerpoint import REGRESSION_WIDTH, HeadOutput, regression_slice
from fusion.heads.decode import HeadTargets, axis_and_direction, relevant_attribute_mask


def gaussian_focal_loss(logits: Tensor, target: Tensor, alpha: float = 2.0, gamma: float = 4.0) -> Tensor:
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of centers (target == 1, at least 1).

    logits: [B, C, H, W] heatmap logits; target: [B, C, H, W] Gaussian heatmap in [0, 1]. Uses log-sigmoid for
    stability instead of clamping probabilities."""
    logits, target = logits.float(), target.float()
    prob = torch.sigmoid(logits)
    positive = target.eq(1.0)
    pos_loss = -F.logsigmoid(logits) * (1 - prob).pow(alpha)
    neg_loss = -F.logsigmoid(-logits) * prob.pow(alpha) * (1 - target).pow(gamma)
    loss = torch.where(positive, pos_loss, neg_loss).sum()
    return loss / positive.sum().clamp_min(1).float()


def gather_at(maps: Tensor, index: Tensor) -> Tensor:
    """Values of maps [B, C, H, W] at flat cell indices [B, N] -> [B, N, C]."""
    flat = maps.flatten(2)
    return flat.gather(2, index[:, None, :].expand(-1, maps.shape[1], -1)).transpose(1, 2)


def masked_regression_terms(prediction: Tensor, target: Tensor, mask: Tensor, weights: Tensor,
                            huber_delta: Tensor | None = None) -> Tensor:
    """[D]: per channel, the sum of weighted |prediction - target| over valid entries, divided by the number of
    objects (at least 1); `masked_l1` is their sum.

    prediction/target: [B, N, D]; mask: [B, N] objects; weights: [D]. Target entries that are NaN (unknown ground
    truth, e.g. velocity) are left out of the sum. huber_delta: optional [D]; a channel with delta > 0 uses the Huber
    penalty instead, 0.5 e^2 / delta for |e| < delta and |e| - delta / 2 beyond (the same slope as L1 far from the
    target, but a pull towards the target that fades near it, so the optimum is a mean, not a median)."""
    valid = mask[..., None] & torch.isfinite(target)
    error = (prediction.float() - torch.nan_to_num(target.float())).abs()
    if huber_delta is not None:
        delta = huber_delta.to(error)
        huber = torch.where(error < delta, 0.5 * error ** 2 / delta.clamp_min(1e-12), error - 0.5 * delta)
        error = torch.where(delta > 0, huber, error)
    diff = torch.where(valid, error, torch.zeros_like(error))
    return (diff * weights).sum(dim=(0, 1)) / mask.sum().clamp_min(1).float()


def masked_l1(prediction: Tensor, target: Tensor, mask: Tensor, weights: Tensor,
              huber_delta: Tensor | None = None) -> Tensor:
    """The sum of `masked_regression_terms` over the channels: weighted L1 (Huber on channels with a delta) per
    object."""
    return masked_regression_terms(prediction, target, mask, weights, huber_delta).sum()


class CenterPointLoss(nn.Module):
    """Weighted sum of the head losses; `forward` returns the named parts and the total (key "loss").

    Args:
        heatmap_weight: weight of the Gaussian focal loss.
        regression_weight: weight of the L1 regression loss (CenterPoint: 0.25).
        code_weights: per-channel L1 weights in REGRESSION_FIELDS order (offset 2, height, log size 3, sin/cos 2,
            velocity 2); CenterPoint's nuScenes setting down-weights velocity to 0.2.
        attribute_weight: weight of the attribute cross-entropy (class-relevant attributes only).
        direction_weight: weight of the front / back binary cross-entropy when the head has a direction classifier
            (its rotation channels are then compared with (sin 2 yaw, cos 2 yaw)); SECOND uses 0.2.
        focal_alpha / focal_gamma: the focal loss exponents.
        velocity_huber_delta: None regresses velocity with L1 like the other channels (CenterPoint). A speed delta
            (m/s) uses the Huber penalty on the velocity channels instead. The idea: in a mostly static world (two
            thirds of the boxes below 1 m/s) L1's optimum is the conditional median, which stays exactly 0 until the
            features tell motion with more than even odds; Huber's optimum within +-delta is the conditional mean,
            which follows partial evidence. Measured on the main job (docs/benchmarks.md, issue 11): with delta 4 no
            gain beyond the run-to-run spread (mAVE 1.96 against 2.03 +- 0.10), so the configs keep L1.
    """

    def __init__(self, heatmap_weight: float = 1.0, regression_weight: float = 0.25,
                 code_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2),
                 attribute_weight: float = 0.2, focal_alpha: float = 2.0, focal_gamma: float = 4.0,
                 direction_weight: float = 0.2, velocity_huber_delta: float | None = None):
        super().__init__()
        if velocity_huber_delta is not None and not velocity_huber_delta > 0:
            raise ValueError(f"CenterPointLoss: velocity_huber_delta must be positive (m/s) or None, got "
                             f"{velocity_huber_delta}")
        if len(code_weights) != REGRESSION_WIDTH:
            raise ValueError(f"CenterPointLoss: code_weights needs {REGRESSION_WIDTH} values, got {len(code_weights)}")
        self.heatmap_weight, self.regression_weight, self.attribute_weight = (heatmap_weight, regression_weight,
                                                                              attribute_weight)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.direction_weight = direction_weight
        self.register_buffer("code_weights", torch.tensor(code_weights, dtype=torch.float32), persistent=False)
        delta = torch.zeros(REGRESSION_WIDTH)
        delta[regression_slice("velocity")] = velocity_huber_delta or 0.0
        self.register_buffer("huber_delta", delta, persistent=False)

    def forward(self, output: HeadOutput, targets: HeadTargets) -> dict[str, Tensor]:
        with torch.autocast(device_type=output.heatmap.device.type, enabled=False):
            out = output.float()
            heatmap = gaussian_focal_loss(out.heatmap, targets.heatmap, self.focal_alpha, self.focal_gamma)
            predicted = gather_at(out.regression(), targets.index)
            regression_targets = targets.regression
            parts = {}
            if out.direction is not None:
                regression_targets, direction_target = self._axis_targets(targets)
                parts["direction"] = self._direction_loss(out.direction, direction_target, targets)
            terms = masked_regression_terms(predicted, regression_targets, targets.mask, self.code_weights,
                                            self.huber_delta)
            regression = terms.sum()
            parts["velocity"] = terms[regression_slice("velocity")].sum()  # its share of `regression`, logged alone
            attribute = self._attribute_loss(out.attribute, targets)
            total = (self.heatmap_weight * heatmap + self.regression_weight * regression
                     + self.attribute_weight * attribute + self.direction_weight * parts.get("direction", 0.0))
        return {"loss": total, "heatmap": heatmap.detach(), "regression": regression.detach(),
                "attribute": attribute.detach(), **{k: v.detach() for k, v in parts.items()}}

    @staticmethod
    def _axis_targets(targets: HeadTargets) -> tuple[Tensor, Tensor]:
        """Regression targets with the rotation channels as (sin 2 yaw, cos 2 yaw), and the front / back label
        [B, N], from the (sin yaw, cos yaw) targets."""
        rotation = regression_slice("rotation")
        sin_cos = targets.regression[..., rotation]
        yaw = torch.atan2(sin_cos[..., 0], sin_cos[..., 1])
        double, direction = axis_and_direction(yaw)
        regression = targets.regression.clone()
        regression[..., rotation] = double
        return regression, direction

    @staticmethod
    def _direction_loss(direction_maps: Tensor, direction_target: Tensor, targets: HeadTargets) -> Tensor:
        """Binary cross-entropy of the front / back logit at each object's centre cell, mean over objects."""
        logits = gather_at(direction_maps, targets.index)[..., 0]  # [B, N]
        if not bool(targets.mask.any()):
            return logits.sum() * 0.0
        return F.binary_cross_entropy_with_logits(logits[targets.mask], direction_target[targets.mask])

    @staticmethod
    def _attribute_loss(attribute_maps: Tensor, targets: HeadTargets) -> Tensor:
        """Cross-entropy over each object's class-relevant attributes; objects without one are ignored."""
        logits = gather_at(attribute_maps, targets.index)  # [B, N, 8]
        relevant = relevant_attribute_mask(logits.device)[targets.labels]  # [B, N, 8]
        use = targets.mask & (targets.attribute >= 0)
        if not bool(use.any()):
            return logits.sum() * 0.0
        masked = logits.masked_fill(~relevant, float("-inf"))[use]
        return F.cross_entropy(masked, targets.attribute[use])
