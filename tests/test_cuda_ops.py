"""fusion.cuda_ops on CPU: the compiled kernels against the pure-torch references (integer outputs and copied
points bit for bit, sums to float tolerance), against spconv's PointToVoxel, against BEVGrid, and their errors.
CUDA-only checks live in tests/test_cuda_ops_cuda.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fusion.cuda_ops._extension as extension
from fusion.cuda_ops import (CompiledOpsMissingError, bev_pool, dynamic_voxelize, hard_voxelize, reference,
                             scatter_reduce, torch_scatter_available, voxel_grid)
from fusion.cuda_ops.scatter import AUTO_BACKEND
from fusion.grid import BEVGrid

POINT_RANGE = (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)
LIDAR_VOXEL = (0.075, 0.075, 0.2)
PILLAR_VOXEL = (0.2, 0.2, 8.0)

pytestmark = pytest.mark.skipif(not extension.is_built(), reason="fusion.cuda_ops._C is not built")


def make_cloud(n: int = 20_000, seed: int = 0, voxel=LIDAR_VOXEL, point_range=POINT_RANGE) -> torch.Tensor:
    """[~n, 5] float32 points that exercise every rule: dense clusters (voxels with more than max_points points),
    exact duplicates, points exactly on and next to cell borders (in float32), out-of-range points, NaN and Inf."""
    rng = np.random.default_rng(seed)
    lo, hi = np.array(point_range[:3]), np.array(point_range[3:])
    size = np.array(voxel)
    parts = [rng.uniform(lo - 3, hi + 3, (n // 2, 3))]  # includes out-of-range points
    centers = rng.uniform(lo, hi, (40, 3))
    parts.append((centers[rng.integers(0, 40, n // 4)] + rng.normal(0, 0.5 * size, (n // 4, 3))))
    borders = (lo + rng.integers(0, ((hi - lo) / size).astype(int), (n // 16, 3)) * size).astype(np.float32)
    parts.append(borders)
    parts.append(np.nextafter(borders, np.float32(-np.inf)))
    parts.append(np.nextafter(borders, np.float32(np.inf)))
    xyz = np.concatenate(parts).astype(np.float32)
    xyz = np.concatenate([xyz, xyz[rng.integers(0, len(xyz), n // 10)]])  # exact duplicates
    xyz = xyz[rng.permutation(len(xyz))]
    bad = rng.integers(0, len(xyz), 60)
    xyz[bad[:20], 0] = np.nan
    xyz[bad[20:40], 1] = np.inf
    xyz[bad[40:], 2] = -np.inf
    features = rng.uniform(0, 1, (len(xyz), 2)).astype(np.float32)
    return torch.from_numpy(np.concatenate([xyz, features], axis=1))


def assert_voxels_equal(ours, theirs):
    names = ("voxels", "coords", "num_points")
    for name, a, b in zip(names, ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype} {tuple(a.shape)} vs {b.dtype} " \
                                                            f"{tuple(b.shape)}"
        assert torch.equal(a, b), f"{name} differ"


# ---------------------------------------------------------------------------------------------------------------
# hard_voxelize / dynamic_voxelize
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("voxel, max_points, max_voxels", [
    (LIDAR_VOXEL, 10, 120_000),   # every voxel kept
    (LIDAR_VOXEL, 3, 2_000),      # more voxels than max_voxels, many voxels past max_points
    (PILLAR_VOXEL, 10, 5_000),    # pillars (dense table path)
    ((0.5, 0.5, 0.5), 1, 1),      # the smallest limits
])
def test_hard_voxelize_matches_reference(voxel, max_points, max_voxels):
    points = make_cloud(voxel=voxel)
    ours = hard_voxelize(points, voxel, POINT_RANGE, max_points, max_voxels)
    assert_voxels_equal(ours, reference.hard_voxelize(points, voxel, POINT_RANGE, max_points, max_voxels))
    voxels, coords, num_points = ours
    kept = reference.dynamic_voxelize(points, voxel, POINT_RANGE)
    distinct = torch.unique(kept[kept[:, 0] >= 0], dim=0).shape[0]
    assert voxels.shape[0] == min(max_voxels, distinct) > 0
    assert int(num_points.max()) == max_points  # the clusters fill some voxels to the limit
    # zero padding after the kept points
    slots = torch.arange(max_points)[None, :] >= num_points[:, None].long()
    assert bool((voxels[slots] == 0).all())


def test_hard_voxelize_semantics_by_hand():
    """First-appearance voxel order, first max_points points in input order, NaN/out-of-range dropped,
    voxels past max_voxels dropped with their points."""
    points = torch.tensor([
        [0.5, 0.5, 0.5, 1.0],    # voxel A (x 0, y 0, z 0)
        [2.5, 0.5, 0.5, 2.0],    # voxel B (x 2)
        [0.6, 0.4, 0.1, 3.0],    # A
        [float("nan"), 0.5, 0.5, 4.0],
        [0.7, 0.9, 0.9, 5.0],    # A, third point: past max_points = 2
        [9.5, 0.5, 0.5, 6.0],    # outside x range
        [2.1, 1.5, 0.5, 7.0],    # voxel C (x 2, y 1)
        [3.5, 3.5, 0.5, 8.0],    # voxel D: past max_voxels = 3
        [2.9, 0.1, 0.9, 9.0],    # B
    ])
    voxels, coords, num_points = hard_voxelize(points, (1.0, 1.0, 1.0), (0, 0, 0, 4, 4, 1), 2, 3)
    assert coords.tolist() == [[0, 0, 0], [0, 0, 2], [0, 1, 2]]
    assert num_points.tolist() == [2, 2, 1]
    assert voxels[:, :, 3].tolist() == [[1.0, 3.0], [2.0, 9.0], [7.0, 0.0]]


@pytest.mark.parametrize("voxel", [LIDAR_VOXEL, PILLAR_VOXEL])
def test_hard_voxelize_matches_spconv_point_to_voxel(voxel):
    spconv_utils = pytest.importorskip("spconv.pytorch.utils")
    points = make_cloud(voxel=voxel, seed=1)
    generator = spconv_utils.PointToVoxel(vsize_xyz=list(voxel), coors_range_xyz=list(POINT_RANGE),
                                          num_point_features=points.shape[1], max_num_voxels=3_000,
                                          max_num_points_per_voxel=4)
    ours = hard_voxelize(points, voxel, POINT_RANGE, 4, 3_000)
    # PointToVoxel's CPU kernel is a serial loop: with torch's default thread count it gives the same output every
    # time (unlike spconv's CPU convolutions, see the common brief), checked over a few runs.
    for _ in range(3):
        assert_voxels_equal(ours, generator(points))


def test_hard_voxelize_independent_of_thread_count():
    points = make_cloud(40_000, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = hard_voxelize(points, LIDAR_VOXEL, POINT_RANGE, 5, 10_000)
        serial_bev = bev_pool(*bev_inputs(seed=2, dtype=torch.float32), 2, (2, 30, 40))
    finally:
        torch.set_num_threads(max(threads, 2))
    try:
        parallel = hard_voxelize(points, LIDAR_VOXEL, POINT_RANGE, 5, 10_000)
        parallel_bev = bev_pool(*bev_inputs(seed=2, dtype=torch.float32), 2, (2, 30, 40))
    finally:
        torch.set_num_threads(threads)
    assert_voxels_equal(parallel, serial)
    assert torch.equal(parallel_bev, serial_bev)  # bit for bit: every cell sums in input order


def test_dynamic_voxelize_matches_reference_and_hard_voxelize():
    points = make_cloud(seed=3)
    coords = dynamic_voxelize(points, LIDAR_VOXEL, POINT_RANGE)
    assert coords.dtype == torch.int32 and coords.shape == (points.shape[0], 3)
    assert torch.equal(coords, reference.dynamic_voxelize(points, LIDAR_VOXEL, POINT_RANGE))
    dropped = (coords == -1).all(1)
    assert bool(((coords >= 0).all(1) | dropped).all())
    assert bool(dropped[~torch.isfinite(points[:, :3]).all(1)].all())
    # hard_voxelize without a voxel limit: its voxels are exactly the distinct kept coords, in order of first
    # appearance, each with min(its point count, max_points) points
    _, voxel_coords, num_points = hard_voxelize(points, LIDAR_VOXEL, POINT_RANGE, 10, 10 ** 7)
    kept = coords[~dropped]
    distinct, first, counts = np.unique(kept.numpy(), axis=0, return_index=True, return_counts=True)
    order = np.argsort(first)
    assert torch.equal(voxel_coords, torch.from_numpy(distinct[order]))
    assert torch.equal(num_points, torch.from_numpy(np.minimum(counts[order], 10)).int())
    assert int(num_points.max()) == 10


def test_coords_are_bevgrid_rows_and_cols():
    grid = BEVGrid(x_min=-51.2, x_max=51.2, y_min=-40.0, y_max=40.0, z_min=-5.0, z_max=3.0, cell_size=0.4)
    generator = torch.Generator().manual_seed(4)
    xy = torch.rand(50_000, 2, generator=generator) * 120 - 60
    points = torch.cat([xy, torch.zeros(50_000, 1)], dim=1)
    coords = dynamic_voxelize(points, (0.4, 0.4, 8.0), (grid.x_min, grid.y_min, grid.z_min, grid.x_max,
                                                         grid.y_max, grid.z_max))
    row, col, inside = grid.cell_index(xy)
    assert torch.equal(coords[:, 0] >= 0, inside)
    assert torch.equal(coords[inside, 1].long(), row[inside])
    assert torch.equal(coords[inside, 2].long(), col[inside])
    assert voxel_grid((0.4, 0.4, 8.0), (-51.2, -40.0, -5.0, 51.2, 40.0, 3.0)).grid == (grid.width, grid.height, 1)


def test_empty_and_non_contiguous_points():
    empty = torch.zeros(0, 4)
    voxels, coords, num_points = hard_voxelize(empty, LIDAR_VOXEL, POINT_RANGE, 7, 100)
    assert voxels.shape == (0, 7, 4) and coords.shape == (0, 3) and num_points.shape == (0,)
    assert coords.dtype == num_points.dtype == torch.int32 and voxels.dtype == torch.float32
    assert dynamic_voxelize(empty, LIDAR_VOXEL, POINT_RANGE).shape == (0, 3)
    all_outside = torch.full((5, 3), 100.0)
    assert hard_voxelize(all_outside, LIDAR_VOXEL, POINT_RANGE, 7, 100)[0].shape == (0, 7, 3)
    points = make_cloud(5_000, seed=5)
    wide = torch.cat([points, points], dim=1)[:, ::2]  # non-contiguous view, same values
    assert not wide.is_contiguous()
    assert_voxels_equal(hard_voxelize(wide, LIDAR_VOXEL, POINT_RANGE, 5, 1_000),
                        hard_voxelize(wide.contiguous(), LIDAR_VOXEL, POINT_RANGE, 5, 1_000))


@pytest.mark.parametrize("points, voxel, point_range, max_points, max_voxels, message", [
    (torch.zeros(4, 4, dtype=torch.float64), LIDAR_VOXEL, POINT_RANGE, 5, 10, "float32"),
    (torch.zeros(4, 4, dtype=torch.int32), LIDAR_VOXEL, POINT_RANGE, 5, 10, "float32"),
    (torch.zeros(4, 2), LIDAR_VOXEL, POINT_RANGE, 5, 10, "C >= 3"),
    (torch.zeros(12), LIDAR_VOXEL, POINT_RANGE, 5, 10, "C >= 3"),
    (np.zeros((4, 4), np.float32), LIDAR_VOXEL, POINT_RANGE, 5, 10, "torch.Tensor"),
    (torch.zeros(4, 4), (0.1, 0.0, 0.1), POINT_RANGE, 5, 10, "positive"),
    (torch.zeros(4, 4), (0.1, -0.1, 0.1), POINT_RANGE, 5, 10, "positive"),
    (torch.zeros(4, 4), (0.1, 0.1), POINT_RANGE, 5, 10, "voxel_size"),
    (torch.zeros(4, 4), (0.1, float("nan"), 0.1), POINT_RANGE, 5, 10, "finite"),
    (torch.zeros(4, 4), LIDAR_VOXEL, (54, -54, -5, -54, 54, 3), 5, 10, "x_min"),
    (torch.zeros(4, 4), LIDAR_VOXEL, (-54, -54, 3, 54, 54, 3), 5, 10, "z_min"),
    (torch.zeros(4, 4), LIDAR_VOXEL, (-54, -54, -5, 54, 54), 5, 10, "point_range"),
    (torch.zeros(4, 4), LIDAR_VOXEL, POINT_RANGE, 0, 10, "max_points"),
    (torch.zeros(4, 4), LIDAR_VOXEL, POINT_RANGE, 5, 0, "max_voxels"),
    (torch.zeros(4, 4), LIDAR_VOXEL, POINT_RANGE, 2.5, 10, "max_points"),
    (torch.zeros(4, 4), (0.01, 0.01, 0.01), POINT_RANGE, 5, 10, "int32"),
    (torch.zeros(4, 4), (300.0, 0.1, 0.1), POINT_RANGE, 5, 10, "no cell"),
])
def test_hard_voxelize_bad_input(points, voxel, point_range, max_points, max_voxels, message):
    with pytest.raises(ValueError, match=message):
        hard_voxelize(points, voxel, point_range, max_points, max_voxels)
    if max_points == 5 and max_voxels == 10:  # the arguments dynamic_voxelize shares
        with pytest.raises(ValueError, match=message):
            dynamic_voxelize(points, voxel, point_range)


def test_unsupported_device_is_a_value_error():
    points = torch.zeros(4, 4, device="meta")
    with pytest.raises(ValueError, match="device meta"):
        hard_voxelize(points, LIDAR_VOXEL, POINT_RANGE, 5, 10)
    with pytest.raises(ValueError, match="device meta"):
        bev_pool(torch.zeros(2, 3, device="meta"), torch.zeros(2, 4, dtype=torch.long, device="meta"), 1, (1, 2, 2))
    with pytest.raises(ValueError, match="coords on cpu"):
        bev_pool(torch.zeros(2, 3, device="meta"), torch.zeros(2, 4, dtype=torch.long), 1, (1, 2, 2))


def test_missing_extension_gives_build_instructions(monkeypatch):
    monkeypatch.setattr(extension, "_compiled", None)
    monkeypatch.setattr(extension, "_load_error", ImportError("No module named 'fusion.cuda_ops._C'"))
    points = make_cloud(1_000)
    for call in (lambda: hard_voxelize(points, LIDAR_VOXEL, POINT_RANGE, 5, 10),
                 lambda: dynamic_voxelize(points, LIDAR_VOXEL, POINT_RANGE),
                 lambda: bev_pool(torch.ones(1, 2), torch.zeros(1, 4, dtype=torch.long), 1, (1, 1, 1))):
        with pytest.raises(CompiledOpsMissingError, match=r"pip install --no-build-isolation -e \."):
            call()
    # the explicit debugging fallback still works
    assert hard_voxelize(points, LIDAR_VOXEL, POINT_RANGE, 5, 10, use_reference=True)[0].shape[0] == 10


# ---------------------------------------------------------------------------------------------------------------
# bev_pool
# ---------------------------------------------------------------------------------------------------------------

def bev_inputs(p: int = 6_000, channels: int = 12, seed: int = 0, dtype=torch.float32, batch=2, shape=(2, 30, 40)):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(p, channels, generator=generator, dtype=torch.float64).to(dtype)
    coords = torch.stack([torch.randint(0, n, (p,), generator=generator) for n in (batch,) + tuple(shape)], dim=1)
    coords[p // 2:] = coords[: p - p // 2]  # many points per cell
    return features, coords


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                              (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_bev_pool_matches_reference(dtype, tolerance):
    features, coords = bev_inputs(dtype=dtype)
    out = bev_pool(features, coords, 2, (2, 30, 40))
    expected = reference.bev_pool(features, coords, 2, (2, 30, 40))
    assert out.shape == (2, features.shape[1], 2, 30, 40) and out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    # spot-check one cell by hand
    b, z, y, x = coords[0].tolist()
    same = (coords == coords[0]).all(1)
    torch.testing.assert_close(out[b, :, z, y, x].double(), features[same].double().sum(0),
                               rtol=tolerance, atol=tolerance * 10)


def test_bev_pool_coordinate_dtypes_and_layout():
    features, coords = bev_inputs(500, 3, seed=1)
    expected = bev_pool(features, coords, 2, (2, 30, 40))
    assert torch.equal(bev_pool(features, coords.int(), 2, (2, 30, 40)), expected)
    assert torch.equal(bev_pool(features, coords.short(), 2, (2, 30, 40)), expected)
    # non-contiguous features are handled
    wide = features.repeat_interleave(2, dim=1)[:, ::2]
    assert not wide.is_contiguous()
    assert torch.equal(bev_pool(wide, coords, 2, (2, 30, 40)), expected)
    # empty input: zeros of the right shape
    empty = bev_pool(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.long), 2, (1, 4, 5))
    assert empty.shape == (2, 3, 1, 4, 5) and not bool(empty.any())


def test_bev_pool_is_deterministic():
    features, coords = bev_inputs(20_000, 8, seed=2)
    first = bev_pool(features, coords, 2, (2, 30, 40))
    for _ in range(3):
        assert torch.equal(bev_pool(features, coords, 2, (2, 30, 40)), first)


def test_bev_pool_gradcheck_float64():
    features, coords = bev_inputs(60, 3, seed=3, dtype=torch.float64, batch=2, shape=(2, 3, 4))
    features.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: bev_pool(f, coords, 2, (2, 3, 4)), (features,))
    # and the gradient equals the reference's
    grad_out = torch.randn(2, 3, 2, 3, 4, dtype=torch.float64)
    ours, = torch.autograd.grad(bev_pool(features, coords, 2, (2, 3, 4)), features, grad_out)
    theirs, = torch.autograd.grad(reference.bev_pool(features, coords, 2, (2, 3, 4)), features, grad_out)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("column, value", [(0, 2), (0, -1), (1, 2), (2, 30), (3, 40), (3, -5)])
def test_bev_pool_rejects_out_of_range_coords(column, value):
    features, coords = bev_inputs(100, 2, seed=4)
    coords[17, column] = value
    with pytest.raises(ValueError, match="row 17"):
        bev_pool(features, coords, 2, (2, 30, 40))


@pytest.mark.parametrize("features, coords, batch, shape, message", [
    (torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.long), 1, (1, 2, 2), "float"),
    (torch.zeros(3), torch.zeros(3, 4, dtype=torch.long), 1, (1, 2, 2), r"\[P, C\]"),
    (torch.zeros(3, 2), torch.zeros(3, 3, dtype=torch.long), 1, (1, 2, 2), r"\[P, 4\]"),
    (torch.zeros(3, 2), torch.zeros(4, 4, dtype=torch.long), 1, (1, 2, 2), r"\[P, 4\]"),
    (torch.zeros(3, 2), torch.zeros(3, 4), 1, (1, 2, 2), "integer"),
    (torch.zeros(3, 2), torch.zeros(3, 4, dtype=torch.long), 0, (1, 2, 2), "batch_size"),
    (torch.zeros(3, 2), torch.zeros(3, 4, dtype=torch.long), 1, (2, 2), "grid_shape"),
    (torch.zeros(3, 2), torch.zeros(3, 4, dtype=torch.long), 1, (1, 0, 2), "grid_shape"),
    (torch.zeros(3, 2), torch.zeros(3, 4, dtype=torch.long), 4, (1, 40_000, 40_000), "int32"),
])
def test_bev_pool_bad_input(features, coords, batch, shape, message):
    with pytest.raises(ValueError, match=message):
        bev_pool(features, coords, batch, shape)


# ---------------------------------------------------------------------------------------------------------------
# scatter_reduce
# ---------------------------------------------------------------------------------------------------------------

BACKENDS = ["torch"] + (["torch_scatter"] if torch_scatter_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_scatter_reduce_matches_reference_with_gradients(backend, reduce):
    generator = torch.Generator().manual_seed(5)
    src = torch.randn(400, 6, generator=generator, dtype=torch.float64)
    index = torch.randint(0, 50, (400,), generator=generator)
    index[index == 7] = 8  # segment 7 stays empty
    leaf_ours, leaf_ref = src.clone().requires_grad_(True), src.clone().requires_grad_(True)
    ours = scatter_reduce(leaf_ours, index, 53, reduce, backend=backend)  # segments 50-52 are empty too
    expected = reference.scatter_reduce(leaf_ref, index, 53, reduce)
    torch.testing.assert_close(ours, expected)
    assert not bool(ours[[7, 50, 51, 52]].any())
    grad = torch.randn(53, 6, generator=generator, dtype=torch.float64)
    ours.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(leaf_ours.grad, leaf_ref.grad)


def test_scatter_reduce_auto_backend_and_float32():
    src = torch.randn(1000, 4)
    index = torch.randint(0, 30, (1000,))
    auto = scatter_reduce(src, index, 30, "mean")
    assert torch.equal(auto, scatter_reduce(src, index, 30, "mean", backend=AUTO_BACKEND["cpu"]))
    torch.testing.assert_close(auto, reference.scatter_reduce(src, index, 30, "mean"))
    assert scatter_reduce(src[:0], index[:0], 5, "max").shape == (5, 4)


@pytest.mark.parametrize("src, index, segments, reduce, backend, message", [
    (torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long), 3, "sum", "auto", "floating"),
    (torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), 3, "sum", "auto", r"\[N\]"),
    (torch.zeros(4, 2), torch.zeros(4), 3, "sum", "auto", "integer"),
    (torch.zeros(4, 2), torch.tensor([0, 1, 2, 3]), 3, "sum", "auto", r"\[0, 3\)"),
    (torch.zeros(4, 2), torch.tensor([0, -1, 2, 1]), 3, "sum", "auto", r"\[0, 3\)"),
    (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), -1, "sum", "auto", "num_segments"),
    (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 3, "min", "auto", "reduce"),
    (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 3, "sum", "cupy", "backend"),
])
def test_scatter_reduce_bad_input(src, index, segments, reduce, backend, message):
    with pytest.raises(ValueError, match=message):
        scatter_reduce(src, index, segments, reduce, backend=backend)


def test_scatter_reduce_max_gradient_goes_to_first_maximum():
    src = torch.tensor([[1.0, 5.0], [3.0, 5.0], [3.0, 2.0], [7.0, -1.0]], requires_grad=True)
    index = torch.tensor([0, 0, 0, 2])
    out = scatter_reduce(src, index, 3, "max", backend="torch")
    assert out.tolist() == [[3.0, 5.0], [0.0, 0.0], [7.0, -1.0]]
    out.backward(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert src.grad.tolist() == [[0.0, 2.0], [1.0, 0.0], [0.0, 0.0], [5.0, 6.0]]
