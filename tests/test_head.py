"""CenterPoint head: target encoding, decoding round trip, losses."""
import math

import numpy as np
import pytest
import torch

from fusion.grid import BEVGrid
from fusion.heads.centerpoint import CenterHead, HeadOutput
from fusion.heads.decode import decode_boxes, encode_targets, gaussian_radius, relevant_attribute_mask
from fusion.losses import CenterPointLoss, gaussian_focal_loss, masked_l1
from fusion.types import ATTRIBUTES, DETECTION_CLASSES, NO_ATTRIBUTE, Boxes

GRID = BEVGrid(-20.0, 20.0, -16.0, 16.0, cell_size=0.5)  # H=64, W=80


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def make_boxes(n: int, seed: int = 0, grid: BEVGrid = GRID, min_separation: float = 2.0) -> Boxes:
    """n ground-truth boxes inside the grid with centers at least min_separation apart (meters)."""
    rng = np.random.default_rng(seed)
    centers = []
    while len(centers) < n:
        c = rng.uniform([grid.x_min + 1, grid.y_min + 1], [grid.x_max - 1, grid.y_max - 1])
        if all(np.hypot(*(c - o)) >= min_separation for o in centers):
            centers.append(c)
    labels = rng.integers(0, len(DETECTION_CLASSES), n)
    relevant = relevant_attribute_mask()
    attributes = []
    for label in labels:
        options = torch.nonzero(relevant[label]).flatten().tolist()
        attributes.append(int(rng.choice(options)) if options else NO_ATTRIBUTE)
    velocity = rng.normal(0, 3, (n, 2))
    velocity[0] = np.nan  # unknown velocity (as the devkit gives for some boxes)
    return Boxes(
        center=torch.tensor(np.c_[np.array(centers), rng.uniform(-1, 2, n)], dtype=torch.float32),
        size=torch.tensor(rng.uniform([0.4, 0.4, 0.8], [12, 3, 4], (n, 3)), dtype=torch.float32),
        yaw=torch.tensor(rng.uniform(-math.pi, math.pi, n), dtype=torch.float32),
        velocity=torch.tensor(velocity, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.int64),
        attributes=torch.tensor(attributes, dtype=torch.int64),
        scores=torch.ones(n),
        num_lidar_pts=torch.full((n,), 10), num_radar_pts=torch.full((n,), 1),
    )


def centerpoint_gaussian_radius(det_size, min_overlap):
    """CenterPoint's numpy implementation (det3d/core/utils/center_utils.py), as a reference."""
    height, width = det_size
    a1, b1 = 1, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + np.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2 = 4, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + np.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + np.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def perfect_output(targets, grid: BEVGrid = GRID) -> HeadOutput:
    """Head maps that say exactly what the targets say: heatmap logits of the target heatmap, regressions written at
    each object's center cell."""
    batch = targets.heatmap.shape[0]
    h, w = grid.shape
    heat = targets.heatmap.clamp(1e-6, 1 - 1e-6)
    regression = torch.zeros(batch, 10, h * w)
    attribute = torch.zeros(batch, len(ATTRIBUTES), h * w)
    for b in range(batch):
        idx = targets.index[b][targets.mask[b]]
        regression[b][:, idx] = torch.nan_to_num(targets.regression[b][targets.mask[b]]).T
        attr = targets.attribute[b][targets.mask[b]]
        has = attr >= 0
        attribute[b, attr[has], idx[has]] = 5.0
    regression = regression.view(batch, 10, h, w)
    return HeadOutput(heatmap=torch.logit(heat), offset=regression[:, 0:2], height=regression[:, 2:3],
                      size=regression[:, 3:6], rotation=regression[:, 6:8], velocity=regression[:, 8:10],
                      attribute=attribute.view(batch, len(ATTRIBUTES), h, w))


def match(decoded: Boxes, truth: Boxes) -> torch.Tensor:
    """For each ground-truth box, the index of the nearest decoded box."""
    return torch.cdist(truth.center[:, :2], decoded.center[:, :2]).argmin(dim=1)


