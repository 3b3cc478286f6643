"""LIDAR_TOP simulation: a 32-beam spinning LiDAR (HDL-32E elevations, 20 Hz) ray-cast into the scene.

Each sweep is a float32 array [N, 5] (x, y, z in the LiDAR sensor frame, meters; intensity 0-255; ring 0-31) as in
nuScenes .pcd.bin files. Imperfections: range noise (2 cm), dropouts that grow with range and on dark, glassy or
leafy surfaces, intensity noise, and returns from the ego's own roof near the sensor (as in real scans). The whole
sweep is taken at the sweep timestamp (no rolling shutter).
"""
from __future__ import annotations

import numpy as np

from . import shapes
from .raycast import GROUND, NO_HIT, STATIC, SceneGeometry
from .rig import lidar_ray_directions
from .roads import GROUND_INTENSITY, RASTER_RESOLUTION, G_CURB


class LidarSimulator:
    def __init__(self, geometry: SceneGeometry, azimuth_steps: int, max_range: float):
        self.geometry = geometry
        self.max_range = max_range
        self.directions, self.rings = lidar_ray_directions(azimuth_steps)

    def ground_class(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        raster = self.geometry.world.raster
        col = np.clip((x / RASTER_RESOLUTION).astype(np.int64), 0, raster.shape[1] - 1)
        row = np.clip((y / RASTER_RESOLUTION).astype(np.int64), 0, raster.shape[0] - 1)
        return raster[row, col]

    def sweep(self, sensor_to_global: np.ndarray, dynamic, rng: np.random.Generator):
        """One sweep. Returns (points [N, 5] float32 in the sensor frame, hit kind [N] (actor index or GROUND /
        STATIC / EGO), points in the global frame [N, 3] float64)."""
        rot = sensor_to_global[:3, :3]
        origin = sensor_to_global[:3, 3]
        dirs_global = self.directions @ rot.T
        hits = self.geometry.cast(origin, dirs_global, dynamic, self.max_range)
        valid = hits.kind != NO_HIT
        r = hits.t
        # Intensity by material; the road and block tops by what is painted on the ground there.
        mean = np.zeros(len(r), np.float32)
        std = np.zeros(len(r), np.float32)
        drop = np.zeros(len(r), np.float32)
        mesh = valid & (hits.material >= 0)
        mean[mesh] = shapes.MATERIAL_INTENSITY[hits.material[mesh], 0]
        std[mesh] = shapes.MATERIAL_INTENSITY[hits.material[mesh], 1]
        drop[mesh] = shapes.MATERIAL_DROPOUT[hits.material[mesh]]
        on_ground = valid & ((hits.kind == GROUND) | ((hits.material == shapes.M_SLAB) & (hits.normal[:, 2] > 0.9)))
        curb = valid & (hits.material == shapes.M_SLAB) & (hits.normal[:, 2] <= 0.9)
        if on_ground.any():
            p = origin + dirs_global[on_ground] * r[on_ground, None]
            cls = self.ground_class(p[:, 0], p[:, 1])
            mean[on_ground] = GROUND_INTENSITY[cls, 0]
            std[on_ground] = GROUND_INTENSITY[cls, 1]
        mean[curb] = GROUND_INTENSITY[G_CURB, 0]
        std[curb] = GROUND_INTENSITY[G_CURB, 1]
        rr = np.where(valid, r, self.max_range) / self.max_range
        cos_inc = np.abs(np.einsum("ij,ij->i", hits.normal, dirs_global))
        intensity = (mean + std * rng.standard_normal(len(r)).astype(np.float32)) * (0.55 + 0.45 * cos_inc)
        intensity *= (1.0 - 0.35 * rr)
        intensity = np.clip(np.round(intensity), 0, 255)
        # Dropouts: base rate, surface-dependent, range and darkness dependent.
        p_drop = 0.04 + drop + 0.55 * rr ** 3 + np.where(intensity < 6, 0.35 * rr ** 2, 0.0)
        keep = valid & (rng.random(len(r)) >= p_drop)
        rng_noise = rng.normal(0.0, 0.02, int(keep.sum()))
        dist = r[keep] + rng_noise
        pts_sensor = self.directions[keep] * dist[:, None]
        out = np.empty((int(keep.sum()), 5), np.float32)
        out[:, :3] = pts_sensor
        out[:, 3] = intensity[keep]
        out[:, 4] = self.rings[keep]
        pts_global = out[:, :3].astype(np.float64) @ rot.T + origin
        return out, hits.kind[keep], pts_global


__all__ = ["LidarSimulator", "GROUND", "STATIC"]
