"""Micro-benchmark of the graph's segment reductions in onnxruntime, at the sizes of a real frame.

    python -m fusion.deploy.segment_benchmark [--config configs/tiny_cpu.yaml] [--dataroot DIR] [--threads 1 2]

The indices are those of the config's first validation sample (generated samples without a dataroot): the LiDAR
points' pillars (the trash pillar included, as in the graph) and the camera frustum points' cells (the trash cell
left out); the values are uniform in [0, 1) (the pooled PFN outputs are ReLUs). Each case is exported alone
(opset 18, TorchScript exporter) in three forms:
    ScatterElements   one ScatterElements with reduction per reduction (index expanded to every element)
    ScatterND         one ScatterND with reduction per reduction (racy with more than one thread)
    sorted            fusion.deploy.segments: one grouping (TopK sort) per index, float64 cumsum sums, max tree,
                      ScatterND without reduction; the values are gathered into sorted order first
and timed in onnxruntime (CPU time of the process, median of --repeats runs after 2 warm-up runs), then checked
against torch's scatter_reduce (float64 for sums) on --checks runs: the largest error, and the number of runs off by
more than 1e-3 (a lost update).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fusion.deploy.segments import group_rows, sorted_max, sorted_sum, to_dense

FORMS = ("ScatterElements", "ScatterND", "sorted")


class _ReducingScatter(torch.autograd.Function):
    """out [S, C] reduced (sum / amax) with values [N, C] at rows index [N], as ScatterElements or ScatterND."""

    @staticmethod
    def forward(ctx, out: Tensor, index: Tensor, values: Tensor, reduce: str, form: str) -> Tensor:
        return out.scatter_reduce(0, index[:, None].expand(-1, values.shape[1]), values, reduce)

    @staticmethod
    def symbolic(g, out, index, values, reduce: str, form: str):
        reduction = {"sum": "add", "amax": "max"}[reduce]
        column = g.op("Unsqueeze", index, g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64)))
        if form == "ScatterND":
            return g.op("ScatterND", out, column, values, reduction_s=reduction)
        expanded = g.op("Expand", column, g.op("Shape", values))
        return g.op("ScatterElements", out, expanded, values, axis_i=0, reduction_s=reduction)


class Pooling(nn.Module):
    """The reductions `reduces` (one per values input, all over the same index [N]) into [segments, sum of C]; rows
    with index == segments are left out when `trash`, else index < segments."""

    def __init__(self, form: str, reduces: tuple[str, ...], segments: int, trash: bool):
        super().__init__()
        self.form, self.reduces, self.segments, self.trash = form, reduces, segments, trash

    def forward(self, index: Tensor, *values: Tensor) -> Tensor:
        if self.form == "sorted":
            rows = group_rows(index, self.segments, self.trash)
            reduced = [(sorted_sum if reduce == "sum" else sorted_max)(v[rows.order], rows)
                       for v, reduce in zip(values, self.reduces)]
            return to_dense(torch.cat(reduced, dim=1), rows)
        rows = self.segments + 1 if self.trash else self.segments
        pooled = [_ReducingScatter.apply(v.new_zeros(rows, v.shape[1]), index, v, reduce, self.form)
                  for v, reduce in zip(values, self.reduces)]
        return torch.cat(pooled, dim=1)[: self.segments]


def reference(index: Tensor, values: list[Tensor], reduces: tuple[str, ...], segments: int) -> Tensor:
    """torch's scatter_reduce in float64 (amax into zeros), rows with index >= segments left out."""
    keep = index < segments
    out = []
    for v, reduce in zip(values, reduces):
        v = v[keep].double()
        rows = index[keep][:, None].expand(-1, v.shape[1])
        out.append(v.new_zeros(segments, v.shape[1]).scatter_reduce(0, rows, v, reduce, include_self=reduce == "sum"))
    return torch.cat(out, dim=1)


