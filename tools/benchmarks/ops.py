"""Benchmarks of fusion.cuda_ops: voxelization vs spconv (and an mmcv-style kernel on CUDA), bev_pool vs BEVFusion's
interval-based pooling, and the two scatter backends. Every figure is printed beside its physical floor
(bytes that must move / measured memory bandwidth), and every comparison checks that the outputs agree.

    python tools/benchmark.py ops --device cpu [--repeats 10] [--json FILE] [--only voxelize,bev_pool,scatter]
    python tools/benchmark.py ops --device cuda          # on a GPU machine (compiles two comparison kernels)

Workloads (issue 3):
- voxelize: a nuScenes-like 10-sweep LiDAR cloud, 300,000 points x 5 (x, y, z, intensity, time lag), ring-structured
  (32 beams ray-cast against ground, building facades, cars, trucks and pedestrians: dense near, sparse far),
  range +-54 m, z -5..3 m; LiDAR voxels 0.075 x 0.075 x 0.2 m (max_points 10, max_voxels 120,000) and pillars
  0.2 x 0.2 x 8 m (same limits).
- bev_pool: BEVFusion's camera workload: 6 cameras x 118 depth bins (1-60 m by 0.5 m) x 32 x 88 feature map,
  80 channels, 0.3 m grid over +-54 m (360 x 360 cells, one z cell), frustum points outside the grid filtered first.
- scatter: the pillar encoder's reductions (sum, mean, max) of per-point features onto occupied 0.2 m pillars.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from fusion.cuda_ops import bev_pool, dynamic_voxelize, hard_voxelize, scatter_reduce, torch_scatter_available
from fusion.cuda_ops import reference
from fusion.cuda_ops.scatter import AUTO_BACKEND

POINT_RANGE = (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)
LIDAR_VOXEL = (0.075, 0.075, 0.2)
PILLAR_VOXEL = (0.2, 0.2, 8.0)
MAX_POINTS, MAX_VOXELS = 10, 120_000


# ---------------------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def lidar_like_cloud(num_points: int = 300_000, sweeps: int = 10, seed: int = 0) -> torch.Tensor:
    """[num_points, 5] float32 (x, y, z, intensity, time lag s), ego frame, meters: a 32-beam spinning LiDAR mounted
    1.84 m up, ray-cast against the ground, two rows of building facades and ~120 boxes (cars, trucks, pedestrians),
    `sweeps` sweeps 0.05 s apart while the ego drives at 10 m/s, each brought into the newest ego frame. Returns
    beyond 70 m or into the sky are lost, as are 5 % of the others (dropout). Points are ordered sweep by sweep,
    firing by firing, beam by beam, like a real scan."""
    rng = np.random.default_rng(seed)
    # Static scene in the frame of the newest sweep.
    kinds = rng.choice(3, size=120, p=[0.65, 0.1, 0.25])
    dims = np.array([[4.6, 1.9, 1.7], [9.0, 2.6, 3.4], [0.7, 0.7, 1.8]])[kinds] * rng.uniform(0.9, 1.1, (120, 3))
    centers = np.stack([rng.uniform(-60, 60, 120), rng.choice([-1, 1], 120) * rng.uniform(2.5, 11, 120),
                        np.zeros(120)], axis=1)
    centers[:, 2] = dims[:, 2] / 2
    yaws = np.where(kinds == 2, rng.uniform(-np.pi, np.pi, 120), rng.normal(0, 0.1, 120))
    facades = [(12.5, 1.0), (-14.0, -1.0)]  # y = const planes, facing the street
    beams = np.deg2rad(np.linspace(-30.67, 10.67, 32))
    per_sweep = 32 * 1084
    clouds = []
    for sweep in range(sweeps):
        sensor = np.array([0.94 - 0.5 * sweep, 0.0, 1.84])  # ego moved 0.5 m forward per sweep
        azimuth = np.linspace(0, 2 * np.pi, 1084, endpoint=False) + rng.uniform(0, 0.006)
        az, el = np.meshgrid(azimuth, beams, indexing="ij")  # firing-major, beam-minor
        dirs = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
        dist = np.full(per_sweep, np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            ground = -(sensor[2] - 0.05 * np.sin(0.1 * sensor[0])) / dirs[:, 2]
            dist = np.where(ground > 0, np.minimum(dist, ground), dist)
            for y_wall, _ in facades:
                t = (y_wall - sensor[1]) / dirs[:, 1]
                z_hit = sensor[2] + t * dirs[:, 2]
                x_hit = sensor[0] + t * dirs[:, 0]
                gap = (np.floor(x_hit / 9.0) % 4) == 3  # alleys between buildings
                hit = (t > 0) & (z_hit < 15.0) & ~gap
                dist = np.where(hit, np.minimum(dist, t), dist)
            for center, size, yaw in zip(centers, dims, yaws):
                c, s = math.cos(-yaw), math.sin(-yaw)
                o = sensor - center
                o_local = np.array([c * o[0] - s * o[1], s * o[0] + c * o[1], o[2]])
                d_local = np.stack([c * dirs[:, 0] - s * dirs[:, 1], s * dirs[:, 0] + c * dirs[:, 1], dirs[:, 2]], 1)
                t1 = (-size / 2 - o_local) / d_local
                t2 = (size / 2 - o_local) / d_local
                t_near = np.nanmax(np.minimum(t1, t2), axis=1)
                t_far = np.nanmin(np.maximum(t1, t2), axis=1)
                hit = (t_near <= t_far) & (t_near > 0)
                dist = np.where(hit, np.minimum(dist, t_near), dist)
        keep = (dist < 70.0) & (rng.random(per_sweep) > 0.05)
        dist = dist[keep] + rng.normal(0, 0.02, keep.sum())
        xyz = sensor + dirs[keep] * dist[:, None]
        intensity = rng.uniform(0, 255, keep.sum())
        lag = np.full(keep.sum(), 0.05 * sweep)
        clouds.append(np.column_stack([xyz, intensity, lag]))
    cloud = np.concatenate(clouds)
    while cloud.shape[0] < num_points:  # more sweeps' worth if the scene returned too few points
        cloud = np.concatenate([cloud, cloud[: num_points - cloud.shape[0]] + rng.normal(0, 0.01, (1, 5))])
    return torch.from_numpy(cloud[:num_points].astype(np.float32))


def camera_frustum_coords(cameras: int = 6, depth_bins: int = 118, feat_h: int = 32, feat_w: int = 88,
                          cell: float = 0.3, half_extent: float = 54.0) -> tuple[torch.Tensor, int]:
    """BEVFusion's lift-splat geometry: frustum points of `cameras` cameras around the ego (1.6 m up, yaws 0, +-55,
    +-110, 180 degrees, 70 degree horizontal field of view, 704 x 256 images seen at stride 8), depth bins 1-60 m by
    0.5 m, in BEVFusion's order (camera, depth, row, column). Returns (coords [P, 4] int64 (batch, z, y, x) of the
    points inside the 0.3 m grid over +-54 m (z in -10..10 m: one cell), P), the filtering BEVFusion does first."""
    depths = torch.arange(depth_bins, dtype=torch.float64) * 0.5 + 1.0
    focal = (704 / 2) / math.tan(math.radians(35))
    us = (torch.arange(feat_w, dtype=torch.float64) + 0.5) * 8
    vs = (torch.arange(feat_h, dtype=torch.float64) + 0.5) * 8
    d, v, u = torch.meshgrid(depths, vs, us, indexing="ij")
    # camera frame (x right, y down, z forward) -> ego frame
    x_cam, y_cam, z_cam = (u - 352) / focal * d, (v - 128) / focal * d, d
    points = []
    for yaw_deg in (0, -55, 55, -110, 110, 180)[:cameras]:
        yaw = math.radians(yaw_deg)
        forward = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0], dtype=torch.float64)
        left = torch.tensor([-math.sin(yaw), math.cos(yaw), 0.0], dtype=torch.float64)
        position = torch.tensor([1.5, 0.0, 1.6], dtype=torch.float64) + 0.8 * forward
        ego = (position + z_cam[..., None] * forward - x_cam[..., None] * left
               - y_cam[..., None] * torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
        points.append(ego.reshape(-1, 3))
    xyz = torch.cat(points)
    col = torch.floor((xyz[:, 0] + half_extent) / cell).long()
    row = torch.floor((xyz[:, 1] + half_extent) / cell).long()
    cells = int(round(2 * half_extent / cell))
    kept = (col >= 0) & (col < cells) & (row >= 0) & (row < cells) & (xyz[:, 2] >= -10) & (xyz[:, 2] < 10)
    zeros = torch.zeros_like(col)
    coords = torch.stack([zeros, zeros, row, col], 1)[kept]
    return coords, cells


# ---------------------------------------------------------------------------------------------------------------
# Comparison implementations
# ---------------------------------------------------------------------------------------------------------------

def bevfusion_bev_pool_torch(feats: torch.Tensor, coords_xyzb: torch.Tensor, batch: int, depth: int, nx: int,
                             ny: int) -> torch.Tensor:
    """BEVFusion's interval-based bev_pool re-implemented in torch (mmdet3d/ops/bev_pool: ranks -> argsort ->
    gather -> interval starts/lengths -> one sum per (interval, channel) -> scatter to [B, Z, X, Y, C] -> permute).
    coords_xyzb [P, 4] (x, y, z, batch) like BEVFusion's; returns [B, C, Z, X, Y] (BEVFusion's layout)."""
    ranks = (coords_xyzb[:, 0] * (ny * depth * batch) + coords_xyzb[:, 1] * (depth * batch)
             + coords_xyzb[:, 2] * batch + coords_xyzb[:, 3])
    indices = ranks.argsort()
    feats, coords_xyzb, ranks = feats[indices], coords_xyzb[indices], ranks[indices]
    kept = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
    kept[1:] = ranks[1:] != ranks[:-1]
    interval_starts = torch.where(kept)[0]
    interval_lengths = torch.diff(interval_starts, append=interval_starts.new_tensor([feats.shape[0]]))
    sums = torch.segment_reduce(feats, "sum", lengths=interval_lengths)  # the per-(interval, channel) kernel
    g = coords_xyzb[interval_starts]
    out = feats.new_zeros(batch, depth, nx, ny, feats.shape[1])
    out[g[:, 3], g[:, 2], g[:, 0], g[:, 1]] = sums
    return out.permute(0, 4, 1, 2, 3).contiguous()


# Faithful CUDA re-implementations of the two comparison kernels, compiled on first use with --device cuda.
BEVFUSION_CUDA = r"""
#include <torch/extension.h>
// BEVFusion's bev_pool kernel (mmdet3d/ops/bev_pool/src/bev_pool_cuda.cu): one thread per (interval, channel).
__global__ void bev_pool_kernel(int b, int d, int h, int w, int n, int c, int n_intervals, const float* x,
                                const int* geom_feats, const int* interval_starts, const int* interval_lengths,
                                float* out) {
  int idx = blockIdx.x * blockDim.x + threadIdx.x;
  int index = idx / c, cur_c = idx % c;
  if (index >= n_intervals) return;
  int interval_start = interval_starts[index], interval_length = interval_lengths[index];
  const int* g = geom_feats + interval_start * 4;
  const float* cur_x = x + interval_start * c + cur_c;
  float* cur_out = out + g[3] * d * h * w * c + g[2] * h * w * c + g[0] * w * c + g[1] * c + cur_c;
  float psum = 0;
  for (int i = 0; i < interval_length; i++) psum += cur_x[i * c];
  *cur_out = psum;
}
torch::Tensor bev_pool_forward(torch::Tensor x, torch::Tensor geom_feats, torch::Tensor interval_lengths,
                               torch::Tensor interval_starts, int64_t b, int64_t d, int64_t h, int64_t w) {
  int n = x.size(0), c = x.size(1), n_intervals = interval_lengths.size(0);
  auto out = torch::zeros({b, d, h, w, c}, x.options());
  bev_pool_kernel<<<(int)ceil(((double)n_intervals * c / 256)), 256>>>(b, d, h, w, n, c, n_intervals,
      x.data_ptr<float>(), geom_feats.data_ptr<int>(), interval_starts.data_ptr<int>(),
      interval_lengths.data_ptr<int>(), out.data_ptr<float>());
  return out;
}
"""
BEVFUSION_CPP = ("torch::Tensor bev_pool_forward(torch::Tensor x, torch::Tensor geom_feats, torch::Tensor "
                 "interval_lengths, torch::Tensor interval_starts, int64_t b, int64_t d, int64_t h, int64_t w);")

MMCV_CUDA = r"""
#include <torch/extension.h>
// mmcv's deterministic hard voxelization (mmcv/ops/csrc/common/cuda/voxelization_cuda.cuh), same structure:
// cell coords per point; O(N^2) scan of all earlier points for the rank in the voxel and the voxel's first point;
// a single-thread pass numbering voxels in order of first appearance; then scatter of points and coords.
__global__ void coords_kernel(const float* pts, int* coors, float vx, float vy, float vz, float x0, float y0,
                              float z0, int gx, int gy, int gz, int n, int c) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float* p = pts + (long)i * c;
  int cx = floorf((p[0] - x0) / vx), cy = floorf((p[1] - y0) / vy), cz = floorf((p[2] - z0) / vz);
  bool ok = isfinite(p[0]) && isfinite(p[1]) && isfinite(p[2]) && cx >= 0 && cx < gx && cy >= 0 && cy < gy &&
            cz >= 0 && cz < gz;
  coors[3 * i] = ok ? cz : -1; coors[3 * i + 1] = ok ? cy : -1; coors[3 * i + 2] = ok ? cx : -1;
}
__global__ void point_to_voxelidx_kernel(const int* coor, int* point_to_voxelidx, int* point_to_pointidx,
                                         int max_points, int n) {
  int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= n) return;
  const int* c = coor + 3 * index;
  if (c[0] == -1) return;
  int num = 0;
  for (int i = 0; i < index; ++i) {
    const int* p = coor + 3 * i;
    if (p[0] == -1) continue;
    if (p[0] == c[0] && p[1] == c[1] && p[2] == c[2]) {
      num++;
      if (num == 1) point_to_pointidx[index] = i;
      else if (num >= max_points) break;
    }
  }
  if (num == 0) point_to_pointidx[index] = index;
  if (num < max_points) point_to_voxelidx[index] = num;
}
__global__ void determine_voxel_num_kernel(int* num_points_per_voxel, int* point_to_voxelidx,
                                           int* point_to_pointidx, int* coor_to_voxelidx, int* voxel_num,
                                           int max_points, int max_voxels, int n) {
  for (int i = 0; i < n; ++i) {
    int pos = point_to_voxelidx[i];
    if (pos == -1) continue;
    if (pos == 0) {
      int v = voxel_num[0];
      if (v >= max_voxels) continue;
      voxel_num[0] += 1;
      coor_to_voxelidx[i] = v;
      num_points_per_voxel[v] += 1;
    } else {
      int v = coor_to_voxelidx[point_to_pointidx[i]];
      if (v != -1) { coor_to_voxelidx[i] = v; num_points_per_voxel[v] += 1; }
    }
  }
}
__global__ void assign_kernel(const float* pts, const int* point_to_voxelidx, const int* coor_to_voxelidx,
                              const int* coor, float* voxels, int* coors_out, int max_points, int c, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int v = coor_to_voxelidx[i], pos = point_to_voxelidx[i];
  if (v < 0 || pos < 0) return;
  for (int k = 0; k < c; ++k) voxels[((long)v * max_points + pos) * c + k] = pts[(long)i * c + k];
  if (pos == 0) for (int k = 0; k < 3; ++k) coors_out[3 * v + k] = coor[3 * i + k];
}
std::vector<torch::Tensor> mmcv_hard_voxelize(torch::Tensor pts, std::vector<double> vsize,
                                              std::vector<double> lower, std::vector<int64_t> grid,
                                              int64_t max_points, int64_t max_voxels) {
  int n = pts.size(0), c = pts.size(1);
  auto io = pts.options().dtype(torch::kInt32);
  auto coor = torch::empty({n, 3}, io);
  auto p2v = torch::full({n}, -1, io), p2p = torch::full({n}, -1, io), c2v = torch::full({n}, -1, io);
  auto voxels = torch::zeros({max_voxels, max_points, c}, pts.options());
  auto coors = torch::zeros({max_voxels, 3}, io), num = torch::zeros({max_voxels}, io);
  auto voxel_num = torch::zeros({1}, io);
  int blocks = (n + 511) / 512;
  coords_kernel<<<blocks, 512>>>(pts.data_ptr<float>(), coor.data_ptr<int>(), vsize[0], vsize[1], vsize[2],
      lower[0], lower[1], lower[2], grid[0], grid[1], grid[2], n, c);
  point_to_voxelidx_kernel<<<blocks, 512>>>(coor.data_ptr<int>(), p2v.data_ptr<int>(), p2p.data_ptr<int>(),
      max_points, n);
  determine_voxel_num_kernel<<<1, 1>>>(num.data_ptr<int>(), p2v.data_ptr<int>(), p2p.data_ptr<int>(),
      c2v.data_ptr<int>(), voxel_num.data_ptr<int>(), max_points, max_voxels, n);
  assign_kernel<<<blocks, 512>>>(pts.data_ptr<float>(), p2v.data_ptr<int>(), c2v.data_ptr<int>(),
      coor.data_ptr<int>(), voxels.data_ptr<float>(), coors.data_ptr<int>(), max_points, c, n);
  int v = voxel_num.item<int>();
  return {voxels.narrow(0, 0, v), coors.narrow(0, 0, v), num.narrow(0, 0, v)};
}
"""
MMCV_CPP = ("std::vector<torch::Tensor> mmcv_hard_voxelize(torch::Tensor pts, std::vector<double> vsize, "
            "std::vector<double> lower, std::vector<int64_t> grid, int64_t max_points, int64_t max_voxels);")


def compile_cuda_comparisons():
    """(BEVFusion bev_pool module, mmcv-style voxelization module), compiled with torch's load_inline."""
    from torch.utils.cpp_extension import load_inline
    flags = ["-O3"]
    bevfusion = load_inline("bench_bevfusion_bev_pool", cpp_sources=BEVFUSION_CPP, cuda_sources=BEVFUSION_CUDA,
                            functions=["bev_pool_forward"], extra_cuda_cflags=flags, verbose=False)
    mmcv = load_inline("bench_mmcv_voxelize", cpp_sources=MMCV_CPP, cuda_sources=MMCV_CUDA,
                       functions=["mmcv_hard_voxelize"], extra_cuda_cflags=flags, verbose=False)
    return bevfusion, mmcv


