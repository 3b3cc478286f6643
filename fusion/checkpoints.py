"""Checkpoint files: atomic writing, safe (weights-only) loading, and rebuilding a trained run from one.

- `atomic_torch_save(obj, path)`: torch.save to a temporary file in the destination folder, flush + fsync, then
  `os.replace` onto `path` and fsync the folder. A run killed at any moment leaves either the previous file or the
  new one, never a truncated one (os.replace is atomic on POSIX within one file system). The temporary file names
  its writer's pid; the next save into the folder removes those of writers that are gone (a SIGKILLed save).
- `load_checkpoint(path)`: torch.load(..., weights_only=True): only tensors and plain Python values are read, no
  pickled code; errors name the file.
- `AtomicCheckpointIO`: a Lightning CheckpointIO plugin doing both, so every checkpoint Lightning writes (periodic,
  best, last.ckpt) is atomic and every checkpoint it resumes from is loaded weights-only.
- `load_run(checkpoint, config, dataroot=...)`: the one way every tool rebuilds a trained run: the model (from the
  checkpoint's saved hyper-parameters, else the YAML config) with its weights, and its data settings (a
  FusionDataModule on the model's grid and modalities), from one read of the checkpoint. Every class path in the
  checkpoint is checked against the allow-list (fusion.checkpoint_allowlist) before anything is imported, and the
  checkpoint never decides where files are written (its saved `cache_dir` is ignored; the caller gives one).
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fusion.checkpoint_allowlist import ClassAllowList, check_class_paths

if TYPE_CHECKING:  # imported when a run is loaded: the model and the data module import this module's callers
    from fusion.datasets.datamodule import FusionDataModule
    from fusion.module import FusionDetector

#: Data settings that follow the model or the call, never the saved ones.
_DATA_KEYS_NOT_SAVED = ("grid", "modalities", "dataroot", "version", "train_split", "val_split", "test_split")
#: Data settings a checkpoint may not decide: where files are written.
_DATA_KEYS_NOT_FROM_CHECKPOINT = ("cache_dir",)
#: Temporary checkpoint files: .<name>.<pid>.<random>.tmp
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process, or not a pid at all
        return pid <= 2**22
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files of interrupted atomic_torch_save calls in `folder` (those whose writer process is
    gone); returns their paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.match(name)
        if match and int(match.group(1)) != os.getpid() and not _process_alive(int(match.group(1))):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(os.path.join(os.fspath(folder), name))
            except OSError:
                pass
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save(obj) to `path` atomically: temp file in the same folder, fsync, os.replace, fsync the folder.
    Temporary files left in the folder by interrupted saves of dead processes are removed first."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp",
                                             dir=folder)
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


# ------------------------------------------------------------------------------------------------------------------
# Rebuilding a trained run
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """A run rebuilt by `load_run`: the model (weights loaded when a checkpoint was given), its data settings (None
    when no dataroot was given), the checkpoint file, and what described the model (`source`)."""

    model: "FusionDetector"
    data: "FusionDataModule | None"
    checkpoint: Path | None
    source: str


def merge_config(base: Any, override: Any) -> Any:
    """Deep merge of parsed YAML: dicts merge key by key, anything else is replaced (as several --config do)."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge_config(base[key], value) if key in base else value
        return merged
    return override


def _config_section(config, name: str, required: bool) -> dict:
    """The merged `name:` sections of one YAML config or several (merged in order like repeated --config); a
    missing file raises FileNotFoundError, a file without the section ValueError when `required`."""
    import yaml

    section: dict = {}
    for path in [config] if isinstance(config, (str, os.PathLike)) else list(config):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as handle:
            document = yaml.safe_load(handle)
        part = document.get(name) if isinstance(document, dict) else None
        if not isinstance(part, dict):
            if required:
                raise ValueError(f"{path} has no '{name}:' section")
            continue
        section = merge_config(section, part)
    return section


def build_model(section: Mapping[str, Any], source: str) -> "FusionDetector":
    """A FusionDetector from its hyper-parameters (a `model:` section: class_path + init_args entries), as
    LightningCLI would build it; ValueError names `source` when they do not describe a model."""
    from jsonargparse import ArgumentParser

    from fusion.module import FusionDetector

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(FusionDetector, "model", fail_untyped=False)
    try:
        parsed = parser.parse_object({"model": dict(section)})
        with warnings.catch_warnings():  # Lightning notes that the loss module is an hparam; it is, by design
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            return parser.instantiate(parsed).model
    except Exception as error:
        raise ValueError(f"cannot build the model from {source}: {error}") from error


