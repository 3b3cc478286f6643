"""Segment reductions (sum / mean / max of rows sharing an index), as used by the pillar encoders.

Two backends compute the same thing: torch's own `Tensor.scatter_reduce` and torch-scatter (when installed).
`backend="auto"` picks the faster one for the device, as measured by `python tools/benchmark.py ops` (figures and
decision in docs/benchmarks.md, section cuda_ops):
- CPU: torch's scatter_reduce, 3-15x faster than torch-scatter 2.1.2 on the 2-core development machine.
- CUDA: torch's scatter_reduce, until the CUDA benchmark (`--device cuda`) has been run on a GPU machine; it prints
  the measured winner, and AUTO_BACKEND below is where the decision is recorded.
Empty segments give 0. Gradients: sum and mean are exact; for max, torch splits the gradient evenly between tied
maxima while torch-scatter gives it all to one of them (they agree whenever the maximum is unique).
"""
from __future__ import annotations

import numbers

import torch

from fusion.cuda_ops import reference

REDUCTIONS = ("sum", "mean", "max")
BACKENDS = ("auto", "torch", "torch_scatter", "reference")
AUTO_BACKEND = {"cpu": "torch", "cuda": "torch"}
_TORCH_REDUCE = {"sum": "sum", "mean": "mean", "max": "amax"}

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
    out = src.new_zeros((num_segments,) + tuple(src.shape[1:]))
    expanded = index.view((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
    return out.scatter_reduce(0, expanded, src, reduce=_TORCH_REDUCE[reduce], include_self=False)
