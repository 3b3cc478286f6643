"""`ExportableDetector`: a FusionDetector as one tensor-in / tensor-out module of standard ONNX operators.

The trained sub-modules (backbones, PFN layers, BEV encoders, the fuser, the head) are reused as they are; only the
parts with data-dependent shapes are re-expressed, with the same arithmetic:
- voxelization: `fusion.cuda_ops.reference.point_cells` (the compiled op's pure-torch reference, floor((p - min) /
  size) in float32) gives every point its pillar; dropped points (outside the grid, non-finite) go to one extra
  "trash" pillar that is cut off at the end, instead of being removed;
- pillar pooling: the points are sorted by pillar once (`fusion.deploy.segments.group_rows`: ONNX TopK) and the
  PFN runs on them in that order; the means are float64 cumulative sums read at each pillar's last point, the PFN
  maxima a 4-ary max tree over each pillar's points, both over the occupied pillars only (as PyTorch's
  `torch.unique` compaction), then ScatterND without reduction (unique indices) puts the pillars on the grid;
- camera BEV pooling: the frustum points are sorted by cell, those outside the grid and all points of invalid
  cameras (the trash cell) left out; depth x context is formed for the kept points in that order and summed per
  cell by the float64 cumsum, then ScatterND onto the grid, instead of `nonzero` + `bev_pool`;
- LiDAR time slices: ScatterElements(add) of ones (one column: exact and cheap) instead of `bincount`;
- the camera intrinsics are inverted in closed form (ONNX has no matrix inverse).
No scatter with a reduction over wide rows: ScatterElements reduces serially, exact but slow (~53 ms per tiny_cpu
frame in the micro-benchmark), and onnxruntime's ScatterND with a reduction loses updates to rows shared by its
threads (issues #18048, #23396); the sorted formulation is exact with any thread count (fusion/deploy/segments.py;
figures in docs/benchmarks.md, Deployment).
Every branch runs on every call; a modality that is absent (False in `present`) is masked out of the fuser's softmax
exactly as in PyTorch (its attention weights are 0), so one graph serves every subset of sensors.

Batch size 1. Frames: ego frame at the keyframe (x forward, y left, z up; meters, radians, seconds).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fusion.branches.common import PillarEncoder
from fusion.branches.lidar import _normalised_lidar_features
from fusion.branches.occupancy_flow import above_ground, flow_from_slices
from fusion.cuda_ops.reference import point_cells
from fusion.deploy.segments import group_rows, sorted_max, sorted_sum, to_dense
from fusion.grid import BEVGrid


class PillarCells(nn.Module):
    """The voxelization stage: points xyz [N, 3] (ego frame, meters) -> [N] int64 flat pillar index row * W + col
    on `grid`, or H * W (the trash row) for a point outside the grid's x/y/z box or with a non-finite coordinate."""

    def __init__(self, grid: BEVGrid, voxel_size: tuple[float, float, float], point_range: tuple):
        super().__init__()
        self.grid, self.voxel_size, self.point_range = grid, voxel_size, point_range

    def forward(self, xyz: Tensor) -> Tensor:
        cells, kept, _ = point_cells(xyz.float(), self.voxel_size, self.point_range)  # (x, y, z) cells
        flat = cells[:, 1] * self.grid.width + cells[:, 0]
        return torch.where(kept, flat, torch.full_like(flat, self.grid.height * self.grid.width))


class _CountScatter(torch.autograd.Function):
    """out [S] with 1 added at index[i] for every i of index [N]: ScatterElements(add) of ones. onnxruntime runs
    ScatterElements serially (exact, any thread count) at ~10-15 ns per element: cheap for one column (0.2 ms for
    48k points), too slow for wide rows (see fusion.deploy.segments)."""

    @staticmethod
    def forward(ctx, out: Tensor, index: Tensor) -> Tensor:
        return out.index_add(0, index, torch.ones_like(index, dtype=out.dtype))

    @staticmethod
    def symbolic(g, out, index):
        ones = g.op("Expand", g.op("Constant", value_t=torch.tensor([1.0])), g.op("Shape", index))
        return g.op("ScatterElements", out, index, ones, axis_i=0, reduction_s="add")


