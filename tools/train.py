#!/usr/bin/env python
"""Train, validate or test the FusionDetector with Lightning's CLI over the YAML configs in configs/.

Examples:
    python tools/train.py fit --config configs/tiny_cpu.yaml --data.dataroot data/synthetic
    python tools/train.py fit --config configs/tiny_cpu.yaml --ckpt_path last          # resume the last checkpoint
    python tools/train.py fit --config configs/tiny_cpu.yaml --ckpt_path outputs/tiny_cpu/checkpoints/last.ckpt
    python tools/train.py validate --config configs/tiny_cpu.yaml --ckpt_path outputs/tiny_cpu/checkpoints/best-*.ckpt
    python tools/train.py fit --help                                                   # every option

Subcommands: fit, validate, test, predict (Lightning's). Any config value can be overridden on the command line
(`--trainer.max_epochs 2`, `--data.batch_size 8`, `--model.lr 1e-3`); the one BEVGrid is given under `model.grid` and
linked to `data.grid`.

Outputs, under --trainer.default_root_dir (default: outputs/<config file name>; a new run in the same folder
overwrites its per-epoch checkpoints, so give each run its own folder unless resuming):
    checkpoints/epoch=NNN-step=NNNNNN.ckpt   one per training epoch (--checkpoint.* configures it)
    checkpoints/last.ckpt                    the latest state; `--ckpt_path last` resumes from it
    checkpoints/best-epoch=NNN-nds=X.ckpt    the best by validation NDS (--best_checkpoint.*)
    tensorboard/version_N/                   TensorBoard logs (+ config.yaml of the run)
    csv/version_N/metrics.csv                the same scalars as CSV
Validation NDS / mAP (val/NDS, val/mAP, val/mATE, ...) come from the nuscenes-devkit's DetectionEval on the
validation predictions the module keeps (fusion.evaluation.NuScenesDetectionMetrics; curves off, so it is cheap).
Checkpoints are written atomically (temp file + fsync + os.replace: a killed run never leaves a corrupt last.ckpt)
and read back with torch.load(weights_only=True) (fusion.checkpoints.AtomicCheckpointIO).

Checkpoints given with --ckpt_path may only name classes of this package (Lightning rebuilds the model from their
saved hyper-parameters); `--allow-class module.Class` (repeatable) allows one more class you trust.
Exit status: 0 on success, 2 for bad input (a message names the file / field), 1 only for bugs.

Seed: `seed_everything` in the config (or --seed_everything N) seeds Python, numpy, torch and the workers.
Precision: --trainer.precision from the config. Mixed precision ("bf16-mixed", "16-mixed") is used on CUDA only:
on a CPU run it falls back to "32-true" with a warning, and "bf16-mixed" becomes "16-mixed" on a GPU without bf16.

Multi-GPU and multi-node (Lightning's DDP strategy only):
    --trainer.accelerator gpu --trainer.devices 8 --trainer.strategy ddp [--trainer.num_nodes 4]
On one machine Lightning starts the other processes itself. On a cluster the launcher starts this same command once
per node (Lightning starts the per-GPU processes) and must provide, on every node:
    MASTER_ADDR  host name or IP of the rank-0 node         MASTER_PORT  a free TCP port on it
    NODE_RANK    this node's index, 0 .. num_nodes - 1      WORLD_SIZE   num_nodes * devices (total processes)
or run under SLURM (srun, one task per GPU, --ntasks-per-node = devices): Lightning reads SLURM_NTASKS,
SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID and SLURM_JOB_NODELIST itself. torchrun (which sets RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) also works with --trainer.devices = --nproc_per_node. The batch size is per
process. DDP on CPU uses the gloo backend (`--trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp`).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

from fusion.checkpoint_allowlist import ClassAllowList, check_class_paths
from fusion.checkpoints import AtomicCheckpointIO, load_checkpoint
from fusion.datasets.datamodule import FusionDataModule
from fusion.evaluation import NuScenesDetectionMetrics
from fusion.module import FusionCLI, FusionDetector

MIXED_PRECISIONS = ("16-mixed", "bf16-mixed", "16", "bf16", 16)


def next_version(*folders: Path) -> int:
    """The first N such that no folder holds version_N (so the TensorBoard and CSV logs of a run share N)."""
    taken = [-1]
    for folder in folders:
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name.startswith("version_") and entry.name[len("version_"):].isdigit():
                    taken.append(int(entry.name[len("version_"):]))
    return max(taken) + 1


def resolve_precision(precision, accelerator) -> str | int:
    """Mixed precision on CUDA only: "32-true" on a CPU run; "bf16-mixed" -> "16-mixed" where CUDA has no bf16."""
    if precision not in MIXED_PRECISIONS:
        return precision
    on_cpu = str(accelerator) == "cpu" or not torch.cuda.is_available()
    if on_cpu:
        warnings.warn(f"precision {precision!r} is for CUDA; this run is on the CPU and uses '32-true'")
        return "32-true"
    if str(precision).startswith("bf16") and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU has no bf16 support; using precision '16-mixed'")
        return "16-mixed"
    return precision


class TrainCLI(FusionCLI):
    """FusionCLI (model.grid -> data.grid link) plus a per-epoch ModelCheckpoint (`checkpoint`), the best-by-NDS
    ModelCheckpoint (`best_checkpoint`), the devkit validation metrics (`nuscenes_metrics`), TensorBoard + CSV loggers,
    atomic weights-only checkpoint IO and CPU-safe precision. A --ckpt_path checkpoint's class paths are checked
    against `allowed_classes` before Lightning parses its hyper-parameters."""

    allowed_classes: ClassAllowList = ClassAllowList()

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            saved = load_checkpoint(ckpt_path).get("hyper_parameters") or {}
            if isinstance(saved, dict):  # Lightning drops "_instantiator" itself and imports nothing from it
                saved = {k: v for k, v in saved.items() if k != "_instantiator"}
            check_class_paths(saved, self.allowed_classes, f"--ckpt_path {ckpt_path}")
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.filename": "epoch={epoch:03d}-step={step:06d}", "checkpoint.auto_insert_metric_name": False,
            "checkpoint.every_n_epochs": 1, "checkpoint.save_top_k": -1, "checkpoint.save_last": True,
            "checkpoint.save_on_train_epoch_end": True,
        })
        parser.add_lightning_class_args(ModelCheckpoint, "best_checkpoint")
        parser.set_defaults({
            "best_checkpoint.monitor": "val/NDS", "best_checkpoint.mode": "max", "best_checkpoint.save_top_k": 1,
            "best_checkpoint.filename": "best-epoch={epoch:03d}-nds={val/NDS:.4f}",
            "best_checkpoint.auto_insert_metric_name": False, "best_checkpoint.save_on_train_epoch_end": False,
        })
        parser.add_lightning_class_args(NuScenesDetectionMetrics, "nuscenes_metrics")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if trainer.default_root_dir is None:
            configs = config.get("config") or []
            name = Path(str(configs[-1])).stem if configs else "default"
            trainer.default_root_dir = os.path.join("outputs", name)
        checkpoints = os.path.join(trainer.default_root_dir, "checkpoints")
        for key in ("checkpoint", "best_checkpoint"):
            if config[key].dirpath is None:
                config[key].dirpath = checkpoints
        trainer.precision = resolve_precision(trainer.precision, trainer.accelerator)
        # Lightning logs the module's and the datamodule's initial hyper-parameters together and refuses a key with
        # two values: model.modalities None ("every branch") next to the linked data.modalities list. Spell it out.
        model, data = config.get("model"), config.get("data")
        if model is not None and data is not None and "modalities" in model and model.modalities is None \
                and data.get("modalities") is not None:
            model.modalities = list(data.modalities)

    def instantiate_trainer(self, **kwargs):
        trainer = self._get(self.config_init, "trainer", default={})
        root = Path(trainer.get("default_root_dir") or ".")
        if trainer.get("logger") in (None, True):
            version = next_version(root / "tensorboard", root / "csv")
            kwargs["logger"] = [TensorBoardLogger(root, name="tensorboard", version=version, default_hp_metric=False),
                                CSVLogger(root, name="csv", version=version)]
        plugins = trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = plugins + [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with this module's docstring kept as written."""


def split_allow_class(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without the --allow-class options, the class names they give)."""
    rest, names, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--allow-class" and i + 1 < len(argv):
            names.append(argv[i + 1])
            i += 2
            continue
        if argv[i].startswith("--allow-class="):
            names.append(argv[i].split("=", 1)[1])
        else:
            rest.append(argv[i])
        i += 1
    return rest, names


def main(argv: list[str] | None = None, run: bool = True) -> TrainCLI:
    """Run the CLI on argv (sys.argv[1:] when None); returns it (cli.trainer, cli.model, cli.datamodule).
    Raises ValueError (ClassNotAllowedError, a bad checkpoint) naming the file for bad input."""
    argv, allowed = split_allow_class(list(sys.argv[1:] if argv is None else argv))
    cli_class = type("AllowListTrainCLI", (TrainCLI,), {"allowed_classes": ClassAllowList.with_names(allowed)})
    return cli_class(FusionDetector, FusionDataModule, args=argv, run=run, save_config_kwargs={"overwrite": True},
                     parser_kwargs={"description": __doc__, "formatter_class": _HelpFormatter})


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:  # bad input: one line, no traceback (exit 2)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
