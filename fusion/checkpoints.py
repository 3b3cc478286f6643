"""Checkpoint files: atomic writing and safe (weights-only) loading.

- `atomic_torch_save(obj, path)`: torch.save to a temporary file in the destination folder, flush + fsync, then
  `os.replace` onto `path` and fsync the folder. A run killed at any moment leaves either the previous file or the
  new one, never a truncated one (os.replace is atomic on POSIX within one file system).
- `load_checkpoint(path)`: torch.load(..., weights_only=True): only tensors and plain Python values are read, no
  pickled code; errors name the file.
- `AtomicCheckpointIO`: a Lightning CheckpointIO plugin doing both, so every checkpoint Lightning writes (periodic,
  best, last.ckpt) is atomic and every checkpoint it resumes from is loaded weights-only.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _fsync_folder(folder: str) -> None:
    """Persist a rename in `folder` (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save(obj) to `path` atomically: temp file in the same folder, fsync, os.replace, fsync the folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """A checkpoint dict read with torch.load(weights_only=True); FileNotFoundError / ValueError name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError / RuntimeError with long messages
        raise ValueError(f"cannot load checkpoint {path} with weights_only=True (corrupt, truncated, or it holds "
                         f"objects other than tensors and plain values): {error}") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic writes (`atomic_torch_save`) and weights-only reads (`load_checkpoint`).

    Only local paths are supported (remote fsspec URLs need the default TorchCheckpointIO)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        if "://" in os.fspath(path):
            raise ValueError(f"{type(self).__name__} writes local files only, got {path}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Callable | Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Always weights_only=True, whatever the caller asks (checkpoints are data, never code)."""
        return load_checkpoint(path, map_location=map_location)