def bevfusion_bev_pool_cuda(module, feats, coords_xyzb, batch, depth, nx, ny):
    """BEVFusion's Python side (ranks, argsort, gather, intervals) around its CUDA kernel; [B, C, Z, X, Y]."""
    ranks = (coords_xyzb[:, 0] * (ny * depth * batch) + coords_xyzb[:, 1] * (depth * batch)
             + coords_xyzb[:, 2] * batch + coords_xyzb[:, 3])
    indices = ranks.argsort()
    feats, coords_xyzb, ranks = feats[indices], coords_xyzb[indices], ranks[indices]
    kept = torch.ones(feats.shape[0], device=feats.device, dtype=torch.bool)
    kept[1:] = ranks[1:] != ranks[:-1]
    interval_starts = torch.where(kept)[0].int()
    interval_lengths = torch.zeros_like(interval_starts)
    interval_lengths[:-1] = interval_starts[1:] - interval_starts[:-1]
    interval_lengths[-1] = feats.shape[0] - interval_starts[-1]
    out = module.bev_pool_forward(feats, coords_xyzb.int(), interval_lengths, interval_starts, batch, depth, nx, ny)
    return out.permute(0, 4, 1, 2, 3).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    section: str
    name: str
    median_ms: float
    min_ms: float
    floor_ms: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def run_once(fn: Callable[[], object], device: str) -> float:
    """Milliseconds of one fn() call (CUDA events on the GPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def timed_together(fns: dict[str, Callable[[], object]], device: str, repeats: int,
                   warmup: int = 1) -> dict[str, tuple[float, float]]:
    """{name: (median, min) milliseconds} over `repeats` rounds after `warmup` rounds; each round runs every fn once,
    in turn, so that implementations compared with each other meet the same background load."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(run_once(fn, device))
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def timed(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median, min) milliseconds of fn() over `repeats` runs after `warmup` runs."""
    return timed_together({"fn": fn}, device, repeats, warmup)["fn"]


def memory_bandwidth(device: str) -> float:
    """Measured copy bandwidth in bytes/s (bytes read + written) on a 256 MiB buffer."""
    src = torch.empty(64 * 2 ** 20, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    _, best = timed(lambda: dst.copy_(src), device, repeats=10, warmup=2)
    return 2 * src.numel() * 4 / (best / 1e3)


def floor_ms(nbytes: float, bandwidth: float) -> float:
    return nbytes / bandwidth * 1e3


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------

def bench_voxelize(device: str, repeats: int, num_points: int, bandwidth: float, cuda_mods) -> list[Row]:
    rows = []
    cloud = lidar_like_cloud(num_points)
    points = cloud.to(device)
    channels = points.shape[1]
    for label, voxel in (("lidar 0.075x0.075x0.2", LIDAR_VOXEL), ("pillars 0.2x0.2x8", PILLAR_VOXEL)):
        ours = hard_voxelize(points, voxel, POINT_RANGE, MAX_POINTS, MAX_VOXELS)
        num_voxels = ours[0].shape[0]
        kept = int(ours[2].sum())
        moved = num_points * channels * 4 + num_voxels * (MAX_POINTS * channels * 4 + 12 + 4)
        stats = {"points": num_points, "voxels": num_voxels, "points_in_voxels": kept}
        fns = {"ours": lambda: hard_voxelize(points, voxel, POINT_RANGE, MAX_POINTS, MAX_VOXELS),
               "dynamic": lambda: dynamic_voxelize(points, voxel, POINT_RANGE)}
        spconv_note = None
        try:
            from spconv.pytorch.utils import PointToVoxel
            generator = PointToVoxel(vsize_xyz=list(voxel), coors_range_xyz=list(POINT_RANGE),
                                     num_point_features=channels, max_num_voxels=MAX_VOXELS,
                                     max_num_points_per_voxel=MAX_POINTS, device=torch.device(device))
            spconv_same = all(torch.equal(a, b) for a, b in zip(ours, generator(points)))
            fns["spconv"] = lambda: generator(points)
        except Exception as error:  # spconv missing or without this device
            spconv_note = f"unavailable: {type(error).__name__}: {error}"[:200]
        times = timed_together(fns, device, repeats)
        med, best = times["ours"]
        rows.append(Row("voxelize", f"{label}: ours hard_voxelize", med, best, floor_ms(moved, bandwidth),
                        f"{num_voxels} voxels, {kept} points kept", stats))
        if device == "cuda":
            cpu_result = hard_voxelize(cloud, voxel, POINT_RANGE, MAX_POINTS, MAX_VOXELS)
            same = all(torch.equal(a.cpu(), b) for a, b in zip(ours, cpu_result))
            rows[-1].note += f"; identical to our CPU result: {same}"
        if "spconv" in times:
            med_s, best_s = times["spconv"]
            rows.append(Row("voxelize", f"{label}: spconv PointToVoxel", med_s, best_s, floor_ms(moved, bandwidth),
                            f"identical to ours: {spconv_same}; ours is {med_s / med:.1f}x faster (median)",
                            {"identical": spconv_same, "speedup": med_s / med}))
        else:
            rows.append(Row("voxelize", f"{label}: spconv PointToVoxel", math.nan, math.nan, None, spconv_note))
        if device == "cuda" and cuda_mods is not None:
            from fusion.cuda_ops.grid_spec import voxel_grid
            grid = voxel_grid(voxel, POINT_RANGE)
            mmcv = cuda_mods[1]
            args = (points, list(grid.voxel_size), list(grid.range_min), list(grid.grid), MAX_POINTS, MAX_VOXELS)
            same = all(torch.equal(a, b) for a, b in zip(ours, mmcv.mmcv_hard_voxelize(*args)))
            med_m, best_m = timed(lambda: mmcv.mmcv_hard_voxelize(*args), device, max(1, min(repeats, 3)))
            rows.append(Row("voxelize", f"{label}: mmcv-style O(N^2) kernel", med_m, best_m,
                            floor_ms(moved, bandwidth), f"identical to ours: {same}; ours is {med_m / med:.0f}x faster",
                            {"identical": same, "speedup": med_m / med}))
        med_d, best_d = times["dynamic"]
        rows.append(Row("voxelize", f"{label}: ours dynamic_voxelize", med_d, best_d,
                        floor_ms(num_points * (channels * 4 + 12), bandwidth)))
        if device == "cpu":
            med_r, best_r = timed(lambda: reference.hard_voxelize(points, voxel, POINT_RANGE, MAX_POINTS, MAX_VOXELS),
                                  device, max(1, repeats // 4))
            rows.append(Row("voxelize", f"{label}: torch reference hard_voxelize", med_r, best_r,
                            floor_ms(moved, bandwidth)))
    return rows


def bench_bev_pool(device: str, repeats: int, bandwidth: float, cuda_mods, channels: int = 80) -> list[Row]:
    rows = []
    coords, cells = camera_frustum_coords()
    generator = torch.Generator().manual_seed(0)
    feats = torch.randn(coords.shape[0], channels, generator=generator).to(device)
    coords = coords.to(device)
    coords32 = coords.int()
    coords_xyzb = coords[:, [3, 2, 1, 0]].contiguous()  # BEVFusion's (x, y, z, batch)
    num_points = coords.shape[0]
    stats = {"points": num_points, "channels": channels, "grid": [1, cells, cells]}
    out_bytes = channels * cells * cells * 4
    moved_fwd = num_points * (channels * 4 + 16) + out_bytes
    moved_bwd = out_bytes + num_points * (channels * 4 + 4)

    ours = bev_pool(feats, coords32, 1, (1, cells, cells))
    occupied = int((ours.abs().sum(1) > 0).sum())
    if device == "cpu":
        theirs = bevfusion_bev_pool_torch(feats, coords_xyzb, 1, 1, cells, cells)
        name = "forward: BEVFusion interval pooling (torch re-implementation)"
        run_theirs = lambda: bevfusion_bev_pool_torch(feats, coords_xyzb, 1, 1, cells, cells)  # noqa: E731
    else:
        module = cuda_mods[0]
        theirs = bevfusion_bev_pool_cuda(module, feats, coords_xyzb, 1, 1, cells, cells)
        name = "forward: BEVFusion interval pooling (its CUDA kernel)"
        run_theirs = lambda: bevfusion_bev_pool_cuda(module, feats, coords_xyzb, 1, 1, cells, cells)  # noqa: E731
    error = float((ours - theirs.transpose(-1, -2)).abs().max())
    times = timed_together({"ours": lambda: bev_pool(feats, coords32, 1, (1, cells, cells)), "theirs": run_theirs},
                           device, repeats)
    med, best = times["ours"]
    med_t, best_t = times["theirs"]
    rows.append(Row("bev_pool", "forward: ours bev_pool", med, best, floor_ms(moved_fwd, bandwidth),
                    f"{num_points} frustum points in {occupied} cells", stats))
    rows.append(Row("bev_pool", name, med_t, best_t, floor_ms(moved_fwd, bandwidth),
                    f"max |ours - theirs| = {error:.2e}; ours is {med_t / med:.1f}x faster (median)",
                    {"max_abs_diff": error, "speedup": med_t / med}))
    if device == "cuda":
        cpu_out = bev_pool(feats.cpu(), coords32.cpu(), 1, (1, cells, cells))
        rows[0].note += f"; bit-identical to our CPU result: {torch.equal(ours.cpu(), cpu_out)}"

    feats_grad = feats.clone().requires_grad_(True)
    grad_out = torch.randn(1, channels, 1, cells, cells, generator=generator).to(device)

    def ours_backward():
        feats_grad.grad = None
        out = bev_pool(feats_grad, coords32, 1, (1, cells, cells))
        out.backward(grad_out)

    med_b, best_b = timed(ours_backward, device, repeats)
    rows.append(Row("bev_pool", "forward + backward: ours bev_pool", med_b, best_b,
                    floor_ms(moved_fwd + moved_bwd, bandwidth)))
    return rows


def pillar_workload(device: str, channels: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(features [N, channels], pillar index [N] int64, number of pillars) for the LiDAR-like cloud on 0.2 m
    pillars, the way fusion/branches/common.py's PillarEncoder builds them."""
    cloud = lidar_like_cloud()
    coords = dynamic_voxelize(cloud, PILLAR_VOXEL, POINT_RANGE).long()
    keep = coords[:, 0] >= 0
    cell = coords[keep, 1] * 540 + coords[keep, 2]
    _, pillar = torch.unique(cell, return_inverse=True)
    generator = torch.Generator().manual_seed(1)
    feats = torch.randn(int(keep.sum()), channels, generator=generator)
    return feats.to(device), pillar.to(device), int(pillar.max()) + 1


