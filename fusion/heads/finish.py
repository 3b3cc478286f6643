"""What happens to decoded boxes before they leave the detector: velocities measured from the points, then headings
settled by the motion and by the map, and attributes that say "moving" where the box moves. Shared by the PyTorch
model (FusionDetector.decode) and the onnxruntime detector (fusion.deploy.inputs.decode), so both give the same
boxes."""
from __future__ import annotations

from dataclasses import replace

from fusion.grid import BEVGrid
from fusion.heads.decode import align_heading_with_motion, attributes_from_motion, vru_headings_from_motion
from fusion.heads.map_heading import MapHeadingSettings, map_headings
from fusion.heads.point_motion import PointMotionSettings, sample_clouds, with_measured_velocities
from fusion.types import Batch, Boxes


def finish_boxes(boxes: list[Boxes], batch: Batch | None, grid: BEVGrid, point_motion: PointMotionSettings | None,
                 heading_from_motion: float | None, heading_from_motion_mode: str = "flip",
                 map_heading: MapHeadingSettings | None = None, attribute_from_motion: float | None = None,
                 vru_heading_from_motion: float | None = None) -> list[Boxes]:
    """Decoded boxes (one list entry per sample of `batch`, ego frame) after, in order:
    1. velocities measured from the sample's present LiDAR / radar (`with_measured_velocities`; point_motion set and
       a batch given);
    2. headings of boxes moving at least heading_from_motion m/s aligned with the motion (`align_heading_with_motion`),
       then pedestrians and two-wheelers moving at least vru_heading_from_motion m/s facing their motion
       (`vru_headings_from_motion`, when set);
    3. headings of slower road vehicles turned to the side of the road traffic keeps to (`map_headings`; map_heading
       set, a batch given and its sample's map present, i.e. present["gps"]);
    4. boxes moving at least attribute_from_motion m/s given their class's moving attribute
       (`attributes_from_motion`, when set).
    Steps 2 and 3 act on different boxes when map_heading.min_speed <= heading_from_motion (the defaults: 1 m/s)."""
    finished = []
    for index, sample_boxes in enumerate(boxes):
        if point_motion is not None and batch is not None:
            lidar, radar = sample_clouds(batch, index)
            sample_boxes = with_measured_velocities(sample_boxes, lidar, radar, point_motion)
        if heading_from_motion is not None:
            yaw = align_heading_with_motion(sample_boxes.yaw, sample_boxes.velocity, heading_from_motion,
                                            heading_from_motion_mode)
            sample_boxes = replace(sample_boxes, yaw=yaw)
        if vru_heading_from_motion is not None:
            yaw = vru_headings_from_motion(sample_boxes.yaw, sample_boxes.velocity, sample_boxes.labels,
                                           vru_heading_from_motion)
            sample_boxes = replace(sample_boxes, yaw=yaw)
        if map_heading is not None and batch is not None and _map_present(batch, index):
            yaw = map_headings(sample_boxes, batch.map_raster[index], grid, map_heading)
            sample_boxes = replace(sample_boxes, yaw=yaw)
        if attribute_from_motion is not None:
            attributes = attributes_from_motion(sample_boxes.labels, sample_boxes.attributes, sample_boxes.velocity,
                                                attribute_from_motion)
            sample_boxes = replace(sample_boxes, attributes=attributes)
        finished.append(sample_boxes)
    return finished


def _map_present(batch: Batch, index: int) -> bool:
    """Whether sample `index` has its map: the GPS modality (ego state and map crop) is present."""
    present = batch.present.get("gps")
    return present is not None and bool(present[index])
