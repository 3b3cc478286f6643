"""fusion.cuda_ops on CUDA: every op bit-identical to its CPU kernel (which tests/test_cuda_ops.py checks against the
references and spconv), plus gradients and errors on the GPU. Skipped where torch has no CUDA device or the
extension was built without the CUDA kernels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.cuda_ops import (bev_pool, dynamic_voxelize, hard_voxelize, has_cuda_kernels, reference, scatter_reduce,
                             torch_scatter_available)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and not has_cuda_kernels(),
                       reason="fusion.cuda_ops was built without CUDA kernels (rebuild with a CUDA torch)"),
]

POINT_RANGE = (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)
LIDAR_VOXEL = (0.075, 0.075, 0.2)
PILLAR_VOXEL = (0.2, 0.2, 8.0)


def make_cloud(n: int = 100_000, seed: int = 0, voxel=LIDAR_VOXEL) -> torch.Tensor:
    """[~n, 5] float32: uniform points (some out of range), tight clusters (voxels past max_points), points on and
    next to cell borders, exact duplicates, NaN and Inf."""
    rng = np.random.default_rng(seed)
    lo, hi, size = np.array(POINT_RANGE[:3]), np.array(POINT_RANGE[3:]), np.array(voxel)
    parts = [rng.uniform(lo - 3, hi + 3, (n // 2, 3)),
             rng.uniform(lo, hi, (50, 3))[rng.integers(0, 50, n // 4)] + rng.normal(0, 0.5 * size, (n // 4, 3))]
    borders = (lo + rng.integers(0, ((hi - lo) / size).astype(int), (n // 16, 3)) * size).astype(np.float32)
    parts += [borders, np.nextafter(borders, np.float32(-np.inf)), np.nextafter(borders, np.float32(np.inf))]
    xyz = np.concatenate(parts).astype(np.float32)
    xyz = np.concatenate([xyz, xyz[rng.integers(0, len(xyz), n // 10)]])
    xyz = xyz[rng.permutation(len(xyz))]
    bad = rng.integers(0, len(xyz), 60)
    xyz[bad[:20], 0], xyz[bad[20:40], 1], xyz[bad[40:], 2] = np.nan, np.inf, -np.inf
    features = rng.uniform(0, 1, (len(xyz), 2)).astype(np.float32)
    return torch.from_numpy(np.concatenate([xyz, features], axis=1))


def assert_same(gpu, cpu):
    for a, b in zip(gpu, cpu):
        assert a.is_cuda and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("voxel, max_points, max_voxels", [
    (LIDAR_VOXEL, 10, 120_000), (LIDAR_VOXEL, 3, 5_000), (PILLAR_VOXEL, 10, 120_000), ((0.5, 0.5, 0.5), 1, 1)])
def test_hard_voxelize_cuda_equals_cpu(voxel, max_points, max_voxels):
    points = make_cloud(voxel=voxel)
    cpu = hard_voxelize(points, voxel, POINT_RANGE, max_points, max_voxels)
    gpu = hard_voxelize(points.cuda(), voxel, POINT_RANGE, max_points, max_voxels)
    assert_same(gpu, cpu)
    assert_same(gpu, reference.hard_voxelize(points, voxel, POINT_RANGE, max_points, max_voxels))


def test_hard_voxelize_cuda_one_crowded_cell_and_repeatability():
    """50,000 points in one cell: the kept points are the first max_points in input order, every run."""
    points = torch.zeros(50_000, 4)
    points[:, :3] = 0.01
    points[:, 3] = torch.arange(50_000, dtype=torch.float32)
    first = hard_voxelize(points.cuda(), LIDAR_VOXEL, POINT_RANGE, 10, 100)
    assert first[0][0, :, 3].tolist() == list(range(10)) and first[2].tolist() == [10]
    cloud = make_cloud(seed=1).cuda()
    results = [hard_voxelize(cloud, LIDAR_VOXEL, POINT_RANGE, 5, 20_000) for _ in range(3)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_dynamic_voxelize_cuda_equals_cpu():
    points = make_cloud(seed=2)
    assert torch.equal(dynamic_voxelize(points.cuda(), LIDAR_VOXEL, POINT_RANGE).cpu(),
                       dynamic_voxelize(points, LIDAR_VOXEL, POINT_RANGE))


def test_voxelize_cuda_empty_input():
    voxels, coords, num_points = hard_voxelize(torch.zeros(0, 4, device="cuda"), LIDAR_VOXEL, POINT_RANGE, 7, 10)
    assert voxels.shape == (0, 7, 4) and coords.shape == (0, 3) and num_points.shape == (0,) and voxels.is_cuda
    outside = torch.full((5, 4), 100.0, device="cuda")
    assert hard_voxelize(outside, LIDAR_VOXEL, POINT_RANGE, 7, 10)[0].shape == (0, 7, 4)
    assert dynamic_voxelize(torch.zeros(0, 3, device="cuda"), LIDAR_VOXEL, POINT_RANGE).shape == (0, 3)


def bev_inputs(p=50_000, channels=40, seed=0, dtype=torch.float32, batch=2, shape=(2, 60, 50)):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(p, channels, generator=generator, dtype=torch.float64).to(dtype)
    coords = torch.stack([torch.randint(0, n, (p,), generator=generator) for n in (batch,) + tuple(shape)], dim=1)
    coords[p // 2:] = coords[: p - p // 2]
    return features, coords


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_bev_pool_cuda_bit_identical_to_cpu(dtype):
    features, coords = bev_inputs(dtype=dtype)
    cpu = bev_pool(features, coords, 2, (2, 60, 50))
    gpu = bev_pool(features.cuda(), coords.cuda().int(), 2, (2, 60, 50))
    assert gpu.is_cuda and gpu.dtype == dtype
    assert torch.equal(gpu.cpu(), cpu)  # both sum every cell in input order with the same accumulation type


def test_bev_pool_cuda_gradients():
    features, coords = bev_inputs(80, 3, seed=1, dtype=torch.float64, shape=(2, 3, 4))
    features = features.cuda().requires_grad_(True)
    coords = coords.cuda()
    assert torch.autograd.gradcheck(lambda f: bev_pool(f, coords, 2, (2, 3, 4)), (features,))
    grad_out = torch.randn(2, 3, 2, 3, 4, dtype=torch.float64, device="cuda")
    ours, = torch.autograd.grad(bev_pool(features, coords, 2, (2, 3, 4)), features, grad_out)
    theirs, = torch.autograd.grad(reference.bev_pool(features, coords, 2, (2, 3, 4)), features, grad_out)
    assert torch.equal(ours, theirs)


def test_bev_pool_cuda_rejects_out_of_range_and_handles_empty():
    features, coords = bev_inputs(1_000, 4, seed=2)
    coords[321, 2] = 60
    with pytest.raises(ValueError, match="row 321"):
        bev_pool(features.cuda(), coords.cuda(), 2, (2, 60, 50))
    empty = bev_pool(torch.zeros(0, 3, device="cuda"), torch.zeros(0, 4, dtype=torch.long, device="cuda"), 1,
                     (1, 4, 5))
    assert empty.shape == (1, 3, 1, 4, 5) and not bool(empty.any())


@pytest.mark.parametrize("backend", ["torch"] + (["torch_scatter"] if torch_scatter_available() else []))
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_scatter_reduce_cuda(backend, reduce):
    generator = torch.Generator().manual_seed(3)
    src = torch.randn(300, 5, generator=generator, dtype=torch.float64)
    index = torch.randint(0, 40, (300,), generator=generator)
    leaf = src.cuda().requires_grad_(True)
    leaf_ref = src.clone().requires_grad_(True)
    ours = scatter_reduce(leaf, index.cuda(), 42, reduce, backend=backend)
    expected = reference.scatter_reduce(leaf_ref, index, 42, reduce)
    torch.testing.assert_close(ours.cpu(), expected)
    grad = torch.randn(42, 5, generator=generator, dtype=torch.float64)
    ours.backward(grad.cuda())
    expected.backward(grad)
    torch.testing.assert_close(leaf.grad.cpu(), leaf_ref.grad)
