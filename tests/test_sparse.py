"""spconv on CPU (fusion/sparse.py): backward works without CUDA, and forward results and gradients match a dense
conv3d reference under the default thread count, run after run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import spconv.pytorch as spconv
from fusion.sparse import SingleThreadSparse, patch_spconv_cpu, single_thread, spconv_cpu_patched

SPATIAL = (12, 16, 16)  # (Z, Y, X)
BATCH = 2
IN_CHANNELS, OUT_CHANNELS = 6, 8


def random_sites(seed: int, count: int = 700) -> torch.Tensor:
    """[V, 4] int32 unique active sites (batch, z, y, x)."""
    g = torch.Generator().manual_seed(seed)
    sites = torch.stack([torch.randint(0, BATCH, (count,), generator=g)]
                        + [torch.randint(0, size, (count,), generator=g) for size in SPATIAL], dim=1)
    return torch.unique(sites, dim=0).int()


def sparse_net(seed: int) -> spconv.SparseSequential:
    """Submanifold conv, stride-2 sparse conv, submanifold conv (no bias, no norm: the dense reference is exact)."""
    torch.manual_seed(seed)
    return spconv.SparseSequential(
        spconv.SubMConv3d(IN_CHANNELS, OUT_CHANNELS, 3, padding=1, bias=False, indice_key="subm0"),
        spconv.SparseConv3d(OUT_CHANNELS, OUT_CHANNELS, 3, stride=2, padding=1, bias=False, indice_key="down1"),
        spconv.SubMConv3d(OUT_CHANNELS, OUT_CHANNELS, 3, padding=1, bias=False, indice_key="subm1"),
    )


def dense_weight(conv) -> torch.Tensor:
    """spconv's [out, kz, ky, kx, in] weight as conv3d's [out, in, kz, ky, kx]."""
    return conv.weight.detach().permute(0, 4, 1, 2, 3).contiguous()


def dense_reference(sites, features, net):
    """The same network on dense tensors with torch.nn.functional.conv3d: submanifold convs are dense convs whose
    output is kept only at the input's active sites; a strided sparse conv is a plain strided dense conv (its output
    sites are exactly the cells whose receptive field holds an active input). Returns (dense output [B, C, Z, Y, X],
    gradient leaves: features and the three weights)."""
    b, z, y, x = sites.long().unbind(1)
    features = features.detach().clone().requires_grad_(True)
    weights = [dense_weight(conv).requires_grad_(True) for conv in net]
    grid = torch.zeros(BATCH, *SPATIAL, IN_CHANNELS).index_put((b, z, y, x), features).permute(0, 4, 1, 2, 3)
    active = torch.zeros(BATCH, 1, *SPATIAL)
    active[b, 0, z, y, x] = 1.0
    out = F.conv3d(grid, weights[0], padding=1) * active
    out = F.conv3d(out, weights[1], stride=2, padding=1)
    active_down = (F.max_pool3d(active, 3, stride=2, padding=1) > 0).float()
    out = F.conv3d(out, weights[2], padding=1) * active_down
    return out, [features] + weights


def compare_once(seed: int, guarded: bool = True, guard_backward: bool = True) -> float:
    """Max abs difference between spconv (forward and all gradients) and the dense reference for one random net."""
    sites = random_sites(seed)
    g = torch.Generator().manual_seed(seed + 1000)
    features = torch.randn(sites.shape[0], IN_CHANNELS, generator=g).requires_grad_(True)
    net = sparse_net(seed)
    module = SingleThreadSparse(net) if guarded and guard_backward else net
    tensor = spconv.SparseConvTensor(features, sites, list(SPATIAL), BATCH)
    if guarded and not guard_backward:
        with single_thread():  # forward only: the backward below runs with every thread
            out = module(tensor).dense()
    else:
        out = module(tensor).dense()
    upstream = torch.randn(out.shape, generator=g)
    (out * upstream).sum().backward()
    reference, leaves = dense_reference(sites, features, net)
    (reference * upstream).sum().backward()
    errors = [(out - reference).abs().max(), (features.grad - leaves[0].grad).abs().max()]
    errors += [(conv.weight.grad.permute(0, 4, 1, 2, 3) - leaf.grad).abs().max() for conv, leaf in zip(net, leaves[1:])]
    return float(max(errors))


def test_patch_is_applied_before_first_use_and_idempotent():
    SingleThreadSparse(sparse_net(0))  # wrapping a sparse module applies the patch (the project's one place)
    assert spconv_cpu_patched()
    assert patch_spconv_cpu() == 0
    import fusion.branches.lidar  # noqa: F401
    assert spconv_cpu_patched()


def test_spconv_backward_runs_on_cpu():
    features = torch.randn(50, IN_CHANNELS, requires_grad=True)
    sites = random_sites(0, count=50)[:50]
    features = features[:sites.shape[0]]
    net = sparse_net(0)
    out = SingleThreadSparse(net)(spconv.SparseConvTensor(features, sites, list(SPATIAL), BATCH))
    out.features.square().sum().backward()
    assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 for conv in net)


@pytest.mark.parametrize("threads", sorted({torch.get_num_threads(), max(2, torch.get_num_threads())}))
def test_guarded_spconv_matches_dense_reference_run_after_run(threads):
    """Forward and gradients (features and every weight) against conv3d, 30 random nets, at the default thread count
    (and at 2 threads if the default is 1, so that the guard is exercised anywhere). Unguarded, these runs are off by
    up to about 1 with 2 threads (see test_without_the_guard_spconv_cpu_is_wrong_with_several_threads)."""
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        errors = [compare_once(seed) for seed in range(30)]
        assert torch.get_num_threads() == threads, "the guard did not restore the thread count"
    finally:
        torch.set_num_threads(default)
    assert max(errors) < 1e-4, f"spconv differs from the dense reference: {errors}"


def test_thread_count_is_restored_after_forward_backward_and_partial_backward():
    default = torch.get_num_threads()
    torch.set_num_threads(max(2, default))
    try:
        threads = torch.get_num_threads()
        sites = random_sites(3)
        net = sparse_net(3)
        features = torch.randn(sites.shape[0], IN_CHANNELS)  # raw inputs: no gradient wanted for them
        out = SingleThreadSparse(net)(spconv.SparseConvTensor(features, sites, list(SPATIAL), BATCH))
        assert torch.get_num_threads() == threads
        out.features.sum().backward()
        assert torch.get_num_threads() == threads
        assert all(conv.weight.grad is not None for conv in net)
        # Gradients of the weights only: the input-side marker is not needed by this backward; the engine callback
        # restores the count.
        out = SingleThreadSparse(net)(spconv.SparseConvTensor(features.requires_grad_(True), sites, list(SPATIAL),
                                                              BATCH))
        torch.autograd.grad(out.features.sum(), [net[2].weight])
        assert torch.get_num_threads() == threads
        with torch.no_grad():
            SingleThreadSparse(net)(spconv.SparseConvTensor(features, sites, list(SPATIAL), BATCH))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(default)


def test_two_guarded_encoders_in_one_graph_stay_correct():
    """Overlapping guarded backward regions (two sparse encoders feeding one loss) keep one thread until both are
    done, then restore the count."""
    default = torch.get_num_threads()
    torch.set_num_threads(max(2, default))
    try:
        threads = torch.get_num_threads()
        g = torch.Generator().manual_seed(5)
        runs = []
        for seed in (5, 6):
            sites = random_sites(seed)
            features = torch.randn(sites.shape[0], IN_CHANNELS, generator=g).requires_grad_(True)
            net = sparse_net(seed)
            out = SingleThreadSparse(net)(spconv.SparseConvTensor(features, sites, list(SPATIAL), BATCH)).dense()
            runs.append((sites, features, net, out))
        upstream = torch.randn(runs[0][3].shape, generator=g)
        (runs[0][3] * runs[1][3] * upstream).sum().backward()
        assert torch.get_num_threads() == threads
        references = [dense_reference(sites, features, net) for sites, features, net, _ in runs]
        (references[0][0] * references[1][0] * upstream).sum().backward()
        for (_, features, net, _), (_, leaves) in zip(runs, references):
            torch.testing.assert_close(features.grad, leaves[0].grad, atol=1e-4, rtol=1e-4)
            for conv, leaf in zip(net, leaves[1:]):
                torch.testing.assert_close(conv.weight.grad.permute(0, 4, 1, 2, 3), leaf.grad, atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(default)


@pytest.mark.slow  # a second on a quiet machine, but a minute when the 2 cores are shared (threads oversubscribed)
def test_without_the_guard_spconv_cpu_is_wrong_with_several_threads():
    """Why the guard exists (spconv 2.3.8 CPU): with 2 threads, unguarded passes and a guard on the forward only
    (gradients computed with 2 threads) both give wrong results (on the 2-core dev machine: 30 runs out of 30, errors
    up to about 1.5; 10 runs are checked here). This is the test that fails without the guard's two halves. If it starts failing, spconv has
    fixed its CPU kernels and the guard may be dropped."""
    patch_spconv_cpu()  # the bare nets below are used without a SingleThreadSparse, which would apply it
    default = torch.get_num_threads()
    torch.set_num_threads(max(2, default))
    try:
        unguarded = [compare_once(seed, guarded=False) for seed in range(10)]
        forward_only = [compare_once(seed, guarded=True, guard_backward=False) for seed in range(10)]
    finally:
        torch.set_num_threads(default)
    assert max(unguarded) > 1e-3, f"unguarded spconv matched the reference in all runs: {unguarded}"
    assert max(forward_only) > 1e-3, f"spconv gradients matched with several threads in all runs: {forward_only}"
