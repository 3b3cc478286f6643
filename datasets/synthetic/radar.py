"""Radar simulation (Continental ARS 408-like, 13 Hz) and the nuScenes PCD v0.7 binary writer.

Returns are sparse clusters on objects and structures the radar can see (ray cast in its horizontal plane), with
detection probability by radar cross-section and range, position noise (quantised to 0.2 m like real files),
Doppler (radial) velocity only: `vx, vy` is the radial velocity relative to the moving sensor and `vx_comp,
vy_comp` the object's own radial velocity (ego motion compensated), both as vectors along the line of sight in the
sensor frame (x forward, y left, meters, m/s). Plus clutter / false alarms, and some points with invalid_state,
ambig_state or dyn_prop values that the devkit's default filters drop. z is 0 (the sensor is 2D), as in nuScenes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import shapes
from .raycast import GROUND, NO_HIT, STATIC, SceneGeometry
from .rig import RADAR_FAR_FOV_DEG, RADAR_FAR_RANGE, RADAR_NEAR_FOV_DEG, RADAR_NEAR_RANGE
from .actors import A_STOPPED

RADAR_DTYPE = np.dtype([
    ("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("dyn_prop", "i1"), ("id", "<i2"), ("rcs", "<f4"), ("vx", "<f4"),
    ("vy", "<f4"), ("vx_comp", "<f4"), ("vy_comp", "<f4"), ("is_quality_valid", "i1"), ("ambig_state", "i1"),
    ("x_rms", "i1"), ("y_rms", "i1"), ("invalid_state", "i1"), ("pdh0", "i1"), ("vx_rms", "i1"), ("vy_rms", "i1")])
assert RADAR_DTYPE.itemsize == 43

PCD_HEADER = (
    "# .PCD v0.7 - Point Cloud Data file format\n"
    "VERSION 0.7\n"
    "FIELDS x y z dyn_prop id rcs vx vy vx_comp vy_comp is_quality_valid ambig_state x_rms y_rms invalid_state "
    "pdh0 vx_rms vy_rms\n"
    "SIZE 4 4 4 1 2 4 4 4 4 4 1 1 1 1 1 1 1 1\n"
    "TYPE F F F I I F F F F F I I I I I I I I\n"
    "COUNT 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1\n"
    "WIDTH {n}\n"
    "HEIGHT 1\n"
    "VIEWPOINT 0 0 0 1 0 0 0\n"
    "POINTS {n}\n"
    "DATA binary\n")
#: Real nuScenes radar files carry zero bytes after the last point; the devkit's reader relies on it.
TRAILING_ZERO_BYTES = 3726

#: Radar cross-section (dBsm) of static structure materials.
STATIC_RCS = {shapes.M_BUILDING: 18.0, shapes.M_WALL: 10.0, shapes.M_POLE: 8.0, shapes.M_TRUNK: 0.0,
              shapes.M_FOLIAGE: -6.0, shapes.M_SLAB: -8.0, shapes.M_METAL: 12.0}
#: Mean number of extra returns per detected object, by category prefix (large objects give several).
EXTRA_RETURNS = {"vehicle.bus": 2.5, "vehicle.truck": 2.0, "vehicle.trailer": 2.0, "vehicle.construction": 1.8,
                 "vehicle.car": 0.9}


def write_pcd(path: Path, points: np.ndarray) -> None:
    """Write a nuScenes radar .pcd (v0.7, binary, 18 fields, 43 bytes per point) with trailing zero bytes."""
    if points.dtype != RADAR_DTYPE:
        raise ValueError(f"radar points for {path} must have dtype RADAR_DTYPE")
    if len(points) == 0:
        raise ValueError(f"radar file {path} needs at least one point (the devkit rejects WIDTH 0)")
    with open(path, "wb") as f:
        f.write(PCD_HEADER.format(n=len(points)).encode("ascii"))
        f.write(points.tobytes())
        f.write(b"\x00" * TRAILING_ZERO_BYTES)


def _detect_probability(rcs: np.ndarray, r: np.ndarray) -> np.ndarray:
    snr = rcs - 40.0 * np.log10(np.maximum(r, 1.0) / 25.0) + 5.0
    return 1.0 / (1.0 + np.exp(-snr / 3.0))


class RadarSimulator:
    def __init__(self, geometry: SceneGeometry):
        self.geometry = geometry
        az = np.radians(np.arange(-RADAR_NEAR_FOV_DEG, RADAR_NEAR_FOV_DEG + 1e-6, 0.75))
        el = np.radians(np.array([-1.5, 0.5]))
        a, e = np.meshgrid(az, el, indexing="ij")
        self.azimuth = a.ravel()
        self.directions = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], axis=-1).reshape(-1, 3)

    def scan(self, t: float, sensor_to_global: np.ndarray, sensor_velocity: np.ndarray, dynamic,
             rng: np.random.Generator) -> np.ndarray:
        """One radar message at scene time t. sensor_velocity: [3] global velocity of the sensor (m/s).
        Returns a RADAR_DTYPE array (at least one point)."""
        world = self.geometry.world
        rot = sensor_to_global[:3, :3]
        origin = sensor_to_global[:3, 3]
        dirs = self.directions @ rot.T
        hits = self.geometry.cast(origin, dirs, dynamic, RADAR_FAR_RANGE)
        far_ok = np.abs(np.degrees(self.azimuth)) <= RADAR_FAR_FOV_DEG
        in_range = (hits.kind != NO_HIT) & ((hits.t <= RADAR_NEAR_RANGE) | far_ok)
        velocities = world.actor_velocities(t)
        attrs = world.actor_poses(t)[4]
        rows = []  # (global point [3], target velocity [2], rcs, kind)

        kinds = hits.kind
        for actor_id in np.unique(kinds[in_range & (kinds >= 0)]):
            idx = np.nonzero(in_range & (kinds == actor_id))[0]
            actor = world.actors[int(actor_id)]
            r = float(np.median(hits.t[idx]))
            if rng.random() > _detect_probability(np.array(actor.rcs), np.array(r)):
                continue
            extra = next((v for k, v in EXTRA_RETURNS.items() if actor.category.startswith(k)), 0.3)
            n = min(len(idx), 1 + int(rng.poisson(extra)))
            for i in rng.choice(idx, size=n, replace=False):
                p = origin + dirs[i] * hits.t[i]
                rows.append((p, velocities[actor_id], actor.rcs + rng.normal(0, 2.0), int(actor_id),
                             attrs[actor_id] == A_STOPPED))
        static_idx = np.nonzero(in_range & (kinds == STATIC))[0]
        if len(static_idx):
            rcs = np.array([STATIC_RCS.get(int(m), 0.0) for m in hits.material[static_idx]])
            p_det = _detect_probability(rcs, hits.t[static_idx]) * 0.12
            chosen = rng.random(len(static_idx)) < p_det
            for i, rc in zip(static_idx[chosen], rcs[chosen]):
                rows.append((origin + dirs[i] * hits.t[i], np.zeros(2), rc + rng.normal(0, 3.0), STATIC, False))
        ground_idx = np.nonzero(in_range & (kinds == GROUND) & (hits.t > 8.0))[0]
        for i in ground_idx[rng.random(len(ground_idx)) < 0.01]:
            rows.append((origin + dirs[i] * hits.t[i], np.zeros(2), rng.uniform(-15, -5), GROUND, False))

        n_real = len(rows)
        n_clutter = int(rng.poisson(9.0)) + (1 if n_real == 0 else 0)
        points = np.zeros(n_real + n_clutter, RADAR_DTYPE)
        v_sensor_local = rot.T @ sensor_velocity
        if n_real:
            p_global = np.array([r[0] for r in rows])
            v_obj = np.array([r[1] for r in rows])
            rcs = np.array([r[2] for r in rows])
            stopped = np.array([r[4] for r in rows], dtype=bool)
            local = (p_global - origin) @ rot
            rng_r = np.hypot(local[:, 0], local[:, 1]) + rng.normal(0, 0.12, n_real)
            az = np.arctan2(local[:, 1], local[:, 0]) + np.radians(rng.normal(0, 0.35, n_real))
            u = np.stack([np.cos(az), np.sin(az)], 1)
            v_obj_local = (np.concatenate([v_obj, np.zeros((n_real, 1))], 1) @ rot)[:, :2]
            v_rad_comp = np.einsum("ij,ij->i", v_obj_local, u) + rng.normal(0, 0.08, n_real)
            v_rad_raw = np.einsum("ij,ij->i", v_obj_local - v_sensor_local[:2], u) + rng.normal(0, 0.08, n_real)
            speed = np.hypot(v_obj[:, 0], v_obj[:, 1])
            static_dyn = rng.choice([1, 1, 1, 1, 3, 5], n_real)
            dyn = np.where(np.abs(v_rad_comp) > 0.5, np.where(v_rad_comp < 0, 2, 0),
                           np.where(speed > 1.0, 6, np.where(stopped & (rng.random(n_real) < 0.5), 7, static_dyn)))
            dyn = np.where(rng.random(n_real) < 0.05, 4, dyn)
            real = points[:n_real]
            real["x"] = np.round(rng_r * u[:, 0] / 0.2) * 0.2
            real["y"] = np.round(rng_r * u[:, 1] / 0.2) * 0.2
            real["rcs"] = np.round(rcs * 2.0) / 2.0
            real["vx"] = np.round(v_rad_raw * u[:, 0] / 0.25) * 0.25
            real["vy"] = np.round(v_rad_raw * u[:, 1] / 0.25) * 0.25
            real["vx_comp"] = v_rad_comp * u[:, 0]
            real["vy_comp"] = v_rad_comp * u[:, 1]
            real["dyn_prop"] = dyn
            real["ambig_state"] = np.where(rng.random(n_real) > 0.08, 3, rng.choice([0, 1, 2], n_real))
            p_invalid = np.where(rcs < -5.0, 0.3, 0.08)
            real["invalid_state"] = np.where(rng.random(n_real) > p_invalid, 0, rng.choice([4, 8, 9, 16, 17], n_real))
            real["pdh0"] = np.where(rng.random(n_real) > 0.1, 1, 3)
        if n_clutter:
            clutter = points[n_real:]
            r = rng.uniform(2.0, 100.0, n_clutter)
            az = np.radians(rng.uniform(-RADAR_NEAR_FOV_DEG, RADAR_NEAR_FOV_DEG, n_clutter))
            u = np.stack([np.cos(az), np.sin(az)], 1)
            clutter["x"] = np.round(r * u[:, 0] / 0.2) * 0.2
            clutter["y"] = np.round(r * u[:, 1] / 0.2) * 0.2
            clutter["rcs"] = np.round(rng.uniform(-16.0, 4.0, n_clutter) * 2.0) / 2.0
            v_rad_comp = np.where(rng.random(n_clutter) < 0.4, rng.normal(0.0, 1.5, n_clutter), 0.0)
            v_rad_raw = v_rad_comp - u @ v_sensor_local[:2]
            clutter["vx"] = np.round(v_rad_raw * u[:, 0] / 0.25) * 0.25
            clutter["vy"] = np.round(v_rad_raw * u[:, 1] / 0.25) * 0.25
            clutter["vx_comp"] = v_rad_comp * u[:, 0]
            clutter["vy_comp"] = v_rad_comp * u[:, 1]
            clutter["dyn_prop"] = rng.choice([0, 1, 1, 3, 4, 5, 7], n_clutter)
            clutter["ambig_state"] = rng.choice([0, 1, 2, 3, 3, 3, 4], n_clutter)
            clutter["invalid_state"] = rng.choice([0, 1, 2, 3, 4, 6, 7, 9, 11, 15, 16], n_clutter)
            clutter["pdh0"] = rng.choice([1, 3, 4, 5, 6, 7], n_clutter)
        points["id"] = np.arange(len(points))
        points["is_quality_valid"] = 1
        points["x_rms"] = rng.choice([0, 19, 20, 21, 22], len(points))
        points["y_rms"] = rng.choice([0, 19, 20, 21, 22, 23, 24], len(points))
        points["vx_rms"] = rng.choice([0, 16, 17, 18, 19, 20], len(points))
        points["vy_rms"] = rng.choice([0, 3], len(points))
        return points


def radar_points_global(points: np.ndarray, sensor_to_global: np.ndarray) -> np.ndarray:
    """[N, 3] global positions (meters) of radar points (x, y, z in the sensor frame)."""
    local = np.stack([points["x"], points["y"], points["z"]], axis=1).astype(np.float64)
    return local @ sensor_to_global[:3, :3].T + sensor_to_global[:3, 3]
