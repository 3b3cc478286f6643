"""DeformableFuser: masking of absent modalities, any subset, locality (linear cost), contribution maps."""
import itertools

import pytest
import torch

from fusion.fuser import DeformableFuser, FusionAttention, contribution_maps, contribution_summary
from fusion.grid import BEVGrid
from fusion.types import MODALITIES

GRID = BEVGrid(-12.8, 12.8, -9.6, 9.6, cell_size=0.8)  # H=24, W=32: a non-square grid catches x/y mix-ups


pytestmark = pytest.mark.usefixtures("single_torch_thread")
CHANNELS = {"camera": 6, "lidar": 8, "radar": 4, "gps": 5}


def make_fuser(seed=0, **kwargs) -> DeformableFuser:
    torch.manual_seed(seed)
    fuser = DeformableFuser(GRID, CHANNELS, channels=16, heads=2, points=3, **kwargs)
    # Non-trivial attention logits and offsets (the default start is uniform, with fixed offsets).
    with torch.no_grad():
        fuser.logits.weight.normal_(0, 0.5)
        fuser.offsets.weight.normal_(0, 0.3)
    return fuser.eval()


def make_features(batch=2, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, c, *GRID.shape, generator=g) for m, c in CHANNELS.items()}


def test_masked_modality_has_exactly_zero_weight_and_no_influence():
    fuser = make_fuser()
    features = make_features()
    present = {m: torch.tensor([True, True]) for m in MODALITIES}
    present["radar"] = torch.tensor([True, False])
    fused, attention = fuser(features, present)
    radar = attention.modalities.index("radar")
    assert torch.all(attention.weights[1, :, radar] == 0)
    assert attention.weights[0, :, radar].sum() > 0
    # Sample 1's output must not depend on its radar features at all; sample 0's must.
    changed = dict(features)
    changed["radar"] = features["radar"] + 10 * torch.randn_like(features["radar"])
    fused2, _ = fuser(changed, present)
    assert torch.equal(fused[1], fused2[1])
    assert not torch.allclose(fused[0], fused2[0])
    # Weights of the present modalities are a distribution per (sample, head, cell).
    sums = attention.weights.sum(dim=(2, 3))
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)


def test_absent_key_equals_masked_for_every_sample():
    fuser = make_fuser()
    features = make_features()
    without = {m: f for m, f in features.items() if m != "camera"}
    present_all = {m: torch.tensor([True, True]) for m in MODALITIES}
    masked = dict(present_all, camera=torch.tensor([False, False]))
    fused_absent, att_absent = fuser(without, present_all)
    fused_masked, att_masked = fuser(features, masked)
    assert torch.allclose(fused_absent, fused_masked, atol=1e-6)
    assert torch.allclose(att_absent.weights, att_masked.weights, atol=1e-7)
    assert not att_absent.present[:, att_absent.modalities.index("camera")].any()


@pytest.mark.parametrize("subset", [s for r in range(1, 5) for s in itertools.combinations(MODALITIES, r)])
def test_every_subset_forward_backward(subset):
    fuser = make_fuser().train()
    features = {m: f.requires_grad_() for m, f in make_features().items() if m in subset}
    fused, attention = fuser(features, {m: torch.tensor([True, True]) for m in subset})
    assert fused.shape == (2, 16, *GRID.shape) and torch.isfinite(fused).all()
    fused.square().mean().backward()
    for m in subset:
        assert features[m].grad is not None and features[m].grad.abs().sum() > 0, m
    for name, p in fuser.value_proj.items():
        assert (p[0].weight.grad is not None) == (name in subset)
    maps = contribution_maps(attention)
    for i, m in enumerate(attention.modalities):
        if m not in subset:
            assert torch.all(maps[:, i] == 0)
    assert torch.allclose(maps.sum(1), torch.ones(2, *GRID.shape), atol=1e-5)


