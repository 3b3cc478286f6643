"""fusion/grid.py: one test beside each rule of the grid arithmetic (point -> cell, cell -> point, grid_sample
coordinates, warping a raster under a planar rigid transform)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusion.geometry import make_transform, rotation_z
from fusion.grid import BEVGrid, planar_transform, rigid_2d

# Non-square, off-centre, so that rows and columns or x and y cannot be confused.
GRID = BEVGrid(x_min=-6.0, x_max=10.0, y_min=-4.0, y_max=2.0, z_min=-3.0, z_max=5.0, cell_size=0.5)
SQUARE = BEVGrid(-4.0, 4.0, -4.0, 4.0, -5.0, 3.0, 1.0)


def random_points(count: int, seed: int = 0, margin: float = 2.0) -> torch.Tensor:
    """[count, 2] float64 ego-frame points in and around GRID's extent."""
    g = torch.Generator().manual_seed(seed)
    low = torch.tensor([GRID.x_min - margin, GRID.y_min - margin], dtype=torch.float64)
    high = torch.tensor([GRID.x_max + margin, GRID.y_max + margin], dtype=torch.float64)
    return low + (high - low) * torch.rand(count, 2, generator=g, dtype=torch.float64)


def test_extent_and_point_range():
    assert GRID.extent == (16.0, 6.0)
    assert GRID.point_range == (-6.0, -4.0, -3.0, 10.0, 2.0, 5.0)
    assert GRID.shape == (12, 32)


def test_cell_coordinates_floor_is_the_cell_and_fraction_the_offset():
    """Column j covers x in [x_min + j * cell, x_min + (j + 1) * cell); likewise rows along y."""
    xy = torch.tensor([[-6.0, -4.0], [-5.75, -3.6], [9.99, 1.99], [0.0, 0.0]], dtype=torch.float64)
    coordinates = GRID.cell_coordinates(xy)
    torch.testing.assert_close(coordinates, torch.tensor([[0.0, 0.0], [0.5, 0.8], [31.98, 11.98], [12.0, 8.0]],
                                                         dtype=torch.float64))
    row, col, inside = GRID.cell_index(xy)
    assert row.tolist() == [0, 0, 11, 8] and col.tolist() == [0, 0, 31, 12] and inside.all()


def test_cell_index_marks_outside_and_non_finite_points_and_clamps_them():
    xy = torch.tensor([[10.0, 0.0], [-6.01, 0.0], [0.0, 2.0], [0.0, -4.5], [float("nan"), 0.0]])
    row, col, inside = GRID.cell_index(xy)
    assert not inside.any()
    assert ((row >= 0) & (row < GRID.height) & (col >= 0) & (col < GRID.width)).all()
    points = random_points(500)
    _, _, inside = GRID.cell_index(points)
    assert torch.equal(inside, GRID.contains(points))


def test_cell_to_xy_inverts_cell_coordinates():
    points = random_points(500, seed=1, margin=0.0)
    coordinates = GRID.cell_coordinates(points)
    cells = torch.floor(coordinates)
    back = GRID.cell_to_xy(cells[:, 1], cells[:, 0], offset=coordinates - cells)
    torch.testing.assert_close(back, points)


def test_cell_centers_are_cell_to_xy_at_half_a_cell_and_fall_in_their_own_cell():
    centers = GRID.cell_centers(dtype=torch.float64)
    assert centers.shape == (GRID.height, GRID.width, 2)
    assert centers[0, 0].tolist() == [-5.75, -3.75] and centers[-1, -1].tolist() == [9.75, 1.75]
    rows, cols = torch.meshgrid(torch.arange(GRID.height), torch.arange(GRID.width), indexing="ij")
    torch.testing.assert_close(GRID.cell_to_xy(rows, cols, dtype=torch.float64), centers)
    row, col, inside = GRID.cell_index(centers)
    assert inside.all() and torch.equal(row, rows) and torch.equal(col, cols)


