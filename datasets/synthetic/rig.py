"""The sensor rig: nuScenes channel names, mounting (sensor -> ego) and camera intrinsics.

Mountings are those of the nuScenes Renault Zoe (LiDAR and cameras from a real v1.0-mini calibration, radars
from their documented positions), with small per-log perturbations like real re-calibrations. The LIDAR_TOP frame
is rotated about -90 deg about z relative to the ego frame (sensor +y points forward), as in nuScenes.
Camera frames: x right, y down, z forward. Radar frames: x forward, y left, z up. Meters, (w, x, y, z) quaternions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion.geometry import make_transform, matrix_to_quaternion, quaternion_to_matrix, rotation_z

LIDAR = "LIDAR_TOP"
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT")
RADARS = ("RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT")

#: Real nuScenes sensor tokens (they are the same in every nuScenes release).
SENSOR_TOKENS = {
    "CAM_FRONT": "725903f5b62f56118f4094b46a4470d8", "CAM_BACK": "ce89d4f3050b5892b33b3d328c5e82a3",
    "CAM_BACK_LEFT": "a89643a5de885c6486df2232dc954da2", "CAM_FRONT_LEFT": "ec4b5d41840a509984f7ec36419d4c09",
    "CAM_FRONT_RIGHT": "2f7ad058f1ac5557bf321c7543758f43", "CAM_BACK_RIGHT": "ca7dba2ec9f95951bbe67246f7f2c3f7",
    "LIDAR_TOP": "dc8b396651c05aedbb9cdaae573bb567", "RADAR_FRONT": "47fcd48f71d75e0da5c8c1704a9bfe0a",
    "RADAR_FRONT_RIGHT": "232a6c4dc628532e81de1c57120876e9", "RADAR_FRONT_LEFT": "1f69f87a4e175e5ba1d03e2e6d9bcd27",
    "RADAR_BACK_LEFT": "df2d5b8be7be55cca33c8c92384f2266", "RADAR_BACK_RIGHT": "5c29dee2f70b528a817110173c2e71b9",
}

# (translation m, rotation quaternion w x y z) sensor -> ego.
_NOMINAL = {
    "LIDAR_TOP": ([0.943713, 0.0, 1.84023], [0.7077955, -0.0064922, 0.0106462, -0.7063073]),
    "CAM_FRONT": ([1.700791, 0.015946, 1.510958], [0.499802, -0.503032, 0.49978, -0.497371]),
    "CAM_FRONT_RIGHT": ([1.550848, -0.493405, 1.495748], [0.206035, -0.202694, 0.682451, -0.671361]),
    "CAM_BACK_RIGHT": ([1.014878, -0.480568, 1.562395], [0.12281, -0.132401, -0.700431, 0.690496]),
    "CAM_BACK": ([0.028326, 0.003451, 1.579103], [0.503787, -0.497402, -0.494185, 0.50455]),
    "CAM_BACK_LEFT": ([1.035691, 0.484795, 1.59097], [0.692419, -0.703162, -0.116483, 0.112033]),
    "CAM_FRONT_LEFT": ([1.523878, 0.494631, 1.509328], [0.675727, -0.673627, 0.21214, -0.211228]),
    # Radars: x forward, yaw only (degrees converted below).
    "RADAR_FRONT": ([3.412, 0.0, 0.5], 1.0),
    "RADAR_FRONT_LEFT": ([2.422, 0.8, 0.78], 88.0),
    "RADAR_FRONT_RIGHT": ([2.422, -0.8, 0.77], -89.0),
    "RADAR_BACK_LEFT": ([-0.562, 0.628, 0.53], 175.0),
    "RADAR_BACK_RIGHT": ([-0.557, -0.608, 0.53], -176.0),
}

#: Horizontal field of view of each camera, degrees (nuScenes: 70 deg, the rear camera 110 deg).
CAMERA_FOV_DEG = {"CAM_FRONT": 70.0, "CAM_FRONT_RIGHT": 70.0, "CAM_BACK_RIGHT": 70.0, "CAM_BACK": 110.0,
                  "CAM_BACK_LEFT": 70.0, "CAM_FRONT_LEFT": 70.0}

#: HDL-32E beam elevations, degrees, ring 0 = lowest (as in nuScenes files).
LIDAR_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)

#: Radar (Continental ARS 408) field of view: near scan +-60 deg up to 70 m, far scan +-9 deg up to 200 m.
RADAR_NEAR_FOV_DEG = 60.0
RADAR_NEAR_RANGE = 70.0
RADAR_FAR_FOV_DEG = 9.0
RADAR_FAR_RANGE = 200.0


@dataclass(frozen=True)
class SensorCalibration:
    """One sensor's mounting on one log. translation [3] m, rotation (w, x, y, z), intrinsic [3, 3] or None."""

    channel: str
    modality: str
    translation: tuple[float, float, float]
    rotation: tuple[float, float, float, float]
    intrinsic: tuple[tuple[float, float, float], ...] | None = None

    def sensor_to_ego(self) -> np.ndarray:
        return make_transform(np.array(self.rotation), np.array(self.translation))

    def intrinsic_matrix(self) -> np.ndarray:
        if self.intrinsic is None:
            raise ValueError(f"{self.channel} has no camera intrinsic")
        return np.array(self.intrinsic, dtype=np.float64)


