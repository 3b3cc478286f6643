"""Cross-attention fusion of the modality BEVs: deformable attention whose cost is linear in the number of cells.

Every cell of the shared BEVGrid builds one query from its position and from the features the *present*
modalities hold at that cell. Per attention head, the query predicts K sampling offsets per modality (in cells,
around the cell itself) and one attention logit per (modality, point). Values are bilinearly sampled from each
modality's BEV with `grid_sample` (deformable-attention style), so a query touches heads x M x K values and the
cost grows linearly with H x W. A modality that is absent for a sample (no key in the input dict, or False in the
per-sample mask) is removed from the softmax with -inf logits: its weights are exactly zero and its features are
never read as data. A sample with no modality at all gets all-zero weights and an output built from the position
embedding only (finite and defined).

Frames and units: every BEV is [B, C, H, W] on the BEVGrid (row i <-> ego y, column j <-> ego x; see
fusion/grid.py); sampling offsets are in cells.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.grid import BEVGrid


@dataclass
class FusionAttention:
    """Attention weights of one fuser call.

    weights: [B, heads, M, K, H, W] float32 softmax weights; for every (sample, head, cell) they sum to 1 over
        (M, K) when the sample has at least one modality, and are all zero when it has none.
    modalities: the names of the M axis, in order.
    present: [B, M] bool, which modality each sample could use (False ones have exactly zero weight).
    """

    weights: Tensor
    modalities: tuple[str, ...]
    present: Tensor

    def detach(self) -> "FusionAttention":
        return FusionAttention(self.weights.detach(), self.modalities, self.present.detach())

    def to(self, device) -> "FusionAttention":
        return FusionAttention(self.weights.to(device), self.modalities, self.present.to(device))


def contribution_maps(attention: FusionAttention) -> Tensor:
    """[B, M, H, W] share of the attention each modality received per cell (mean over heads, sum over points).

    Values are in [0, 1] and sum to 1 over M at every cell of a sample that has at least one modality; an absent
    modality is exactly 0. This is "which sensor the model relied on where"."""
    return attention.weights.sum(dim=3).mean(dim=1)


def contribution_summary(attention: FusionAttention, cell_mask: Tensor | None = None) -> dict[str, float]:
    """Mean share of the attention per modality over all samples and cells, as {modality: share} (shares sum to 1
    when some sample has a modality).

    cell_mask: optional [B, H, W] or [H, W] bool to average over chosen cells only (e.g. cells near detections)."""
    maps = contribution_maps(attention.detach())  # [B, M, H, W]
    has_any = attention.present.any(dim=1)  # [B]
    weight = has_any[:, None, None].to(maps.dtype).expand(maps.shape[0], maps.shape[2], maps.shape[3])
    if cell_mask is not None:
        weight = weight * cell_mask.to(device=maps.device, dtype=maps.dtype).expand_as(weight)
    total = weight.sum().clamp_min(1e-12)
    shares = (maps * weight[:, None]).sum(dim=(0, 2, 3)) / total
    return {name: float(share) for name, share in zip(attention.modalities, shares)}


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each cell of a [B, C, H, W] map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DeformableFuser(nn.Module):
    """Deformable cross-attention over the modality BEVs -> fused BEV [B, channels, H, W] plus attention weights.

    Args:
        grid: the shared BEVGrid (H, W of every input and of the output).
        in_channels: {modality: channels of its BEV}; the fuser accepts any subset of these keys at run time.
        channels: width of the fused BEV (and of the attention).
        heads: attention heads (channels must be divisible by heads).
        points: sampling points per (head, modality), K.
        offset_init_cells: radius in cells of the initial ring of sampling points (point 0 starts at the cell).
        ffn_ratio: hidden width of the feed-forward block, in multiples of `channels`.
    """

    def __init__(self, grid: BEVGrid, in_channels: dict[str, int], channels: int = 64, heads: int = 4,
                 points: int = 4, offset_init_cells: float = 1.0, ffn_ratio: int = 2):
        super().__init__()
        if not in_channels:
            raise ValueError("DeformableFuser needs at least one modality in in_channels")
        if channels % heads != 0:
            raise ValueError(f"DeformableFuser: channels ({channels}) must be divisible by heads ({heads})")
        if points < 1:
            raise ValueError(f"DeformableFuser: points must be >= 1, got {points}")
        self.grid = grid
        self.modalities: tuple[str, ...] = tuple(in_channels)
        self.out_channels = channels
        self.heads, self.points = heads, points
        # Per-cell projection and normalisation (no statistics over the grid: a cell's value depends on that cell).
        self.value_proj = nn.ModuleDict({
            m: nn.Sequential(nn.Conv2d(c, channels, 1, bias=False), _ChannelNorm(channels))
            for m, c in in_channels.items()
        })
        self.position = nn.Sequential(nn.Conv2d(2, channels, 1), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1))
        self.query_norm = nn.LayerNorm(channels)
        num_m = len(self.modalities)
        self.offsets = nn.Linear(channels, heads * num_m * points * 2)
        self.logits = nn.Linear(channels, heads * num_m * points)
        self.out_proj = nn.Linear(channels, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, ffn_ratio * channels), nn.ReLU(inplace=True),
                                 nn.Linear(ffn_ratio * channels, channels))
        self.norm2 = nn.LayerNorm(channels)
        self._reset_attention(offset_init_cells)
        # Cell centres in grid_sample's normalised coordinates [H, W, 2] and in meters / extent for the position MLP.
        centers = grid.cell_centers()
        self.register_buffer("reference", grid.to_normalized(centers), persistent=False)
        self.register_buffer("position_input", grid.to_normalized(centers).permute(2, 0, 1)[None], persistent=False)
        self.register_buffer("cell_to_normalized", torch.tensor(grid.normalized_cell_size), persistent=False)

    def _reset_attention(self, radius: float) -> None:
        """Deformable-DETR style start: point 0 at the cell itself, the others on rings around it, one direction per
        (head, modality); uniform attention."""
        nn.init.zeros_(self.offsets.weight)
        num_m = len(self.modalities)
        bias = torch.zeros(self.heads, num_m, self.points, 2)
        for h in range(self.heads):
            for m in range(num_m):
                angle = 2.0 * math.pi * (h * num_m + m) / (self.heads * num_m)
                for k in range(1, self.points):
                    r = radius * k
                    bias[h, m, k] = torch.tensor([math.cos(angle + k), math.sin(angle + k)]) * r
        with torch.no_grad():
            self.offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)

    def forward(self, features: dict[str, Tensor], present: dict[str, Tensor] | None = None
                ) -> tuple[Tensor, FusionAttention]:
        """Fuse the modality BEVs.

        features: {modality: [B, C_m, H, W]} for any subset of the configured modalities (absent key = absent for
            every sample).
        present: optional {modality: [B] bool}; a modality is used for a sample only if its key is in `features`
            AND present[modality][b] is True (missing entries count as True).
        Returns (fused [B, channels, H, W], FusionAttention).
        """
        unknown = set(features) - set(self.modalities)
        if unknown:
            raise ValueError(f"DeformableFuser got modalities {sorted(unknown)} it was not built for "
                             f"(configured: {list(self.modalities)})")
        if not features and present is None:
            raise ValueError("DeformableFuser needs at least one feature map or a present mask to know the batch size")
        height, width = self.grid.shape
        reference_tensor = next(iter(features.values())) if features else None
        batch = reference_tensor.shape[0] if reference_tensor is not None else next(iter(present.values())).shape[0]
        device = reference_tensor.device if reference_tensor is not None else next(iter(present.values())).device
        for name, bev in features.items():
            if bev.ndim != 4 or bev.shape[0] != batch or tuple(bev.shape[2:]) != (height, width):
                raise ValueError(f"DeformableFuser: BEV of {name!r} has shape {tuple(bev.shape)}, expected "
                                 f"[{batch}, C, {height}, {width}] (the BEVGrid)")

        mask = torch.zeros(batch, len(self.modalities), dtype=torch.bool, device=device)
        for i, name in enumerate(self.modalities):
            if name in features:
                sample_mask = present.get(name) if present is not None else None
                mask[:, i] = True if sample_mask is None else sample_mask.to(device=device, dtype=torch.bool)

        values = {name: self.value_proj[name](bev) for name, bev in features.items()}  # [B, D, H, W]
        dtype = next(iter(values.values())).dtype if values else self.position_input.dtype

        # Query: position embedding + mean of the present modalities' values at the cell (never zeros as data).
        query = self.position(self.position_input.to(dtype)).expand(batch, -1, -1, -1)
        if values:
            stacked = torch.stack([values[name] for name in self.modalities if name in values], dim=1)
            used = mask[:, [i for i, name in enumerate(self.modalities) if name in values]].to(stacked.dtype)
            mean = (stacked * used[:, :, None, None, None]).sum(1) / used.sum(1).clamp_min(1.0)[:, None, None, None]
            query = query + mean
        query = query.permute(0, 2, 3, 1)  # [B, H, W, D]
        q = self.query_norm(query)

        num_m, heads, points = len(self.modalities), self.heads, self.points
        logits = self.logits(q).float().view(batch, height, width, heads, num_m * points)
        point_mask = mask[:, None, None, None, :, None].expand(batch, 1, 1, 1, num_m, points)
        point_mask = point_mask.reshape(batch, 1, 1, 1, num_m * points)
        logits = logits.masked_fill(~point_mask, float("-inf"))
        has_any = mask.any(dim=1)[:, None, None, None, None]
        logits = logits.masked_fill(~has_any, 0.0)  # rows with no modality: uniform, then zeroed below
        weights = torch.softmax(logits, dim=-1) * has_any  # [B, H, W, heads, M*K] float32
        weights = weights.view(batch, height, width, heads, num_m, points)

        offsets = self.offsets(q).float().view(batch, height, width, heads, num_m, points, 2)
        locations = self.reference[None, :, :, None, None, None, :].float() + offsets * self.cell_to_normalized

        # One grid_sample over every (sample, head, modality): values [B*heads*M', Dh, H, W] sampled at
        # [B*heads*M', H*W, K] locations, then weighted and summed over modalities and points.
        channels_per_head = self.out_channels // heads
        used = [i for i, name in enumerate(self.modalities) if name in values]
        if used:
            value = torch.stack([values[self.modalities[i]].float().view(batch, heads, channels_per_head, height, width)
                                 for i in used], dim=2).view(-1, channels_per_head, height, width)
            grid = locations[:, :, :, :, used].permute(0, 3, 4, 1, 2, 5, 6).reshape(-1, height * width, points, 2)
            with torch.autocast(device_type=device.type, enabled=False):
                picked = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            picked = picked.view(batch * heads, len(used), channels_per_head, height * width, points)
            w = weights[:, :, :, :, used].permute(0, 3, 4, 1, 2, 5).reshape(batch * heads, len(used), 1,
                                                                           height * width, points)
            sampled = (picked * w).sum(dim=(1, 4))
        else:
            sampled = torch.zeros(batch * heads, channels_per_head, height * width, device=device)
        attended = sampled.view(batch, heads * channels_per_head, height, width).permute(0, 2, 3, 1).to(query.dtype)

        x = self.norm1(query + self.out_proj(attended))
        x = self.norm2(x + self.ffn(x))
        fused = x.permute(0, 3, 1, 2).contiguous()
        attention = FusionAttention(weights.permute(0, 3, 4, 5, 1, 2), self.modalities, mask)
        return fused, attention
