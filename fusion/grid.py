"""The one bird's-eye-view grid shared by every branch, the fuser, the head and the renderer.

A BEV tensor is [B, C, H, W] in the ego frame (x forward, y left, z up, meters):
- column j covers x in [x_min + j * cell_size, x_min + (j + 1) * cell_size)
- row i covers y in [y_min + i * cell_size, y_min + (i + 1) * cell_size)
so row 0 is the rightmost strip (most negative y) and column 0 the rearmost (most negative x). Renderers that want
"forward is up" flip the picture; the tensors never do.

Grid arithmetic lives here, once: a point's cell (`cell_coordinates`, `cell_index`), a cell's point (`cell_to_xy`,
`cell_centers`), grid_sample coordinates (`to_normalized`) and resampling a raster under a planar rigid transform
(`warp`; `planar_transform` and `rigid_2d` build the transform). tests/test_grid.py holds a test beside each rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

MAX_CELLS = 2 ** 31 - 1


@dataclass(frozen=True)
class BEVGrid:
    """Extent (meters, ego frame), cell size (meters) and height range (meters) of the shared BEV grid."""

    x_min: float = -51.2
    x_max: float = 51.2
    y_min: float = -51.2
    y_max: float = 51.2
    z_min: float = -5.0
    z_max: float = 3.0
    cell_size: float = 0.8

    def __post_init__(self):
        for name in ("x_min", "x_max", "y_min", "y_max", "z_min", "z_max", "cell_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"BEVGrid.{name} must be a finite number, got {value!r}")
        if self.cell_size <= 0:
            raise ValueError(f"BEVGrid.cell_size must be positive, got {self.cell_size}")
        for low, high in (("x_min", "x_max"), ("y_min", "y_max"), ("z_min", "z_max")):
            if getattr(self, low) >= getattr(self, high):
                raise ValueError(f"BEVGrid.{low} ({getattr(self, low)}) must be below {high} ({getattr(self, high)})")
        for low, high in (("x_min", "x_max"), ("y_min", "y_max")):
            cells = (getattr(self, high) - getattr(self, low)) / self.cell_size
            if abs(cells - round(cells)) > 1e-6:
                raise ValueError(f"BEVGrid: {low}..{high} = {getattr(self, high) - getattr(self, low)} m is not a "
                                 f"whole number of {self.cell_size} m cells")
        if self.height * self.width > MAX_CELLS:
            raise ValueError(f"BEVGrid has {self.height} x {self.width} cells, more than int32 can index")

    @property
    def height(self) -> int:
        """H: number of rows (along y)."""
        return int(round((self.y_max - self.y_min) / self.cell_size))

    @property
    def width(self) -> int:
        """W: number of columns (along x)."""
        return int(round((self.x_max - self.x_min) / self.cell_size))

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W)."""
        return self.height, self.width

    def contains(self, xy: torch.Tensor) -> torch.Tensor:
        """Bool [...] : whether ego-frame points xy [..., 2] (meters) lie inside the grid's x/y extent."""
        x, y = xy[..., 0], xy[..., 1]
        return (x >= self.x_min) & (x < self.x_max) & (y >= self.y_min) & (y < self.y_max)

    @property
    def extent(self) -> tuple[float, float]:
        """(x extent, y extent) of the grid, meters."""
        return self.x_max - self.x_min, self.y_max - self.y_min

    @property
    def point_range(self) -> tuple[float, float, float, float, float, float]:
        """(x_min, y_min, z_min, x_max, y_max, z_max), meters: the grid's box as the cuda_ops' `point_range`."""
        return self.x_min, self.y_min, self.z_min, self.x_max, self.y_max, self.z_max

    def cell_coordinates(self, xy: torch.Tensor) -> torch.Tensor:
        """[..., 2] continuous (column, row) position, in cells, of ego-frame points xy [..., 2] (meters): the cell of
        a point is the floor of it, the point's offset inside its cell (in [0, 1)) the fractional part."""
        return torch.stack([(xy[..., 0] - self.x_min) / self.cell_size, (xy[..., 1] - self.y_min) / self.cell_size],
                           dim=-1)

    def cell_index(self, xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, col, inside) for ego-frame points xy [..., 2] (meters): int64 cell indices and a bool mask of
        points inside the grid. Indices of points outside are clamped into range; use `inside` to drop them."""
        cells = torch.floor(self.cell_coordinates(xy)).long()
        col, row = cells[..., 0], cells[..., 1]
        inside = (col >= 0) & (col < self.width) & (row >= 0) & (row < self.height) & torch.isfinite(xy).all(-1)
        return row.clamp(0, self.height - 1), col.clamp(0, self.width - 1), inside

    def cell_to_xy(self, row: torch.Tensor, col: torch.Tensor, offset: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """[..., 2] ego-frame (x, y), meters, of the point at `offset` [..., 2] (column, row fractions of a cell;
        None: 0.5, the cell centre) inside cell (row [...], col [...]). `dtype` casts the indices first."""
        if dtype is not None:
            row, col = row.to(dtype), col.to(dtype)
        dx, dy = (0.5, 0.5) if offset is None else (offset[..., 0], offset[..., 1])
        return torch.stack([self.x_min + (col + dx) * self.cell_size, self.y_min + (row + dy) * self.cell_size],
                           dim=-1)

    def cell_centers(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """[H, W, 2] ego-frame (x, y) of every cell center, meters."""
        rows = torch.arange(self.height, device=device, dtype=dtype)
        cols = torch.arange(self.width, device=device, dtype=dtype)
        grid_row, grid_col = torch.meshgrid(rows, cols, indexing="ij")
        return self.cell_to_xy(grid_row, grid_col)

    def normalized_xyz(self, xyz: torch.Tensor) -> torch.Tensor:
        """Ego-frame points xyz [..., 3] (meters) relative to the centre of the grid's box over its half extent: the
        box maps to [-1, 1]^3 (network inputs of order 1)."""
        centre = xyz.new_tensor([(self.x_min + self.x_max) / 2, (self.y_min + self.y_max) / 2,
                                 (self.z_min + self.z_max) / 2])
        half = xyz.new_tensor([(self.x_max - self.x_min) / 2, (self.y_max - self.y_min) / 2,
                               (self.z_max - self.z_min) / 2])
        return (xyz - centre) / half

    def to_normalized(self, xy: torch.Tensor) -> torch.Tensor:
        """Ego-frame xy [..., 2] (meters) -> coordinates in [-1, 1] for `torch.nn.functional.grid_sample` on a
        [B, C, H, W] BEV tensor (align_corners=False): -1/+1 are the outer edges of the grid."""
        u = (xy[..., 0] - self.x_min) / (self.x_max - self.x_min) * 2.0 - 1.0
        v = (xy[..., 1] - self.y_min) / (self.y_max - self.y_min) * 2.0 - 1.0
        return torch.stack([u, v], dim=-1)

    @property
    def normalized_cell_size(self) -> tuple[float, float]:
        """(x, y) size of one cell in `to_normalized` coordinates: an offset in cells times it is a grid_sample
        offset."""
        return 2.0 / self.width, 2.0 / self.height

    def warp(self, raster: torch.Tensor, target_to_source: torch.Tensor, mode: str = "bilinear"
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resample `raster` [B, C, H, W] (on this grid, in a source ego frame) into a target ego frame.

        target_to_source: [B, 3, 3] or [3, 3] (every sample) planar rigid transform on homogeneous (x, y, 1), meters,
        taking a target-frame point to the source frame (`planar_transform`, `rigid_2d`). The value at each target
        cell centre q becomes the raster's value at T q: `mode` "bilinear" or "nearest" (grid_sample,
        align_corners=False), 0 from outside the grid. Coordinates are computed in the transform's dtype (float64
        for poses with large global coordinates). Returns (warped [B, C, H, W] in raster.dtype, valid [B, H, W]
        bool: T q lies inside the grid)."""
        if raster.dim() != 4 or tuple(raster.shape[-2:]) != self.shape:
            raise ValueError(f"BEVGrid.warp: raster has shape {tuple(raster.shape)}, expected [B, C, {self.height}, "
                             f"{self.width}]")
        transform = target_to_source.to(raster.device)
        if transform.dim() == 2:
            transform = transform.expand(raster.shape[0], 3, 3)
        if tuple(transform.shape) != (raster.shape[0], 3, 3):
            raise ValueError(f"BEVGrid.warp: target_to_source has shape {tuple(target_to_source.shape)}, expected "
                             f"[{raster.shape[0]}, 3, 3] or [3, 3]")
        centres = self.cell_centers(device=raster.device, dtype=transform.dtype)  # [H, W, 2]
        source = torch.einsum("bij,hwj->bhwi", transform[:, :2, :2], centres) + transform[:, None, None, :2, 2]
        warped = F.grid_sample(raster, self.to_normalized(source).to(raster.dtype), mode=mode, padding_mode="zeros",
                               align_corners=False)
        return warped, self.contains(source)

    def downsampled(self, factor: int) -> "BEVGrid":
        """The same extent with cells `factor` times larger (for strided feature maps)."""
        return BEVGrid(self.x_min, self.x_max, self.y_min, self.y_max, self.z_min, self.z_max, self.cell_size * factor)

    def upsampled(self, factor: int) -> "BEVGrid":
        """The same extent with cells `factor` times smaller (for branches that work finer, then pool)."""
        return BEVGrid(self.x_min, self.x_max, self.y_min, self.y_max, self.z_min, self.z_max, self.cell_size / factor)


def planar_transform(matrix: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] planar part (x, y, translation) of 4x4 rigid transforms [..., 4, 4]: how they move points at z = 0
    in the x/y plane (what matters for a BEV raster)."""
    keep = [0, 1, 3]
    return matrix[..., keep, :][..., keep]


def rigid_2d(yaw: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] planar transforms p -> R(yaw) p + translation, from yaw [B] (radians, counter-clockwise) and
    translation [B, 2] (meters); in yaw's dtype."""
    cos, sin = torch.cos(yaw), torch.sin(yaw)
    transform = torch.zeros(yaw.shape[0], 3, 3, dtype=yaw.dtype, device=yaw.device)
    transform[:, 0, 0], transform[:, 0, 1], transform[:, 1, 0], transform[:, 1, 1] = cos, -sin, sin, cos
    transform[:, :2, 2] = translation.to(yaw.dtype)
    transform[:, 2, 2] = 1.0
    return transform