def modality_of(channel: str) -> str:
    return "lidar" if channel == LIDAR else ("camera" if channel.startswith("CAM") else "radar")


def camera_intrinsic(channel: str, width: int, height: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Pinhole matrix [3, 3] (pixels) for the camera's field of view at this image size, principal point near the
    center (a few pixels off, like real calibrations)."""
    fx = (width / 2.0) / np.tan(np.radians(CAMERA_FOV_DEG[channel]) / 2.0)
    jitter = rng.normal(0.0, 0.004, 3) if rng is not None else np.zeros(3)
    cx = width / 2.0 + jitter[0] * width
    cy = height / 2.0 + jitter[1] * height
    f = fx * (1.0 + jitter[2])
    return np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])


def log_calibration(rng: np.random.Generator, width: int, height: int) -> dict[str, SensorCalibration]:
    """Calibration of all 12 sensors for one log: nominal mounting + small perturbations (+-1 cm, +-0.3 deg)."""
    calibrations = {}
    for channel in (LIDAR,) + CAMERAS + RADARS:
        translation, rotation = _NOMINAL[channel]
        translation = np.array(translation) + rng.normal(0.0, 0.005, 3)
        if channel.startswith("RADAR"):
            rot = rotation_z(np.radians(rotation + rng.normal(0.0, 0.3)))
        else:
            rot = quaternion_to_matrix(rotation)
        small = np.radians(rng.normal(0.0, 0.15, 3))
        rot = _small_rotation(small) @ rot
        q = matrix_to_quaternion(rot)
        intrinsic = None
        if channel.startswith("CAM"):
            k = camera_intrinsic(channel, width, height, rng)
            intrinsic = tuple(tuple(float(v) for v in row) for row in k)
        calibrations[channel] = SensorCalibration(channel, modality_of(channel),
                                                  tuple(float(v) for v in translation),
                                                  tuple(float(v) for v in q), intrinsic)
    return calibrations


def _small_rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix for small roll, pitch, yaw (radians), applied as Rz @ Ry @ Rx."""
    rx, ry, rz = angles
    cx, sx, cy, sy = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rotation_z(rz) @ my @ mx


def lidar_ray_directions(azimuth_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit ray directions [32 * azimuth_steps, 3] in the LiDAR frame and their ring index [N] (0 = lowest beam).

    Rays are ordered ring-major; within a ring, azimuth runs counter-clockwise from -180 deg (sensor -x axis).
    """
    elevation = np.radians(LIDAR_ELEVATIONS_DEG)
    azimuth = np.arange(azimuth_steps) * (2.0 * np.pi / azimuth_steps) - np.pi
    el, az = np.meshgrid(elevation, azimuth, indexing="ij")
    directions = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1).reshape(-1, 3)
    rings = np.repeat(np.arange(32), azimuth_steps)
    return directions, rings
