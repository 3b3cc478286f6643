"""Model speed and memory: inference frames/s and training samples/s on the CPU; end-to-end latency, peak memory and
a training step on a GPU.

    python tools/benchmark.py model --config configs/tiny_cpu.yaml [--dataroot DIR] [--threads 2]
    python tools/benchmark.py model --device cuda --config configs/nuscenes.yaml [--dataroot DIR]

--config may be repeated (a base config, then an ablation overlay). Samples come from the config's dataroot (or
--dataroot) through the FusionDataModule's validation pipeline when it exists, else from a built-in generator of
well-formed random samples at the config's grid / image size / sweep counts (a ring-structured LiDAR cloud: 32 beams,
~34k points per sweep, dense near and sparse far; radar returns; uint8 images). Samples are loaded before timing, so
the figures are the model's; data loading (reader + transforms, one process) is timed separately.

CPU (always): inference at batch 1 (forward + box decoding, eval mode, no grad) in frames/s, training (forward,
loss, backward, AdamW step) at the config's batch size in samples/s, and the process's peak resident memory.
CUDA (--device cuda): end-to-end latency at batch 1 from raw points and uint8 images in host memory to decoded boxes
(host-to-device copy, voxelization and every branch included), with mixed precision (autocast bf16, or fp16 where
bf16 is unsupported), p50/p90 over the timed iterations, and peak GPU memory; then a training step at batch 4 with
the same mixed precision (forward, loss, backward, AdamW step) and its peak memory.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fusion.datasets.collate import collate_samples
from fusion.grid import BEVGrid
from fusion.checkpoints import load_run
from fusion.module import FusionDetector
from fusion.types import CAMERA_NAMES, Boxes, CameraImages, EgoState, Sample


# ------------------------------------------------------------------------------------------------ inputs
def _merged_config(paths: list[str]) -> dict:
    import yaml

    from fusion.checkpoints import merge_config

    merged: dict = {}
    for path in paths:
        with open(path) as f:
            merged = merge_config(merged, yaml.safe_load(f) or {})
    return merged


def ring_lidar(rng: np.random.Generator, sweeps: int, points_per_sweep: int = 34_000,
               speed_mps: float = 8.0) -> np.ndarray:
    """A LiDAR-like cloud [N, 5] (x, y, z, intensity, time_lag) in the ego frame: 32 beams from +10 to -30 degrees at
    1.8 m height; downward beams hit the ground (dense near, sparse far), the others hit walls/objects at 5-70 m.
    Earlier sweeps are shifted back by the ego motion (20 Hz)."""
    beams = 32
    azimuths = points_per_sweep // beams
    elevation = np.deg2rad(np.linspace(10.0, -30.0, beams))
    clouds = []
    for sweep in range(sweeps + 1):
        az = np.linspace(-np.pi, np.pi, azimuths, endpoint=False) + rng.uniform(0, 2 * np.pi / azimuths)
        el, az = np.meshgrid(elevation, az, indexing="ij")
        ground = np.where(el < -0.02, 1.8 / np.tan(np.clip(-el, 0.02, None)), np.inf)
        obstacle = rng.uniform(5.0, 70.0, el.shape)
        hit = np.minimum(ground, obstacle) * (1 + rng.normal(0, 0.002, el.shape))
        keep = (hit < 90.0) & (rng.random(el.shape) > 0.05)  # range limit and dropouts
        r = hit[keep]
        x = r * np.cos(el[keep]) * np.cos(az[keep])
        y = r * np.cos(el[keep]) * np.sin(az[keep])
        z = 1.8 + r * np.sin(el[keep])
        lag = sweep * 0.05
        x = x - speed_mps * lag
        clouds.append(np.c_[x, y, z, rng.uniform(0, 255, r.shape), np.full(r.shape, lag)])
    return np.concatenate(clouds).astype(np.float32)


def random_sample(index: int, grid: BEVGrid, image_size: tuple[int, int], lidar_sweeps: int, radar_sweeps: int,
                  seed: int = 0) -> Sample:
    """A well-formed random Sample with every sensor (see the module docstring)."""
    rng = np.random.default_rng(seed + index)
    height, width = image_size
    intrinsics, poses = [], []
    for yaw in np.deg2rad([0, -55, 55, 180, 110, -110]):
        intrinsics.append([[width * 0.55, 0, width / 2], [0, width * 0.55, height / 2], [0, 0, 1]])
        pose = np.eye(4)
        pose[:3, :3] = np.array([[math.sin(yaw), -math.cos(yaw), 0.0], [0.0, 0.0, -1.0],
                                 [math.cos(yaw), math.sin(yaw), 0.0]]).T
        pose[:3, 3] = [1.0, 0.0, 1.6]
        poses.append(pose)
    cameras = CameraImages(torch.from_numpy(rng.integers(0, 256, (6, 3, height, width), dtype=np.uint8)),
                           torch.tensor(np.array(intrinsics), dtype=torch.float32),
                           torch.tensor(np.array(poses), dtype=torch.float32), torch.ones(6, dtype=torch.bool),
                           torch.zeros(6), CAMERA_NAMES)
    radar_points = 5 * radar_sweeps * 40
    radar = np.c_[rng.uniform(-60, 60, (radar_points, 2)), rng.uniform(-1, 2, radar_points),
                  rng.uniform(-10, 20, radar_points), rng.normal(0, 5, (radar_points, 2)),
                  rng.integers(0, 7, radar_points), rng.integers(0, radar_sweeps, radar_points) * 0.077]
    num_boxes = 30
    boxes = Boxes(torch.tensor(np.c_[rng.uniform(-45, 45, (num_boxes, 2)), rng.uniform(-1, 1, num_boxes)],
                               dtype=torch.float32),
                  torch.tensor(rng.uniform([0.5, 0.5, 1.0], [5.0, 2.5, 2.0], (num_boxes, 3)), dtype=torch.float32),
                  torch.tensor(rng.uniform(-np.pi, np.pi, num_boxes), dtype=torch.float32),
                  torch.tensor(rng.normal(0, 3, (num_boxes, 2)), dtype=torch.float32),
                  torch.tensor(rng.integers(0, 10, num_boxes)), torch.full((num_boxes,), -1),
                  torch.ones(num_boxes), torch.full((num_boxes,), 10), torch.full((num_boxes,), 1))
    ego = EgoState(torch.eye(4, dtype=torch.float64), torch.tensor(8.0), torch.tensor(0.05),
                   torch.tensor([0.3, 0.0, 0.0]), torch.tensor(True))
    return Sample(token=f"bench{index:06d}", scene_name="scene-9999", timestamp_us=index * 500_000,
                  lidar=torch.from_numpy(ring_lidar(rng, lidar_sweeps)),
                  radar=torch.tensor(radar, dtype=torch.float32), cameras=cameras, ego=ego,
                  map_raster=torch.from_numpy((rng.random((1, *grid.shape)) > 0.5).astype(np.float32)), boxes=boxes)


def load_samples(config: dict, model: FusionDetector, count: int, dataroot: str | None
                 ) -> tuple[list[Sample], str, float | None]:
    """(samples, where they came from, data-loading samples/s or None)."""
    data = dict(config.get("data") or {})
    if dataroot:
        data["dataroot"] = dataroot
    image_size = tuple(data.get("image_size", (256, 704)))
    lidar_sweeps, radar_sweeps = int(data.get("lidar_sweeps", 9)), int(data.get("radar_sweeps", 6))
    root = data.get("dataroot")
    if root and Path(root).is_dir():
        from fusion.datasets.datamodule import FusionDataModule

        data.pop("grid", None)
        data["modalities"] = list(model.modalities)
        module = FusionDataModule(grid=model.grid, **data)
        dataset = module.make_dataset(module.val_split, train=False)
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        try:
            start = time.perf_counter()
            samples = [dataset[i % len(dataset)] for i in range(count)]
            elapsed = time.perf_counter() - start
        finally:
            torch.set_num_threads(previous)
        return samples, f"{root} ({module.val_split})", count / elapsed
    samples = [random_sample(i, model.grid, image_size, lidar_sweeps, radar_sweeps) for i in range(count)]
    return samples, f"random samples (image {image_size[0]}x{image_size[1]}, {lidar_sweeps} LiDAR sweeps)", None


# ------------------------------------------------------------------------------------------------ timing
def _cpu_inference(model: FusionDetector, samples: list[Sample], warmup: int, iterations: int) -> list[float]:
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + iterations):
            batch = collate_samples([samples[i % len(samples)]])
            start = time.perf_counter()
            model.predict_boxes(batch)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def _train_step(model: FusionDetector, optimizer, batch, autocast: dict | None = None) -> float:
    optimizer.zero_grad(set_to_none=True)
    if autocast:
        with torch.autocast(**autocast):
            losses, _ = model.compute_losses(batch)
    else:
        losses, _ = model.compute_losses(batch)
    losses["loss"].backward()
    optimizer.step()
    return float(losses["loss"].detach())


def _cpu_training(model: FusionDetector, samples: list[Sample], batch_size: int, warmup: int, iterations: int
                  ) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + iterations):
        chosen = [samples[(i * batch_size + k) % len(samples)] for k in range(batch_size)]
        batch = collate_samples(chosen)
        start = time.perf_counter()
        _train_step(model, optimizer, batch)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _cuda_benchmark(model: FusionDetector, samples: list[Sample], warmup: int, iterations: int,
                    train_batch_size: int) -> dict:
    device = torch.device("cuda")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    autocast = dict(device_type="cuda", dtype=dtype)
    model = model.to(device).eval()
    batches = [collate_samples([s]) for s in samples]  # raw points / uint8 images in host memory
    for batch in batches:
        batch.lidar_points = batch.lidar_points.pin_memory()
        if batch.cameras is not None:
            batch.cameras.images = batch.cameras.images.pin_memory()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    latencies = []
    with torch.no_grad(), torch.autocast(**autocast):
        for i in range(warmup + iterations):
            batch = batches[i % len(batches)]
            torch.cuda.synchronize()
            start = time.perf_counter()
            boxes = model.predict_boxes(batch)  # copies the batch to the GPU, runs the model, decodes
            torch.cuda.synchronize()
            if i >= warmup:
                latencies.append(time.perf_counter() - start)
    inference_peak = torch.cuda.max_memory_allocated()
    result = {
        "precision": str(dtype).replace("torch.", ""),
        "latency_ms_p50": 1000 * statistics.median(latencies),
        "latency_ms_p90": 1000 * float(np.percentile(latencies, 90)),
        "latency_ms_mean": 1000 * statistics.fmean(latencies),
        "inference_peak_memory_gib": inference_peak / 2 ** 30,
        "boxes_last_frame": len(boxes[0]),
        "gpu": torch.cuda.get_device_name(device),
    }
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    steps = []
    for i in range(max(3, warmup // 2) + iterations // 2):
        chosen = [samples[(i * train_batch_size + k) % len(samples)] for k in range(train_batch_size)]
        batch = collate_samples(chosen).to(device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        _train_step(model, optimizer, batch, autocast)
        torch.cuda.synchronize()
        if i >= max(3, warmup // 2):
            steps.append(time.perf_counter() - start)
    result.update({
        "train_batch_size": train_batch_size,
        "train_step_ms_p50": 1000 * statistics.median(steps),
        "train_samples_per_s": train_batch_size / statistics.median(steps),
        "train_peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
    })
    return result


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True,
                        help="YAML config (repeat for overlays, in order)")
    parser.add_argument("--dataroot", help="override the config's data.dataroot (random samples if it does not exist)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--samples", type=int, default=16, help="distinct samples to cycle through")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20, help="timed frames (inference) / steps (training)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="training batch size (default: the config's data.batch_size on CPU, 4 on CUDA)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for path in args.config:
        if not Path(path).is_file():
            parser.error(f"config file not found: {path}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch has no usable CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = _merged_config(args.config)
    model = load_run(config=args.config).model
    samples, source, loading = load_samples(config, model, args.samples, args.dataroot)
    parameters = sum(p.numel() for p in model.parameters())
    results: dict = {"config": args.config, "device": args.device, "samples": source, "parameters": parameters,
                     "threads": torch.get_num_threads(), "modalities": list(model.modalities),
                     "grid": [model.grid.height, model.grid.width, model.grid.cell_size]}
    if loading is not None:
        results["data_loading_samples_per_s_one_process"] = loading
    print(f"model: {', '.join(model.modalities)} | {parameters / 1e6:.2f} M parameters | grid "
          f"{model.grid.height}x{model.grid.width} at {model.grid.cell_size} m | samples: {source}")
    if args.device == "cpu":
        batch_size = args.batch_size or int((config.get("data") or {}).get("batch_size", 4))
        inference = _cpu_inference(model, samples, args.warmup, args.iterations)
        training = _cpu_training(model, samples, batch_size, max(1, args.warmup // 2), max(3, args.iterations // 2))
        import resource

        results.update({
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "inference_frames_per_s": 1.0 / statistics.median(inference),
            "inference_ms_p50": 1000 * statistics.median(inference),
            "train_batch_size": batch_size,
            "train_samples_per_s": batch_size / statistics.median(training),
            "train_step_ms_p50": 1000 * statistics.median(training),
        })
        print(f"CPU ({torch.get_num_threads()} threads)")
        print(f"  inference, batch 1 (forward + decode): {results['inference_frames_per_s']:8.2f} frames/s "
              f"({results['inference_ms_p50']:.0f} ms p50 over {len(inference)} frames)")
        print(f"  training, batch {batch_size} (fwd + loss + bwd + AdamW): {results['train_samples_per_s']:8.2f} "
              f"samples/s ({results['train_step_ms_p50']:.0f} ms per step p50 over {len(training)} steps)")
        print(f"  peak resident memory of the process: {results['peak_rss_gib']:.2f} GiB")
    else:
        cuda = _cuda_benchmark(model, samples, max(args.warmup, 10), max(args.iterations, 50), args.batch_size or 4)
        results.update(cuda)
        print(f"CUDA ({cuda['gpu']}, autocast {cuda['precision']})")
        print(f"  end to end, batch 1 (host points/images -> boxes): {cuda['latency_ms_p50']:.1f} ms p50, "
              f"{cuda['latency_ms_p90']:.1f} ms p90; peak memory {cuda['inference_peak_memory_gib']:.2f} GiB")
        print(f"  training step, batch {cuda['train_batch_size']}: {cuda['train_step_ms_p50']:.0f} ms p50 "
              f"({cuda['train_samples_per_s']:.1f} samples/s); peak memory {cuda['train_peak_memory_gib']:.2f} GiB")
    if loading is not None:
        print(f"  data loading (reader + transforms, 1 process, 1 thread): {loading:.1f} samples/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"figures written to {args.json}")
    return 0
