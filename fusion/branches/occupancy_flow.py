"""Dense motion from the LiDAR sweeps: block matching of the newest sweep's above-ground occupancy against the
oldest sweep's, on the BEV grid.

Why: the time slices (`time_slice_occupancy`) show a moving object at a different cell in each sweep, but a 2D conv
stack has to learn a correlation (a product of two inputs) to read the displacement off them, and in the main job's
short schedule it never did: the head's velocity for moving cars stayed near zero (median 1 % of the true speed;
docs/benchmarks.md, issue 11). This module computes the correlation with fixed arithmetic (FlowNet's correlation
layer, on occupancy instead of learned features) and hands the network a velocity per cell.

For every cell x and every shift d within +-radius cells: score(x, d) = the normalised cross-correlation over the
window around x of newest(y) and oldest(y - d); the oldest occupancy shifted by d lies over the newest where the
objects moved by d. A plain product would prefer shifts onto denser occupancy (a wall, a neighbour); the
normalisation does not. Between equally good shifts (an isolated blob lines up with any other blob) a small penalty
growing with the shift's length picks the slower motion. The best shift is refined to a fraction of a cell by a
parabola through its neighbours on each axis (the usual sub-pixel step of block matching) and divided by the time
between the two sweeps. Points near the ground are left out by the caller (the road matches itself at zero shift
everywhere and would drown the objects). Known bias: the slow-motion penalty also tilts the parabola, by up to a
fifth of a cell towards zero (tests/test_occupancy_flow.py). Only standard tensor operations (pad, unfold, product,
average pooling, max, gather), so the ONNX graph runs the same function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

WINDOW_CHANNELS = 4  # per window: vx / 10, vy / 10 (m/s), peak score, zero-shift score / peak score


@dataclass(frozen=True)
class FlowSettings:
    """max_speed: fastest motion searched (m/s); the shift radius is ceil(max_speed * lag / cell_size) cells.
    windows: sides of the squares (cells, odd) whose overlap is scored around each cell, one flow per window (a
        small window keeps neighbours out; a large one sees more of a long vehicle, whose side alone matches at many
        shifts along it).
    slow_preference: subtracted from the score (a normalised cross-correlation, at most 1) of the longest shift, in
        proportion to the shift's length for the others: between equally good matches the slower motion wins.
    min_height: points lower than this (meters, ego frame z) are left out of the occupancy that is matched (the
        ego frame's z = 0 is the ground under the ego; the road and sidewalks stay below it)."""

    max_speed: float = 14.0
    windows: tuple[int, ...] = (3, 5)
    min_height: float = 0.3
    slow_preference: float = 0.1

    def __post_init__(self):
        if not self.max_speed > 0:
            raise ValueError(f"flow max_speed must be positive (m/s), got {self.max_speed!r}")
        object.__setattr__(self, "windows", tuple(self.windows))
        if not self.windows or any(not isinstance(w, int) or w < 1 or w % 2 == 0 for w in self.windows):
            raise ValueError(f"flow windows must be odd integers >= 1 (cells), got {self.windows!r}")
        if not self.slow_preference >= 0:
            raise ValueError(f"flow slow_preference must be >= 0, got {self.slow_preference!r}")


def flow_channels(settings: FlowSettings) -> int:
    """Channels `occupancy_flow` returns for these settings."""
    return WINDOW_CHANNELS * len(settings.windows)


def flow_settings(value: "FlowSettings | dict | None") -> FlowSettings | None:
    """A branch's `flow` setting (None: off; a dict of FlowSettings fields, {} for the defaults) as FlowSettings;
    ValueError naming an unknown field."""
    if value is None or isinstance(value, FlowSettings):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"flow must be null or a mapping of FlowSettings fields, got {value!r}")
    unknown = sorted(set(value) - set(FlowSettings.__dataclass_fields__))
    if unknown:
        raise ValueError(f"flow: unknown field(s) {unknown}; known: {sorted(FlowSettings.__dataclass_fields__)}")
    return FlowSettings(**value)


def shift_radius(settings: FlowSettings, lag_s: float, cell_size: float) -> int:
    """Cells searched each way for an object moving at most settings.max_speed during lag_s seconds."""
    return max(1, math.ceil(settings.max_speed * lag_s / cell_size))