class DensePillars(nn.Module):
    """`PillarEncoder.forward` for one sample over the whole pillar grid (see the module docstring); same parameters.

    xyz [N, 3] ego-frame meters; point_features [N, F] -> [1, C, H, W] on encoder.pillar_grid, empty pillars 0."""

    def __init__(self, encoder: PillarEncoder):
        super().__init__()
        self.encoder = encoder
        self.voxelize = PillarCells(encoder.pillar_grid, encoder.voxel_size, encoder.point_range)

    def forward(self, xyz: Tensor, point_features: Tensor) -> Tensor:
        encoder, grid = self.encoder, self.encoder.pillar_grid
        # The trash row H * W is a segment like the others (cut off at the end), so that the PFN never gets zero
        # rows (onnxruntime's MatMul / LayerNorm reject them) when every point is dropped.
        rows = group_rows(self.voxelize(xyz), grid.height * grid.width + 1)
        # From here on the points are in pillar order: a per-point value of pillar k is a gather by `ordinal`.
        xyz, point_features, pillar = xyz.float()[rows.order], point_features[rows.order], rows.index
        counts = rows.counts()[:, None].to(xyz.dtype)  # [K, 1] points per occupied pillar
        mean_xyz = (sorted_sum(xyz, rows) / counts)[rows.ordinal]
        pillar_size = xyz.new_tensor(encoder.voxel_size)
        row, col = pillar // grid.width, pillar % grid.width
        center_xy = grid.cell_to_xy(row, col, dtype=xyz.dtype)
        features = torch.cat([point_features, (xyz - mean_xyz) / pillar_size,
                              (xyz[:, :2] - center_xy) / pillar_size[:2]], dim=-1)
        hidden = encoder.pfn1(features)
        pooled = sorted_max(hidden, rows)[rows.ordinal]
        hidden = encoder.pfn2(torch.cat([hidden, pooled], dim=-1))
        pillars = to_dense(torch.cat([sorted_max(hidden, rows), torch.log1p(counts)], dim=-1), rows)
        return pillars[:-1].view(1, grid.height, grid.width, encoder.out_channels).permute(0, 3, 1, 2)


class DenseTimeSlices(nn.Module):
    """`fusion.branches.common.time_slice_occupancy` for one sample: points [N, 5] (LIDAR_FEATURES) ->
    [1, slices, H, W] log(1 + points) per (sweep slice, cell) on `grid`."""

    def __init__(self, grid: BEVGrid, slices: int, slice_s: float):
        super().__init__()
        self.grid, self.slices, self.slice_s = grid, slices, slice_s

    def forward(self, points: Tensor) -> Tensor:
        grid, slices = self.grid, self.slices
        xyz, time_lag = points[:, :3], points[:, 4]
        row, col, inside = grid.cell_index(xyz[:, :2])
        slice_index = torch.round(torch.nan_to_num(time_lag, nan=-1.0) / self.slice_s)
        inside = inside & (xyz[:, 2] >= grid.z_min) & (xyz[:, 2] < grid.z_max) & torch.isfinite(xyz[:, 2])
        inside = inside & (slice_index >= 0) & (slice_index < slices) & torch.isfinite(time_lag)
        cells = slices * grid.height * grid.width
        flat = (slice_index.clamp(0, slices - 1).long() * grid.height + row) * grid.width + col
        flat = torch.where(inside, flat, torch.full_like(flat, cells))
        counts = _CountScatter.apply(points.new_zeros(cells + 1), flat)  # + the trash row
        return torch.log1p(counts[:-1]).view(1, slices, grid.height, grid.width)


class LidarPillarGraph(nn.Module):
    """LidarPillarBranch.forward for one sample: lidar_points [P, 5] -> [1, out_channels, H, W]."""

    def __init__(self, branch):
        super().__init__()
        self.branch = branch
        self.pillars = DensePillars(branch.pillars)
        self.time_slices = (DenseTimeSlices(branch.pillars.pillar_grid, branch.time_slices, branch.time_slice_s)
                            if branch.time_slices else None)
        self.flow_slices = (DenseTimeSlices(branch.grid, branch.time_slices, branch.time_slice_s)
                            if branch.flow is not None else None)

    def forward(self, points: Tensor) -> Tensor:
        points = points.float()
        bev = self.pillars(points[:, :3], _normalised_lidar_features(points, self.branch.grid))
        if self.time_slices is not None:
            bev = torch.cat([bev, self.time_slices(points)], dim=1)
        bev = self.branch.downsample(bev)
        if self.flow_slices is not None:
            flow = self.branch.flow
            occupancy = self.flow_slices(above_ground(points, flow))
            bev = torch.cat([bev, flow_from_slices(occupancy, self.branch.grid.cell_size, self.branch.time_slice_s,
                                                   flow)], dim=1)
        return self.branch.bev_encoder(bev)