@pytest.mark.parametrize("size", [(1.0, 1.0), (4.5, 1.9), (23.0, 6.4), (0.5, 8.0)])
@pytest.mark.parametrize("overlap", [0.1, 0.5])
def test_gaussian_radius_matches_centerpoint(size, overlap):
    ours = gaussian_radius(torch.tensor(size[0]), torch.tensor(size[1]), overlap)
    assert float(ours) == pytest.approx(centerpoint_gaussian_radius(size, overlap), rel=1e-5)


def test_encode_targets_places_peaks_and_regressions():
    boxes = make_boxes(12, seed=1)
    outside = Boxes(center=torch.tensor([[25.0, 0.0, 0.0], [0.0, -17.0, 0.0]]), size=torch.ones(2, 3),
                    yaw=torch.zeros(2), velocity=torch.zeros(2, 2), labels=torch.zeros(2, dtype=torch.int64),
                    attributes=torch.zeros(2, dtype=torch.int64), scores=torch.ones(2),
                    num_lidar_pts=torch.ones(2, dtype=torch.int64), num_radar_pts=torch.ones(2, dtype=torch.int64))
    targets = encode_targets([Boxes.cat([boxes, outside]), Boxes.empty()], GRID)
    h, w = GRID.shape
    assert targets.heatmap.shape == (2, 10, h, w)
    assert int(targets.mask[0].sum()) == 12 and not targets.mask[1].any()  # out-of-grid boxes left out
    assert targets.heatmap[1].sum() == 0
    for i in range(12):
        x, y = boxes.center[i, :2].tolist()
        col, row = int((x - GRID.x_min) // GRID.cell_size), int((y - GRID.y_min) // GRID.cell_size)
        assert targets.index[0, i] == row * w + col
        assert targets.heatmap[0, boxes.labels[i], row, col] == 1.0
        reg = targets.regression[0, i]
        assert reg[0].item() == pytest.approx((x - GRID.x_min) / GRID.cell_size - col, abs=1e-4)
        assert reg[1].item() == pytest.approx((y - GRID.y_min) / GRID.cell_size - row, abs=1e-4)
        assert 0 <= reg[0] < 1 and 0 <= reg[1] < 1
        assert reg[2] == boxes.center[i, 2]
        assert torch.allclose(reg[3:6].exp(), boxes.size[i], rtol=1e-5)
        assert math.atan2(reg[6], reg[7]) == pytest.approx(boxes.yaw[i].item(), abs=1e-5)
    assert torch.isnan(targets.regression[0, 0, 8:]).all()  # unknown velocity stays unknown for the loss to mask
    # the number of exact peaks equals the number of objects (their separation keeps peaks apart)
    assert int((targets.heatmap[0] == 1.0).sum()) == 12
    # attribute targets only where the class has attributes
    for i in range(12):
        name = DETECTION_CLASSES[boxes.labels[i]]
        assert (targets.attribute[0, i] >= 0) == (name not in ("barrier", "traffic_cone"))


def test_gaussian_extent_follows_centerpoint_radius():
    box = make_boxes(1, seed=3)
    box = Boxes(**{**box.__dict__, "center": torch.tensor([[0.1, 0.1, 0.0]]), "size": torch.tensor([[4.0, 2.0, 1.5]]),
                   "labels": torch.tensor([0])})
    targets = encode_targets([box], GRID, min_overlap=0.1, min_radius=2)
    radius = max(2, int(centerpoint_gaussian_radius((4.0 / 0.5, 2.0 / 0.5), 0.1)))
    nonzero = torch.nonzero(targets.heatmap[0, 0])
    row, col = divmod(int(targets.index[0, 0]), GRID.width)
    assert (nonzero[:, 0] - row).abs().max() == radius and (nonzero[:, 1] - col).abs().max() == radius
    sigma = (2 * radius + 1) / 6
    assert targets.heatmap[0, 0, row, col + 1].item() == pytest.approx(math.exp(-1 / (2 * sigma ** 2)), rel=1e-5)


def test_decode_round_trip_recovers_the_boxes():
    boxes = [make_boxes(30, seed=4), make_boxes(5, seed=5)]
    targets = encode_targets(boxes, GRID)
    decoded = decode_boxes(perfect_output(targets), GRID, score_threshold=0.5)
    for truth, got in zip(boxes, decoded):
        assert len(got) == len(truth)
        j = match(got, truth)
        assert len(set(j.tolist())) == len(truth)
        got = got.select(j)
        assert torch.allclose(got.center, truth.center, atol=1e-4)  # exact: offsets carry the sub-cell position
        assert torch.allclose(got.size, truth.size, rtol=1e-4)
        angle = (got.yaw - truth.yaw + math.pi) % (2 * math.pi) - math.pi
        assert angle.abs().max() < 1e-4
        assert torch.equal(got.labels, truth.labels)
        assert torch.equal(got.attributes, truth.attributes)
        known = torch.isfinite(truth.velocity)
        assert torch.allclose(got.velocity[known], truth.velocity[known], atol=1e-5)
        assert torch.all(got.scores > 0.99) and torch.all(got.num_lidar_pts == -1)
        # ego frame: every decoded center inside the grid's extent
        assert GRID.contains(got.center[:, :2]).all()


def test_decode_center_is_within_a_cell_without_offsets():
    boxes = make_boxes(10, seed=6)
    output = perfect_output(encode_targets([boxes], GRID))
    output.offset.zero_()
    got = decode_boxes(output, GRID, score_threshold=0.5)[0].select(match(decode_boxes(output, GRID, 0.5)[0], boxes))
    err = (got.center[:, :2] - boxes.center[:, :2]).abs()
    assert err.max() <= GRID.cell_size + 1e-5


def test_decode_limits_and_threshold_and_float32():
    torch.manual_seed(0)
    h, w = GRID.shape
    maps = {name: torch.randn(2, c, h, w, dtype=torch.bfloat16) for name, c in
            [("heatmap", 10), ("offset", 2), ("height", 1), ("size", 3), ("rotation", 2), ("velocity", 2),
             ("attribute", 8)]}
    maps["heatmap"] = maps["heatmap"] + 3  # many confident peaks
    maps["offset"] = torch.full_like(maps["offset"], 0.5)  # decoded centers at the peak cells' centers
    output = HeadOutput(**maps)
    decoded = decode_boxes(output, GRID, score_threshold=0.0, max_boxes=500)
    assert all(len(b) == 500 for b in decoded)
    assert all(b.center.dtype == torch.float32 for b in decoded)
    for b in decoded:
        assert torch.all(b.scores[:-1] >= b.scores[1:])  # best first
        rel = relevant_attribute_mask()[b.labels]
        has = rel.any(1)
        assert torch.all(b.attributes[~has] == NO_ATTRIBUTE)
        assert torch.all(rel[has, b.attributes[has]])  # an attribute only from the class's relevant ones
    threshold = float(decoded[0].scores[300])
    few = decode_boxes(output, GRID, score_threshold=threshold, max_boxes=500)
    assert all(torch.all(b.scores >= threshold) for b in few) and 300 <= len(few[0]) < 500
    # peaks are local maxima: no two kept boxes of one class in neighbouring cells with a higher neighbour
    heat = torch.sigmoid(output.heatmap.float())
    b = decoded[0]
    col = ((b.center[:, 0] - GRID.x_min) / GRID.cell_size).floor().long().clamp(0, w - 1)
    row = ((b.center[:, 1] - GRID.y_min) / GRID.cell_size).floor().long().clamp(0, h - 1)
    for k in range(50):
        r, c, lab = int(row[k]), int(col[k]), int(b.labels[k])
        window = heat[0, lab, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
        assert b.scores[k] == window.max()
    with pytest.raises(ValueError, match="pool_size"):
        decode_boxes(output, GRID, pool_size=2)


def test_focal_loss_matches_centernet_reference():
    torch.manual_seed(1)
    targets = encode_targets([make_boxes(8, seed=7)], GRID)
    logits = torch.randn(1, 10, *GRID.shape)
    pred = torch.sigmoid(logits).clamp(1e-12, 1 - 1e-12).double()
    gt = targets.heatmap.double()
    pos = gt.eq(1)
    reference = -(torch.log(pred) * (1 - pred) ** 2 * pos).sum() - (
        torch.log(1 - pred) * pred ** 2 * (1 - gt) ** 4 * ~pos).sum()
    reference = reference / pos.sum()
    assert gaussian_focal_loss(logits, targets.heatmap).item() == pytest.approx(reference.item(), rel=1e-4)
    perfect = perfect_output(targets)
    prior = torch.full_like(logits, -2.19)  # the head's initial prediction
    # penalty-reduced negatives near the centers keep a soft-target loss above zero, but far below the prior's
    assert gaussian_focal_loss(perfect.heatmap, targets.heatmap) < 0.02 * gaussian_focal_loss(prior, targets.heatmap)


def test_l1_masks_unknown_velocity_and_padding():
    pred = torch.zeros(1, 3, 10)
    target = torch.ones(1, 3, 10)
    target[0, 0, 8:] = float("nan")
    mask = torch.tensor([[True, True, False]])
    weights = torch.ones(10)
    # object 0: 8 finite entries, object 1: 10, object 2: padding -> (8 + 10) / 2 objects
    assert masked_l1(pred, target, mask, weights).item() == pytest.approx(9.0)


def test_huber_channels_are_quadratic_near_the_target_and_l1_beyond():
    pred = torch.zeros(1, 1, 2)
    target = torch.tensor([[[1.0, 10.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    delta = torch.tensor([4.0, 4.0])
    # 0.5 * 1^2 / 4 = 0.125 inside delta; 10 - 2 = 8 beyond it; a delta of 0 keeps that channel L1
    assert masked_l1(pred, target, mask, torch.ones(2), delta).item() == pytest.approx(8.125)
    assert masked_l1(pred, target, mask, torch.ones(2), torch.tensor([0.0, 4.0])).item() == pytest.approx(9.0)


def _optimal_constant(loss_fn, speeds: torch.Tensor) -> float:
    """The one velocity value that minimises loss_fn over objects with these true speeds (gradient descent)."""
    value = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.SGD([value], lr=0.05)
    for _ in range(2000):
        optimiser.zero_grad()
        loss_fn(value.expand(len(speeds))[None, :, None], speeds[None, :, None]).backward()
        optimiser.step()
    return float(value)


def test_huber_velocity_does_not_collapse_to_zero_in_a_mostly_static_world():
    """Objects the features cannot tell apart, 65 % static and 35 % at 6 m/s: L1's best answer is the median, 0
    (the collapse of issue 11), Huber's with delta 4 m/s is near the mean (2.1 m/s)."""
    speeds = torch.tensor([0.0] * 13 + [6.0] * 7)
    mask = torch.ones(1, len(speeds), dtype=torch.bool)
    l1 = _optimal_constant(lambda p, t: masked_l1(p, t, mask, torch.ones(1)), speeds)
    huber = _optimal_constant(lambda p, t: masked_l1(p, t, mask, torch.ones(1), torch.tensor([4.0])), speeds)
    assert abs(l1) < 0.1
    assert 1.5 < huber < 3.0


def test_velocity_huber_delta_must_be_positive():
    with pytest.raises(ValueError, match="velocity_huber_delta"):
        CenterPointLoss(velocity_huber_delta=0.0)
    loss = CenterPointLoss(velocity_huber_delta=4.0)
    assert loss.huber_delta.tolist() == [0.0] * 8 + [4.0, 4.0]


def test_loss_is_small_for_perfect_maps_and_has_gradients_for_each_part():
    boxes = [make_boxes(6, seed=8), make_boxes(3, seed=9)]
    targets = encode_targets(boxes, GRID)
    loss_fn = CenterPointLoss()
    perfect = loss_fn(perfect_output(targets), targets)
    assert perfect["regression"] < 1e-5 and perfect["heatmap"] < 0.2 and perfect["attribute"] < 0.05
    torch.manual_seed(0)
    head = CenterHead(GRID, in_channels=8, shared_channels=8, head_channels=8)
    out = head(torch.randn(2, 8, *GRID.shape))
    losses = loss_fn(out, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss"] > perfect["loss"]
    losses["loss"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert head.attribute[-1].weight.grad.abs().sum() > 0
    assert head.regressions["velocity"][-1].weight.grad.abs().sum() > 0


def test_attribute_loss_ignores_classes_without_attributes():
    boxes = make_boxes(4, seed=10)
    boxes.labels[:] = DETECTION_CLASSES.index("barrier")
    boxes.attributes[:] = NO_ATTRIBUTE
    targets = encode_targets([boxes], GRID)
    out = perfect_output(targets)
    out.attribute.normal_()
    assert CenterPointLoss()(out, targets)["attribute"] == 0.0


def test_head_rejects_wrong_grid():
    head = CenterHead(GRID, in_channels=4)
    with pytest.raises(ValueError, match="grid"):
        head(torch.zeros(1, 4, 10, 10))


def test_direction_classifier_encoding_round_trips_every_heading():
    from fusion.heads.decode import axis_and_direction, decode_yaw
    yaw = torch.linspace(-math.pi + 1e-4, math.pi, 721)
    double, direction = axis_and_direction(yaw)
    logit = (direction * 2 - 1)[:, None] * 5.0
    decoded = decode_yaw(double, logit)
    error = torch.remainder(decoded - yaw + math.pi, 2 * math.pi) - math.pi
    assert error.abs().max() < 1e-4
    # the axis is the same for yaw and yaw + pi: only the direction label differs
    double_flipped, direction_flipped = axis_and_direction(yaw + math.pi)
    assert torch.allclose(double, double_flipped, atol=1e-5)
    away_from_edge = (torch.cos(yaw).abs() > 1e-3) & (torch.sin(yaw).abs() > 1e-3)
    assert torch.equal(direction[away_from_edge], 1 - direction_flipped[away_from_edge])


def test_head_with_direction_classifier_trains_and_decodes_headings():
    from fusion.losses import CenterPointLoss
    torch.manual_seed(0)
    head = CenterHead(GRID, 8, shared_channels=8, head_channels=8, direction_classifier=True)
    output = head(torch.randn(2, 8, *GRID.shape))
    assert output.direction.shape == (2, 1, *GRID.shape)
    boxes = [make_boxes(6, seed=4), make_boxes(3, seed=5)]
    targets = encode_targets(boxes, GRID)
    losses = CenterPointLoss()(output, targets)
    assert losses["direction"] > 0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert head.direction[-1].weight.grad.abs().sum() > 0
    # Perfect maps in the axis encoding decode to the true headings.
    from fusion.heads.decode import axis_and_direction
    perfect = perfect_output(targets)
    h, w = GRID.shape
    rotation, direction = torch.zeros(2, 2, h * w), torch.zeros(2, 1, h * w)
    for b in range(2):
        idx = targets.index[b][targets.mask[b]]
        yaw = torch.atan2(targets.regression[b, targets.mask[b], 6], targets.regression[b, targets.mask[b], 7])
        double, front = axis_and_direction(yaw)
        rotation[b][:, idx] = double.T
        direction[b][0, idx] = front * 10 - 5
    perfect.rotation, perfect.direction = rotation.view(2, 2, h, w), direction.view(2, 1, h, w)
    decoded = decode_boxes(perfect, GRID, score_threshold=0.5)
    for got, truth in zip(decoded, boxes):
        got = got.select(match(got, truth))
        error = torch.remainder(got.yaw - truth.yaw + math.pi, 2 * math.pi) - math.pi
        assert error.abs().max() < 1e-4