def bench_scatter(device: str, repeats: int, bandwidth: float, channels: int = 32) -> list[Row]:
    rows = []
    feats, index, segments = pillar_workload(device, channels)
    backends = ["torch"] + (["torch_scatter"] if torch_scatter_available() else [])
    stats = {"points": feats.shape[0], "segments": segments, "channels": channels}
    moved = feats.shape[0] * (channels * 4 + 8) + segments * channels * 4
    leaf = feats.clone().requires_grad_(True)
    grad = torch.randn(segments, channels, device=device)

    def forward(reduce, backend):
        return lambda: scatter_reduce(feats, index, segments, reduce, backend=backend)

    def forward_backward(reduce, backend):
        def run():
            leaf.grad = None
            scatter_reduce(leaf, index, segments, reduce, backend=backend).backward(grad)
        return run

    for reduce in ("sum", "mean", "max"):
        results = {backend: scatter_reduce(feats, index, segments, reduce, backend=backend) for backend in backends}
        fns = {}
        for backend in backends:
            fns[(backend, "fwd")] = forward(reduce, backend)
            fns[(backend, "fwd+bwd")] = forward_backward(reduce, backend)
        times = timed_together(fns, device, repeats)
        for backend in backends:
            med, best = times[(backend, "fwd")]
            med_b, _ = times[(backend, "fwd+bwd")]
            rows.append(Row("scatter", f"{reduce}: {backend}", med, best, floor_ms(moved, bandwidth),
                            f"forward + backward {med_b:.2f} ms (median)",
                            dict(stats, fwd_bwd_median_ms=med_b, backend=backend, reduce=reduce)))
        if len(results) == 2:
            diff = float((results["torch"] - results["torch_scatter"]).abs().max())
            rows[-1].note += f"; max |torch - torch_scatter| = {diff:.1e}"
    return rows


