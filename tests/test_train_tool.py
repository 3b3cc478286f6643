"""tools/train.py (LightningCLI over FusionDetector / FusionDataModule) and fusion.checkpoints: a short fit end to end
with the devkit validation metrics, per-epoch / last / best-by-NDS checkpoints written atomically and read with
weights_only=True, TensorBoard and CSV logs. Slow (subprocesses): resume after SIGKILL continues the global step; DDP
with 2 CPU processes (gloo)."""
from __future__ import annotations

import csv
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fusion.checkpoints import AtomicCheckpointIO, atomic_torch_save, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "tools" / "train.py"


def load_train_tool():
    spec = importlib.util.spec_from_file_location("fusion_train_tool", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_config(path: Path, info, **trainer) -> Path:
    """configs/tiny_cpu.yaml on the tiny dataroot, made cheaper for tests: 3.2 m cells, 48x128 images, one LiDAR /
    radar sweep, batch 1, 2 training batches per epoch, 2 validation batches, no sanity check."""
    config = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    config["model"]["grid"]["cell_size"] = 3.2
    config["data"].update(dataroot=str(info.dataroot), version=info.version, train_split=info.train_split,
                          val_split=info.val_split, image_size=[48, 128], lidar_sweeps=1, radar_sweeps=1,
                          batch_size=1, num_workers=0, cache_dir=None)
    config["trainer"].update(dict(max_epochs=1, limit_train_batches=2, limit_val_batches=2,
                                  check_val_every_n_epoch=1, num_sanity_val_steps=0, log_every_n_steps=1,
                                  enable_progress_bar=False, enable_model_summary=False), **trainer)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------------ checkpoint IO
def test_atomic_save_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "ckpts" / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(3)}, "global_step": 4}, target)
    assert load_checkpoint(target)["global_step"] == 4

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom while writing")

    with pytest.raises(RuntimeError, match="boom while writing"):
        atomic_torch_save({"global_step": 5, "bad": Unsaveable()}, target)
    assert load_checkpoint(target)["global_step"] == 4  # the previous file is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temp file left behind

    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 6, "state_dict": {"w": torch.zeros(2)}}, target)
    assert io.load_checkpoint(target)["global_step"] == 6

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(target.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated.ckpt"):
        load_checkpoint(truncated)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "object.ckpt"
    torch.save({"global_step": 1, "callback": torch.nn.Linear(2, 2)}, path)  # a pickled module: not plain data
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(path)


def test_precision_falls_back_on_cpu():
    tool = load_train_tool()
    with pytest.warns(UserWarning, match="uses '32-true'"):
        assert tool.resolve_precision("bf16-mixed", "cpu") == "32-true"
    assert tool.resolve_precision("32-true", "cpu") == "32-true"


# ------------------------------------------------------------------------------------------------ fit
def test_fit_writes_checkpoints_logs_and_devkit_metrics(tiny_dataroot, tmp_path):
    config = small_config(tmp_path / "config.yaml", tiny_dataroot)
    root = tmp_path / "run"
    cli = load_train_tool().main(["fit", "--config", str(config), "--trainer.default_root_dir", str(root)])
    assert cli.trainer.global_step == 2
    assert cli.trainer.strategy.checkpoint_io.__class__ is AtomicCheckpointIO

    checkpoints = root / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert "last.ckpt" in names and "epoch=000-step=000002.ckpt" in names, names
    best = [n for n in names if n.startswith("best-")]
    assert len(best) == 1 and best[0].startswith("best-epoch=000-nds="), names
    assert not [n for n in names if n.endswith(".tmp")]

    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2
    assert last["hyper_parameters"]["grid"]["cell_size"] == 3.2
    assert set(last["state_dict"]) == set(cli.model.state_dict())
    for key, value in last["state_dict"].items():
        torch.testing.assert_close(value, cli.model.state_dict()[key])
    nds_in_name = float(best[0].split("nds=")[1].removesuffix(".ckpt"))

    rows = read_csv(root / "csv" / "version_0" / "metrics.csv")
    validation = [r for r in rows if r.get("val/NDS")]
    assert len(validation) == 1
    for key in ("val/NDS", "val/mAP", "val/mATE", "val/mAVE", "val/loss"):
        value = float(validation[0][key])
        assert math.isfinite(value), key
    assert 0.0 <= float(validation[0]["val/NDS"]) <= 1.0
    assert float(validation[0]["val/NDS"]) == pytest.approx(nds_in_name, abs=1e-4)
    assert float(validation[0]["val/samples"]) == 2  # limit_val_batches=2 x batch 1
    assert [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert list((root / "tensorboard" / "version_0").glob("events.out.tfevents.*"))
    assert (root / "tensorboard" / "version_0" / "config.yaml").is_file()


def test_resume_after_kill_continues_from_the_checkpoint(tiny_dataroot, tmp_path):
    """A 2-epoch fit in a subprocess is SIGKILLed as soon as its first last.ckpt exists (it is then in epoch 1);
    last.ckpt still loads with weights_only=True, and `--ckpt_path last` continues from its global step."""
    config = small_config(tmp_path / "config.yaml", tiny_dataroot, max_epochs=2, limit_val_batches=1)
    root = tmp_path / "run"
    last = root / "checkpoints" / "last.ckpt"
    with open(tmp_path / "first_run.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(TRAIN), "fit", "--config", str(config),
                                    "--trainer.default_root_dir", str(root)],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        try:
            while not last.exists():
                assert process.poll() is None, (tmp_path / "first_run.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    killed = load_checkpoint(last)
    assert killed["global_step"] == 2 and killed["epoch"] == 0

    cli = load_train_tool().main(["fit", "--config", str(config), "--trainer.default_root_dir", str(root),
                                  "--ckpt_path", "last"])
    assert cli.trainer.global_step == 4  # 2 epochs x 2 batches: one more epoch, not two
    resumed_steps = [int(r["step"]) for r in read_csv(root / "csv" / "version_1" / "metrics.csv")
                     if r.get("train/loss")]
    assert resumed_steps == [2, 3]  # the resumed run starts where the kill left off
    final = load_checkpoint(last)
    assert final["global_step"] == 4 and final["epoch"] == 1


def test_ddp_fit_with_two_cpu_processes(tiny_dataroot, tmp_path):
    """Lightning's DDP strategy with 2 CPU processes (gloo), run in a subprocess: both ranks train, the validation
    predictions of both ranks are gathered and scored by the devkit on rank 0."""
    config = small_config(tmp_path / "config.yaml", tiny_dataroot)
    root = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, str(TRAIN), "fit", "--config", str(config),
                             "--trainer.default_root_dir", str(root), "--trainer.accelerator", "cpu",
                             "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "distributed_backend=gloo" in output and "All distributed processes registered" in output, output[-4000:]
    last = load_checkpoint(root / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2
    validation = [r for r in read_csv(root / "csv" / "version_0" / "metrics.csv") if r.get("val/NDS")]
    assert len(validation) == 1
    assert float(validation[0]["val/samples"]) == 4  # 2 batches x batch 1 on each of the 2 ranks, gathered
    assert math.isfinite(float(validation[0]["val/NDS"]))
