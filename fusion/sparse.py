"""spconv on CPU: two fixes that make spconv 2.3 usable without CUDA.

1. Backward. spconv's ops ask `torch.cuda.current_stream()` for a stream handle even for CPU tensors, which fails on a
   CPU-only torch ("Torch not compiled with CUDA enabled", traveller59/spconv#366). `patch_spconv_cpu()` replaces
   `get_current_stream` in every spconv module that imported it with one that returns 0 (the null stream, ignored by
   the CPU kernels) when CUDA is unavailable. Importing this module changes nothing in spconv: the patch is applied
   explicitly, before first use, by `SingleThreadSparse.__init__` (every sparse module of the project is wrapped in
   one), or by calling `patch_spconv_cpu()` before running a bare spconv module. It is idempotent.

2. Threads. spconv's CPU kernels give wrong forward results and gradients (errors of order 0.1-1, in most runs on a
   2-core machine) when torch runs more than one intra-op thread; with one thread they match a dense conv3d to
   float32 rounding. `SingleThreadSparse` wraps a sparse module so that its forward AND its backward run with
   `torch.set_num_threads(1)` and the previous thread count is restored afterwards:
   - forward: inside the `single_thread()` context manager;
   - backward: an identity autograd Function on the module's output switches to one thread when the backward pass
     reaches it (before any spconv backward), and an identity Function on the module's input restores the previous
     count once the backward has gone through every spconv op (it runs last). A callback queued on the autograd
     engine also restores the count at the end of the backward pass, for passes that never reach the input marker
     (e.g. `torch.autograd.grad` asked only for the weights).
   On CUDA tensors the wrapper is a plain call (spconv casts to float16 itself under CUDA autocast); on CPU it also
   switches CPU autocast off inside, since spconv's CPU kernels take float32/float64 only.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch

import spconv.pytorch as spconv  # noqa: F401  (imports the spconv submodules the patch rewrites)
import spconv.pytorch.cppcore
import spconv.pytorch.hash  # noqa: F401
import spconv.pytorch.ops  # noqa: F401
import spconv.pytorch.utils  # noqa: F401

_ORIGINAL_GET_CURRENT_STREAM = spconv.pytorch.cppcore.get_current_stream


def _get_current_stream_cpu_safe() -> int:
    """The current CUDA stream handle, or 0 (the null stream) on a torch without usable CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.current_stream().cuda_stream
    return 0


def patch_spconv_cpu() -> int:
    """Make spconv's backward work without CUDA; returns how many modules were patched now (0 when already done)."""
    patched = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("spconv") or module is None:
            continue
        if getattr(module, "get_current_stream", None) is _ORIGINAL_GET_CURRENT_STREAM:
            module.get_current_stream = _get_current_stream_cpu_safe
            patched += 1
    return patched


def spconv_cpu_patched() -> bool:
    """Whether every loaded spconv module uses the CPU-safe `get_current_stream`."""
    return all(getattr(module, "get_current_stream", None) is not _ORIGINAL_GET_CURRENT_STREAM
               for name, module in list(sys.modules.items()) if name.startswith("spconv") and module is not None)



@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the body with `torch.set_num_threads(1)`; restore the previous count afterwards (also on error)."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _BackwardThreads:
    """Process-wide bookkeeping of the guarded backward regions in progress: the first one to start saves the thread
    count and switches to one thread, the last one to end restores it (so that overlapping regions, e.g. two sparse
    encoders in one graph, never let spconv run with several threads)."""

    active = 0
    saved = 1


class _ThreadState:
    """One guarded call's backward region (shared by its two markers): entered at most once, left at most once."""

    def __init__(self):
        self.inside = False

    def enter(self) -> None:
        if self.inside:
            return
        self.inside = True
        if _BackwardThreads.active == 0:
            _BackwardThreads.saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _BackwardThreads.active += 1
        # Safety net: leave at the end of this backward pass even if the input marker is never reached.
        torch.autograd.Variable._execution_engine.queue_callback(self.leave)

    def leave(self) -> None:
        if not self.inside:
            return
        self.inside = False
        _BackwardThreads.active -= 1
        if _BackwardThreads.active == 0:
            torch.set_num_threads(_BackwardThreads.saved)


class _RestoreThreadsInBackward(torch.autograd.Function):
    """Identity on the input of the guarded module; its backward runs after every op of the module: restore."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, anchor: torch.Tensor, state: _ThreadState) -> torch.Tensor:
        ctx.state = state
        return features.view_as(features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.state.leave()
        return grad, None, None


class _SingleThreadInBackward(torch.autograd.Function):
    """Identity on the output of the guarded module; its backward runs before any op of the module: one thread."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, state: _ThreadState) -> torch.Tensor:
        ctx.state = state
        return features.view_as(features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.state.enter()
        return grad, None


class SingleThreadSparse(torch.nn.Module):
    """Wraps a spconv module (SparseConvTensor -> SparseConvTensor) so that on CPU its forward and backward run on
    one torch thread (see the module docstring); the thread count is restored after each. Building one applies
    `patch_spconv_cpu()` (before the module's first use), so its backward also works without CUDA."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        patch_spconv_cpu()
        self.module = module

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        if x.features.is_cuda:
            return self.module(x)
        # spconv's CPU kernels take float32/float64 only: no CPU autocast (bfloat16) inside.
        with torch.autocast(device_type="cpu", enabled=False):
            if x.features.dtype not in (torch.float32, torch.float64):
                x = x.replace_feature(x.features.float())
            return self._forward_cpu(x)

    def _forward_cpu(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        if torch.get_num_threads() == 1:
            return self.module(x)
        if not torch.is_grad_enabled():
            with single_thread():
                return self.module(x)
        state = _ThreadState()
        # The anchor requires grad so that the input marker is part of the graph (and its backward runs) even when
        # the input features do not require grad themselves (e.g. voxel means of raw points).
        anchor = torch.zeros((), device=x.features.device, requires_grad=True)
        x = x.replace_feature(_RestoreThreadsInBackward.apply(x.features, anchor, state))
        with single_thread():
            out = self.module(x)
        return out.replace_feature(_SingleThreadInBackward.apply(out.features, state))