def test_sample_without_any_modality_is_finite_with_zero_weights():
    fuser = make_fuser()
    features = make_features()
    present = {m: torch.tensor([True, False]) for m in MODALITIES}
    fused, attention = fuser(features, present)
    assert torch.isfinite(fused).all()
    assert torch.all(attention.weights[1] == 0)
    # It depends on nothing: any features give the same output for that sample.
    fused2, _ = fuser(make_features(seed=7), present)
    assert torch.equal(fused[1], fused2[1])
    # No features at all (every modality absent), only the masks for the batch size.
    empty, att = fuser({}, {m: torch.tensor([False, False]) for m in MODALITIES})
    assert torch.isfinite(empty).all() and torch.all(att.weights == 0)
    assert torch.allclose(empty[0], fused[1], atol=1e-6)
    # Gradients through an all-absent sample are finite.
    feats = {m: f.requires_grad_() for m, f in make_features().items()}
    out, _ = fuser.train()(feats, present)
    out.sum().backward()
    assert all(torch.isfinite(f.grad).all() for f in feats.values())


def test_attention_is_local_so_cost_is_linear_in_cells():
    """A cell's output depends only on features within the sampling reach: perturbing the far half of the grid
    leaves the near cells unchanged (each query reads heads x M x K values, not all H x W cells)."""
    fuser = make_fuser()
    with torch.no_grad():  # bound the offsets: |offset| <= 3 cells, bilinear support +1 cell
        fuser.offsets.weight.zero_()
        fuser.offsets.bias.clamp_(-3, 3)
    features = make_features()
    present = {m: torch.tensor([True, True]) for m in MODALITIES}
    fused, _ = fuser(features, present)
    changed = {m: f.clone() for m, f in features.items()}
    for f in changed.values():
        f[..., 20:] = torch.randn_like(f[..., 20:])  # columns 20..31 replaced
    fused2, _ = fuser(changed, present)
    assert torch.equal(fused[..., :15], fused2[..., :15])  # 4+ cells away: untouched
    assert not torch.allclose(fused[..., 20:], fused2[..., 20:])


def test_samples_are_independent_and_batch_order_does_not_matter():
    fuser = make_fuser()
    features = make_features(batch=3)
    present = {m: torch.tensor([True, False, True]) for m in MODALITIES}
    present["lidar"] = torch.tensor([True, True, False])
    fused, _ = fuser(features, present)
    order = torch.tensor([2, 0, 1])
    fused_p, _ = fuser({m: f[order] for m, f in features.items()}, {m: p[order] for m, p in present.items()})
    assert torch.allclose(fused[order], fused_p, atol=1e-5)


def test_contribution_summary_shares():
    weights = torch.zeros(2, 1, 4, 1, 2, 2)
    weights[0, 0, 1] = 0.75  # sample 0: lidar 0.75, radar 0.25 at every cell
    weights[0, 0, 2] = 0.25
    weights[1, 0, 1] = 1.0  # sample 1: lidar only
    attention = FusionAttention(weights, MODALITIES, torch.tensor([[False, True, True, False], [False, True, False,
                                                                                                False]]))
    summary = contribution_summary(attention)
    assert summary == pytest.approx({"camera": 0.0, "lidar": 0.875, "radar": 0.125, "gps": 0.0})
    only_sample_0 = contribution_summary(attention, cell_mask=torch.tensor([True, False])[:, None, None].expand(2, 2, 2))
    assert only_sample_0 == pytest.approx({"camera": 0.0, "lidar": 0.75, "radar": 0.25, "gps": 0.0})


def test_bad_inputs_name_the_problem():
    fuser = make_fuser()
    features = make_features()
    with pytest.raises(ValueError, match="sonar"):
        fuser({"sonar": features["lidar"]})
    with pytest.raises(ValueError, match="lidar"):
        fuser({"lidar": features["lidar"][..., :-1]})
    with pytest.raises(ValueError, match="divisible"):
        DeformableFuser(GRID, CHANNELS, channels=10, heads=4)
