"""The one bird's-eye-view grid shared by every branch, the fuser, the head and the renderer.

A BEV tensor is [B, C, H, W] in the ego frame (x forward, y left, z up, meters):
- column j covers x in [x_min + j * cell_size, x_min + (j + 1) * cell_size)
- row i covers y in [y_min + i * cell_size, y_min + (i + 1) * cell_size)
so row 0 is the rightmost strip (most negative y) and column 0 the rearmost (most negative x). Renderers that want
"forward is up" flip the picture; the tensors never do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def cell_index(self, xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, col, inside) for ego-frame points xy [..., 2] (meters): int64 cell indices and a bool mask of
        points inside the grid. Indices of points outside are clamped into range; use `inside` to drop them."""
        col = torch.floor((xy[..., 0] - self.x_min) / self.cell_size).long()
        row = torch.floor((xy[..., 1] - self.y_min) / self.cell_size).long()
        inside = (col >= 0) & (col < self.width) & (row >= 0) & (row < self.height) & torch.isfinite(xy).all(-1)
        return row.clamp(0, self.height - 1), col.clamp(0, self.width - 1), inside

    def cell_centers(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """[H, W, 2] ego-frame (x, y) of every cell center, meters."""
        xs = self.x_min + (torch.arange(self.width, device=device, dtype=dtype) + 0.5) * self.cell_size
        ys = self.y_min + (torch.arange(self.height, device=device, dtype=dtype) + 0.5) * self.cell_size
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([grid_x, grid_y], dim=-1)

    def to_normalized(self, xy: torch.Tensor) -> torch.Tensor:
        """Ego-frame xy [..., 2] (meters) -> coordinates in [-1, 1] for `torch.nn.functional.grid_sample` on a
        [B, C, H, W] BEV tensor (align_corners=False): -1/+1 are the outer edges of the grid."""
        u = (xy[..., 0] - self.x_min) / (self.x_max - self.x_min) * 2.0 - 1.0
        v = (xy[..., 1] - self.y_min) / (self.y_max - self.y_min) * 2.0 - 1.0
        return torch.stack([u, v], dim=-1)

    def downsampled(self, factor: int) -> "BEVGrid":
        """The same extent with cells `factor` times larger (for strided feature maps)."""
        return BEVGrid(self.x_min, self.x_max, self.y_min, self.y_max, self.z_min, self.z_max, self.cell_size * factor)

    def upsampled(self, factor: int) -> "BEVGrid":
        """The same extent with cells `factor` times smaller (for branches that work finer, then pool)."""
        return BEVGrid(self.x_min, self.x_max, self.y_min, self.y_max, self.z_min, self.z_max, self.cell_size / factor)