def occupancy_flow(newest: torch.Tensor, oldest: torch.Tensor, cell_size: float, lag_s: float,
                   settings: FlowSettings = FlowSettings()) -> torch.Tensor:
    """newest, oldest [B, H, W]: occupancy (e.g. log(1 + points)) of two sweeps lag_s seconds apart on a grid of
    cell_size-meter cells (rows <-> y, columns <-> x of the ego frame) -> [B, flow_channels(settings), H, W]: for
    each of settings.windows in turn, WINDOW_CHANNELS channels:
    - vx / 10, vy / 10: the velocity (m/s, ego frame) that carries the oldest occupancy onto the newest around each
      cell; 0 where there is nothing to match;
    - peak score: the best shift's normalised cross-correlation less its slow-motion penalty, at most 1 (1: the
      window's occupancy is the same in both sweeps up to the shift; 0 for an empty neighbourhood);
    - zero-shift score / peak score, at most 1: 1 where standing still explains the points as well as any motion.
    The inputs are counts, not learned features: computed without autograd."""
    if newest.shape != oldest.shape or newest.dim() != 3:
        raise ValueError(f"occupancy_flow: newest and oldest must both be [B, H, W], got {tuple(newest.shape)} and "
                         f"{tuple(oldest.shape)}")
    if not lag_s > 0:
        raise ValueError(f"occupancy_flow: lag_s must be positive (seconds), got {lag_s!r}")
    batch, height, width = newest.shape
    radius = shift_radius(settings, lag_s, cell_size)
    side = 2 * radius + 1

    def shifted(image: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] -> [B, side * side, H, W]: channel k (x) = image(x - d_k),
        d_k = (radius - k // side, radius - k % side) cells (rows, columns)."""
        unfolded = F.unfold(F.pad(image, (radius, radius, radius, radius)), kernel_size=side)
        return unfolded.view(batch, side * side, height, width)

    with torch.no_grad():
        newest, oldest = newest[:, None].float(), oldest[:, None].float()
        overlap = newest * shifted(oldest)
        offsets = torch.arange(radius, -radius - 1, -1, dtype=overlap.dtype, device=overlap.device)
        shift_length = (offsets[:, None] ** 2 + offsets[None, :] ** 2).sqrt().reshape(1, side * side, 1, 1)
        scale = cell_size / lag_s / 10.0
        channels = []
        for window in settings.windows:
            energy = _window_mean(newest * newest, window) * shifted(_window_mean(oldest * oldest, window))
            score = _window_mean(overlap, window) / (energy + 1e-6).sqrt()
            score = score - settings.slow_preference * shift_length / radius
            channels += _displacement(score, radius, scale)
        return torch.stack(channels, dim=1)


def _displacement(score: torch.Tensor, radius: int, scale: float) -> list[torch.Tensor]:
    """score [B, side * side, H, W] (shifts as in `occupancy_flow`) -> [vx / 10, vy / 10, peak, zero-shift share],
    each [B, H, W]: the best shift refined by a parabola on each axis, times `scale` (m/s / 10 per cell)."""
    side = 2 * radius + 1
    peak, best = score.max(dim=1)
    best_row, best_col = best // side, best % side
    d_row = radius - best_row.to(score.dtype) - _parabola_offset(score, best, best_row, side, side)
    d_col = radius - best_col.to(score.dtype) - _parabola_offset(score, best, best_col, side, 1)
    matched = peak > 1e-6
    zero = torch.zeros_like(peak)
    still = torch.where(matched, score[:, side * side // 2] / peak.clamp_min(1e-6), zero)
    return [torch.where(matched, d_col * scale, zero), torch.where(matched, d_row * scale, zero),
            torch.where(matched, peak, zero), still]


def _window_mean(values: torch.Tensor, window: int) -> torch.Tensor:
    """values [B, C, H, W] averaged over the window x window square around each cell (zeros beyond the edge)."""
    if window == 1:
        return values
    return F.avg_pool2d(values, window, stride=1, padding=window // 2, count_include_pad=True)


def _parabola_offset(score: torch.Tensor, best: torch.Tensor, position: torch.Tensor, side: int,
                     step: int) -> torch.Tensor:
    """Sub-cell offset in [-0.5, 0.5] of the peak of the parabola through the scores one shift before and after the
    best one along one axis (step: the flat index distance of one shift on that axis; position: the best shift's
    index on that axis); 0 at the edge of the search or where the scores do not curve down."""
    inner = (position > 0) & (position < side - 1)
    before = score.gather(1, (best - step).clamp(0, score.shape[1] - 1)[:, None])[:, 0]
    at = score.gather(1, best[:, None])[:, 0]
    after = score.gather(1, (best + step).clamp(0, score.shape[1] - 1)[:, None])[:, 0]
    curvature = before - 2 * at + after
    offset = 0.5 * (before - after) / torch.where(curvature < -1e-9, curvature, -torch.ones_like(curvature))
    return torch.where(inner & (curvature < -1e-9), offset.clamp(-0.5, 0.5), torch.zeros_like(offset))


def above_ground(points: torch.Tensor, settings: FlowSettings, time_lag_column: int = 4) -> torch.Tensor:
    """LiDAR points [N, >= 5] (x, y, z meters in the ego frame; the time lag in `time_lag_column`) with the time lag
    of every point lower than settings.min_height set to NaN, which the time-slice occupancy leaves out."""
    low = ~(points[:, 2] >= settings.min_height)
    lag = torch.where(low, torch.full_like(points[:, time_lag_column], float("nan")), points[:, time_lag_column])
    return torch.cat([points[:, :time_lag_column], lag[:, None], points[:, time_lag_column + 1:]], dim=1)


def flow_from_slices(occupancy: torch.Tensor, cell_size: float, slice_s: float, settings: FlowSettings
                     ) -> torch.Tensor:
    """`occupancy_flow` between the newest and the oldest of the time slices occupancy [B, S, H, W] (S >= 2, slices
    slice_s seconds apart, newest first) -> [B, flow_channels(settings), H, W]."""
    slices = occupancy.shape[1]
    if slices < 2:
        raise ValueError(f"the LiDAR flow needs at least 2 time slices, got {slices}")
    return occupancy_flow(occupancy[:, 0], occupancy[:, -1], cell_size, (slices - 1) * slice_s, settings)
