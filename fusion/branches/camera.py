"""Camera branch: surround images -> BEV features by lift-splat (Philion & Fidler 2020; BEVFusion's camera path).

For every valid camera: a compact ResNet gives a feature map at stride s; a 1x1 conv predicts, per feature pixel, a
distribution over D depth bins and a context vector; their outer product is "lifted" onto the frustum points (the
pixel's ray at each bin's depth, through the post-resize intrinsics and cam_to_ego into the ego frame) and "splatted"
(summed) into the BEV cells with `fusion.cuda_ops.bev_pool`. The pooled map (Z height bins folded into channels)
goes through a small BEV conv encoder.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fusion.branches.common import BEVEncoder, Downsample, ResNetBackbone, check_power_of_two
from fusion.branches.depth_supervision import depth_loss, lidar_depth_targets
from fusion.cuda_ops import bev_pool
from fusion.grid import BEVGrid
from fusion.types import Batch

#: ImageNet RGB statistics in uint8 units, used to normalise the images inside the branch.
IMAGE_MEAN = (123.675, 116.28, 103.53)
IMAGE_STD = (58.395, 57.12, 57.375)


class CameraBranch(nn.Module):
    """Batch -> camera BEV [B, out_channels, grid.height, grid.width].

    depth_min / depth_max (meters, along the optical axis) are split into `depth_bins` equal bins, each represented
    by its centre. `height_bins` splits grid.z_min..z_max into Z slabs kept as separate channels (1 collapses
    height). `pool_upsample` (a power of two) pools into `grid.upsampled(pool_upsample)` and reduces with stride-2
    convs, for finer splatting than the output grid. Frustum points outside the grid (x, y or z) are dropped;
    invalid cameras (batch.cameras.valid False) are not run at all, so samples without cameras get the encoder's
    response to an empty map (finite; masked downstream).
    `depth_loss_weight` > 0 adds, in training (`forward_with_losses`), a cross-entropy of the depth distribution
    against the depth of the keyframe LiDAR points projected into each camera (BEVDepth-style; LiDAR is a teacher
    at training time only, see fusion/branches/depth_supervision.py).
    """

    modality = "camera"

    def __init__(self, grid: BEVGrid, out_channels: int = 64, backbone_widths: Sequence[int] = (32, 64, 128),
                 backbone_blocks: Sequence[int] = (1, 1, 1), feature_channels: int = 64, context_channels: int = 32,
                 depth_min: float = 1.0, depth_max: float = 60.0, depth_bins: int = 59, height_bins: int = 1,
                 pool_upsample: int = 1, bev_blocks: int = 2, depth_loss_weight: float = 0.0):
        super().__init__()
        if not 0 < depth_min < depth_max:
            raise ValueError(f"CameraBranch: need 0 < depth_min < depth_max, got {depth_min}, {depth_max}")
        if depth_bins < 1 or height_bins < 1:
            raise ValueError(f"CameraBranch: depth_bins ({depth_bins}) and height_bins ({height_bins}) must be >= 1")
        check_power_of_two(pool_upsample, "CameraBranch pool_upsample")
        if not depth_loss_weight >= 0:
            raise ValueError(f"CameraBranch: depth_loss_weight must be >= 0, got {depth_loss_weight}")
        self.depth_loss_weight = float(depth_loss_weight)
        self.depth_range = (float(depth_min), float(depth_max))
        self.grid = grid
        self.pool_grid = grid.upsampled(pool_upsample) if pool_upsample > 1 else grid
        self.out_channels = out_channels
        self.context_channels = context_channels
        self.height_bins = height_bins
        step = (depth_max - depth_min) / depth_bins
        self.register_buffer("depth_centers", depth_min + (torch.arange(depth_bins, dtype=torch.float32) + 0.5) * step,
                             persistent=False)
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)
        self.backbone = ResNetBackbone(backbone_widths, backbone_blocks, out_channels=feature_channels)
        self.depth_net = nn.Conv2d(feature_channels, depth_bins + context_channels, 1)
        pooled_channels = context_channels * height_bins
        self.downsample = Downsample(pooled_channels, pool_upsample)
        self.bev_encoder = BEVEncoder(pooled_channels, out_channels, bev_blocks)
        self._frustum_cache: dict[tuple, torch.Tensor] = {}

    @property
    def depth_bins(self) -> int:
        return int(self.depth_centers.shape[0])

    def frustum(self, image_size: tuple[int, int], feature_size: tuple[int, int], device, dtype) -> torch.Tensor:
        """[D, h, w, 3] homogeneous frustum (u * d, v * d, d): pixel (u, v) of each feature cell's centre in image
        pixels (pixel centres at integer coordinates) times each depth bin's centre d (meters). Cached per shape."""
        key = (tuple(image_size), tuple(feature_size), str(device), dtype)
        if key not in self._frustum_cache:
            (height, width), (rows, cols) = image_size, feature_size
            u = (torch.arange(cols, device=device, dtype=dtype) + 0.5) * (width / cols) - 0.5
            v = (torch.arange(rows, device=device, dtype=dtype) + 0.5) * (height / rows) - 0.5
            d = self.depth_centers.to(device=device, dtype=dtype)
            dd, vv, uu = torch.meshgrid(d, v, u, indexing="ij")
            self._frustum_cache[key] = torch.stack([uu * dd, vv * dd, dd], dim=-1)
        return self._frustum_cache[key]

    def frustum_points(self, intrinsics: torch.Tensor, cam_to_ego: torch.Tensor, image_size: tuple[int, int],
                       feature_size: tuple[int, int]) -> torch.Tensor:
        """Ego-frame points (meters) [Nv, D, h, w, 3] of every (depth bin, feature pixel) of Nv cameras, from
        intrinsics [Nv, 3, 3] (pixels of the image as given) and cam_to_ego [Nv, 4, 4]."""
        # float32 even under mixed precision: bf16 would put points tens of centimetres off at 50 m.
        with torch.autocast(device_type=intrinsics.device.type, enabled=False):
            frustum = self.frustum(image_size, feature_size, intrinsics.device, torch.float32)
            pixel_to_ego = cam_to_ego[:, :3, :3].float() @ torch.linalg.inv(intrinsics.float())
            points = torch.einsum("nij,dhwj->ndhwi", pixel_to_ego, frustum)
            return points + cam_to_ego[:, None, None, None, :3, 3].float()

    def splat(self, depth: torch.Tensor, context: torch.Tensor, points: torch.Tensor, camera_sample: torch.Tensor,
              batch_size: int) -> torch.Tensor:
        """Sum depth [Nv, D, h, w] x context [Nv, C, h, w] onto the pool grid at `points` [Nv, D, h, w, 3] (ego frame,
        meters); camera_sample [Nv] int64 is each camera's sample index. -> [B, C * Z, Hp, Wp]."""
        grid = self.pool_grid
        z_step = (grid.z_max - grid.z_min) / self.height_bins
        row, col, inside = grid.cell_index(points[..., :2])
        level = torch.floor((points[..., 2] - grid.z_min) / z_step).long()
        inside &= (level >= 0) & (level < self.height_bins) & torch.isfinite(points[..., 2])
        # Only the points inside the grid are lifted: [P, C] features depth x context (the full [Nv, D, h, w, C]
        # volume is never built) and their [P, 4] (sample, level, row, col) cells.
        cam, bin_, v, u = torch.nonzero(inside, as_tuple=True)
        lifted = depth[cam, bin_, v, u].unsqueeze(1) * context.permute(0, 2, 3, 1)[cam, v, u]
        coords = torch.stack([camera_sample[cam], level[cam, bin_, v, u], row[cam, bin_, v, u],
                              col[cam, bin_, v, u]], dim=-1)
        pooled = bev_pool(lifted.float(), coords, batch_size, (self.height_bins, grid.height, grid.width))
        return pooled.flatten(1, 2)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Batch with cameras [B, Ncam, 3, H, W] uint8 -> [B, out_channels, grid.height, grid.width]."""
        return self._run(batch, supervise=False)[0]

    def forward_with_losses(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the camera BEV as `forward`, {"camera_depth": weighted depth loss} in training with depth supervision on
        and LiDAR points in the batch, else {})."""
        return self._run(batch, supervise=True)

    def _run(self, batch: Batch, supervise: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch_size = batch.batch_size
        grid = self.pool_grid
        device = self.depth_centers.device
        cameras = batch.cameras
        pooled, losses = None, {}
        if cameras is not None and bool(cameras.valid.any()):
            num_cameras = cameras.images.shape[1]
            image_size = tuple(cameras.images.shape[-2:])
            valid = cameras.valid.reshape(-1)
            index = torch.nonzero(valid).squeeze(1)
            images = cameras.images.reshape(-1, *cameras.images.shape[2:])[index].to(device)
            images = (images.float() - self.image_mean) / self.image_std
            features = self.backbone(images)
            logits = self.depth_net(features)
            depth = logits[:, :self.depth_bins].softmax(dim=1)
            context = logits[:, self.depth_bins:]
            intrinsics = cameras.intrinsics.reshape(-1, 3, 3)[index].to(device)
            cam_to_ego = cameras.cam_to_ego.reshape(-1, 4, 4)[index].to(device)
            points = self.frustum_points(intrinsics, cam_to_ego, image_size, tuple(features.shape[-2:]))
            camera_sample = torch.div(index, num_cameras, rounding_mode="floor").to(device)
            pooled = self.splat(depth, context, points, camera_sample, batch_size)
            if supervise and self.training and self.depth_loss_weight > 0 and batch.lidar_points.shape[0] > 0:
                with torch.no_grad():
                    target = lidar_depth_targets(batch.lidar_points.to(device), batch.lidar_batch.to(device),
                                                 camera_sample, intrinsics, cam_to_ego, image_size,
                                                 tuple(features.shape[-2:]), *self.depth_range, self.depth_bins)
                losses["camera_depth"] = self.depth_loss_weight * depth_loss(logits[:, :self.depth_bins], target)
        if pooled is None:
            pooled = torch.zeros(batch_size, self.context_channels * self.height_bins, grid.height, grid.width,
                                 device=device)
        return self.bev_encoder(self.downsample(pooled)), losses
