"""CenterPoint-style detection head: raw maps on the BEVGrid. Decoding to `Boxes` is in fusion/heads/decode.py."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from fusion.grid import BEVGrid
from fusion.types import ATTRIBUTES, DETECTION_CLASSES

#: Channels of the regression maps and of the regression targets, in this order.
REGRESSION_FIELDS: tuple[tuple[str, int], ...] = (
    ("offset", 2), ("height", 1), ("size", 3), ("rotation", 2), ("velocity", 2),
)
#: Channels of all regression maps together (the width of HeadTargets.regression and of the L1 code weights).
REGRESSION_WIDTH: int = sum(width for _, width in REGRESSION_FIELDS)


def regression_slice(name: str) -> slice:
    """The channels of REGRESSION_FIELDS entry `name` in the stacked regression maps / targets."""
    start = 0
    for field, width in REGRESSION_FIELDS:
        if field == name:
            return slice(start, start + width)
        start += width
    raise KeyError(f"no regression field {name!r}; fields: {[f for f, _ in REGRESSION_FIELDS]}")


@dataclass
class HeadOutput:
    """Raw head maps on the BEVGrid, [B, C, H, W] each (row i <-> ego y, column j <-> ego x).

    heatmap: [B, 10, H, W] class logits (sigmoid -> center probability), classes DETECTION_CLASSES.
    offset: [B, 2, H, W] sub-cell position of the center (dx, dy) in cells, in [0, 1) for a perfect prediction.
    height: [B, 1, H, W] z of the box center, meters (ego frame).
    size: [B, 3, H, W] log of (length, width, height), log-meters.
    rotation: [B, 2, H, W] (sin yaw, cos yaw); with `direction` (sin 2 yaw, cos 2 yaw): the box's axis, which
        is the same for yaw and yaw + pi.
    velocity: [B, 2, H, W] (vx, vy), m/s, ego frame.
    attribute: [B, 8, H, W] attribute logits, ATTRIBUTES order (only the class's relevant ones are used).
    direction: None, or [B, 1, H, W] logit that the heading is the axis angle a = atan2(sin 2 yaw, cos 2 yaw) / 2
        rather than a + pi (front / back, SECOND's direction classifier). Decoding: fusion.heads.decode.decode_yaw.
    """

    heatmap: Tensor
    offset: Tensor
    height: Tensor
    size: Tensor
    rotation: Tensor
    velocity: Tensor
    attribute: Tensor
    direction: Tensor | None = None

    def regression(self) -> Tensor:
        """[B, 10, H, W]: offset, height, size, rotation, velocity stacked (REGRESSION_FIELDS order)."""
        return torch.cat([getattr(self, name) for name, _ in REGRESSION_FIELDS], dim=1)

    def _map(self, fn) -> "HeadOutput":
        return HeadOutput(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                             for f in fields(self)})

    def float(self) -> "HeadOutput":
        return self._map(lambda t: t.float())

    def detach(self) -> "HeadOutput":
        return self._map(lambda t: t.detach())


def _branch(in_channels: int, hidden: int, out_channels: int, bias_init: float | None = None) -> nn.Sequential:
    layers = nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, 1),
    )
    if bias_init is not None:
        nn.init.constant_(layers[-1].bias, bias_init)
    return layers


class CenterHead(nn.Module):
    """Shared 3x3 conv block, then one small conv branch per output (CenterPoint's SepHead).

    Args:
        grid: the shared BEVGrid (the head works at its resolution).
        in_channels: channels of the fused BEV.
        shared_channels: width of the shared conv block.
        head_channels: hidden width of each output branch.
        shared_layers: number of 3x3 conv layers in the shared block.
        heatmap_bias: initial heatmap logit (-2.19 = prior probability 0.1, as CenterPoint).
        direction_classifier: regress the heading's axis (sin 2 yaw, cos 2 yaw) and classify front / back in a
            separate logit map, instead of regressing (sin yaw, cos yaw). An L1 regression of (sin, cos) on objects
            whose front and back look alike averages the two answers towards (0, 0), whose angle is noise; the axis
            is unambiguous, and the front / back decision becomes a classification that the cues (motion, shape,
            appearance) can win.
    """

    def __init__(self, grid: BEVGrid, in_channels: int, shared_channels: int = 64, head_channels: int = 64,
                 shared_layers: int = 1, heatmap_bias: float = -2.19, direction_classifier: bool = False):
        super().__init__()
        self.grid = grid
        self.num_classes = len(DETECTION_CLASSES)
        self.num_attributes = len(ATTRIBUTES)
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(shared_layers):
            layers += [nn.Conv2d(channels, shared_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(shared_channels), nn.ReLU(inplace=True)]
            channels = shared_channels
        self.shared = nn.Sequential(*layers)
        self.heatmap = _branch(channels, head_channels, self.num_classes, bias_init=heatmap_bias)
        self.regressions = nn.ModuleDict({name: _branch(channels, head_channels, width)
                                          for name, width in REGRESSION_FIELDS})
        self.attribute = _branch(channels, head_channels, self.num_attributes)
        self.direction = _branch(channels, head_channels, 1) if direction_classifier else None

    def forward(self, bev: Tensor) -> HeadOutput:
        """bev: fused BEV [B, in_channels, H, W] on the grid -> HeadOutput."""
        if tuple(bev.shape[2:]) != self.grid.shape:
            raise ValueError(f"CenterHead: BEV has spatial shape {tuple(bev.shape[2:])}, expected the grid's "
                             f"{self.grid.shape}")
        x = self.shared(bev)
        return HeadOutput(heatmap=self.heatmap(x), attribute=self.attribute(x),
                          direction=self.direction(x) if self.direction is not None else None,
                          **{name: branch(x) for name, branch in self.regressions.items()})
