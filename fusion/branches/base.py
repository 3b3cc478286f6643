"""The branch interface: what every sensor branch is, written down as a `typing.Protocol` (no base class to inherit).

A branch is an `nn.Module` built from the shared BEVGrid (`factory(grid)`, a class with its options in YAML) that
reads its own fields of a `Batch` and returns one BEV tensor on that grid. It never looks at another branch; the
fuser masks samples whose `batch.present[modality]` is False. A fifth sensor is one new branch file (plus its reader
and a config entry).

Batch fields each branch reads (fusion.types.Batch; all in the keyframe ego frame: x forward, y left, z up, meters):
- camera (fusion.branches.camera): `cameras` (CameraImages [B, Ncam, 3, H, W] uint8, intrinsics, cam_to_ego, valid).
- lidar (fusion.branches.lidar): `lidar_points` [P, 5] (LIDAR_FEATURES), `lidar_batch` [P] sample index.
- radar (fusion.branches.radar): `radar_points` [R, 8] (RADAR_FEATURES), `radar_batch` [R] sample index.
- gps (fusion.branches.gps): `map_raster` [B, 1, H, W] (drivable area on the grid) and `ego` (EgoState: speed m/s,
  yaw rate rad/s, acceleration m/s^2, can_valid).
All of them may read `batch_size`.

A branch may also have `forward_with_losses(batch) -> (BEV, {name: loss})` for training losses of its own (the
camera's LiDAR-supervised depth); FusionDetector uses it in training and adds the losses to the total.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from fusion.types import Batch

#: Which Batch fields each modality's branch reads (see the module docstring).
BATCH_FIELDS: dict[str, tuple[str, ...]] = {
    "camera": ("cameras",),
    "lidar": ("lidar_points", "lidar_batch"),
    "radar": ("radar_points", "radar_batch"),
    "gps": ("map_raster", "ego"),
}


@runtime_checkable
class Branch(Protocol):
    """A sensor branch: Batch -> BEV features [B, out_channels, grid.height, grid.width] on the shared BEVGrid.

    modality: one of fusion.types.MODALITIES ("camera", "lidar", "radar", "gps"), at most one branch each.
    out_channels: C of the BEV it returns.
    forward(batch): the BEV [B, C, H, W] float, cell (row i, column j) covering the grid cell of y row i and x column
        j (fusion.grid), for every sample of the batch (rows of samples without the modality are masked by the fuser).
    """

    modality: str
    out_channels: int

    def __call__(self, batch: Batch) -> Tensor: ...

    def forward(self, batch: Batch) -> Tensor: ...
