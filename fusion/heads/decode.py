"""Box coding for the CenterPoint head: ground-truth Boxes -> training targets, and raw maps -> Boxes.

Both directions use the same convention on the BEVGrid (row i <-> ego y, column j <-> ego x, see fusion/grid.py):
a box whose center (x, y) falls in cell (row, col) is represented at that cell by
    offset  = ((x - x_min) / cell - col, (y - y_min) / cell - row)   in [0, 1), cells
    height  = z of the box center, meters
    size    = log(length, width, height), log-meters
    rotation= (sin yaw, cos yaw)
    velocity= (vx, vy), m/s, NaN where unknown (the loss masks it)
and by a Gaussian peak of value exactly 1 on its class heatmap (CenterPoint's gaussian_radius with min_overlap).
`decode_boxes` is a pure function (no module state): max-pool peak extraction, no NMS library.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fusion.grid import BEVGrid
from fusion.heads.centerpoint import REGRESSION_WIDTH, HeadOutput
from fusion.types import ATTRIBUTES, CLASS_ATTRIBUTES, DETECTION_CLASSES, NO_ATTRIBUTE, Boxes


def _relevant_attribute_table() -> Tensor:
    mask = torch.zeros(len(DETECTION_CLASSES), len(ATTRIBUTES), dtype=torch.bool)
    for c, name in enumerate(DETECTION_CLASSES):
        for attribute in CLASS_ATTRIBUTES[name]:
            mask[c, ATTRIBUTES.index(attribute)] = True
    return mask


_RELEVANT_ATTRIBUTE_TABLE = _relevant_attribute_table()


def relevant_attribute_mask(device=None) -> Tensor:
    """[10, 8] bool: which ATTRIBUTES are relevant to each of DETECTION_CLASSES."""
    return _RELEVANT_ATTRIBUTE_TABLE.to(device) if device is not None else _RELEVANT_ATTRIBUTE_TABLE.clone()


def gaussian_radius(length_cells: Tensor, width_cells: Tensor, min_overlap: float = 0.1) -> Tensor:
    """CenterPoint's / CornerNet's gaussian_radius: the radius (cells) of center displacement that keeps a box of
    (length, width) cells above `min_overlap` IoU with itself, the smallest of the three corner cases."""
    h, w = length_cells, width_cells
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


@dataclass
class HeadTargets:
    """Training targets for one batch, objects padded to N = the most objects in a sample.

    heatmap: [B, 10, H, W] float32 in [0, 1], exactly 1 at each object's center cell.
    index: [B, N] int64 flat cell index row * W + col of each object (0 for padding).
    mask: [B, N] bool, real objects (False for padding).
    labels: [B, N] int64 class index.
    regression: [B, N, REGRESSION_WIDTH] float32 in REGRESSION_FIELDS order (offset 2, height 1, log size 3, sin/cos 2,
        velocity 2); velocity entries are NaN where the ground truth has none.
    attribute: [B, N] int64 attribute index, NO_ATTRIBUTE (-1) where none or where the class has no attributes.
    """

    heatmap: Tensor
    index: Tensor
    mask: Tensor
    labels: Tensor
    regression: Tensor
    attribute: Tensor


def encode_targets(boxes: list[Boxes], grid: BEVGrid, min_overlap: float = 0.1, min_radius: int = 2,
                   device=None) -> HeadTargets:
    """Ground-truth Boxes (ego frame) of each sample -> HeadTargets on the grid. Boxes whose center is outside the
    grid, or with a non-finite center/size/yaw, are left out. Vectorised (no per-box Python loop)."""
    height, width = grid.shape
    num_classes = len(DETECTION_CLASSES)
    batch = len(boxes)
    device = device if device is not None else (boxes[0].center.device if boxes else None)
    kept: list[Boxes] = []
    for b in boxes:
        b = b.to(device)
        finite = torch.isfinite(b.center).all(1) & torch.isfinite(b.size).all(1) & torch.isfinite(b.yaw)
        finite &= (b.size > 0).all(1) & (b.labels >= 0) & (b.labels < num_classes)
        _, _, inside = grid.cell_index(b.center[:, :2])
        kept.append(b.select(finite & inside))
    count = max([len(b) for b in kept] + [0])
    heatmap = torch.zeros(batch, num_classes, height, width, device=device)
    index = torch.zeros(batch, count, dtype=torch.int64, device=device)
    mask = torch.zeros(batch, count, dtype=torch.bool, device=device)
    labels = torch.zeros(batch, count, dtype=torch.int64, device=device)
    regression = torch.zeros(batch, count, REGRESSION_WIDTH, device=device)
    attribute = torch.full((batch, count), NO_ATTRIBUTE, dtype=torch.int64, device=device)
    relevant = relevant_attribute_mask(device)
    for i, b in enumerate(kept):
        n = len(b)
        if n == 0:
            continue
        center = b.center.float()
        row, col, _ = grid.cell_index(center[:, :2])
        index[i, :n] = row * width + col
        mask[i, :n] = True
        labels[i, :n] = b.labels
        offset = grid.cell_coordinates(center[:, :2]) - torch.stack([col, row], dim=1)
        regression[i, :n] = torch.cat([offset, center[:, 2:3], torch.log(b.size.float()),
                                       torch.sin(b.yaw.float())[:, None], torch.cos(b.yaw.float())[:, None],
                                       b.velocity.float()], dim=1)
        attr = b.attributes.clone()
        valid_attr = (attr >= 0) & (attr < len(ATTRIBUTES))
        valid_attr &= relevant[b.labels, attr.clamp(0, len(ATTRIBUTES) - 1)]
        attribute[i, :n] = torch.where(valid_attr, attr, torch.full_like(attr, NO_ATTRIBUTE))
        _draw_gaussians(heatmap[i], b.labels, row, col, b.size[:, 0].float() / grid.cell_size,
                        b.size[:, 1].float() / grid.cell_size, min_overlap, min_radius)
    return HeadTargets(heatmap, index, mask, labels, regression, attribute)


def _draw_gaussians(heatmap: Tensor, labels: Tensor, row: Tensor, col: Tensor, length_cells: Tensor,
                    width_cells: Tensor, min_overlap: float, min_radius: int) -> None:
    """Max-composite a Gaussian per object (CenterPoint's draw_heatmap_gaussian) into heatmap [C, H, W] in place."""
    num_classes, height, width = heatmap.shape
    radius = torch.clamp(gaussian_radius(length_cells, width_cells, min_overlap).floor(), min=min_radius).long()
    reach = int(radius.max())
    steps = torch.arange(-reach, reach + 1, device=heatmap.device)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")  # [S, S]
    sigma = (2 * radius + 1).float() / 6.0  # [N]
    gauss = torch.exp(-(dx[None] ** 2 + dy[None] ** 2).float() / (2 * sigma[:, None, None] ** 2))  # [N, S, S]
    gauss = torch.where(gauss < torch.finfo(torch.float32).eps * gauss.amax(dim=(1, 2), keepdim=True),
                        torch.zeros_like(gauss), gauss)
    rows, cols = row[:, None, None] + dy[None], col[:, None, None] + dx[None]
    valid = (dy[None].abs() <= radius[:, None, None]) & (dx[None].abs() <= radius[:, None, None])
    valid &= (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    flat = (labels[:, None, None] * height + rows) * width + cols
    heatmap.view(-1).scatter_reduce_(0, flat[valid], gauss[valid], reduce="amax", include_self=True)


def axis_and_direction(yaw: Tensor) -> tuple[Tensor, Tensor]:
    """The targets of the direction-classifier encoding for headings yaw [...] (radians): (sin 2 yaw, cos 2 yaw)
    [..., 2] and the front / back label [...] float, 1 where yaw is the axis angle a = atan2(sin 2 yaw, cos 2 yaw) / 2
    (up to rounding) and 0 where it is a + pi."""
    double = torch.stack([torch.sin(2 * yaw), torch.cos(2 * yaw)], dim=-1)
    axis = torch.atan2(double[..., 0], double[..., 1]) / 2
    return double, (torch.cos(yaw - axis) > 0).to(yaw.dtype)


def turned_around(yaw: Tensor) -> Tensor:
    """yaw + pi wrapped to (-pi, pi], radians."""
    return torch.atan2(-torch.sin(yaw), -torch.cos(yaw))


def decode_yaw(rotation: Tensor, direction_logit: Tensor | None = None) -> Tensor:
    """Headings [...] (radians, in (-pi, pi]) from rotation [..., 2]: (sin yaw, cos yaw) when direction_logit is
    None; else the axis (sin 2 yaw, cos 2 yaw) and direction_logit [..., 1] (> 0: the axis angle, else + pi)."""
    if direction_logit is None:
        return torch.atan2(rotation[..., 0], rotation[..., 1])
    axis = torch.atan2(rotation[..., 0], rotation[..., 1]) / 2
    return torch.where(direction_logit[..., 0] > 0, axis, turned_around(axis))


def align_heading_with_motion(yaw: Tensor, velocity: Tensor, min_speed: float, mode: str = "flip") -> Tensor:
    """yaw [...] (radians) where the speed of velocity [..., 2] (m/s, same frame) is at least min_speed:
    mode "direction" replaces it by the direction of motion (road users move forwards); mode "flip" only turns it by
    pi when it points against the motion (more than 90 degrees apart). Wrapped to (-pi, pi]; slower boxes keep it."""
    if mode not in ("direction", "flip"):
        raise ValueError(f"heading_from_motion mode must be 'direction' or 'flip', got {mode!r}")
    moving = velocity.norm(dim=-1) >= min_speed
    if mode == "direction":
        heading = torch.atan2(velocity[..., 1], velocity[..., 0])
    else:
        against = (torch.cos(yaw) * velocity[..., 0] + torch.sin(yaw) * velocity[..., 1]) < 0
        heading = torch.where(against, turned_around(yaw), yaw)
    return torch.where(moving, heading, yaw)


VULNERABLE_ROAD_USERS: tuple[str, ...] = ("pedestrian", "bicycle", "motorcycle")


def vru_headings_from_motion(yaw: Tensor, velocity: Tensor, labels: Tensor, min_speed: float) -> Tensor:
    """yaw [N] (radians) where a pedestrian, bicycle or motorcycle (labels [N], DETECTION_CLASSES index) moves at
    least min_speed (velocity [N, 2], m/s, same frame): replaced by the direction of its motion. People walk and
    two-wheelers ride forwards, never sideways, and their nearly square boxes give the head's axis little to go on
    (on the selection drives a third of the matched pedestrians' headings were off by 45-135 degrees). Other boxes,
    and slower ones, keep their yaw."""
    vru = torch.zeros_like(labels, dtype=torch.bool)
    for name in VULNERABLE_ROAD_USERS:
        vru |= labels == DETECTION_CLASSES.index(name)
    facing = align_heading_with_motion(yaw, velocity, min_speed, "direction")
    return torch.where(vru, facing, yaw)


def _moving_attribute_table() -> Tensor:
    """[10] int64: the attribute index that says "moving" for each of DETECTION_CLASSES, NO_ATTRIBUTE for none."""
    moving = ("vehicle.moving", "cycle.with_rider", "pedestrian.moving")
    table = torch.full((len(DETECTION_CLASSES),), NO_ATTRIBUTE, dtype=torch.int64)
    for c, name in enumerate(DETECTION_CLASSES):
        for attribute in CLASS_ATTRIBUTES[name]:
            if attribute in moving:
                table[c] = ATTRIBUTES.index(attribute)
    return table


_MOVING_ATTRIBUTE = _moving_attribute_table()


def attributes_from_motion(labels: Tensor, attributes: Tensor, velocity: Tensor, min_speed: float) -> Tensor:
    """attributes [N] (ATTRIBUTES index) where each box moving at least min_speed m/s (velocity [N, 2], m/s) gets
    its class's moving attribute (vehicle.moving, cycle.with_rider, pedestrian.moving; barriers and cones have
    none); slower boxes keep theirs. The attribute states the motion, so it follows the measured velocity."""
    moving_attribute = _MOVING_ATTRIBUTE.to(labels.device)[labels]
    moving = (velocity.norm(dim=-1) >= min_speed) & (moving_attribute != NO_ATTRIBUTE)
    return torch.where(moving, moving_attribute, attributes)


def decode_boxes(output: HeadOutput, grid: BEVGrid, score_threshold: float = 0.1, max_boxes: int = 500,
                 pool_size: int = 3) -> list[Boxes]:
    """Raw head maps -> Boxes per sample in the ego frame, best first, at most `max_boxes` each.

    A peak is a cell whose class probability (sigmoid of the heatmap logit) is the maximum of its
    pool_size x pool_size neighbourhood (max-pool peak extraction, no NMS); peaks scoring below score_threshold are
    dropped. A centre lies in its peak's cell (the offset is clamped to [0, 1] cells, as the encoding has it).
    Runs in float32 whatever the precision of `output`. num_lidar_pts / num_radar_pts are -1 (unknown).
    Measured velocities (point_motion) and headings settled by the motion (heading_from_motion) and the map
    (map_heading) are applied after this, by `fusion.heads.finish.finish_boxes`.
    """
    if max_boxes < 1:
        raise ValueError(f"decode_boxes: max_boxes must be >= 1, got {max_boxes}")
    if pool_size < 1 or pool_size % 2 == 0:
        raise ValueError(f"decode_boxes: pool_size must be a positive odd number, got {pool_size}")
    out = output.float()
    batch, num_classes, height, width = out.heatmap.shape
    if (height, width) != grid.shape:
        raise ValueError(f"decode_boxes: maps have spatial shape {(height, width)}, the grid {grid.shape}")
    heat = torch.sigmoid(out.heatmap)
    peaks = F.max_pool2d(heat, pool_size, stride=1, padding=pool_size // 2)
    heat = torch.where(peaks == heat, heat, torch.zeros_like(heat))
    k = min(max_boxes, num_classes * height * width)
    scores, flat = heat.view(batch, -1).topk(k, dim=1)  # sorted, best first
    labels = flat // (height * width)
    cell = flat % (height * width)
    row, col = (cell // width).float(), (cell % width).float()

    def gather(maps: Tensor) -> Tensor:  # [B, C, H, W] -> [B, k, C]
        return maps.flatten(2).gather(2, cell[:, None, :].expand(-1, maps.shape[1], -1)).transpose(1, 2)

    offset, z, log_size = gather(out.offset), gather(out.height), gather(out.size)
    rotation, velocity, attr_logits = gather(out.rotation), gather(out.velocity), gather(out.attribute)
    # the encoding puts a centre inside its peak's cell (offset in [0, 1)): an offset outside is an error, clamped
    center = torch.cat([grid.cell_to_xy(row, col, offset[..., :2].clamp(0.0, 1.0)), z], dim=-1)
    size = torch.exp(log_size.clamp(max=math.log(100.0)))
    yaw = decode_yaw(rotation, gather(out.direction) if out.direction is not None else None)
    relevant = relevant_attribute_mask(heat.device)[labels]  # [B, k, 8]
    attributes = attr_logits.masked_fill(~relevant, float("-inf")).argmax(dim=-1)
    attributes = torch.where(relevant.any(dim=-1), attributes, torch.full_like(attributes, NO_ATTRIBUTE))
    results = []
    for i in range(batch):
        keep = scores[i] >= score_threshold
        n = int(keep.sum())
        results.append(Boxes(
            center=center[i][keep], size=size[i][keep], yaw=yaw[i][keep], velocity=velocity[i][keep],
            labels=labels[i][keep], attributes=attributes[i][keep], scores=scores[i][keep],
            num_lidar_pts=torch.full((n,), -1, dtype=torch.int64, device=heat.device),
            num_radar_pts=torch.full((n,), -1, dtype=torch.int64, device=heat.device),
        ))
    return results