def scatter_decision(rows: list[Row], device: str) -> str:
    totals: dict[str, float] = {}
    for row in rows:
        if row.section == "scatter":
            backend = row.extra["backend"]
            totals[backend] = totals.get(backend, 0.0) + row.median_ms + row.extra["fwd_bwd_median_ms"]
    if not totals:
        return ""
    winner = min(totals, key=totals.get)
    summary = ", ".join(f"{name} {ms:.1f} ms" for name, ms in sorted(totals.items()))
    return (f"scatter backend on {device}: summed medians (fwd and fwd+bwd, sum/mean/max): {summary} -> faster: "
            f"{winner}; fusion.cuda_ops.scatter.AUTO_BACKEND[{device!r}] = {AUTO_BACKEND.get(device)!r}")


# ---------------------------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per figure (median and min reported)")
    parser.add_argument("--points", type=int, default=300_000, help="LiDAR cloud size for the voxelization figures")
    parser.add_argument("--only", default="voxelize,bev_pool,scatter", help="comma-separated sections to run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch has no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = set(args.only.split(","))
    bandwidth = memory_bandwidth(args.device)
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    print(f"device: {args.device} ({machine}); measured copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); "
          f"floor = bytes that must move / that bandwidth")
    cuda_mods = compile_cuda_comparisons() if args.device == "cuda" else None
    rows: list[Row] = []
    if "voxelize" in sections:
        rows += bench_voxelize(args.device, args.repeats, args.points, bandwidth, cuda_mods)
    if "bev_pool" in sections:
        rows += bench_bev_pool(args.device, args.repeats, bandwidth, cuda_mods)
    if "scatter" in sections:
        rows += bench_scatter(args.device, args.repeats, bandwidth)
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            print(f"\n[{section}]" + "".join(f" {k}={v}" for k, v in row.extra.items()
                                             if k in ("points", "voxels", "channels", "segments", "grid")))
            print(f"  {'what':58s} {'median ms':>10s} {'min ms':>9s} {'floor ms':>9s}  note")
        floor = f"{row.floor_ms:9.3f}" if row.floor_ms is not None else f"{'-':>9s}"
        print(f"  {row.name:58s} {row.median_ms:10.3f} {row.min_ms:9.3f} {floor}  {row.note}")
    decision = scatter_decision(rows, args.device)
    if decision:
        print("\n" + decision)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": args.device, "machine": machine, "bandwidth_bytes_per_s": bandwidth,
                       "rows": [asdict(r) for r in rows], "scatter_decision": decision}, handle, indent=1)
    return 0
