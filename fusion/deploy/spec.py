"""What an exported graph expects (`ExportSpec`, stored as JSON in the ONNX file's metadata) and which models can be
exported at all (`check_exportable`).

The graph is exported for batch 1 and a fixed camera set-up (number of cameras, image size in pixels); the number of
LiDAR and radar points is a dynamic axis (any count, zero included). Sensor availability is the `present` input, so
one graph serves every subset of sensors.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from fusion.grid import BEVGrid

#: The metadata key of the ONNX file that holds the ExportSpec as JSON.
METADATA_KEY = "fusion_export_spec"
#: ONNX opset of the export (18: the opset the graph was written and tested against; its TopK / CumSum / ScatterND
#: pooling, fusion.deploy.segments, needs no newer one).
OPSET = 18


class UnsupportedExport(ValueError):
    """The model (or the requested input configuration) cannot be exported faithfully; the message says why."""


@dataclass
class DecodeSettings:
    """fusion.heads.decode.decode_boxes settings of the model (FusionDetector.decode), applied after the graph."""

    score_threshold: float = 0.1
    max_boxes: int = 500
    pool_size: int = 3
    heading_from_motion: float | None = None
    heading_from_motion_mode: str = "flip"
    point_motion: dict | None = None  # fusion.heads.point_motion.PointMotionSettings fields; None: off
    map_heading: dict | None = None  # fusion.heads.map_heading.MapHeadingSettings fields; None: off
    attribute_from_motion: float | None = None  # m/s; None: off (fusion.heads.decode.attributes_from_motion)
    vru_heading_from_motion: float | None = None  # m/s; None: off (fusion.heads.decode.vru_headings_from_motion)

    def check(self) -> None:
        """ValueError naming the field whose value the decoding cannot use (the spec comes from a file)."""
        from fusion.heads.map_heading import map_heading_settings
        from fusion.heads.point_motion import point_motion_settings

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not number(self.score_threshold):
            raise ValueError(f"decode.score_threshold must be a finite number, got {self.score_threshold!r}")
        for name in ("max_boxes", "pool_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"decode.{name} must be an integer >= 1, got {value!r}")
        for name in ("heading_from_motion", "attribute_from_motion", "vru_heading_from_motion"):
            value = getattr(self, name)
            if value is not None and not (number(value) and value >= 0):
                raise ValueError(f"decode.{name} must be a speed >= 0 (m/s) or null, got {value!r}")
        if self.heading_from_motion_mode not in ("direction", "flip"):
            raise ValueError(f"decode.heading_from_motion_mode must be 'direction' or 'flip', got "
                             f"{self.heading_from_motion_mode!r}")
        for name, parse in (("point_motion", point_motion_settings), ("map_heading", map_heading_settings)):
            try:
                parse(getattr(self, name))
            except (TypeError, ValueError) as error:
                raise ValueError(f"decode.{name}: {error}") from None


@dataclass
class ExportSpec:
    """The fixed input configuration of an exported graph.

    grid: the BEVGrid of the model (ego frame, meters) as a dict of its fields.
    modalities: the model's branches, in the order of the `present` input's columns.
    image_size: (height, width) in pixels of the camera images the graph takes; num_cameras: cameras per sample.
    lidar_sweeps / radar_sweeps: the sweeps the model was trained with (what pre-processing should give it).
    decode: the decoding settings applied to the graph's outputs.
    inputs / outputs: the graph's input and output names, in order.
    """

    grid: dict
    modalities: list[str]
    image_size: tuple[int, int] | None
    num_cameras: int
    lidar_sweeps: int | None
    radar_sweeps: int | None
    decode: DecodeSettings
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    opset: int = OPSET

    @property
    def bev_grid(self) -> BEVGrid:
        return BEVGrid(**self.grid)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "ExportSpec":
        """The spec from its JSON (an ONNX file's metadata: untrusted input). ValueError saying what is wrong for
        malformed JSON, a missing or unknown field, a grid that is not a BEVGrid, or decoding settings the decoder
        cannot use."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"export spec is not valid JSON: {error}") from None
        if not isinstance(values, dict) or not isinstance(values.get("decode"), dict):
            raise ValueError("export spec must be a JSON object with a 'decode' object")
        try:
            values["decode"] = DecodeSettings(**values["decode"])
            if values.get("image_size") is not None:
                values["image_size"] = tuple(values["image_size"])
            spec = ExportSpec(**values)
            if not isinstance(spec.grid, dict):
                raise TypeError(f"grid must be an object, got {type(spec.grid).__name__}")
            spec.bev_grid  # ValueError naming a bad grid field
        except TypeError as error:
            raise ValueError(f"export spec: {error}") from None
        spec.decode.check()
        return spec


def input_names(modalities: list[str]) -> list[str]:
    """The graph's inputs for a model with these branches (batch 1; P and R points are dynamic):

    lidar_points [P, 5] float32, LIDAR_FEATURES, ego frame, meters / seconds;
    radar_points [R, 8] float32, RADAR_FEATURES, ego frame;
    images [1, Ncam, 3, H, W] uint8 RGB; intrinsics [1, Ncam, 3, 3] float32 pixels; cam_to_ego [1, Ncam, 4, 4]
    float32 meters; camera_valid [1, Ncam] bool;
    map_raster [1, 1, H_grid, W_grid] float32 in [0, 1]; ego_vector [1, 5] float32 (EgoState.vector(): speed m/s,
    yaw rate rad/s, acceleration m/s^2); can_valid [1] bool;
    present [1, M] bool, one column per modality of `modalities`."""
    names = []
    if "lidar" in modalities:
        names.append("lidar_points")
    if "radar" in modalities:
        names.append("radar_points")
    if "camera" in modalities:
        names += ["images", "intrinsics", "cam_to_ego", "camera_valid"]
    if "gps" in modalities:
        names += ["map_raster", "ego_vector", "can_valid"]
    return names + ["present"]


def output_names(direction: bool) -> list[str]:
    """The graph's outputs: the HeadOutput maps [1, C, H, W] (fusion.heads.centerpoint) then the fuser's attention
    weights [1, heads, M, K, H, W]."""
    maps = ["heatmap", "offset", "height", "size", "rotation", "velocity", "attribute"]
    return maps + (["direction"] if direction else []) + ["attention_weights"]


def check_exportable(model) -> None:
    """UnsupportedExport naming the part of `model` (a FusionDetector) that has no faithful ONNX form; None if it
    can be exported."""
    from fusion.branches.camera import CameraBranch
    from fusion.branches.gps import GpsBranch
    from fusion.branches.lidar import LidarBranch, LidarPillarBranch
    from fusion.branches.radar import RadarBranch
    from fusion.fuser import DeformableFuser
    from fusion.heads.centerpoint import CenterHead

    if model.temporal is not None:
        raise UnsupportedExport("model.temporal_fusion is on: its per-scene history of fused BEVs is Python state "
                                "between calls, not part of a graph; export a model trained with temporal_fusion: false")
    supported = (CameraBranch, LidarPillarBranch, RadarBranch, GpsBranch)
    for name, branch in model.branches.items():
        if isinstance(branch, LidarBranch):
            raise UnsupportedExport(f"branch {name!r} is LidarBranch: its spconv sparse 3D convolutions have no ONNX "
                                    "form (and no faithful dense one at 0.075 m voxels); export a model with "
                                    "fusion.branches.lidar.LidarPillarBranch")
        if type(branch) not in supported:
            raise UnsupportedExport(f"branch {name!r} is {type(branch).__name__}; the exporter knows "
                                    f"{[cls.__name__ for cls in supported]}")
    if type(model.fuser) is not DeformableFuser:
        raise UnsupportedExport(f"fuser {type(model.fuser).__name__} is not DeformableFuser")
    if type(model.head) is not CenterHead:
        raise UnsupportedExport(f"head {type(model.head).__name__} is not CenterHead")