def test_to_normalized_hits_pixel_centres_in_grid_sample():
    values = torch.arange(GRID.height * GRID.width, dtype=torch.float32).reshape(1, 1, *GRID.shape)
    sampled = torch.nn.functional.grid_sample(values, GRID.to_normalized(GRID.cell_centers())[None],
                                              align_corners=False)
    torch.testing.assert_close(sampled, values)
    corners = GRID.to_normalized(torch.tensor([[GRID.x_min, GRID.y_min], [GRID.x_max, GRID.y_max]]))
    torch.testing.assert_close(corners, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))


def test_warp_with_the_identity_returns_the_raster():
    raster = torch.rand(2, 3, *GRID.shape, generator=torch.Generator().manual_seed(0))
    for mode in ("bilinear", "nearest"):
        warped, valid = GRID.warp(raster, torch.eye(3, dtype=torch.float64), mode=mode)
        torch.testing.assert_close(warped, raster)
        assert valid.shape == (2, *GRID.shape) and valid.all()


def test_warp_by_one_cell_shifts_the_raster_and_marks_the_new_edge_invalid():
    """target_to_source moves target point q to q + (cell, 0): the value at q is the old value one column up (+x)."""
    raster = torch.rand(1, 1, *GRID.shape, generator=torch.Generator().manual_seed(1))
    shift = rigid_2d(torch.zeros(1, dtype=torch.float64), torch.tensor([[GRID.cell_size, 0.0]], dtype=torch.float64))
    warped, valid = GRID.warp(raster, shift)
    torch.testing.assert_close(warped[..., :-1], raster[..., 1:])
    assert (warped[..., -1] == 0).all()
    assert valid[..., :-1].all() and not valid[..., -1].any()


def test_warp_by_a_quarter_turn_rotates_a_square_raster():
    """With yaw +90 degrees on a square grid centred on the ego: new(x, y) = old(-y, x), i.e. torch.rot90."""
    raster = torch.rand(2, 1, *SQUARE.shape, generator=torch.Generator().manual_seed(2))
    turn = rigid_2d(torch.full((2,), math.pi / 2), torch.zeros(2, 2))
    warped, _ = SQUARE.warp(raster, turn)
    torch.testing.assert_close(warped, torch.rot90(raster, k=1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_warp_takes_a_batch_of_transforms_and_checks_shapes():
    raster = torch.rand(2, 1, *GRID.shape)
    transforms = torch.stack([torch.eye(3), rigid_2d(torch.zeros(1), torch.tensor([[100.0, 0.0]]))[0]])
    warped, valid = GRID.warp(raster, transforms)
    torch.testing.assert_close(warped[0], raster[0])
    assert (warped[1] == 0).all() and not valid[1].any()
    with pytest.raises(ValueError, match="raster"):
        GRID.warp(torch.rand(2, 1, 3, 3), torch.eye(3))
    with pytest.raises(ValueError, match="target_to_source"):
        GRID.warp(raster, torch.eye(3).expand(3, 3, 3))


def test_planar_transform_moves_points_at_z0_like_the_4x4():
    pose = make_transform(rotation_z(0.7), [3.0, -2.0, 1.5])
    planar = planar_transform(torch.from_numpy(pose))
    point = np.array([1.25, -0.5, 0.0, 1.0])
    moved = pose @ point
    torch.testing.assert_close(planar @ torch.tensor([1.25, -0.5, 1.0], dtype=torch.float64),
                               torch.tensor([moved[0], moved[1], 1.0], dtype=torch.float64))


def test_rigid_2d_rotates_counter_clockwise_then_translates():
    transform = rigid_2d(torch.tensor([math.pi / 2]), torch.tensor([[1.0, 2.0]]))
    moved = transform[0] @ torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(moved, torch.tensor([1.0, 3.0, 1.0]), atol=1e-6, rtol=0)


def test_normalized_cell_size_is_one_cell_in_grid_sample_coordinates():
    grid = BEVGrid(x_min=-8.0, x_max=8.0, y_min=-4.0, y_max=4.0, cell_size=1.0)
    dx, dy = grid.normalized_cell_size
    a = grid.to_normalized(torch.tensor([0.5, 0.5]))
    b = grid.to_normalized(torch.tensor([1.5, 1.5]))
    assert (b - a).tolist() == pytest.approx([dx, dy])
