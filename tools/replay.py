#!/usr/bin/env python
r"""Replay a recorded drive through a trained FusionDetector as if it were live (no ROS).

    python tools/replay.py --dataroot data/synthetic --version v1.0-synth --scene scene-2009 \
        --checkpoint outputs/tiny_cpu/checkpoints/last.ckpt --out outputs/replay
    python tools/replay.py --dataroot DIR --version V --split synth_val --checkpoint CKPT --out DIR --rate 1.0
    python tools/replay.py --scenario configs/scenarios/scene-2009_traffic.yaml --checkpoint CKPT --out DIR
    python tools/replay.py ... --checkpoint CKPT --runtime onnx --onnx model.onnx    # onnxruntime (tools/export.py)

Every sample_data of the scene (LiDAR, radar and camera sweeps, not only keyframes) and its CAN bus messages are
replayed in timestamp order. Without --scene, the first scene of --split is replayed. The model and its data
settings come from the checkpoint (tools/train.py saves both in it); --config is only needed for checkpoints
that lack them.

Sync policy (on each LiDAR sweep, or every k-th):
  - the frame is the ego frame at the sweep's timestamp T; it is assembled once the stream has passed
    T + --sync-wait-ms (default 50; 0 = strictly causal), so messages taken just after the sweep can be paired;
  - LiDAR: the sweep plus the model's number of previous sweeps (--lidar-sweeps), none older than --max-age-ms;
  - each camera: the message nearest to T within --camera-tolerance-ms (default 60);
  - each radar: the message nearest to T within --radar-tolerance-ms (default 100) plus its previous sweeps
    (--radar-sweeps in all);
  - CAN (speed, yaw rate, acceleration) interpolated at T; the map cropped at the sweep's pose;
  - every message keeps its own ego pose: ego motion is compensated into the frame at T. A sensor with nothing
    in tolerance is marked missing for that frame and the model runs on the sensors that are present.
Playback (--rate): "max" (as fast as possible; deterministic), 1.0 (real time), 2.0, 0.5, ... In real-time modes
a frame is late when its processing starts after the next sweep's frame was ready, and dropped when it would
start more than --max-lag-ms after its own. Missing, corrupt, late and out-of-order messages are counted in the
summary and skipped; they never stop the replay.

Tracking: each frame's detections feed a CenterPoint-style tracker (fusion.tracking; greedy association by
velocity-propagated centre distance, birth / death by score and age); its time counts as processing time.

Scenarios (--scenario FILE, a YAML of fusion.scenarios.spec): the file names the drive (dataroot, version, scene;
--dataroot / --version / --scene given on the command line win) and criteria (latency percentile, no dropped
frames, detection / tracking metrics over a time window, an object of a class within range of the ego for N
frames, no track ID switches of a named instance). After the replay a pass/fail table is printed and a JUnit XML
written (--junit, default OUT/scenario_junit.xml).

A checkpoint may only name classes of this package (`--allow-class module.Class` allows one more you trust).
Exit status: 0 on success (every scenario criterion passed; bad messages in the drive are counted, not fatal), 2 for
bad input (a bad argument, scenario file, an unreadable or disallowed checkpoint, unreadable tables: one line names
the file / field), 3 when the replay ran but a scenario criterion failed, 1 only for bugs.

Writes under --out:
    detections.jsonl   one line per processed frame: timestamp, LiDAR sample_data token, latency, sensors
                       used / missing, boxes in the GLOBAL frame (class, score, velocity, attribute), and
                       "tracks": the tracks of the frame, GLOBAL frame (tracking_id, tracking_name, translation,
                       size, rotation, velocity, tracking_score, age in frames)
    summary.json       frames processed / dropped / late, latency p50 / p95 / p99 ms, per-sensor message counts
                       (received, used, skipped, corrupt, missing_file, out_of_order, late, duplicate,
                       bad_timestamp), every fault by kind (faults, faults_by_channel), wall time
    frames/*.png       the BEV picture of every --png-every-th frame (0: none)
    replay.mp4         the drive (replay.gif with --video gif, or when ffmpeg fails)
    scenario_junit.xml with --scenario: one testcase per criterion
and, when asked, recordings for viewers (their writing time is not part of the latency figures; the summary gives it
as recording_s):
    --rerun FILE.rrd   a rerun recording: LiDAR and radar points, the six cameras with their pinhole calibration and
                       projected boxes, 3D boxes (tracks with IDs, else detections) in class colours, the ego
                       trajectory, the fuser's contribution map, latency plots; open it with `rerun FILE.rrd`
    --mcap FILE.mcap   the same as Foxglove-schema messages (PointCloud, CompressedImage, CameraCalibration,
                       SceneUpdate, FrameTransforms, Log and a JSON /metrics channel); open it in Foxglove
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rate(text: str) -> float:
    if text.strip().lower() in ("max", "0", "0.0"):
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rate must be 'max' or a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--rate must be 'max' or a positive number, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataroot", help="nuScenes-format dataroot (required unless --scenario names it)")
    parser.add_argument("--version", help="table folder, e.g. v1.0-mini or v1.0-synth (required unless --scenario)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--scene", help="scene name, e.g. scene-0061")
    where.add_argument("--split", help="replay the first scene of this split (devkit or splits.json name)")
    parser.add_argument("--checkpoint", required=True, help="Lightning checkpoint of a FusionDetector")
    parser.add_argument("--config", help="YAML the model was trained with, for checkpoints that do not carry their "
                        "model and data settings")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--allow-class", action="append", default=[], metavar="MODULE.CLASS",
                        help="also allow the checkpoint to name this class (repeatable; default: this package only)")
    parser.add_argument("--cache-dir", default=None, help="the reader's cache folder (default: <out>/cache)")
    parser.add_argument("--rate", type=_rate, default=0.0, help="'max' (default) or a multiple of real time")
    parser.add_argument("--every-k-sweeps", type=int, default=1, metavar="K", help="a frame on every K-th sweep")
    parser.add_argument("--keyframes-only", action="store_true",
                        help="trigger frames on nuScenes keyframe sweeps only (every K-th of them)")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N", help="stop after N processed frames")
    parser.add_argument("--video", choices=("mp4", "gif", "none"), default="mp4", help="video of the drive")
    parser.add_argument("--png-every", type=int, default=1, metavar="K",
                        help="save the BEV picture of every K-th processed frame (0: none; default 1)")
    parser.add_argument("--rerun", type=Path, metavar="FILE.rrd", help="also write a rerun recording of the replay")
    parser.add_argument("--mcap", type=Path, metavar="FILE.mcap", help="also write a Foxglove MCAP recording")
    parser.add_argument("--no-contributions", action="store_true",
                        help="do not draw the fuser's contribution map beside the BEV picture")
    parser.add_argument("--camera-tolerance-ms", type=float, default=60.0, help="max |t_camera - T| (default 60)")
    parser.add_argument("--radar-tolerance-ms", type=float, default=100.0, help="max |t_radar - T| (default 100)")
    parser.add_argument("--sync-wait-ms", type=float, default=50.0,
                        help="assemble a frame once the stream passed T + this (default 50; 0: causal)")
    parser.add_argument("--max-age-ms", type=float, default=600.0, help="oldest previous LiDAR / radar sweep used")
    parser.add_argument("--max-lag-ms", type=float, default=250.0, help="real-time modes: drop frames this far behind")
    parser.add_argument("--lidar-sweeps", type=int, default=None, help="previous LiDAR sweeps (default: the config's)")
    parser.add_argument("--radar-sweeps", type=int, default=None, help="sweeps per radar (default: the config's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--score-threshold", type=float, default=None, help="decoding threshold (default: model's)")
    parser.add_argument("--no-tracking", action="store_true", help="do not track (the records' tracks stay empty)")
    parser.add_argument("--scenario", help="scenario YAML: the drive and the criteria its replay must meet")
    parser.add_argument("--junit", help="where --scenario writes its JUnit XML (default OUT/scenario_junit.xml)")
    parser.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                        help="run the checkpoint in PyTorch (default) or the --onnx file (tools/export.py) in "
                        "onnxruntime; the data settings come from the checkpoint either way")
    parser.add_argument("--onnx", help="the exported model for --runtime onnx")
    args = parser.parse_args(argv)
    if args.scenario is None:
        for name in ("dataroot", "version"):
            if getattr(args, name) is None:
                parser.error(f"--{name} is required (or a --scenario that names the drive)")
        if args.scene is None and args.split is None:
            parser.error("one of --scene / --split is required (or a --scenario that names the drive)")
    if args.no_tracking and args.scenario:
        parser.error("--scenario needs the tracks (leave out --no-tracking)")
    for name in ("every_k_sweeps",):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_frames is not None and args.max_frames < 1:
        parser.error("--max-frames must be >= 1")
    if args.png_every < 0:
        parser.error("--png-every must be >= 0")
    if args.runtime == "onnx" and not args.onnx:
        parser.error("--runtime onnx needs --onnx FILE")
    return args


def open_recorders(rerun_path: Path | None, mcap_path: Path | None) -> list:
    """The recording sinks asked for; ValueError naming the option when one cannot be opened."""
    recorders = []
    for option, path, module, cls in (("--rerun", rerun_path, "fusion.replay.rerun_sink", "RerunSink"),
                                      ("--mcap", mcap_path, "fusion.replay.mcap_sink", "McapSink")):
        if path is None:
            continue
        try:
            recorders.append(getattr(importlib.import_module(module), cls)(path))
        except (ImportError, OSError) as error:
            for recorder in recorders:
                recorder.close()
            if isinstance(error, ImportError):
                raise ValueError(f"{option} needs the packages of requirements.txt ({error})") from None
            raise ValueError(f"{option} {path}: cannot write it ({error.strerror or error})") from None
    return recorders


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from fusion.checkpoint_allowlist import ClassAllowList
    from fusion.checkpoints import load_run
    from fusion.datasets.nuscenes_tables import open_nuscenes
    from fusion.replay import SyncPolicy, engine_for_scene, first_scene_of_split, run_replay
    from fusion.scenarios import load_scenario

    scenario = None
    try:
        if args.scenario is not None:
            scenario = load_scenario(args.scenario)
            args.dataroot = args.dataroot or scenario.drive.dataroot
            args.version = args.version or scenario.drive.version
            if args.scene is None and args.split is None:
                args.scene = scenario.drive.scene
        dataroot, checkpoint = Path(args.dataroot), Path(args.checkpoint)
        if not (dataroot / args.version).is_dir():
            raise FileNotFoundError(f"--dataroot {dataroot} has no table folder {args.version!r}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        started = time.perf_counter()
        model_overrides = {} if args.score_threshold is None else {"score_threshold": args.score_threshold}
        run = load_run(checkpoint, args.config, dataroot=dataroot, version=args.version,
                       model_overrides=model_overrides, allowed_classes=ClassAllowList.with_names(args.allow_class),
                       cache_dir=str(args.cache_dir or Path(args.out) / "cache"))
        model, data = run.model.to(device).eval(), run.data
        if model.temporal is not None:
            model.temporal.reset()
        detector = model
        if args.runtime == "onnx":
            from fusion.deploy.runtime import OnnxDetector

            detector = OnnxDetector(args.onnx, score_threshold=args.score_threshold)
            if detector.modalities != model.modalities or detector.grid != model.grid:
                raise ValueError(f"--onnx {args.onnx} was exported from another model than {checkpoint}")
            device = "cpu (onnxruntime)"
        nusc = open_nuscenes(str(dataroot), args.version)
        scene = args.scene or first_scene_of_split(nusc, args.split)
        policy = SyncPolicy(
            every_k_sweeps=args.every_k_sweeps, keyframes_only=args.keyframes_only,
            lidar_sweeps=args.lidar_sweeps if args.lidar_sweeps is not None else
            (data.lidar_sweeps if "lidar" in data.modalities else 0),
            lidar_sweep_stride=data.lidar_sweep_stride,
            radar_sweeps=args.radar_sweeps if args.radar_sweeps is not None else
            (data.radar_sweeps if "radar" in data.modalities else 1),
            camera_tolerance_s=args.camera_tolerance_ms / 1e3, radar_tolerance_s=args.radar_tolerance_ms / 1e3,
            wait_s=args.sync_wait_ms / 1e3, max_sweep_age_s=args.max_age_ms / 1e3)
        engine_options = {"tracker": None} if args.no_tracking else {}
        engine = engine_for_scene(nusc, scene, detector, data, policy, rate=args.rate,
                                  max_lag_s=args.max_lag_ms / 1e3, contributions=not args.no_contributions,
                                  **engine_options)
        recorders = open_recorders(args.rerun, args.mcap)
    except (FileNotFoundError, ValueError) as error:  # ScenarioError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"replaying {scene} of {dataroot}/{args.version} at rate {args.rate or 'max'} on {device} "
          f"(setup {time.perf_counter() - started:.1f} s)")
    summary, outputs = run_replay(
        engine, args.out, model.grid, max_frames=args.max_frames, video=args.video, png_every=args.png_every,
        contributions=not args.no_contributions,
        extra_summary={"checkpoint": str(checkpoint), "config": args.config, "dataroot": str(dataroot),
                       "version": args.version, "device": device, "runtime": args.runtime, "onnx": args.onnx},
        recorders=recorders)
    frames, latency = summary["frames"], summary["latency_ms"]
    print(f"frames: {frames['processed']} processed, {frames['dropped']} dropped, {frames['late']} late "
          f"({frames['failed']} failed) in {summary['wall_time_s']:.1f} s for {summary['stream_seconds']:.1f} s "
          f"of drive")
    if latency["count"]:
        print(f"latency ms: p50 {latency['p50']:.1f}  p95 {latency['p95']:.1f}  p99 {latency['p99']:.1f}")
    problems = {channel: {k: v for k, v in counts.items() if k in ("corrupt", "missing_file", "out_of_order", "late")
                          and v} for channel, counts in summary["messages"].items()}
    problems = {channel: counts for channel, counts in problems.items() if counts}
    if problems:
        print(f"messages skipped as bad: {problems}")
    if summary.get("faults"):
        print(f"faults counted and skipped, by kind: {summary['faults']}")
    print(f"detections: {outputs.detections}")
    print(f"summary:    {outputs.summary}")
    if outputs.frames_dir is not None:
        print(f"pictures:   {outputs.frames_dir}/")
    if outputs.video is not None:
        print(f"video:      {outputs.video} ({summary['video']['frames']} frames)")
    for name, path in (outputs.recordings or {}).items():
        print(f"{name + ':':<11} {path} (written in {summary['recording_s'][name]:.1f} s, not counted in latency)")
    if scenario is not None:
        return judge(scenario, scene, nusc, summary, outputs, args)
    return 0


def judge(scenario, scene: str, nusc, summary: dict, outputs, args: argparse.Namespace) -> int:
    """Print the scenario's pass/fail table and write its JUnit XML; 0 when every criterion passed, 3 when one
    failed, 2 when the scenario does not fit the drive."""
    import dataclasses

    from fusion.scenarios import Drive, ScenarioError, format_table, judge_scenario, read_records, write_junit

    scenario = dataclasses.replace(scenario, drive=Drive(str(args.dataroot), args.version, scene))  # as replayed
    try:
        verdicts = judge_scenario(scenario, read_records(outputs.detections), summary, nusc, scene)
    except ScenarioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(scenario, verdicts, scene))
    junit = write_junit(scenario, verdicts, args.junit or Path(args.out) / "scenario_junit.xml",
                        seconds=summary["wall_time_s"], scene=scene)
    print(f"junit:      {junit}")
    return 0 if all(v.passed for v in verdicts) else 3


if __name__ == "__main__":
    sys.exit(main())
