"""tools/main.py (README command one): the training step's command with config overlays, and its skip stamp."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_main():
    spec = importlib.util.spec_from_file_location("main_job", ROOT / "tools" / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_are_passed_in_order_and_a_changed_overlay_retrains(tmp_path, monkeypatch):
    main = load_main()
    commands = []

    def fake_run(command, log=None):
        commands.append([str(part) for part in command])
        checkpoints = tmp_path / "train" / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / "last.ckpt").write_bytes(b"")

    monkeypatch.setattr(main, "run", fake_run)
    base, overlay = tmp_path / "base.yaml", tmp_path / "overlay.yaml"
    base.write_text("seed_everything: 0\n")
    overlay.write_text("trainer: {max_epochs: 24}\n")
    args = main.parse_args(["--data", str(tmp_path / "data"), "--config", str(base), "--config", str(overlay)])
    assert args.config == [base, overlay]
    main.step_train(args, tmp_path / "train")
    configs = [part for index, part in enumerate(commands[0][1:]) if commands[0][index] == "--config"]
    assert configs == [str(base), str(overlay)]
    assert "trainer: {max_epochs: 24}" in json.loads((tmp_path / "train" / "main_job.json").read_text())["config"]
    main.step_train(args, tmp_path / "train")  # same inputs: skipped
    assert len(commands) == 1
    overlay.write_text("trainer: {max_epochs: 30}\n")
    main.step_train(args, tmp_path / "train")  # a changed overlay: trained again
    assert len(commands) == 2


def test_the_default_config_is_tiny_cpu():
    main = load_main()
    assert main.parse_args([]).config is None  # main() resolves it to configs/tiny_cpu.yaml
    assert (ROOT / "configs" / "tiny_cpu.yaml").is_file()