def load_run(checkpoint: str | os.PathLike | None = None,
             config: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
             dataroot: str | os.PathLike | None = None, version: str | None = None, split: str | None = None,
             map_location: Any = "cpu", model_overrides: Mapping[str, Any] | None = None,
             allowed_classes: ClassAllowList | None = None, **data_overrides) -> Run:
    """Rebuild a trained run from one read of `checkpoint` (torch.load(weights_only=True)).

    Model: from the checkpoint's saved model hyper-parameters when it has them (Lightning's CLI saves them as plain
    values, command-line overrides included: they describe what was trained); otherwise from `config`: a YAML file,
    or several merged in order like repeated `--config` (e.g. tiny_cpu.yaml then an ablation overlay), whose
    `model:` sections describe the model. `model_overrides` (e.g. {"score_threshold": 0.2}) replace
    hyper-parameters before it is built. The checkpoint's weights are loaded into it.
    Data (when `dataroot` is given): a FusionDataModule for that dataroot / `version` (and `split` as train, val and
    test split, when given) on the model's grid and modalities, with the data settings the model was trained with:
    the checkpoint's saved data-module hyper-parameters when it has them, else the config's `data:` sections.
    `data_overrides` (e.g. num_workers, val_batch_size, cache_dir) win; a checkpoint's saved cache_dir is never
    used (the index cache goes where `cache_dir` says, or stays in memory).
    Class paths in the checkpoint must pass `allowed_classes` (default: this package only; ClassNotAllowedError,
    a ValueError, otherwise), checked before anything is imported.
    Without a checkpoint, the model is built fresh from `config`. Errors name the file."""
    state = load_checkpoint(checkpoint, map_location) if checkpoint is not None else None
    saved = (state or {}).get("hyper_parameters") or {}
    if not isinstance(saved, dict):
        raise ValueError(f"{checkpoint}: hyper_parameters must be a dict, got {type(saved).__name__}")
    if "branches" in saved and "grid" in saved:
        section = {k: v for k, v in saved.items() if not k.startswith("_")}
        source = f"the hyper-parameters saved in {checkpoint}"
        check_class_paths(section, allowed_classes, f"checkpoint {checkpoint}")
    elif config is not None:
        section, source = _config_section(config, "model", required=True), str(config)
    else:
        raise ValueError(f"load_run: {checkpoint} has no saved model hyper-parameters and no config was given; "
                         "pass the YAML config the model was trained with")
    model = build_model({**section, **dict(model_overrides or {})}, source)
    if state is not None:
        try:
            model.load_state_dict(state.get("state_dict", state))
        except (RuntimeError, TypeError, AttributeError, KeyError) as error:
            raise ValueError(f"{checkpoint} does not fit the model built from {source}: {error}") from error
    data = None
    if dataroot is not None:
        saved_data = (state or {}).get("datamodule_hyper_parameters") or {}
        if not isinstance(saved_data, dict):
            raise ValueError(f"{checkpoint}: datamodule_hyper_parameters must be a dict")
        settings = {k: v for k, v in saved_data.items() if k not in _DATA_KEYS_NOT_FROM_CHECKPOINT}
        if not settings and config is not None:
            settings = _config_section(config, "data", required=False)
        data = _data_module(model, settings, dataroot, version, split, checkpoint, data_overrides)
    return Run(model, data, Path(checkpoint) if checkpoint is not None else None, source)


def _data_module(model, settings: dict, dataroot, version: str | None, split: str | None, checkpoint,
                 overrides: Mapping[str, Any]) -> "FusionDataModule":
    """The FusionDataModule of saved data `settings` for a dataroot, on the model's grid and modalities."""
    from fusion.datasets.datamodule import FusionDataModule

    if not settings:
        raise ValueError(f"no data settings: {checkpoint or '(no checkpoint)'} has no datamodule hyper-parameters "
                         "and no config with a data: section was given")
    if version is None:
        raise ValueError("load_run: a dataroot needs its version (e.g. version='v1.0-mini')")
    settings = {k: v for k, v in settings.items() if not k.startswith("_") and k not in _DATA_KEYS_NOT_SAVED}
    if split is not None:
        settings.update(train_split=split, val_split=split, test_split=split)
    try:
        return FusionDataModule(dataroot=str(dataroot), version=version, grid=model.grid,
                                modalities=list(model.modalities), **{**settings, **overrides})
    except TypeError as error:
        raise ValueError(f"the saved data settings do not fit FusionDataModule: {error}") from error
