"""BEV pooling, the "splat" of lift-splat: sum frustum-point features into BEV cells (compiled CPU/CUDA kernels).

Deterministic: every cell sums its points in input order (float32 accumulation, float64 for float64 features) on CPU
and on CUDA alike, so both give bit-identical results and repeated runs never differ. The backward pass is a gather
of the output gradient.
"""
from __future__ import annotations

import numbers

import torch

from fusion.cuda_ops import reference
from fusion.cuda_ops._extension import check_device, compiled
from fusion.cuda_ops.grid_spec import INT32_MAX

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class _BEVPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, coords, batch_size, depth, height, width):
        out, keys = compiled().bev_pool_forward(features, coords, batch_size, depth, height, width)
        ctx.save_for_backward(keys)
        ctx.mark_non_differentiable(keys)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (keys,) = ctx.saved_tensors
        channels = grad_out.shape[1]
        # [B, C, Z, H, W] -> cell-major [B*Z*H*W, C] (contiguous rows: a gather of whole rows), then one row per point.
        grad_cells = grad_out.permute(0, 2, 3, 4, 1).contiguous().view(-1, channels)
        return grad_cells.index_select(0, keys), None, None, None, None, None


def check_bev_pool_args(features, coords, batch_size, grid_shape, op: str = "bev_pool"):
    """Validate bev_pool's arguments; returns (features, coords as int32/int64, B, (Z, H, W)), both contiguous."""
    if not isinstance(features, torch.Tensor) or not isinstance(coords, torch.Tensor):
        raise ValueError(f"{op}: features and coords must be torch.Tensor")
    if features.dtype not in FEATURE_DTYPES:
        raise ValueError(f"{op}: features must be float32, float16, bfloat16 or float64, got {features.dtype}")
    if features.dim() != 2:
        raise ValueError(f"{op}: features must be [P, C], got shape {tuple(features.shape)}")
    if coords.dim() != 2 or coords.shape[1] != 4 or coords.shape[0] != features.shape[0]:
        raise ValueError(f"{op}: coords must be [P, 4] (batch, z, y, x) with P = {features.shape[0]}, got shape "
                         f"{tuple(coords.shape)}")
    if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
        raise ValueError(f"{op}: coords must be an integer tensor, got {coords.dtype}")
    if features.device != coords.device:
        raise ValueError(f"{op}: features on {features.device} but coords on {coords.device}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"{op}: batch_size must be an integer >= 1, got {batch_size!r}")
    shape = tuple(grid_shape) if isinstance(grid_shape, (tuple, list, torch.Size)) else None
    if (shape is None or len(shape) != 3 or
            not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise ValueError(f"{op}: grid_shape must be three integers (Z, H, W) >= 1, got {grid_shape!r}")
    shape = tuple(int(s) for s in shape)
    if int(batch_size) * shape[0] * shape[1] * shape[2] > INT32_MAX:
        raise ValueError(f"{op}: batch_size x Z x H x W = {batch_size} x {shape} cells, more than int32 can index")
    if coords.dtype not in (torch.int32, torch.int64):
        coords = coords.long()
    return features.contiguous(), coords.contiguous(), int(batch_size), shape


def bev_pool(features: torch.Tensor, coords: torch.Tensor, batch_size: int, grid_shape,
             use_reference: bool = False) -> torch.Tensor:
    """Sum point features into BEV cells.

    features [P, C] float32/float16/bfloat16/float64; coords [P, 4] integer (batch, z, y, x) cell indices, where
    (y, x) are BEVGrid (row, col); grid_shape (Z, H, W). Returns [B, C, Z, H, W] in the dtype of `features`, the sum
    of the features of the points in each cell (0 for empty cells). Differentiable w.r.t. `features`.
    A row with a coordinate outside [0, B) x [0, Z) x [0, H) x [0, W) raises ValueError: filter points first.
    `use_reference=True` runs the pure-torch reference instead (for debugging).
    """
    features, coords, batch_size, (depth, height, width) = check_bev_pool_args(features, coords, batch_size,
                                                                               grid_shape)
    if use_reference:
        return reference.bev_pool(features, coords, batch_size, (depth, height, width))
    check_device("bev_pool", features)
    return _BEVPool.apply(features, coords, batch_size, depth, height, width)
