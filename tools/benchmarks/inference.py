"""Inference latency per stage and end to end, batch 1, on the CPU: PyTorch eager, torch.compile and onnxruntime.

    python tools/benchmark.py inference [--config configs/tiny_cpu.yaml] [--runtime eager compile onnx]
        [--iterations 20] [--threads 2] [--json FILE]

Each runtime runs in its own process (so its peak resident memory is its own) on the same samples: the config's
validation data when its dataroot exists, else the generated samples of `benchmark.py model` (random_sample), with
untrained weights (seeded). Stages, milliseconds per frame (median over the timed frames):
    load      reader + transforms of one sample from disk (shared code, the same for every runtime; only with a
              dataroot), then `prepare`: collate (+ graph inputs for onnxruntime)
    voxelize  the points' pillar / voxel indices (part of the LiDAR and radar stages, shown on its own)
    camera / lidar / radar / gps   each branch, fuser, head, decode (the shared decode_boxes and, when the model
              has point_motion, the velocity measurement from the points: fusion.heads.point_motion)
    e2e       prepare + model + decode, timed as one call (p50 and p95), not the sum of the stages.
Stages are CPU time of the process (time.process_time, all threads): on a machine shared with other jobs, wall
time mostly measures waiting for a core; e2e is given both as CPU time and as wall time.
eager: FusionDetector as trained, each stage timed on its own call. compile: torch.compile of each branch, the
fuser and the head (inductor, default mode; the data-dependent parts of the pillar / camera pooling break the graph
there), the same stage calls. onnxruntime: the file of tools/export.py (CPU execution provider); stages from
onnxruntime's per-node profile, attributed by the node names (/camera/..., /lidar/pillars/voxelize/..., /fuser/...):
each stage gets its share of the profiled node time times the graph's measured CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RUNTIMES = ("eager", "compile", "onnx")
STAGES = ("prepare", "voxelize", "camera", "lidar", "radar", "gps", "fuser", "head", "decode")


def _ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def _timed(fn, store: dict[str, list[float]], stage: str):
    """fn() with its CPU time (this process, all threads; seconds) appended to store[stage]."""
    start = time.process_time()
    result = fn()
    store.setdefault(stage, []).append(time.process_time() - start)
    return result


class _Frame:
    """Wall-clock and CPU time of one frame, appended to the e2e lists on exit."""

    def __init__(self, wall: list[float], cpu: list[float], keep: bool = True):
        self.wall, self.cpu, self.keep = wall, cpu, keep

    def __enter__(self):
        self.start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc):
        if self.keep:
            self.wall.append(time.perf_counter() - self.start[0])
            self.cpu.append(time.process_time() - self.start[1])


def _voxelize_fn(branch, batch):
    """The voxelization step of a LiDAR / radar branch on this batch, as a callable (None for other branches)."""
    from fusion.branches.lidar import LidarBranch
    from fusion.cuda_ops import dynamic_voxelize

    if isinstance(branch, LidarBranch):
        return lambda: branch.voxelize(batch)
    pillars = getattr(branch, "pillars", None)
    if pillars is None:
        return None
    points = batch.lidar_points if branch.modality == "lidar" else batch.radar_points
    xyz = points[:, :3].float().contiguous()
    return lambda: dynamic_voxelize(xyz, pillars.voxel_size, pillars.point_range)


def _torch_runtime(model, samples, warmup: int, iterations: int, compiled: bool) -> dict:
    from fusion.datasets.collate import collate_samples

    model.eval()
    branches = dict(model.branches.items())
    fuser, head = model.fuser, model.head
    if compiled:
        branches = {name: torch.compile(branch) for name, branch in branches.items()}
        fuser, head = torch.compile(fuser), torch.compile(head)

    def forward(batch, stages):
        masks = {name: batch.present[name] for name in branches}
        features = {name: _timed(lambda b=b: b(batch), stages, name) for name, b in branches.items()}
        fused, _ = _timed(lambda: fuser(features, masks), stages, "fuser")
        output = _timed(lambda: head(fused), stages, "head")
        return _timed(lambda: model.decode(output, batch=batch), stages, "decode")

    stages: dict[str, list[float]] = {}
    wall, cpu = [], []
    compile_s = None
    with torch.no_grad():
        start = time.perf_counter()
        for i in range(warmup):
            forward(collate_samples([samples[i % len(samples)]]), {})
        if compiled:
            compile_s = time.perf_counter() - start
        for i in range(iterations):
            sample = samples[i % len(samples)]
            with _Frame(wall, cpu):
                batch = _timed(lambda: collate_samples([sample]), stages, "prepare")
                forward(batch, stages)
            for name, branch in model.branches.items():
                voxelize = _voxelize_fn(branch, batch)
                if voxelize is not None:
                    _timed(voxelize, stages, f"voxelize_{name}")
    result = {"stages_ms": {k: _ms(v) for k, v in stages.items() if not k.startswith("voxelize_")}, "wall": wall,
              "cpu": cpu}
    voxelize = [k for k in stages if k.startswith("voxelize_")]
    if voxelize:
        result["stages_ms"]["voxelize"] = sum(_ms(stages[k]) for k in voxelize)
    if compile_s is not None:
        result["warmup_with_compilation_s"] = compile_s
    return result


def _stage_of(node_name: str) -> str | None:
    """The stage of an onnxruntime profile node from its exported name (/lidar/pillars/voxelize/..., /fuser/...)."""
    parts = node_name.strip("/").split("/")
    if len(parts) >= 3 and parts[1] == "pillars" and parts[2] == "voxelize":
        return f"voxelize_{parts[0]}"
    return parts[0] if parts and parts[0] in STAGES else None


def _onnx_runtime(model, samples, warmup: int, iterations: int, threads: int, out_dir: Path,
                  providers: list[str] | None = None) -> dict:
    from fusion.datasets.collate import collate_samples
    from fusion.deploy import inputs as shared
    from fusion.deploy.export import example_batch, export_onnx, export_spec
    from fusion.deploy.runtime import OnnxDetector

    first = samples[0]
    image_size = tuple(first.cameras.images.shape[-2:]) if first.cameras is not None else None
    count = int(first.cameras.images.shape[0]) if first.cameras is not None else 6
    spec = export_spec(model, image_size, count)
    path = export_onnx(model, spec, example_batch(spec), out_dir / "model.onnx")
    stages: dict[str, list[float]] = {}
    wall, cpu = [], []
    detector = OnnxDetector(path, providers=providers, threads=threads)
    for i in range(warmup + iterations):
        sample = samples[i % len(samples)]
        timed = stages if i >= warmup else {}
        with _Frame(wall, cpu, keep=i >= warmup):
            batch = _timed(lambda: collate_samples([sample]), timed, "prepare")
            feeds = _timed(lambda: {name: t.numpy() for name, t in shared.graph_inputs(batch, spec).items()}, timed,
                           "prepare_inputs")
            values = _timed(lambda: detector.session.run(spec.outputs, feeds), timed, "graph")
            outputs = {name: torch.from_numpy(v) for name, v in zip(spec.outputs, values)}
            _timed(lambda: shared.decode(shared.head_output(outputs), spec, batch=batch), timed, "decode")
    stages["prepare"] = [a + b for a, b in zip(stages.pop("prepare"), stages.pop("prepare_inputs"))]
    result = {"stages_ms": {k: _ms(v) for k, v in stages.items()}, "wall": wall, "cpu": cpu,
              "onnx_file_mib": path.stat().st_size / 2 ** 20, "providers": detector.session.get_providers()}
    # Per-node profile in a second session: stage totals per frame.
    profiler = OnnxDetector(path, providers=providers, threads=threads, profile=True)
    for i in range(iterations):
        profiler.run(collate_samples([samples[i % len(samples)]]))
    profile = Path(profiler.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        stage = _stage_of(event["name"][: -len("_kernel_time")]) or "other"
        totals[stage] = totals.get(stage, 0.0) + event["dur"] / 1000.0 / iterations
    # Node times are wall-clock and inflated alike on a loaded machine: each stage gets its share of the graph's
    # measured CPU time. A branch's figure includes its voxelization, shown on its own as well (as for PyTorch).
    node_total = sum(totals.values())
    shares = {stage: value / node_total for stage, value in totals.items()}
    for branch in ("lidar", "radar"):
        if f"voxelize_{branch}" in shares:
            shares[branch] = shares.get(branch, 0.0) + shares[f"voxelize_{branch}"]
            shares["voxelize"] = shares.get("voxelize", 0.0) + shares.pop(f"voxelize_{branch}")
    result["profile_share"] = shares
    result["profile_ms"] = {stage: share * result["stages_ms"]["graph"] for stage, share in shares.items()}
    return result


def run_one(runtime: str, config: list[str], dataroot: str | None, warmup: int, iterations: int, samples_count: int,
            threads: int, providers: list[str] | None = None) -> dict:
    """The figures of one runtime in this process."""
    from fusion.checkpoints import load_run
    from tools.benchmarks.model import _merged_config, load_samples

    torch.manual_seed(0)
    model = load_run(config=config if len(config) > 1 else config[0]).model.eval()
    samples, source, loading = load_samples(_merged_config(config), model, samples_count, dataroot)
    result = {"runtime": runtime, "config": config, "samples": source, "threads": threads,
              "load_ms": 1000.0 / loading if loading else None}
    if runtime == "onnx":
        from fusion.deploy.spec import UnsupportedExport

        try:
            with tempfile.TemporaryDirectory() as folder:
                result.update(_onnx_runtime(model, samples, warmup, iterations, threads, Path(folder), providers))
        except UnsupportedExport as error:
            result["refused"] = f"export refused: {error}"
            return result
    else:
        result.update(_torch_runtime(model, samples, warmup, iterations, compiled=runtime == "compile"))
    wall, cpu = result.pop("wall"), result.pop("cpu")
    result.update(e2e_ms_p50=_ms(wall), e2e_ms_p95=1000.0 * float(np.percentile(wall, 95)), frames=len(wall),
                  e2e_cpu_ms_p50=_ms(cpu), e2e_cpu_ms_p95=1000.0 * float(np.percentile(cpu, 95)),
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def table(results: list[dict]) -> str:
    """A markdown table: one row per runtime, CPU ms per stage, e2e CPU p50 / p95 and wall p50 / p95, peak RSS."""
    columns = ["load", "prepare", "voxelize", "camera", "lidar", "radar", "gps", "fuser", "head", "decode"]
    lines = ["| runtime | " + " | ".join(columns) + " | e2e CPU p50 / p95 | e2e wall p50 / p95 | peak RSS MiB |",
             "|---" * (len(columns) + 4) + "|"]
    for r in results:
        if "refused" in r:
            lines.append(f"| {r['runtime']} | {r['refused']} |")
            continue
        stages = {**r["stages_ms"], **r.get("profile_ms", {})}
        cells = [f"{r['load_ms']:.1f}" if r.get("load_ms") else "-"]
        cells += [f"{stages[c]:.1f}" if c in stages else "-" for c in columns[1:]]
        lines.append(f"| {r['runtime']} | " + " | ".join(cells) + f" | {r['e2e_cpu_ms_p50']:.1f} / "
                     f"{r['e2e_cpu_ms_p95']:.1f} | {r['e2e_ms_p50']:.1f} / {r['e2e_ms_p95']:.1f} "
                     f"| {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=None,
                        help="YAML config (repeat for overlays; default configs/tiny_cpu.yaml)")
    parser.add_argument("--dataroot", help="override the config's data.dataroot (generated samples if absent)")
    parser.add_argument("--runtime", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4, help="distinct samples to cycle through")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--providers", nargs="+", default=None,
                        help="onnxruntime execution providers in order (default CPUExecutionProvider; with "
                        "onnxruntime-gpu: TensorrtExecutionProvider CUDAExecutionProvider CPUExecutionProvider)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per runtime (compilation included)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = args.config or ["configs/tiny_cpu.yaml"]
    for path in config:
        if not Path(path).is_file():
            parser.error(f"config file not found: {path}")
    torch.set_num_threads(args.threads)
    if args.child:  # one runtime in this process; figures as JSON on stdout's last line
        result = run_one(args.runtime[0], config, args.dataroot, args.warmup, args.iterations, args.samples,
                         args.threads, args.providers)
        print(json.dumps(result))
        return 0
    results = []
    for runtime in args.runtime:
        command = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "benchmark.py"), "inference",
                   "--child", "--runtime", runtime, "--warmup", str(args.warmup), "--iterations",
                   str(args.iterations), "--samples", str(args.samples), "--threads", str(args.threads)]
        command += [item for path in config for item in ("--config", path)]
        if args.dataroot:
            command += ["--dataroot", args.dataroot]
        if args.providers:
            command += ["--providers", *args.providers]
        print(f"{runtime}: running ...", flush=True)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results.append({"runtime": runtime, "refused": f"not measured: did not finish within {args.timeout:.0f} s"})
            print(f"{runtime}: did not finish within {args.timeout:.0f} s", flush=True)
            continue
        if done.returncode != 0:
            print(f"{runtime} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        if "refused" not in result:
            print(f"{runtime}: e2e CPU p50 {result['e2e_cpu_ms_p50']:.1f} ms, wall p50 {result['e2e_ms_p50']:.1f} ms, "
                  f"p95 {result['e2e_ms_p95']:.1f} ms", flush=True)
    source = next((r["samples"] for r in results if "samples" in r), "-")
    print(f"config {' + '.join(config)}, batch 1, {args.threads} threads, samples: {source}")
    print(table(results))
    eager = next((r for r in results if r["runtime"] == "eager"), None)
    for r in results:
        if eager is not None and r is not eager and "refused" not in r:
            print(f"{r['runtime']}: {eager['e2e_cpu_ms_p50'] / r['e2e_cpu_ms_p50']:.2f}x eager end to end (CPU time "
                  f"p50), {eager['e2e_ms_p50'] / r['e2e_ms_p50']:.2f}x (wall p50)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"figures written to {args.json}")
    return 0