class RadarGraph(nn.Module):
    """RadarBranch.forward for one sample: radar_points [R, 8] -> [1, out_channels, H, W]."""

    def __init__(self, branch):
        super().__init__()
        self.branch = branch
        self.pillars = DensePillars(branch.pillars)

    def forward(self, points: Tensor) -> Tensor:
        points = points.float()
        bev = self.pillars(points[:, :3], self.branch.point_features(points))
        return self.branch.bev_encoder(self.branch.downsample(bev))


def _cross(u: Tensor, v: Tensor) -> Tensor:
    """u x v for [..., 3] vectors (written out: the TorchScript exporter has no cross product)."""
    return torch.stack([u[..., 1] * v[..., 2] - u[..., 2] * v[..., 1], u[..., 2] * v[..., 0] - u[..., 0] * v[..., 2],
                        u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]], dim=-1)


def inverse_3x3(matrix: Tensor) -> Tensor:
    """Inverse of [..., 3, 3] matrices by the adjugate (cofactors / determinant); ONNX has no inverse operator."""
    a, b, c = matrix[..., 0, :], matrix[..., 1, :], matrix[..., 2, :]
    adjugate_t = torch.stack([_cross(b, c), _cross(c, a), _cross(a, b)], dim=-2)
    determinant = (a * adjugate_t[..., 0, :]).sum(-1)
    return adjugate_t.transpose(-1, -2) / determinant[..., None, None]


class CameraGraph(nn.Module):
    """CameraBranch.forward for one sample: images [1, Ncam, 3, H, W] uint8, intrinsics [1, Ncam, 3, 3] (pixels),
    cam_to_ego [1, Ncam, 4, 4] (meters), camera_valid [1, Ncam] bool -> [1, out_channels, H_grid, W_grid]."""

    def __init__(self, branch, image_size: tuple[int, int]):
        super().__init__()
        self.branch = branch
        self.image_size = tuple(image_size)

    def cells(self, intrinsics: Tensor, cam_to_ego: Tensor, camera_valid: Tensor, feature_size: tuple[int, int]
              ) -> Tensor:
        """[Nv, D, h, w] int64 flat pool-grid cell (level * H + row) * W + col of every frustum point, or Z * H * W
        (the trash cell) for a point outside the grid or of an invalid camera. Inputs as in forward; feature_size
        (h, w) of the depth net's output."""
        branch, grid = self.branch, self.branch.pool_grid
        frustum = branch.frustum(self.image_size, feature_size, intrinsics.device, torch.float32)
        pose = cam_to_ego[0].float()
        pixel_to_ego = pose[:, :3, :3] @ inverse_3x3(intrinsics[0].float())
        points = torch.einsum("nij,dhwj->ndhwi", pixel_to_ego, frustum) + pose[:, None, None, None, :3, 3]
        z_step = (grid.z_max - grid.z_min) / branch.height_bins
        row, col, inside = grid.cell_index(points[..., :2])
        level = torch.floor((points[..., 2] - grid.z_min) / z_step)
        inside = inside & (level >= 0) & (level < branch.height_bins) & torch.isfinite(points[..., 2])
        inside = inside & camera_valid[0][:, None, None, None]
        cells = branch.height_bins * grid.height * grid.width
        flat = (level.clamp(0, branch.height_bins - 1).long() * grid.height + row) * grid.width + col
        return torch.where(inside, flat, torch.full_like(flat, cells))

    def forward(self, images: Tensor, intrinsics: Tensor, cam_to_ego: Tensor, camera_valid: Tensor) -> Tensor:
        branch, grid = self.branch, self.branch.pool_grid
        x = (images[0].float() - branch.image_mean) / branch.image_std
        logits = branch.depth_net(branch.backbone(x))
        depth = logits[:, :branch.depth_bins].softmax(dim=1)  # [Nv, D, h, w]
        context = logits[:, branch.depth_bins:]  # [Nv, C, h, w]
        cells = branch.height_bins * grid.height * grid.width
        flat = self.cells(intrinsics, cam_to_ego, camera_valid, tuple(logits.shape[-2:]))
        # Sum depth x context over the frustum points of each cell, the trash cell left out. The products are formed
        # for the kept points only, in cell order: the point (camera, bin, v, u) has the pixel (camera, v, u).
        rows = group_rows(flat.reshape(-1), cells, trash=True)
        pixels = logits.shape[-2] * logits.shape[-1]
        pixel = rows.order // (branch.depth_bins * pixels) * pixels + rows.order % pixels
        channels = context.shape[1]
        context_rows = context.permute(0, 2, 3, 1).reshape(-1, channels)  # [Nv * h * w, C]
        lifted = depth.reshape(-1)[rows.order, None] * context_rows[pixel]  # [kept points, C], cell order
        pooled = to_dense(sorted_sum(lifted, rows), rows)  # [Z * H * W, C]
        pooled = pooled.view(branch.height_bins, grid.height, grid.width, channels).permute(3, 0, 1, 2)
        pooled = pooled.reshape(1, channels * branch.height_bins, grid.height, grid.width)
        return branch.bev_encoder(branch.downsample(pooled))


