"""Front / back of road vehicles from the side of the road traffic keeps to (fusion.heads.map_heading)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings as hypothesis_settings, strategies as st

from fusion.grid import BEVGrid
from fusion.heads.finish import finish_boxes
from fusion.heads.map_heading import MapHeadingSettings, map_heading_settings, map_headings
from fusion.types import DETECTION_CLASSES, Boxes

GRID = BEVGrid(x_min=-25.6, x_max=25.6, y_min=-25.6, y_max=25.6, cell_size=0.4)
HALF_WIDTH = 7.0  # meters: half the carriageway of the two-way roads below (two 3.5 m lanes each way)


def road_raster(grid: BEVGrid, direction: float = 0.0, lateral_shift: float = 0.0,
                half_width: float = HALF_WIDTH) -> torch.Tensor:
    """[1, H, W] drivable surface (1) of a straight two-way road through the grid along angle `direction`
    (radians, ego frame), its middle `lateral_shift` meters to the left of the origin; 0 elsewhere."""
    centers = grid.cell_centers(dtype=torch.float64)
    left = torch.tensor([-math.sin(direction), math.cos(direction)], dtype=torch.float64)
    across = centers @ left - lateral_shift
    return (across.abs() < half_width).float().reshape(1, grid.height, grid.width)


def boxes_of(centers, yaws, labels, velocities=None) -> Boxes:
    n = len(centers)
    velocities = [[0.0, 0.0]] * n if velocities is None else velocities
    return Boxes(center=torch.tensor([[x, y, 0.8] for x, y in centers], dtype=torch.float32).reshape(n, 3),
                 size=torch.tensor([[4.5, 1.9, 1.6]] * n).reshape(n, 3), yaw=torch.tensor(yaws, dtype=torch.float32),
                 velocity=torch.tensor(velocities, dtype=torch.float32).reshape(n, 2),
                 labels=torch.tensor([DETECTION_CLASSES.index(name) for name in labels], dtype=torch.int64),
                 attributes=torch.full((n,), -1), scores=torch.ones(n), num_lidar_pts=torch.full((n,), -1),
                 num_radar_pts=torch.full((n,), -1))


def faces(yaw: torch.Tensor, direction: float) -> np.ndarray:
    """Whether each heading points along `direction` (within 90 degrees)."""
    return (torch.cos(yaw.double() - direction) > 0).numpy()


def test_right_hand_traffic_turns_vehicles_to_drive_on_the_right():
    raster = road_raster(GRID)  # a road along x; driving +x, the right side is y < 0
    boxes = boxes_of([(3.0, -1.75), (-6.0, -5.25), (2.0, 1.75), (8.0, 5.25)], [math.pi, 0.0, 0.0, math.pi],
                     ["car", "truck", "car", "bus"])
    yaw = map_headings(boxes, raster, GRID, MapHeadingSettings())
    assert faces(yaw, 0.0).tolist() == [True, True, False, False]
    assert float(yaw[1]) == 0.0 and float(yaw[3]) == pytest.approx(math.pi)  # already right: untouched
    assert float(yaw[0]) == pytest.approx(0.0, abs=1e-6)  # turned by exactly pi
    left = map_headings(boxes, raster, GRID, MapHeadingSettings(traffic="left"))
    assert faces(left, 0.0).tolist() == [False, False, True, True]


def test_objects_beside_the_road_use_the_nearest_carriageway():
    """A bicycle parked on the sidewalk right of the carriageway (driving +x) faces +x."""
    raster = road_raster(GRID)
    boxes = boxes_of([(0.0, -HALF_WIDTH - 1.5)], [math.pi], ["bicycle"])
    assert faces(map_headings(boxes, raster, GRID, MapHeadingSettings()), 0.0).tolist() == [True]


def test_undecided_boxes_keep_their_heading():
    raster = road_raster(GRID)
    open_area = torch.ones(1, GRID.height, GRID.width)  # a junction / plaza: the run has no edges in reach
    near_middle = boxes_of([(0.0, -0.3)], [math.pi], ["car"])
    moving = boxes_of([(0.0, -1.75)], [math.pi], ["car"], velocities=[[-5.0, 0.0]])
    pedestrian = boxes_of([(0.0, -1.75)], [math.pi], ["pedestrian"])
    for boxes, map_raster in ((near_middle, raster), (moving, raster), (pedestrian, raster),
                              (boxes_of([(0.0, -1.75)], [math.pi], ["car"]), open_area),
                              (boxes_of([(0.0, -1.75)], [math.pi], ["car"]), torch.zeros(1, 1, 1)),
                              ):
        torch.testing.assert_close(map_headings(boxes, map_raster, GRID, MapHeadingSettings()), boxes.yaw)
    # The far edge of the road lies beyond the grid: not seen, no decision (near edge alone could be a median).
    small = BEVGrid(x_min=-12.8, x_max=12.8, y_min=-6.4, y_max=6.4, cell_size=0.4)
    beyond = boxes_of([(0.0, -4.0)], [math.pi], ["car"])
    torch.testing.assert_close(map_headings(beyond, road_raster(small, lateral_shift=2.0), small,
                                            MapHeadingSettings()), beyond.yaw)
    empty = boxes_of([], [], [])
    assert map_headings(empty, raster, GRID, MapHeadingSettings()).shape == (0,)


@hypothesis_settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(direction=st.floats(-math.pi, math.pi), lateral=st.floats(1.2, HALF_WIDTH - 0.8),
       along=st.floats(-6.0, 6.0), shift=st.floats(-3.0, 3.0), turned=st.booleans(), yaw_noise=st.floats(-0.2, 0.2))
def test_any_road_direction_a_vehicle_right_of_the_middle_faces_the_travel_direction(direction, lateral, along,
                                                                                    shift, turned, yaw_noise):
    """Property: for a road at any angle and a car anywhere in its right half (>= 1.2 m from the middle), whatever
    the detector said front was, the result faces the travel direction; its axis is never changed."""
    raster = road_raster(GRID, direction, shift)
    forward = np.array([math.cos(direction), math.sin(direction)])
    left = np.array([-forward[1], forward[0]])
    center = along * forward + (shift - lateral) * left
    start = direction + yaw_noise + (math.pi if turned else 0.0)
    yaw = map_headings(boxes_of([tuple(center)], [start], ["car"]), raster, GRID, MapHeadingSettings())
    assert faces(yaw, direction).tolist() == [True]
    assert abs(math.sin(float(yaw[0]) - start)) < 1e-5  # only ever turned by pi


class _Batch:
    """The fields of fusion.types.Batch that finish_boxes reads for the map."""

    def __init__(self, map_raster: torch.Tensor, gps_present: bool):
        self.map_raster = map_raster[None]
        self.present = {"gps": torch.tensor([gps_present])}


def test_finish_boxes_reads_the_map_only_when_present_and_after_the_motion():
    raster = road_raster(GRID)
    boxes = boxes_of([(3.0, -1.75), (6.0, -5.25)], [math.pi, 0.0], ["car", "car"],
                     velocities=[[0.0, 0.0], [-4.0, 0.0]])  # the second backs up at 4 m/s: motion decides
    settings = MapHeadingSettings()
    finished = finish_boxes([boxes], _Batch(raster, True), GRID, None, heading_from_motion=1.0,
                            map_heading=settings)[0]
    assert faces(finished.yaw, 0.0).tolist() == [True, False]
    absent = finish_boxes([boxes], _Batch(raster, False), GRID, None, None, map_heading=settings)[0]
    torch.testing.assert_close(absent.yaw, boxes.yaw)
    without_batch = finish_boxes([boxes], None, GRID, None, None, map_heading=settings)[0]
    torch.testing.assert_close(without_batch.yaw, boxes.yaw)


def test_settings_are_checked_with_the_field_named():
    assert map_heading_settings(None) is None
    assert map_heading_settings({}) == MapHeadingSettings()
    assert map_heading_settings({"traffic": "left", "classes": ["car"]}).classes == ("car",)
    with pytest.raises(ValueError, match="unknown setting"):
        map_heading_settings({"side": "left"})
    with pytest.raises(ValueError, match="traffic"):
        MapHeadingSettings(traffic="middle")
    with pytest.raises(ValueError, match="unknown class"):
        MapHeadingSettings(classes=("car", "tram"))
    with pytest.raises(ValueError, match="classes"):
        MapHeadingSettings(classes="car")
    with pytest.raises(ValueError, match="reach_m"):
        MapHeadingSettings(reach_m=float("nan"))
    with pytest.raises(ValueError, match="step_m"):
        MapHeadingSettings(step_m=0.0)
    with pytest.raises(ValueError, match="must be a mapping"):
        map_heading_settings("right")


def test_the_model_and_the_export_apply_the_map_prior(tiny):
    """FusionDetector.decode with map_heading (and attribute_from_motion) = its boxes without them, then
    finish_boxes with them; the settings travel into the ONNX export's decoding settings."""
    from fusion.datasets.collate import collate_samples
    from fusion.deploy.export import export_spec
    from fusion.deploy.spec import ExportSpec

    model, data = tiny
    data.setup("validate")
    batch = collate_samples([data.datasets["val"][0]])
    assert bool(batch.present["gps"][0]) and batch.map_raster.shape[-2:] == model.grid.shape
    names = ("point_motion", "heading_from_motion", "map_heading", "attribute_from_motion", "vru_heading_from_motion")
    saved = {name: model.hparams.get(name) for name in names}
    try:
        model.hparams.update(point_motion=None, heading_from_motion=None, map_heading=None, attribute_from_motion=None,
                             vru_heading_from_motion=None)
        plain, _ = model.predict(batch, score_threshold=0.0)
        model.hparams.update(map_heading={"classes": list(DETECTION_CLASSES)}, attribute_from_motion=0.0)
        with_map, _ = model.predict(batch, score_threshold=0.0)
        spec = ExportSpec.from_json(export_spec(model, (96, 256)).to_json())
    finally:
        model.hparams.update(saved)
    settings = MapHeadingSettings(classes=DETECTION_CLASSES)
    expected = finish_boxes(plain, batch, model.grid, None, None, map_heading=settings, attribute_from_motion=0.0)
    assert len(with_map[0]) == len(plain[0]) > 0
    torch.testing.assert_close(with_map[0].yaw, expected[0].yaw)
    torch.testing.assert_close(with_map[0].attributes, expected[0].attributes)
    torch.testing.assert_close(with_map[0].center, plain[0].center)
    assert map_heading_settings(spec.decode.map_heading) == settings
    assert spec.decode.attribute_from_motion == 0.0
