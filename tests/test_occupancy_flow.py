"""The LiDAR occupancy flow (fusion/branches/occupancy_flow.py): block matching between the newest and the oldest
sweep recovers known motions, leaves still and empty cells at zero, is not pulled onto denser neighbours, and runs
inside LidarPillarBranch."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings as hypothesis_settings, strategies as st

from fusion.branches.common import time_slice_occupancy
from fusion.branches.lidar import LidarPillarBranch
from fusion.branches.occupancy_flow import (FlowSettings, WINDOW_CHANNELS, above_ground, flow_channels,
                                            flow_settings, occupancy_flow, shift_radius)
from fusion.grid import BEVGrid

CELL, LAG = 1.6, 0.45  # the main job's grid cell (m) and its oldest sweep's lag (s): 3.56 m/s per cell
# m/s: the parabola's sub-cell step is exact only for a symmetric peak, and the preference for slow motion tilts it
# towards zero (by up to a fifth of a cell, measured on these patterns)
TOLERANCE = 0.25 * CELL / LAG
CAR = torch.tensor([[1.0, 2.0, 2.0, 1.0], [1.5, 3.0, 2.5, 1.0]])  # a 2 x 4-cell object, uneven like real returns


def scene(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, size, size), torch.zeros(1, size, size)


def velocity_at(flow: torch.Tensor, row: int, col: int, window_index: int = 0) -> torch.Tensor:
    """(vx, vy) m/s of one window's flow at a cell."""
    base = window_index * WINDOW_CHANNELS
    return flow[0, base:base + 2, row, col] * 10.0


@pytest.mark.parametrize("d_row, d_col", [(0, 2), (1, -3), (-2, 0), (3, 3)])
def test_a_moved_object_gets_its_velocity_in_every_window(d_row, d_col):
    newest, oldest = scene()
    oldest[0, 12:14, 12:16] = CAR
    newest[0, 12 + d_row:14 + d_row, 12 + d_col:16 + d_col] = CAR
    flow = occupancy_flow(newest, oldest, CELL, LAG)
    expected = torch.tensor([d_col * CELL / LAG, d_row * CELL / LAG])
    for window_index in range(len(FlowSettings().windows)):
        velocity = velocity_at(flow, 13 + d_row, 13 + d_col, window_index)
        assert torch.allclose(velocity, expected, atol=TOLERANCE), (window_index, velocity, expected)
        peak = flow[0, window_index * WINDOW_CHANNELS + 2, 13 + d_row, 13 + d_col]
        assert peak > 0.8


def test_still_and_empty_cells_have_zero_velocity():
    newest, oldest = scene()
    newest[0, 5:7, 5:9] = oldest[0, 5:7, 5:9] = CAR
    flow = occupancy_flow(newest, oldest, CELL, LAG)
    assert velocity_at(flow, 6, 6).abs().max() < TOLERANCE
    assert flow[0, 3, 6, 6] == pytest.approx(1.0)  # zero shift explains the object fully
    assert torch.count_nonzero(flow[0, :, 25, 25]) == 0  # nothing near: no motion, no match
    assert torch.count_nonzero(occupancy_flow(*scene(), CELL, LAG)) == 0


def test_a_denser_neighbour_does_not_capture_the_match():
    """A plain product would pick the shift that puts the object onto the heavier static blob next to it; the
    normalised correlation picks the shift that lines the object up."""
    newest, oldest = scene()
    oldest[0, 12:14, 12:16] = CAR
    newest[0, 12:14, 14:18] = CAR  # moved 2 columns
    oldest[0, 12:14, 19:23] = newest[0, 12:14, 19:23] = 20.0 * CAR  # a dense still object 1 cell beyond
    velocity = velocity_at(occupancy_flow(newest, oldest, CELL, LAG, FlowSettings(windows=(3,))), 13, 15)
    assert torch.allclose(velocity, torch.tensor([2 * CELL / LAG, 0.0]), atol=TOLERANCE)


def test_sub_cell_motion_is_interpolated_between_cells():
    """A smooth blob moved by half a cell comes out between the two neighbouring whole-cell velocities."""
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def blob(center_col: float) -> torch.Tensor:
        return torch.exp(-((rows - 16) ** 2 + (cols - center_col) ** 2) / 4.0)[None]

    velocity = velocity_at(occupancy_flow(blob(16.5), blob(15.0), CELL, LAG), 16, 16)
    assert 1.0 * CELL / LAG < velocity[0] < 2.0 * CELL / LAG
    assert abs(velocity[1]) < 0.2