def frame_indices(config: list[str], dataroot: str | None) -> dict[str, tuple[Tensor, int, bool]]:
    """{"lidar": (pillar index [N], segments, trash), "camera": (cell index [Nv * D * h * w], segments, trash)}."""
    from fusion.checkpoints import load_run
    from fusion.datasets.collate import collate_samples
    from fusion.deploy import inputs as shared
    from fusion.deploy.export import export_spec
    from fusion.deploy.graph import ExportableDetector
    from tools.benchmarks.model import _merged_config, load_samples

    torch.manual_seed(0)
    model = load_run(config=config if len(config) > 1 else config[0]).model.eval()
    samples, _, _ = load_samples(_merged_config(config), model, 1, dataroot)
    cameras = samples[0].cameras
    spec = export_spec(model, tuple(cameras.images.shape[-2:]), int(cameras.images.shape[0]))
    graph = ExportableDetector(model, spec.image_size).eval()
    inputs = shared.graph_inputs(collate_samples(samples), spec)
    pillars = graph.lidar.pillars
    grid = pillars.encoder.pillar_grid
    found = {"lidar": (pillars.voxelize(inputs["lidar_points"][:, :3]), grid.height * grid.width + 1, False)}
    with torch.no_grad():
        camera = graph.camera
        x = (inputs["images"][0].float() - camera.branch.image_mean) / camera.branch.image_std
        feature_size = tuple(camera.branch.depth_net(camera.branch.backbone(x)).shape[-2:])
        cells = camera.cells(inputs["intrinsics"], inputs["cam_to_ego"], inputs["camera_valid"], feature_size)
    pool = camera.branch.pool_grid
    found["camera"] = (cells.reshape(-1), camera.branch.height_bins * pool.height * pool.width, True)
    return found


def measure(module: Pooling, index: Tensor, values: list[Tensor], threads: int, repeats: int, checks: int,
            folder: Path) -> dict:
    """{cpu_ms, wall_ms, error, wrong_runs} of `module` exported and run in onnxruntime with `threads`."""
    import onnxruntime as ort

    names = ["index"] + [f"values{i}" for i in range(len(values))]
    path = folder / f"{module.form}.onnx"
    if not path.exists():
        torch.onnx.export(module, (index, *values), str(path), input_names=names, output_names=["pooled"],
                          dynamic_axes={name: {0: "rows"} for name in names}, opset_version=18, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = dict(zip(names, [t.numpy() for t in (index, *values)]))
    expected = reference(index, values, module.reduces, module.segments).numpy()
    errors = [float(np.abs(session.run(None, feeds)[0] - expected).max()) for _ in range(checks)]
    cpu, wall = [], []
    for run in range(repeats + 2):
        start = (time.process_time(), time.perf_counter())
        session.run(None, feeds)
        if run >= 2:
            cpu.append(time.process_time() - start[0])
            wall.append(time.perf_counter() - start[1])
    return {"cpu_ms": 1000 * statistics.median(cpu), "wall_ms": 1000 * statistics.median(wall),
            "error": max(errors), "wrong_runs": sum(e > 1e-3 for e in errors)}


CASES = {  # name: (index, reductions with their channel counts)
    "LiDAR pillar counts (sum, C=1)": ("lidar", (("sum", 1),)),
    "LiDAR pillar xyz (sum, C=3)": ("lidar", (("sum", 3),)),
    "LiDAR PFN1 max (C=16)": ("lidar", (("amax", 16),)),
    "LiDAR PFN2 max (C=31)": ("lidar", (("amax", 31),)),
    "LiDAR pillar encoder: all four above": ("lidar", (("sum", 1), ("sum", 3), ("amax", 16), ("amax", 31))),
    "camera BEV pooling (sum, C=24)": ("camera", (("sum", 24),)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=None, help="default configs/tiny_cpu.yaml")
    parser.add_argument("--dataroot", help="override the config's data.dataroot (generated samples if absent)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--checks", type=int, default=5)
    args = parser.parse_args(argv)
    indices = frame_indices(args.config or ["configs/tiny_cpu.yaml"], args.dataroot)
    for name, (index, segments, trash) in indices.items():
        kept = int((index < segments).sum()) if trash else index.shape[0]
        print(f"{name}: {index.shape[0]} rows ({kept} kept), {int(torch.unique(index).numel())} distinct indices, "
              f"{segments} segments")
    generator = torch.Generator().manual_seed(0)
    print("| case | N | form | threads | CPU ms | wall ms | largest error | runs off |")
    print("|---|---|---|---|---|---|---|---|")
    for case, (which, reductions) in CASES.items():
        index, segments, trash = indices[which]
        values = [torch.rand(index.shape[0], channels, generator=generator) for _, channels in reductions]
        reduces = tuple(reduce for reduce, _ in reductions)
        with tempfile.TemporaryDirectory() as folder:
            for form in FORMS:
                module = Pooling(form, reduces, segments, trash)
                for threads in args.threads:
                    r = measure(module, index, values, threads, args.repeats, args.checks, Path(folder))
                    print(f"| {case} | {index.shape[0]} | {form} | {threads} | {r['cpu_ms']:.2f} | {r['wall_ms']:.2f} "
                          f"| {r['error']:.1e} | {r['wrong_runs']} of {args.checks} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
