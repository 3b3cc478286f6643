"""The pre- and post-processing shared by the PyTorch and the onnxruntime paths (one copy of each):

- before: the drive / dataset reader, the data module's inference transforms and `collate_samples` give a `Batch`
  (point loading, image decoding and resizing, motion compensation: the same code for both runtimes); `graph_inputs`
  turns a Batch of one sample into the exported graph's input tensors (image normalisation is inside the graph, as
  it is inside CameraBranch);
- after: `head_output` / `attention` turn the graph's outputs back into a HeadOutput / FusionAttention, and
  `decode` is `fusion.heads.decode.decode_boxes` (max-pool peak extraction, the model's NMS-free decoding) with the
  model's settings.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fusion.deploy.spec import DecodeSettings, ExportSpec
from fusion.fuser import FusionAttention
from fusion.heads.centerpoint import HeadOutput
from fusion.heads.decode import decode_boxes
from fusion.heads.finish import finish_boxes
from fusion.heads.map_heading import map_heading_settings
from fusion.heads.point_motion import point_motion_settings
from fusion.types import LIDAR_FEATURES, RADAR_FEATURES, Batch, Boxes

_MAP_NAMES = ("heatmap", "offset", "height", "size", "rotation", "velocity", "attribute", "direction")


def graph_inputs(batch: Batch, spec: ExportSpec) -> dict[str, Tensor]:
    """{input name: CPU tensor} for the graph of `spec` from a Batch of one sample (see spec.input_names for shapes,
    frames and units). A sensor the batch lacks is given as an empty / invalid input and False in `present`; an
    empty point cloud as one point far outside the grid (`_never_empty`).
    ValueError if the batch has more than one sample or camera images of another size than the graph's."""
    if batch.batch_size != 1:
        raise ValueError(f"the exported graph takes one sample at a time, got a batch of {batch.batch_size}")
    grid = spec.bev_grid
    inputs: dict[str, Tensor] = {}
    if "lidar" in spec.modalities:
        inputs["lidar_points"] = _never_empty(batch.lidar_points.detach().cpu().float(), len(LIDAR_FEATURES))
    if "radar" in spec.modalities:
        inputs["radar_points"] = _never_empty(batch.radar_points.detach().cpu().float(), len(RADAR_FEATURES))
    if "camera" in spec.modalities:
        height, width = spec.image_size
        cameras = batch.cameras
        if cameras is None:
            inputs["images"] = torch.zeros(1, spec.num_cameras, 3, height, width, dtype=torch.uint8)
            inputs["intrinsics"] = torch.eye(3).expand(1, spec.num_cameras, 3, 3).contiguous()
            inputs["cam_to_ego"] = torch.eye(4).expand(1, spec.num_cameras, 4, 4).contiguous()
            inputs["camera_valid"] = torch.zeros(1, spec.num_cameras, dtype=torch.bool)
        else:
            if tuple(cameras.images.shape[1:]) != (spec.num_cameras, 3, height, width):
                raise ValueError(f"camera images are {tuple(cameras.images.shape[1:])} (Ncam, 3, H, W) but the graph "
                                 f"was exported for {(spec.num_cameras, 3, height, width)}; resize in the transforms")
            inputs["images"] = cameras.images.detach().cpu().to(torch.uint8)
            inputs["intrinsics"] = cameras.intrinsics.detach().cpu().float()
            inputs["cam_to_ego"] = cameras.cam_to_ego.detach().cpu().float()
            inputs["camera_valid"] = cameras.valid.detach().cpu().bool()
    if "gps" in spec.modalities:
        raster = batch.map_raster.detach().cpu().float()
        inputs["map_raster"] = raster.expand(1, 1, *grid.shape).contiguous()
        ego = batch.ego.to("cpu")
        inputs["ego_vector"] = ego.vector().reshape(1, 5)
        inputs["can_valid"] = ego.can_valid.reshape(1).bool()
    present = [batch.present[m].reshape(-1)[:1].cpu().bool() if m in batch.present else torch.zeros(1, dtype=torch.bool)
               for m in spec.modalities]
    inputs["present"] = torch.stack(present, dim=1)
    return {name: inputs[name] for name in spec.inputs}


def _never_empty(points: Tensor, columns: int) -> Tensor:
    """points [N, columns], or for N = 0 one point 1000 km away (x, y), which the voxelization drops like any point
    outside the grid: onnxruntime's MatMul / LayerNorm kernels reject zero-row inputs."""
    points = points.reshape(-1, columns)
    if points.shape[0] == 0:
        points = torch.zeros(1, columns)
        points[0, :2] = 1e6
    return points


def head_output(outputs: dict[str, Tensor]) -> HeadOutput:
    """The graph's map outputs {name: [1, C, H, W]} as a HeadOutput."""
    return HeadOutput(**{name: outputs[name] for name in _MAP_NAMES if name in outputs})


def attention(outputs: dict[str, Tensor], spec: ExportSpec, present: Tensor) -> FusionAttention:
    """The graph's attention_weights [1, heads, M, K, H, W] and the present input [1, M] as a FusionAttention."""
    return FusionAttention(outputs["attention_weights"], tuple(spec.modalities), present)


def decode(output: HeadOutput, spec: ExportSpec, score_threshold: float | None = None, batch: Batch | None = None
           ) -> list[Boxes]:
    """Boxes per sample (ego frame, best first) from the head maps, with the decoding settings of `spec`; `batch`
    (the graph's input) gives the point clouds of the point_motion velocity measurement, as in FusionDetector.decode."""
    settings: DecodeSettings = spec.decode
    threshold = settings.score_threshold if score_threshold is None else score_threshold
    boxes = decode_boxes(output, spec.bev_grid, threshold, settings.max_boxes, settings.pool_size)
    return finish_boxes(boxes, batch, spec.bev_grid, point_motion_settings(settings.point_motion),
                        settings.heading_from_motion, settings.heading_from_motion_mode,
                        map_heading_settings(settings.map_heading), settings.attribute_from_motion,
                        settings.vru_heading_from_motion)
