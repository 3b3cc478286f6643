"""Loading the compiled extension `fusion.cuda_ops._C`, with a clear error when it is missing.

Importing fusion.cuda_ops never fails because of the build: the import error is kept and re-raised, with the build
command, when a compiled op is first called.
"""
from __future__ import annotations

from types import ModuleType

import torch

BUILD_HINT = ("build it from the repository root with `pip install --no-build-isolation -e .` (after torch is "
              "installed; with a CUDA-enabled torch, or FORCE_CUDA=1, the CUDA kernels are compiled too)")


class CompiledOpsMissingError(RuntimeError):
    """The compiled extension fusion.cuda_ops._C is not built or does not load."""


try:
    from fusion.cuda_ops import _C as _compiled  # type: ignore[attr-defined]
    _load_error: BaseException | None = None
except ImportError as error:  # not built, or built against another torch
    _compiled = None
    _load_error = error


def compiled() -> ModuleType:
    """The compiled module; raises CompiledOpsMissingError (saying how to build) when it is unavailable."""
    if _compiled is None:
        raise CompiledOpsMissingError(f"fusion.cuda_ops: the compiled extension fusion.cuda_ops._C is unavailable "
                                      f"({_load_error}); {BUILD_HINT}")
    return _compiled


def is_built() -> bool:
    """Whether the compiled extension loaded."""
    return _compiled is not None


def has_cuda_kernels() -> bool:
    """Whether the compiled extension contains the CUDA kernels."""
    return _compiled is not None and bool(_compiled.with_cuda())


def check_device(op: str, tensor: torch.Tensor) -> None:
    """ValueError unless `tensor` is on a device the compiled ops support (CPU, or CUDA when built with it)."""
    if tensor.device.type == "cpu":
        return
    if tensor.device.type == "cuda":
        if not has_cuda_kernels():
            compiled()  # a missing build is reported first
            raise ValueError(f"{op}: got a CUDA tensor but fusion.cuda_ops was built without CUDA kernels; rebuild "
                             f"with a CUDA-enabled torch (or FORCE_CUDA=1): {BUILD_HINT}")
        return
    raise ValueError(f"{op}: tensors on device {tensor.device} are not supported (CPU or CUDA only)")
