"""Reader benchmark: our nuScenes reader against nuscenes-devkit on the same samples.

    python tools/benchmark.py reader --dataroot DIR --version V --split S [--samples N] [--repeats R] [--json FILE]

Per sample, devkit and ours interleaved, files warm in the page cache (one untimed pass first), --repeats times.
Three figures each: the median wall time, the best wall time (the least disturbed by other processes), and the
median CPU time of this process (all its threads; robust to waiting on a busy machine, but it counts BLAS threads'
spinning):
- lidar: `LidarPointCloud.from_file_multisweep(nusc, sample, 'LIDAR_TOP', 'LIDAR_TOP', nsweeps=N+1)` against
  `SampleBuilder.load_lidar` (including making the messages from our index). Checks the points are equal after
  expressing the devkit's in the ego frame (max |diff| <= 1e-4 m) and fails otherwise.
- radar_file: `RadarPointCloud.from_file` against `read_radar_pcd` on each keyframe radar file (exact equality checked),
  and on the two real 125-point radar files of ../shared/nuscenes-real when present.
- radar_sweeps: the devkit's `RadarPointCloud.from_file_multisweep` for the five radars (M sweeps) against
  `SampleBuilder.load_radar` (which also rotates the velocities into the ego frame).
- sample: a whole `Sample` (`dataset[i]`: LiDAR, radar, six JPEGs, map crop, boxes) at full image size and, with
  --decode-size, with JPEG DCT-scaled decoding. (The devkit has no single call for this.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np


def _real_root() -> Path:
    """The real nuScenes files (their radar_split_unknown/ .pcd files are timed too): $NUSCENES_REAL, else
    ../shared/nuscenes-real next to the repository (when it does not exist, no real files are timed)."""
    if os.environ.get("NUSCENES_REAL"):
        return Path(os.environ["NUSCENES_REAL"])
    return Path(__file__).resolve().parents[2].parent / "shared" / "nuscenes-real"


def _median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    walls, cpus = [w for w, _ in samples], [c for _, c in samples]
    return {"wall_median_ms": _median_ms(walls), "wall_min_ms": 1e3 * min(walls), "cpu_median_ms": _median_ms(cpus)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py reader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataroot", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--split", required=True)
    parser.add_argument("--samples", type=int, default=20, help="number of keyframes (spread over the split)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lidar-sweeps", type=int, default=9)
    parser.add_argument("--radar-sweeps", type=int, default=6)
    parser.add_argument("--decode-size", default="",
                        help="WxH: also time whole Samples with JPEGs decoded at least this large (DCT scaling)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud
    from nuscenes.utils.geometry_utils import transform_matrix
    from pyquaternion import Quaternion

    from fusion.datasets.io import RadarFilters, read_radar_pcd
    from fusion.datasets.nuscenes import NuScenesDataset
    from fusion.grid import BEVGrid
    from fusion.types import LIDAR_NAME, RADAR_NAMES

    grid = BEVGrid()
    start = time.perf_counter()
    dataset = NuScenesDataset(args.dataroot, args.version, args.split, grid=grid, lidar_sweeps=args.lidar_sweeps,
                              radar_sweeps=args.radar_sweeps)
    index_seconds = time.perf_counter() - start
    nusc = NuScenes(args.version, args.dataroot, verbose=False)
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(args.samples, len(dataset))).round().astype(int))
    builder = dataset.builder
    decode = tuple(int(v) for v in args.decode_size.lower().split("x")) if args.decode_size else None
    decoded = None
    if decode:
        decoded = NuScenesDataset(args.dataroot, args.version, args.split, grid=grid, lidar_sweeps=args.lidar_sweeps,
                                  radar_sweeps=args.radar_sweeps, camera_decode_size=decode)

    def ours_lidar(i):
        messages = dataset.messages(i, sensors=("lidar",))
        return builder.load_lidar(messages["keyframe_lidar"], messages["lidar_sweeps"])[0]

    def devkit_lidar(record):
        return LidarPointCloud.from_file_multisweep(nusc, record, LIDAR_NAME, LIDAR_NAME,
                                                    nsweeps=args.lidar_sweeps + 1)

    def ours_radar(i):
        messages = dataset.messages(i, sensors=("radar",))
        return builder.load_radar(messages["keyframe_lidar"], messages["radar_messages"])[0]

    def devkit_radar(record):
        return [RadarPointCloud.from_file_multisweep(nusc, record, channel, LIDAR_NAME, nsweeps=args.radar_sweeps)
                for channel in RADAR_NAMES]

    timings: dict[str, dict[str, list]] = {k: {"devkit": [], "ours": []} for k in ("lidar", "radar_file",
                                                                                    "radar_sweeps", "radar_real")}
    real_radar = sorted(str(p) for p in (_real_root() / "radar_split_unknown").glob("*/*.pcd"))
    for path in real_radar:
        if not np.array_equal(read_radar_pcd(path, RadarFilters()).T, RadarPointCloud.from_file(path).points):
            raise SystemExit(f"{path}: our radar parse differs from the devkit's")
        for _ in range(args.repeats * 10):
            timings["radar_real"]["devkit"].append(_timed(lambda: RadarPointCloud.from_file(path)))
            timings["radar_real"]["ours"].append(_timed(lambda: read_radar_pcd(path, RadarFilters())))
    sample_times, decoded_times = [], []
    max_diff, points, radar_points, radar_files, radar_points_per_file = 0.0, [], [], 0, []
    for i in picks:
        token = str(dataset.index.sample_token[i])
        record = nusc.get("sample", token)
        sd = nusc.get("sample_data", record["data"][LIDAR_NAME])
        calib = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        lidar_to_ego = transform_matrix(calib["translation"], Quaternion(calib["rotation"]))
        radar_paths = [os.path.join(args.dataroot, nusc.get("sample_data", record["data"][c])["filename"])
                       for c in RADAR_NAMES if c in record["data"]]
        # untimed pass: warm the page cache, check equality
        (cloud, times), ours = devkit_lidar(record), ours_lidar(i)
        ego = lidar_to_ego[:3, :3] @ cloud.points[:3] + lidar_to_ego[:3, 3:4]
        if ours.shape[0] != ego.shape[1]:
            raise SystemExit(f"sample {token}: {ours.shape[0]} points, the devkit has {ego.shape[1]}")
        diff = float(np.abs(ours[:, :3].numpy() - ego.T).max(initial=0.0))
        diff = max(diff, float(np.abs(ours[:, 4].numpy() - times[0]).max(initial=0.0)))
        if diff > 1e-4 or not np.array_equal(ours[:, 3].numpy(), cloud.points[3]):
            raise SystemExit(f"sample {token}: our LiDAR differs from the devkit's by {diff} m")
        max_diff = max(max_diff, diff)
        points.append(len(ours))
        for path in radar_paths:
            if not np.array_equal(read_radar_pcd(path, RadarFilters()).T, RadarPointCloud.from_file(path).points):
                raise SystemExit(f"{path}: our radar parse differs from the devkit's")
            radar_points_per_file.append(len(read_radar_pcd(path)))
        radar_points.append(sum(c[0].points.shape[1] for c in devkit_radar(record)))
        ours_radar(i)
        dataset[i]
        if decoded is not None:
            decoded[i]
        for _ in range(args.repeats):
            timings["lidar"]["devkit"].append(_timed(lambda: devkit_lidar(record)))
            timings["lidar"]["ours"].append(_timed(lambda: ours_lidar(i)))
            for path in radar_paths:
                timings["radar_file"]["devkit"].append(_timed(lambda: RadarPointCloud.from_file(path)))
                timings["radar_file"]["ours"].append(_timed(lambda: read_radar_pcd(path, RadarFilters())))
            timings["radar_sweeps"]["devkit"].append(_timed(lambda: devkit_radar(record)))
            timings["radar_sweeps"]["ours"].append(_timed(lambda: ours_radar(i)))
            sample_times.append(_timed(lambda: dataset[i]))
            if decoded is not None:
                decoded_times.append(_timed(lambda: decoded[i]))
        radar_files += len(radar_paths)

    results = {
        "dataroot": os.path.abspath(args.dataroot), "version": args.version, "split": args.split,
        "samples": int(len(picks)), "repeats": args.repeats, "lidar_sweeps_per_sample": args.lidar_sweeps,
        "radar_sweeps_per_radar": args.radar_sweeps, "index_build_s": index_seconds,
        "mean_lidar_points": float(np.mean(points)), "mean_radar_points_devkit_frame": float(np.mean(radar_points)),
        "lidar_max_abs_diff_m": max_diff, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "image_size": list(dataset[int(picks[0])].cameras.images.shape[-2:]) if dataset.builder.cameras else None,
    }
    print(f"{len(picks)} samples x {args.repeats} repeats of {args.dataroot} ({args.version}, {args.split}); "
          f"index built in {index_seconds:.2f} s; {results['mean_lidar_points']:.0f} LiDAR points per sample "
          f"({args.lidar_sweeps} sweeps + keyframe), max |ours - devkit| = {max_diff:.2e} m")
    header = f"{'measure':<34}" + "".join(f"{h:>24}" for h in ("wall median ms", "wall best ms", "CPU median ms"))
    print(header)
    print(f"{'':<34}" + f"{'devkit / ours  (x)':>24}" * 3)
    radar_per_file = float(np.mean(radar_points_per_file)) if radar_points_per_file else 0.0
    for name, label in (("lidar", f"LiDAR keyframe + {args.lidar_sweeps} sweeps"),
                        ("radar_file", f"radar .pcd parse ({radar_per_file:.0f} pts/file)"),
                        ("radar_real", "real radar .pcd parse (125 pts)"),
                        ("radar_sweeps", f"radar 5 x {args.radar_sweeps} sweeps")):
        if not timings[name]["ours"]:
            continue
        devkit, ours = _summary(timings[name]["devkit"]), _summary(timings[name]["ours"])
        results[name] = {"devkit": devkit, "ours": ours,
                         "speedup": {k: devkit[k] / ours[k] for k in devkit}}
        cells = [f"{devkit[k]:.2f} / {ours[k]:.2f}  ({devkit[k] / ours[k]:.1f}x)" for k in devkit]
        print(f"{label:<34}" + "".join(f"{c:>24}" for c in cells))
    results["sample"] = _summary(sample_times)
    rows = [("whole Sample, full-size JPEGs", results["sample"])]
    if decoded_times:
        results["sample_decoded"] = _summary(decoded_times)
        results["decode_size"] = list(decode)
        rows.append((f"whole Sample, JPEG decode >= {args.decode_size}", results["sample_decoded"]))
    for label, summary in rows:
        print(f"{label:<34}" + "".join(f"{'ours ' + format(summary[k], '.1f'):>24}" for k in summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