class GpsGraph(nn.Module):
    """GpsBranch.forward (eval mode) for one sample: map_raster [1, 1, H, W], ego_vector [1, 5] (EgoState.vector()),
    can_valid [1] bool -> [1, out_channels, H, W]."""

    def __init__(self, branch):
        super().__init__()
        self.branch = branch

    def forward(self, map_raster: Tensor, ego_vector: Tensor, can_valid: Tensor) -> Tensor:
        branch = self.branch
        state = torch.cat([ego_vector.float() * branch.ego_scale, can_valid.float()[:, None]], dim=-1)
        embedding = branch.ego_encoder(state)
        x = torch.cat([map_raster.float(), branch.coordinates], dim=1)
        for block, film in zip(branch.map_blocks, branch.films):
            x = block(x)
            scale, shift = film(embedding).chunk(2, dim=-1)
            x = x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return branch.bev_encoder(x)


class ExportableDetector(nn.Module):
    """A FusionDetector (eval mode, `check_exportable` passed) as a module over the graph inputs of
    `fusion.deploy.spec.input_names(model.modalities)`, returning the outputs of `output_names` as a tuple.
    Sub-modules are named after the stages (camera, lidar, radar, gps, fuser, head; the voxelization is
    `lidar.pillars.voxelize` / `radar.pillars.voxelize`) so the ONNX node names tell the stage."""

    def __init__(self, model, image_size: tuple[int, int] | None):
        super().__init__()
        self.modalities = tuple(model.modalities)
        graphs = {}
        for name, branch in model.branches.items():
            if name == "camera":
                graphs[name] = CameraGraph(branch, image_size)
            elif name == "lidar":
                graphs[name] = LidarPillarGraph(branch)
            elif name == "radar":
                graphs[name] = RadarGraph(branch)
            else:
                graphs[name] = GpsGraph(branch)
        for name, graph in graphs.items():
            self.add_module(name, graph)
        self.fuser = model.fuser
        self.head = model.head

    def branch_inputs(self, inputs: dict[str, Tensor]) -> dict[str, tuple[Tensor, ...]]:
        """{modality: the graph inputs its stage takes}."""
        table = {"lidar": ("lidar_points",), "radar": ("radar_points",),
                 "camera": ("images", "intrinsics", "cam_to_ego", "camera_valid"),
                 "gps": ("map_raster", "ego_vector", "can_valid")}
        return {m: tuple(inputs[name] for name in table[m]) for m in self.modalities}

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        from fusion.deploy.spec import input_names

        inputs = dict(zip(input_names(list(self.modalities)), tensors))
        features = {m: getattr(self, m)(*args) for m, args in self.branch_inputs(inputs).items()}
        present = inputs["present"]
        masks = {m: present[:, i] for i, m in enumerate(self.modalities)}
        fused, attention = self.fuser(features, masks)
        out = self.head(fused)
        maps = [out.heatmap, out.offset, out.height, out.size, out.rotation, out.velocity, out.attribute]
        if out.direction is not None:
            maps.append(out.direction)
        return (*maps, attention.weights)
