"""The pictures put things where they are: BEV orientation, camera projection, contribution colours."""
import numpy as np
import pytest
import torch

from fusion import geometry
from fusion.grid import BEVGrid
from fusion.types import Boxes, CameraImages
from fusion.visualization import (GT_COLOR, MODALITY_COLORS, BevCanvas, project_to_image, render_bev,
                                  render_cameras, render_contributions)

GRID = BEVGrid(x_min=-20, x_max=20, y_min=-10, y_max=10, cell_size=0.5)


def one_box(x, y, label=0, length=4.0, width=2.0):
    return Boxes(center=torch.tensor([[x, y, 0.0]]), size=torch.tensor([[length, width, 1.5]]), yaw=torch.zeros(1),
                 velocity=torch.zeros(1, 2), labels=torch.tensor([label]), attributes=torch.tensor([-1]),
                 scores=torch.ones(1), num_lidar_pts=torch.ones(1, dtype=torch.long),
                 num_radar_pts=torch.zeros(1, dtype=torch.long))


def test_bev_puts_forward_up_and_left_left():
    canvas = BevCanvas(GRID, pixels_per_meter=4)
    assert canvas.size == (80, 160)
    u, v = canvas.to_pixels(np.array([[15.0, 5.0]]))[0]
    assert v < 80 and u < 40  # ahead of the ego: upper half; to its left: left half
    lidar = np.array([[15.0, 5.0, 0.0], [-15.0, -5.0, 0.0]])
    picture = np.asarray(render_bev(GRID, lidar=lidar, pixels_per_meter=4))
    assert picture[int(v), int(u)].sum() > 3 * 18 + 50
    u2, v2 = canvas.to_pixels(lidar[1:, :2])[0]
    assert picture[int(v2), int(u2)].sum() > 3 * 18 + 50


def test_bev_map_raster_orientation():
    raster = torch.zeros(1, *GRID.shape)
    row, col, _ = GRID.cell_index(torch.tensor([[15.0, 5.0]]))
    raster[0, row, col] = 1.0
    picture = np.asarray(render_bev(GRID, map_raster=raster, pixels_per_meter=2)).astype(int)
    u, v = BevCanvas(GRID, 2).to_pixels(np.array([[15.25, 5.25]]))[0]
    assert picture[int(v), int(u)].sum() > picture[5, 5].sum()


def test_ground_truth_box_is_drawn_in_green():
    picture = np.asarray(render_bev(GRID, gt_boxes=one_box(10.0, 0.0), pixels_per_meter=4))
    assert (np.abs(picture.astype(int) - np.array(GT_COLOR)).sum(-1) == 0).sum() > 20


def test_projection_and_camera_mosaic_draw_the_box_where_it_is():
    # A front camera 1.5 m up looking along +x (camera z forward = ego x, camera x right = ego -y).
    cam_to_ego = geometry.make_transform(np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float), [0, 0, 1.5])
    intrinsics = np.array([[100.0, 0, 160], [0, 100.0, 90], [0, 0, 1]])
    uv, in_front = project_to_image(np.array([[10.0, 0.0, 1.5], [-5.0, 0.0, 1.5]]), cam_to_ego, intrinsics)
    assert in_front.tolist() == [True, False]
    np.testing.assert_allclose(uv[0], [160, 90], atol=1e-9)
    cameras = CameraImages(images=torch.zeros(1, 3, 180, 320, dtype=torch.uint8),
                           intrinsics=torch.tensor(intrinsics, dtype=torch.float32)[None],
                           cam_to_ego=torch.tensor(cam_to_ego, dtype=torch.float32)[None],
                           valid=torch.ones(1, dtype=torch.bool), time_offsets=torch.zeros(1), names=("CAM_FRONT",))
    mosaic = np.asarray(render_cameras(cameras, gt_boxes=one_box(10.0, 0.0), columns=1, tile_width=320))
    green = np.abs(mosaic.astype(int) - np.array(GT_COLOR)).sum(-1) == 0
    ys, xs = np.nonzero(green)
    assert len(xs) > 50
    assert 110 < xs.mean() < 210 and 60 < ys.mean() < 140


def test_contribution_map_colours_and_validation():
    shares = torch.zeros(4, *GRID.shape)
    shares[1] = 1.0  # LiDAR everywhere
    picture = np.asarray(render_contributions(shares, cell_pixels=1))
    assert tuple(picture[-1, -1]) == MODALITY_COLORS[1]
    with pytest.raises(ValueError, match="contributions must be"):
        render_contributions(torch.zeros(3, 4))