@hypothesis_settings(max_examples=25, deadline=None)
@given(d_row=st.integers(-4, 4), d_col=st.integers(-4, 4), seed=st.integers(0, 10_000))
def test_any_whole_cell_motion_within_the_search_is_recovered(d_row, d_col, seed):
    generator = torch.Generator().manual_seed(seed)
    pattern = 0.5 + torch.rand(3, 3, generator=generator)
    newest, oldest = scene(40)
    oldest[0, 18:21, 18:21] = pattern
    newest[0, 18 + d_row:21 + d_row, 18 + d_col:21 + d_col] = pattern
    assert shift_radius(FlowSettings(), LAG, CELL) >= 4
    velocity = velocity_at(occupancy_flow(newest, oldest, CELL, LAG, FlowSettings(windows=(3,))),
                           19 + d_row, 19 + d_col)
    assert torch.allclose(velocity, torch.tensor([d_col * CELL / LAG, d_row * CELL / LAG]), atol=TOLERANCE)


def test_points_near_the_ground_are_left_out_of_the_matched_occupancy():
    points = torch.tensor([[1.0, 1.0, 0.05, 0.0, 0.0],    # road
                           [1.0, 1.0, 1.20, 0.0, 0.0],    # car body, newest sweep
                           [3.0, 1.0, 0.80, 0.0, 0.45]])  # car body, oldest sweep
    kept = above_ground(points, FlowSettings(min_height=0.3))
    assert torch.isnan(kept[0, 4]) and torch.equal(kept[1:], points[1:])
    grid = BEVGrid(-8.0, 8.0, -8.0, 8.0, -5.0, 3.0, 1.6)
    occupancy = time_slice_occupancy(kept[:, :3], kept[:, 4], torch.zeros(3, dtype=torch.long), 1, grid, 4, 0.15)
    assert occupancy[0, 0].sum() == pytest.approx(torch.log1p(torch.tensor(1.0)).item())  # the road point is gone


def test_lidar_pillar_branch_takes_the_flow_channels():
    grid = BEVGrid(-12.8, 12.8, -12.8, 12.8, -5.0, 3.0, 1.6)
    branch = LidarPillarBranch(grid, out_channels=8, pillar_channels=8, hidden_channels=8, bev_blocks=1,
                               time_slices=4, time_slice_s=0.15, flow={"windows": [3]})
    assert branch.bev_encoder.blocks[0].conv1.in_channels == 8 + 4 + flow_channels(branch.flow)
    with pytest.raises(ValueError, match="time_slices >= 2"):
        LidarPillarBranch(grid, time_slices=0, flow={})


def test_bad_flow_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown field"):
        flow_settings({"max_sped": 10})
    with pytest.raises(ValueError, match="windows"):
        FlowSettings(windows=(4,))
    with pytest.raises(ValueError, match="max_speed"):
        FlowSettings(max_speed=0)
    with pytest.raises(ValueError, match="lag_s"):
        occupancy_flow(*scene(), CELL, 0.0)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        occupancy_flow(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5), CELL, LAG)
    assert flow_settings(None) is None and flow_settings({}) == FlowSettings()


def test_the_exported_flow_matches_pytorch_in_onnxruntime(tmp_path):
    """The flow is plain tensor arithmetic: exported to ONNX (opset 18, as tools/export.py) and run by onnxruntime it
    gives the PyTorch values on a sparse random scene with moved objects."""
    ort = pytest.importorskip("onnxruntime")
    generator = torch.Generator().manual_seed(0)
    oldest = torch.rand(1, 24, 24, generator=generator) * (torch.rand(1, 24, 24, generator=generator) < 0.15)
    newest = torch.roll(oldest, shifts=(1, 2), dims=(1, 2))
    newest[0, :12] = oldest[0, :12]  # half the scene stands still

    class Flow(torch.nn.Module):
        def forward(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            return occupancy_flow(new, old, CELL, LAG)

    path = tmp_path / "flow.onnx"
    torch.onnx.export(Flow(), (newest, oldest), str(path), input_names=["newest", "oldest"], output_names=["flow"],
                      opset_version=18, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"newest": newest.numpy(), "oldest": oldest.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(exported), occupancy_flow(newest, oldest, CELL, LAG),
                               atol=1e-4, rtol=1e-4)
