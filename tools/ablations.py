#!/usr/bin/env python
"""Modality ablations: train and evaluate the base config with every single sensor and with each sensor left out,
the same way the main job trains the fused model, and print one table (markdown) of NDS / mAP / TP errors.

    python tools/ablations.py --data data/synthetic --out outputs/ablations [--only only_camera no_radar ...]

Each variant is `tools/train.py fit --config BASE --config configs/<base>_<variant>.yaml` (the overlay sets
model.modalities) followed by `tools/evaluate.py` on the validation split with the devkit. The fused model itself is
the base config alone ("fused"); when the main job (tools/main.py) already trained it on the same config, seed and
dataroot, its results are used (--fused-from). Finished variants (a metrics_summary.json under their folder) are not redone
unless --force; the table is written to <out>/ablations.md and <out>/ablations.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fused", "only_camera", "only_lidar", "only_radar", "only_gps",
            "no_camera", "no_lidar", "no_radar", "no_gps")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic", help="generated dataroot")
    parser.add_argument("--version", default="v1.0-synth")
    parser.add_argument("--split", default="synth_val", help="evaluation split")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny_cpu.yaml", help="base config")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "ablations")
    parser.add_argument("--only", nargs="+", choices=VARIANTS, help="run these variants only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="redo variants that already have results")
    parser.add_argument("--fused-from", type=Path, default=ROOT / "outputs" / "main",
                        help="a main-job output folder whose model is the fused row when it was trained on the "
                             "same config, seed and dataroot (tools/main.py trains exactly the fused variant)")
    return parser.parse_args(argv)


def overlay(base: Path, variant: str) -> Path | None:
    """configs/<base>_<variant>.yaml for a variant, None for the fused model."""
    if variant == "fused":
        return None
    path = base.with_name(f"{base.stem}_{variant}.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"no overlay config {path} for variant {variant!r}")
    return path


def run(command: list, log: Path) -> None:
    print("$ " + " ".join(str(c) for c in command), flush=True)
    with open(log, "w") as handle:
        code = subprocess.call([str(c) for c in command], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"failed (exit {code}); see {log}")


def main_job_summary(args) -> dict | None:
    """The main job's metrics when its training stamp says it trained the fused variant on the same inputs."""
    stamp = args.fused_from / "train" / "main_job.json"
    summary_path = args.fused_from / "eval" / "metrics_summary.json"
    if not (stamp.is_file() and summary_path.is_file()):
        return None
    inputs = json.loads(stamp.read_text())
    same = (inputs.get("config") == args.config.read_text() and inputs.get("seed") == args.seed
            and inputs.get("max_epochs") is None and Path(inputs.get("data", "")).resolve() == args.data)
    return json.loads(summary_path.read_text()) if same else None


def run_variant(args, variant: str) -> dict:
    folder = args.out / variant
    if variant == "fused" and not args.force and (summary := main_job_summary(args)) is not None:
        print(f"fused: the main job in {args.fused_from} trained it on the same config, seed and data; using its "
              f"results (NDS {summary['nd_score']:.4f})")
        return summary
    summary_path = folder / "eval" / "metrics_summary.json"
    if summary_path.is_file() and not args.force:
        print(f"{variant}: results exist in {folder}, skipping")
        return json.loads(summary_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    extra = overlay(args.config, variant)
    configs = ["--config", args.config] + (["--config", extra] if extra is not None else [])
    started = time.time()
    run([sys.executable, "tools/train.py", "fit", *configs, "--data.dataroot", args.data,
         "--data.cache_dir", args.data / "cache", "--seed_everything", args.seed,
         "--trainer.default_root_dir", folder / "train", "--trainer.enable_progress_bar", "false"],
        folder / "train.log")
    run([sys.executable, "tools/evaluate.py", "--dataroot", args.data, "--version", args.version,
         "--split", args.split, "--out", folder / "eval", "--config", args.config,
         "--checkpoint", folder / "train" / "checkpoints" / "last.ckpt", "--no-curves"], folder / "evaluate.log")
    summary = json.loads(summary_path.read_text())
    print(f"{variant}: NDS {summary['nd_score']:.4f}  mAP {summary['mean_ap']:.4f}  "
          f"({(time.time() - started) / 60:.1f} min)", flush=True)
    return summary


def table(results: dict[str, dict]) -> str:
    errors = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
    lines = ["| model | NDS | mAP | mATE | mASE | mAOE | mAVE | mAAE |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, summary in results.items():
        tp = summary["tp_errors"]
        lines.append(f"| {variant} | {summary['nd_score']:.4f} | {summary['mean_ap']:.4f} | "
                     + " | ".join(f"{tp[e]:.3f}" for e in errors) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data, args.out, args.config = args.data.resolve(), args.out.resolve(), args.config.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {variant: run_variant(args, variant) for variant in (args.only or VARIANTS)}
    text = table(results)
    (args.out / "ablations.md").write_text(text + "\n")
    (args.out / "ablations.json").write_text(json.dumps(
        {v: {"NDS": s["nd_score"], "mAP": s["mean_ap"], "tp_errors": s["tp_errors"]} for v, s in results.items()},
        indent=2))
    print("\n" + text)
    single = {v: s["nd_score"] for v, s in results.items() if v.startswith("only_")}
    if "fused" in results and single:
        best = max(single, key=single.get)
        verdict = "beats" if results["fused"]["nd_score"] > single[best] else "does NOT beat"
        print(f"\nfused NDS {results['fused']['nd_score']:.4f} {verdict} the best single-modality model "
              f"({best}, NDS {single[best]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
