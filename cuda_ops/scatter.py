"""Segment reductions (sum / mean / max of rows sharing an index), as used by the pillar encoders.

Two backends compute the same thing: torch's own ops (`index_add` for sum and mean, `scatter_reduce` for max) and
torch-scatter (when installed).
`backend="auto"` picks the faster one for the device, as measured by `python tools/benchmark.py ops` on the pillar
encoder's workload (figures and decision in docs/benchmarks.md, section cuda_ops):
- CPU: "torch". On the 2-core development machine it ties torch-scatter 2.1.2 for sum and mean (forward and
  backward, within noise) and is ~9x faster for the max forward (5.7 vs 50 ms), as fast for max forward + backward.
- CUDA: "torch", provisionally: no GPU was available to measure; `--device cuda` prints the measured winner, and
  AUTO_BACKEND below is where the decision is recorded.
Empty segments give 0. Gradients: sum and mean are exact; for max, the gradient of each (segment, channel) goes to
one row attaining the maximum: the first in input order for the torch backend; torch-scatter picks one of tied rows
itself (they agree whenever the maximum is unique). On CUDA the sums use atomics in both backends, so they are not
bit-reproducible (bev_pool is).
"""
from __future__ import annotations

import numbers

import torch

from fusion.cuda_ops import reference

REDUCTIONS = ("sum", "mean", "max")
BACKENDS = ("auto", "torch", "torch_scatter", "reference")
AUTO_BACKEND = {"cpu": "torch", "cuda": "torch"}

try:
    import torch_scatter as _torch_scatter
except ImportError:  # optional dependency
    _torch_scatter = None


def torch_scatter_available() -> bool:
    return _torch_scatter is not None


def scatter_reduce(src: torch.Tensor, index: torch.Tensor, num_segments: int, reduce: str,
                   backend: str = "auto") -> torch.Tensor:
    """Reduce the rows of `src` [N, C] (or [N, ...]) by segment: out[s] = reduce(src[i] for i with index[i] == s).

    index [N] integer (int64 preferred) in [0, num_segments); reduce "sum" | "mean" | "max"; returns
    [num_segments, C] in src's dtype and device, 0 for empty segments. Differentiable w.r.t. `src`.
    backend: "auto" (the faster one for the device, see the module docstring), "torch", "torch_scatter" or
    "reference" (a slow loop, for tests).
    """
    op = "scatter_reduce"
    if not isinstance(src, torch.Tensor) or not isinstance(index, torch.Tensor):
        raise ValueError(f"{op}: src and index must be torch.Tensor")
    if not src.dtype.is_floating_point:
        raise ValueError(f"{op}: src must be a floating-point tensor, got {src.dtype}")
    if src.dim() < 1:
        raise ValueError(f"{op}: src must be [N, C] (or [N, ...]), got a scalar")
    if index.dim() != 1 or index.shape[0] != src.shape[0]:
        raise ValueError(f"{op}: index must be [N] with N = {src.shape[0]}, got shape {tuple(index.shape)}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"{op}: index must be an integer tensor, got {index.dtype}")
    if index.device != src.device:
        raise ValueError(f"{op}: src on {src.device} but index on {index.device}")
    if isinstance(num_segments, bool) or not isinstance(num_segments, numbers.Integral) or num_segments < 0:
        raise ValueError(f"{op}: num_segments must be an integer >= 0, got {num_segments!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"{op}: reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    num_segments = int(num_segments)
    index = index.long()
    if index.numel() > 0:
        low, high = torch.aminmax(index)
        if int(low) < 0 or int(high) >= num_segments:
            raise ValueError(f"{op}: index values must lie in [0, {num_segments}), got [{int(low)}, {int(high)}]")
    if backend == "auto":
        backend = AUTO_BACKEND.get(src.device.type, "torch")
    if backend == "reference":
        return reference.scatter_reduce(src, index, num_segments, reduce)
    if backend == "torch_scatter":
        if _torch_scatter is None:
            raise ValueError(f"{op}: backend 'torch_scatter' requested but torch_scatter is not installed")
        return _torch_scatter.scatter(src, index, dim=0, dim_size=num_segments, reduce=reduce)
    return _torch_backend(src, index, num_segments, reduce)


def _torch_backend(src: torch.Tensor, index: torch.Tensor, num_segments: int, reduce: str) -> torch.Tensor:
    """torch's own ops: index_add for sum and mean (its backward is one index_select), scatter_reduce("amax") for max
    with the gradient routed to the first maximum of each segment (SegmentMax; torch's generic amax backward, which
    splits ties, was 10-20x slower on CPU)."""
    if reduce == "max":
        return SegmentMax.apply(src, index, num_segments)
    out = src.new_zeros((num_segments,) + tuple(src.shape[1:])).index_add(0, index, src)
    if reduce == "mean":
        counts = torch.bincount(index, minlength=num_segments).clamp(min=1).to(src.dtype)
        out = out / counts.view((-1,) + (1,) * (src.dim() - 1))
    return out


class SegmentMax(torch.autograd.Function):
    """Per-segment maximum of the rows of src [N, ...]; the gradient of each (segment, channel) goes to the first row
    (in input order) that attains the maximum, as torch.max(dim=0) does. Empty segments give 0 and no gradient.
    The forward pass is one scatter_reduce; the first maxima are only searched for in the backward pass."""

    @staticmethod
    def forward(ctx, src, index, num_segments):
        expanded = index.view((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
        out = src.new_zeros((num_segments,) + tuple(src.shape[1:]))
        out = out.scatter_reduce(0, expanded, src, reduce="amax", include_self=False)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(src, index, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        src, index, out = ctx.saved_tensors
        n = src.shape[0]
        expanded = index.view((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
        rows = torch.arange(n, device=src.device, dtype=torch.int32).view((-1,) + (1,) * (src.dim() - 1))
        candidate = torch.where(src == out.index_select(0, index), rows, n)
        first = torch.full(out.shape, n, dtype=torch.int32, device=src.device)
        first = first.scatter_reduce(0, expanded, candidate, reduce="amin", include_self=True)
        found = first < n
        grad_src = grad_out.new_zeros(src.shape)
        # Each (segment, channel) has its own row, so the additions never collide; empty segments add 0 to row 0.
        grad_src.scatter_add_(0, torch.where(found, first, 0).long(), torch.where(found, grad_out, 0))
        return grad_src, None, None
