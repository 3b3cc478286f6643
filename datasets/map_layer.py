"""Map rasters: a scene's map PNG as a `MapLayer`, and its crop onto the BEVGrid at an ego pose.

The map is the devkit's MapMask kind (0.1 m per pixel, 255 = drivable surface, global frame). `crop_map` samples it
at every BEV cell centre (ego frame, meters) taken to the global frame by the keyframe's ego pose.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from fusion.datasets.safe_io import (MAP_MAX_PIXELS, DataFileError, FileTooLargeError, checked_size,
                                     image_pixel_limit)
from fusion.grid import BEVGrid


@dataclass(frozen=True)
class MapLayer:
    """A map raster of the devkit's MapMask kind: mask [Hm, Wm] uint8 (255 = drivable surface), `resolution` meters
    per pixel. Global (x, y) maps to pixel (round(x / res), round(Hm - y / res)), as in MapMask.to_pixel_coords."""

    mask: np.ndarray
    resolution: float = 0.1
    path: str = ""


_MAP_CACHE: dict[str, MapLayer] = {}


def load_map_layer(path: str, resolution: float = 0.1, cache_dir: str | None = None) -> MapLayer:
    """The map PNG at `path` as a MapLayer (kept per process). With `cache_dir`, the decoded raster is stored once
    as .npy there and memory-mapped, so DataLoader workers share one copy.

    Raises FileNotFoundError for a missing PNG and a DataFileError (ValueError) naming it for an empty, corrupt or
    too large one. The map is decoded with Pillow's pixel limit raised to MAP_MAX_PIXELS for this read only."""
    path = os.fspath(path)
    if path in _MAP_CACHE:
        return _MAP_CACHE[path]
    checked_size(path, "map raster")
    mask = None
    npy = None
    if cache_dir is not None:
        stat = os.stat(path)
        key = hashlib.sha1(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        npy = os.path.join(cache_dir, f"map_{key}.npy")
        if os.path.exists(npy):
            mask = np.load(npy, mmap_mode="r", allow_pickle=False)
    if mask is None:
        try:
            with image_pixel_limit(MAP_MAX_PIXELS), Image.open(path) as image:
                mask = np.asarray(image.convert("L") if image.mode not in ("L", "1") else image, dtype=np.uint8)
                if image.mode == "1":
                    mask = mask * np.uint8(255)
        except Image.DecompressionBombError as error:
            raise FileTooLargeError(f"map raster {path}: {error}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise DataFileError(f"corrupt map raster {path}: {error}") from error
        if mask.ndim != 2:
            raise DataFileError(f"corrupt map raster {path}: decoded to shape {mask.shape}, expected one channel")
        if resolution != 0.1:
            raise ValueError(f"map resolution {resolution} m: only the native 0.1 m/px is supported")
        if npy is not None:
            os.makedirs(cache_dir, exist_ok=True)
            temporary = f"{npy}.{os.getpid()}.tmp.npy"
            np.save(temporary, mask, allow_pickle=False)
            os.replace(temporary, npy)
            mask = np.load(npy, mmap_mode="r", allow_pickle=False)
    layer = MapLayer(mask=mask, resolution=resolution, path=path)
    _MAP_CACHE[path] = layer
    return layer


def crop_map(layer: MapLayer, ego_to_global: np.ndarray, grid: BEVGrid) -> np.ndarray:
    """[1, H, W] float32 in [0, 1]: the map value (mask / 255) at every BEV cell centre of `grid` (ego frame, taken
    to global through `ego_to_global`), nearest pixel as in MapMask; cells off the map are 0."""
    centers = grid.cell_centers(dtype=torch.float64).numpy().reshape(-1, 2)
    pose = np.asarray(ego_to_global, dtype=np.float64)
    global_xy = centers @ pose[:2, :2].T + pose[:2, 3]
    height, width = layer.mask.shape
    px = np.round(global_xy[:, 0] / layer.resolution).astype(np.int64)
    py = np.round(height - global_xy[:, 1] / layer.resolution).astype(np.int64)
    inside = (px >= 0) & (px < width) & (py >= 0) & (py < height)
    values = np.zeros(len(px), dtype=np.float32)
    values[inside] = layer.mask[py[inside], px[inside]].astype(np.float32) / 255.0
    return values.reshape(1, grid.height, grid.width)
