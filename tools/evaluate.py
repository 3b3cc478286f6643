#!/usr/bin/env python
"""nuScenes detection benchmark of a trained FusionDetector, or of a results file, with the nuscenes-devkit.

From a checkpoint (inference over the split with the model's predict_boxes, then the devkit):
    python tools/evaluate.py --dataroot data/synthetic --version v1.0-synth --split synth_val --out outputs/eval \
        --checkpoint outputs/tiny_cpu/checkpoints/last.ckpt [--robustness]
From an existing submission (validated against the nuScenes format first, then evaluated):
    python tools/evaluate.py --dataroot DIR --version V --split NAME --out DIR --results results_nusc.json

Writes under --out:
    results_nusc.json       the submission (checkpoint mode): global frame, every sample of the split, meta flags
    metrics_summary.json    the devkit's summary (mAP, NDS, TP errors, per class); metrics_details.json
    plots/*.pdf             the devkit's PR / TP curves (skip with --no-curves)
    robustness.json         with --robustness: NDS / mAP per condition (sensor removed, LiDAR thinned, GPS noise),
                            each condition's files under robustness/<condition>/
and prints the devkit's per-class table, mAP, NDS and TP errors (and the robustness table).

The split is a devkit split name (mini_val, val, ...) or a custom one from <dataroot>/<version>/splits.json.
Tracking (--task tracking): the checkpoint's detections over the split's scenes in time order, then the
CenterPoint-style tracker (fusion.tracking), scored with the devkit's TrackingEval (tracking_nips_2019: AMOTA,
AMOTP, MOTA, IDS, ...); or an existing tracking submission, validated first:
    python tools/evaluate.py --task tracking --dataroot data/synthetic --version v1.0-synth --split synth_val \
        --out outputs/eval_tracking --checkpoint outputs/main/train/checkpoints/last.ckpt
    python tools/evaluate.py --task tracking --dataroot DIR --version V --split NAME --out DIR --results tracks.json
writes results_nusc.json (the detections, checkpoint mode), tracking_results.json (the tracks, checkpoint mode),
metrics_summary.json / metrics_details.json (the devkit's tracking metrics) and plots/*.pdf.


A checkpoint may only name classes of this package (`--allow-class module.Class` allows one more you trust); the
reader's index cache goes to --cache-dir (default <out>/cache), never where the checkpoint says.
Exit status: 0 on success, 2 for bad input: a bad argument, an invalid submission, an unreadable or disallowed
checkpoint, a bad data file (one line names the file / sample / field, no traceback); 1 only for bugs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataroot", required=True, help="nuScenes-format dataroot")
    parser.add_argument("--version", required=True, help="table folder, e.g. v1.0-mini or v1.0-synth")
    parser.add_argument("--split", required=True, help="split to evaluate, e.g. mini_val or synth_val")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--task", choices=("detection", "tracking"), default="detection",
                        help="what to score: detection (DetectionEval, default) or tracking (TrackingEval)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="Lightning checkpoint of a FusionDetector (tools/train.py saves the "
                        "model and data settings in it)")
    source.add_argument("--results", help="an existing nuScenes submission JSON to validate and evaluate")
    parser.add_argument("--config", help="the YAML config the checkpoint was trained with, for checkpoints that do "
                        "not carry their settings (the model and data settings saved in a checkpoint win)")
    parser.add_argument("--allow-class", action="append", default=[], metavar="MODULE.CLASS",
                        help="also allow the checkpoint to name this class (repeatable; default: this package only)")
    parser.add_argument("--cache-dir", default=None, help="the reader's index cache folder (default: <out>/cache)")
    parser.add_argument("--no-curves", action="store_true", help="skip the devkit's PDF curves (8-10 s)")
    parser.add_argument("--robustness", action="store_true",
                        help="also score the checkpoint with each sensor removed, LiDAR thinned and GPS noise")
    parser.add_argument("--thin-rings", type=int, nargs="+", default=[2, 4], metavar="K",
                        help="LiDAR thinning for --robustness: keep rings with ring %% K == 0 (default: 2 4)")
    parser.add_argument("--gps-position-sigma", type=float, default=1.0, help="GPS noise: position sigma, meters")
    parser.add_argument("--gps-yaw-sigma", type=float, default=0.035, help="GPS noise: yaw sigma, radians")
    parser.add_argument("--gps-can-dropout", type=float, default=0.1, help="GPS noise: CAN dropout probability")
    parser.add_argument("--batch-size", type=int, default=None, help="inference batch size (default: the config's "
                        "val batch size)")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="decoding score threshold (default: the model's)")
    parser.add_argument("--point-motion", choices=("model", "off", "on"), default="model",
                        help="velocities measured from LiDAR time lags and radar Doppler after decoding "
                             "(fusion.heads.point_motion): as the checkpoint's config says (model), off (the head's "
                             "velocities), or on with the default settings")
    parser.add_argument("--map-heading", choices=("model", "off", "right", "left"), default="model",
                        help="front / back of slow road vehicles from the side of the road traffic keeps to "
                             "(fusion.heads.map_heading): as the checkpoint's config says (model), off, or on with "
                             "the default settings for right- or left-hand traffic")
    parser.add_argument("--attribute-from-motion", choices=("model", "off", "on"), default="model",
                        help="boxes moving at least 1 m/s get their class's moving attribute "
                             "(fusion.heads.decode.attributes_from_motion): as the checkpoint's config says (model), "
                             "off, or on")
    parser.add_argument("--vru-heading-from-motion", choices=("model", "off", "on"), default="model",
                        help="pedestrians, bicycles and motorcycles moving at least 0.5 m/s face their motion "
                             "(fusion.heads.decode.vru_headings_from_motion): as the checkpoint's config says "
                             "(model), off, or on")
    args = parser.parse_args(argv)
    if args.results and args.robustness:
        parser.error("--robustness needs --checkpoint (it runs the model under each condition)")
    for flag in ("point_motion", "map_heading", "attribute_from_motion", "vru_heading_from_motion"):
        if args.results and getattr(args, flag) != "model":
            parser.error(f"--{flag.replace('_', '-')} is only used with --checkpoint")
    if args.results and args.config:
        parser.error("--config is only used with --checkpoint")
    if args.task == "tracking" and args.robustness:
        parser.error("--robustness scores detection only (leave out --task tracking)")
    return args


def condition_loader(datamodule, split: str, lidar_keep_rings: int | None = None):
    """A DataLoader over the split (no augmentation); with lidar_keep_rings, the reader keeps only LiDAR rings with
    ring % lidar_keep_rings == 0 (fewer beams)."""
    from torch.utils.data import DataLoader

    from fusion.datasets.collate import collate_samples

    overrides = {} if lidar_keep_rings is None else {"lidar_keep_rings": lidar_keep_rings}
    dataset = datamodule.make_dataset(split, train=False, **overrides)
    return DataLoader(dataset, batch_size=datamodule.val_batch_size, shuffle=False,
                      num_workers=datamodule.num_workers, collate_fn=collate_samples)


def score_condition(model, loader, nusc, split: str, tokens, condition, out: Path, render_curves: bool,
                    verbose: bool):
    """Inference under one condition -> results_nusc.json -> devkit metrics under `out`. Returns (summary, path)."""
    from fusion.evaluation import (make_submission, predict_split, run_detection_eval, submission_meta,
                                   validate_submission, write_submission)

    predictions, poses = predict_split(model, loader, condition, progress=True)
    missing = [t for t in tokens if t not in predictions]
    if missing:
        print(f"warning: {len(missing)} sample(s) of the split were not predicted (empty lists), e.g. {missing[:3]}")
    submission = make_submission(predictions, poses, tokens, submission_meta(condition.modalities(model.modalities)))
    validate_submission(submission, tokens, source=f"submission of {condition.name}")
    results_path = write_submission(submission, out / "results_nusc.json")
    summary = run_detection_eval(nusc, split, results_path, out, render_curves=render_curves, verbose=verbose)
    return summary, results_path


def load_model(args: argparse.Namespace):
    """(model in eval mode on its device, its data module, the device) of --checkpoint."""
    import torch

    from fusion.checkpoint_allowlist import ClassAllowList
    from fusion.checkpoints import load_run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_overrides = {} if args.score_threshold is None else {"score_threshold": args.score_threshold}
    if args.point_motion != "model":
        model_overrides["point_motion"] = {} if args.point_motion == "on" else None
    if args.map_heading != "model":
        model_overrides["map_heading"] = None if args.map_heading == "off" else {"traffic": args.map_heading}
    if args.attribute_from_motion != "model":
        model_overrides["attribute_from_motion"] = 1.0 if args.attribute_from_motion == "on" else None
    if args.vru_heading_from_motion != "model":
        model_overrides["vru_heading_from_motion"] = 0.5 if args.vru_heading_from_motion == "on" else None
    data_overrides = {k: v for k, v in (("val_batch_size", args.batch_size), ("num_workers", args.num_workers))
                      if v is not None}
    data_overrides["cache_dir"] = str(args.cache_dir or Path(args.out) / "cache")
    run = load_run(args.checkpoint, args.config, dataroot=args.dataroot, version=args.version, split=args.split,
                   model_overrides=model_overrides, allowed_classes=ClassAllowList.with_names(args.allow_class),
                   **data_overrides)
    return run.model.to(device).eval(), run.data, device


def evaluate_checkpoint(args: argparse.Namespace, nusc, tokens, out: Path) -> dict:
    from fusion.evaluation import (GpsNoise, RobustnessRow, format_robustness_table, robustness_conditions,
                                   summary_scalars)

    model, datamodule, device = load_model(args)

    def loader(condition):
        return condition_loader(datamodule, args.split, condition.lidar_keep_rings)

    noise = GpsNoise(position_sigma_m=args.gps_position_sigma, yaw_sigma_rad=args.gps_yaw_sigma,
                     can_dropout=args.gps_can_dropout)
    conditions = robustness_conditions(model.modalities, args.thin_rings, noise)
    grid = model.grid
    print(f"model: {args.checkpoint} ({', '.join(model.modalities)}; BEV {grid.height} x {grid.width} cells of "
          f"{grid.cell_size} m) on {device}; split {args.split}: {len(tokens)} samples")
    start = time.perf_counter()
    summary, results_path = score_condition(model, loader(conditions[0]), nusc, args.split, tokens, conditions[0],
                                            out, render_curves=not args.no_curves, verbose=True)
    print(f"results: {results_path}\nmetrics: {out / 'metrics_summary.json'}"
          + ("" if args.no_curves else f"\nplots: {out / 'plots'}") + f"\n({time.perf_counter() - start:.1f} s)")
    if not args.robustness:
        return summary
    rows = []
    for condition in conditions:
        if condition is conditions[0]:
            condition_summary, path = summary, results_path
        else:
            print(f"robustness: {condition.name} ({condition.description})")
            condition_summary, path = score_condition(model, loader(condition), nusc, args.split, tokens, condition,
                                                      out / "robustness" / condition.name, render_curves=False,
                                                      verbose=False)
        scalars = summary_scalars(condition_summary)
        rows.append(RobustnessRow(condition.name, condition.description, condition.modalities(model.modalities),
                                  scalars["NDS"], scalars["mAP"],
                                  {k: v for k, v in scalars.items() if k not in ("NDS", "mAP")}, str(path)))
    table = format_robustness_table(rows)
    print("\nRobustness (devkit NDS / mAP per condition):\n" + table)
    report = {"checkpoint": str(args.checkpoint), "config": str(args.config), "dataroot": str(args.dataroot),
              "version": args.version, "split": args.split, "gps_noise": dataclasses.asdict(noise),
              "conditions": [dataclasses.asdict(row) for row in rows]}
    with open(out / "robustness.json", "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"robustness table: {out / 'robustness.json'}")
    return summary


def evaluate_results(args: argparse.Namespace, nusc, tokens, out: Path) -> dict:
    from fusion.evaluation import load_submission, run_detection_eval, validate_submission

    submission = load_submission(args.results)
    validate_submission(submission, tokens, source=str(args.results))
    print(f"{args.results}: valid submission for {len(tokens)} samples of {args.split}")
    summary = run_detection_eval(nusc, args.split, args.results, out, render_curves=not args.no_curves)
    print(f"metrics: {out / 'metrics_summary.json'}" + ("" if args.no_curves else f"\nplots: {out / 'plots'}"))
    return summary


def evaluate_tracking(args: argparse.Namespace, nusc, tokens, out: Path) -> dict:
    """--task tracking: the checkpoint's detections tracked per scene (or --results, a tracking submission), then
    the devkit's TrackingEval. Returns its metrics summary."""
    from fusion.evaluation import (load_submission, make_submission, predict_split, submission_meta,
                                   validate_submission, write_submission)
    from fusion.tracking import run_tracking_eval, track_submission, validate_tracking_submission

    if args.checkpoint:
        model, datamodule, device = load_model(args)
        print(f"model: {args.checkpoint} ({', '.join(model.modalities)}) on {device}; split {args.split}: "
              f"{len(tokens)} samples")
        predictions, poses = predict_split(model, condition_loader(datamodule, args.split), progress=True)
        detections = make_submission(predictions, poses, tokens, submission_meta(model.modalities))
        validate_submission(detections, tokens, source="detections of the checkpoint")
        print(f"detections: {write_submission(detections, out / 'results_nusc.json')}")
        submission = track_submission(nusc, detections, tokens)
        validate_tracking_submission(submission, tokens, source="tracker output")
        results_path = write_submission(submission, out / "tracking_results.json")
        print(f"tracks:     {results_path}")
    else:
        submission = load_submission(args.results)
        validate_tracking_submission(submission, tokens, source=str(args.results))
        results_path = Path(args.results)
        print(f"{args.results}: valid tracking submission for {len(tokens)} samples of {args.split}")
    if not any(submission["results"].values()):
        raise ValueError(f"{results_path}: no track in any sample; the devkit cannot score an empty submission")
    summary = run_tracking_eval(nusc, args.split, results_path, out, render_curves=not args.no_curves)
    print(f"metrics: {out / 'metrics_summary.json'}" + ("" if args.no_curves else f"\nplots: {out / 'plots'}"))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fusion.evaluation import SubmissionError, load_nuscenes, split_sample_tokens

    out = Path(args.out)
    try:
        for name in ("checkpoint", "config", "results"):
            path = getattr(args, name)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"--{name} {path}: file not found")
        nusc = load_nuscenes(args.dataroot, args.version)
        tokens = split_sample_tokens(nusc, args.split)
        out.mkdir(parents=True, exist_ok=True)
        if args.task == "tracking":
            summary = evaluate_tracking(args, nusc, tokens, out)
        else:
            summary = evaluate_checkpoint(args, nusc, tokens, out) if args.checkpoint else \
                evaluate_results(args, nusc, tokens, out)
    except (SubmissionError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.task == "tracking":
        print(f"AMOTA {summary['amota']:.4f}  AMOTP {summary['amotp']:.4f}  MOTA {summary['mota']:.4f}  "
              f"IDS {summary['ids']:.0f}  recall {summary['recall']:.4f}")
    else:
        print(f"NDS {summary['nd_score']:.4f}  mAP {summary['mean_ap']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
