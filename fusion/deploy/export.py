"""`export_onnx`: a FusionDetector -> an ONNX file (opset 18) with its ExportSpec in the metadata.

The exporter is torch.onnx's TorchScript-based one (`dynamo=False`): `ExportableDetector` has no data-dependent
Python control flow, so a trace is exact, and it needs no onnxscript. The number of LiDAR / radar points is a
dynamic axis.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from fusion.deploy.graph import ExportableDetector
from fusion.deploy.inputs import graph_inputs
from fusion.deploy.spec import (METADATA_KEY, OPSET, DecodeSettings, ExportSpec, UnsupportedExport, check_exportable,
                                input_names, output_names)
from fusion.types import Batch


def export_spec(model, image_size: tuple[int, int] | None, num_cameras: int = 6, lidar_sweeps: int | None = None,
                radar_sweeps: int | None = None) -> ExportSpec:
    """The ExportSpec of `model` (a FusionDetector) for camera images of `image_size` (height, width) pixels."""
    from dataclasses import asdict

    modalities = list(model.modalities)
    if "camera" in modalities and (image_size is None or min(image_size) < 1):
        raise UnsupportedExport(f"the model has a camera branch: give the image size (height, width), got {image_size}")
    hparams = model.hparams
    decode = DecodeSettings(score_threshold=float(hparams.get("score_threshold", 0.1)),
                            max_boxes=int(hparams.get("max_boxes", 500)), pool_size=int(hparams.get("pool_size", 3)),
                            heading_from_motion=hparams.get("heading_from_motion"),
                            heading_from_motion_mode=hparams.get("heading_from_motion_mode", "flip"),
                            point_motion=hparams.get("point_motion"), map_heading=hparams.get("map_heading"),
                            attribute_from_motion=hparams.get("attribute_from_motion"),
                            vru_heading_from_motion=hparams.get("vru_heading_from_motion"))
    direction = getattr(model.head, "direction", None) is not None
    return ExportSpec(grid=asdict(model.grid), modalities=modalities,
                      image_size=tuple(image_size) if "camera" in modalities else None,
                      num_cameras=num_cameras if "camera" in modalities else 0, lidar_sweeps=lidar_sweeps,
                      radar_sweeps=radar_sweeps, decode=decode, inputs=input_names(modalities),
                      outputs=output_names(direction))


def export_onnx(model, spec: ExportSpec, example: Batch, path: str | Path) -> Path:
    """Write `model` (a FusionDetector; put in eval mode) as ONNX to `path`, traced on `example` (a Batch of one
    sample in the spec's input configuration, all sensors present), with the spec as metadata. UnsupportedExport
    when the model cannot be exported faithfully."""
    import onnx

    check_exportable(model)
    model = model.eval().cpu()
    graph = ExportableDetector(model, spec.image_size).eval()
    inputs = graph_inputs(example.to("cpu"), spec)
    dynamic_axes = {name: {0: f"{name}_count"} for name in ("lidar_points", "radar_points") if name in inputs}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: shape checks become constants (shapes are fixed)
        torch.onnx.export(graph, tuple(inputs[name] for name in spec.inputs), str(path), dynamo=False,
                          opset_version=OPSET, input_names=spec.inputs, output_names=spec.outputs,
                          dynamic_axes=dynamic_axes)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, spec.to_json()
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def read_spec(path: str | Path) -> ExportSpec:
    """The ExportSpec stored in an ONNX file by `export_onnx`; ValueError naming the file if it has none."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            try:
                return ExportSpec.from_json(entry.value)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
    raise ValueError(f"{path}: no {METADATA_KEY} metadata; export it with tools/export.py")


def data_settings(checkpoint: str | Path | None, config) -> dict:
    """The data-module settings a model was trained with (image_size, cameras, sweeps, ...): the checkpoint's saved
    data hyper-parameters, else the `data:` sections of `config` (one YAML or several), else {}."""
    from fusion.checkpoints import _config_section, load_checkpoint

    if checkpoint is not None:
        saved = load_checkpoint(checkpoint).get("datamodule_hyper_parameters") or {}
        if saved:
            return dict(saved)
    return dict(_config_section(config, "data", required=False)) if config is not None else {}


def example_batch(spec: ExportSpec, points: int = 2000, seed: int = 0) -> Batch:
    """A Batch of one well-formed sample in the spec's input configuration (random points inside the grid, grey
    images from cameras looking out at 60 degree steps, a random map), every sensor present: the tracing input."""
    from fusion.datasets.collate import collate_samples
    from fusion.types import CAMERA_NAMES, Boxes, CameraImages, EgoState, Sample

    generator = torch.Generator().manual_seed(seed)
    grid = spec.bev_grid

    def uniform(count: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator)

    lidar = torch.stack([uniform(points, grid.x_min, grid.x_max), uniform(points, grid.y_min, grid.y_max),
                         uniform(points, grid.z_min, grid.z_max), uniform(points, 0, 255), uniform(points, 0, 0.5)], 1)
    radar = torch.stack([uniform(200, grid.x_min, grid.x_max), uniform(200, grid.y_min, grid.y_max),
                         uniform(200, 0, 1), uniform(200, -5, 20), uniform(200, -5, 5), uniform(200, -5, 5),
                         torch.randint(0, 8, (200,), generator=generator).float(), uniform(200, 0, 0.5)], 1)
    cameras = None
    if spec.image_size is not None:
        height, width = spec.image_size
        count = spec.num_cameras
        intrinsics = torch.tensor([[width * 0.55, 0, width / 2], [0, width * 0.55, height / 2], [0, 0, 1.0]])
        poses = []
        for k in range(count):
            yaw = 2 * torch.pi * k / count
            c, s = float(torch.cos(torch.tensor(yaw))), float(torch.sin(torch.tensor(yaw)))
            pose = torch.eye(4)
            pose[:3, :3] = torch.tensor([[s, -c, 0.0], [0.0, 0.0, -1.0], [c, s, 0.0]]).T  # camera z along yaw
            pose[:3, 3] = torch.tensor([1.0, 0.0, 1.6])
            poses.append(pose)
        cameras = CameraImages(torch.full((count, 3, height, width), 128, dtype=torch.uint8),
                               intrinsics.expand(count, 3, 3).clone(), torch.stack(poses),
                               torch.ones(count, dtype=torch.bool), torch.zeros(count),
                               tuple(CAMERA_NAMES[:count]) if count <= len(CAMERA_NAMES) else CAMERA_NAMES)
    ego = EgoState(torch.eye(4, dtype=torch.float64), torch.tensor(5.0), torch.tensor(0.0),
                   torch.zeros(3), torch.tensor(True))
    raster = (torch.rand(1, *grid.shape, generator=generator) > 0.5).float()
    sample = Sample(token="export", scene_name="export", timestamp_us=0, lidar=lidar, radar=radar, cameras=cameras,
                    ego=ego, map_raster=raster, boxes=Boxes.empty())
    return collate_samples([sample])
