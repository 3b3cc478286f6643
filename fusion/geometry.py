"""Rigid transforms, quaternions and frame conversions.

Conventions (those of nuScenes):
- Quaternions are (w, x, y, z), unit norm, and rotate vectors from the child frame into the parent frame.
- A pose `T_parent_child` is a 4x4 homogeneous matrix mapping points in the child frame to the parent frame:
  p_parent = T @ [p_child, 1]. Translations are in meters.
- Frames: `global` (map frame, meters), `ego` (vehicle body: x forward, y left, z up, meters), sensor frames
  (LiDAR/radar: x forward, y left, z up; camera: x right, y down, z forward).
- Yaw is the rotation about +z in radians, counter-clockwise, 0 along +x.

Everything here works on float64 numpy arrays; the model converts to torch where it needs to.
"""
from __future__ import annotations

import numpy as np


def quaternion_to_matrix(q: np.ndarray | list[float]) -> np.ndarray:
    """Rotation matrix [3, 3] of a (w, x, y, z) quaternion. Non-unit quaternions are normalised; a zero one is an error."""
    w, x, y, z = np.asarray(q, dtype=np.float64)
    norm = np.sqrt(w * w + x * x + y * y + z * z)
    if not np.isfinite(norm) or norm < 1e-12:
        raise ValueError(f"quaternion {list(q)} is zero or not finite")
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """(w, x, y, z) quaternion with w >= 0 of a rotation matrix [3, 3] (Shepperd's method, stable for all angles)."""
    m = np.asarray(rotation, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    q /= np.linalg.norm(q)
    return q if q[0] >= 0 else -q


def yaw_to_quaternion(yaw: float) -> np.ndarray:
    """(w, x, y, z) quaternion of a rotation by `yaw` radians about +z."""
    return np.array([np.cos(yaw / 2.0), 0.0, 0.0, np.sin(yaw / 2.0)])


def yaw_of_matrix(rotation: np.ndarray) -> np.ndarray | float:
    """Yaw in radians of rotation matrices [..., 3, 3]: the heading of the rotated +x axis in the xy plane."""
    rotation = np.asarray(rotation)
    return np.arctan2(rotation[..., 1, 0], rotation[..., 0, 0])


def rotation_z(yaw: float) -> np.ndarray:
    """Rotation matrix [3, 3] by `yaw` radians about +z."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def wrap_angle(angle):
    """Angles wrapped to [-pi, pi)."""
    return (np.asarray(angle) + np.pi) % (2.0 * np.pi) - np.pi


def make_transform(rotation, translation) -> np.ndarray:
    """4x4 pose from a rotation (a (w, x, y, z) quaternion or a 3x3 matrix) and a translation (3,) in meters."""
    rotation = np.asarray(rotation, dtype=np.float64)
    transform = np.eye(4)
    transform[:3, :3] = quaternion_to_matrix(rotation) if rotation.shape == (4,) else rotation
    transform[:3, 3] = np.asarray(translation, dtype=np.float64)
    return transform


def invert_transform(transform: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 pose (exact: transposed rotation, not a general matrix inverse)."""
    transform = np.asarray(transform, dtype=np.float64)
    inverse = np.eye(4)
    inverse[:3, :3] = transform[:3, :3].T
    inverse[:3, 3] = -transform[:3, :3].T @ transform[:3, 3]
    return inverse


def transform_points(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 pose to points [N, 3] (meters); returns [N, 3] in the points' dtype."""
    points = np.asarray(points)
    transform = np.asarray(transform, dtype=np.float64)
    out = points.astype(np.float64) @ transform[:3, :3].T + transform[:3, 3]
    return out.astype(points.dtype, copy=False)


def pose_record_to_transform(record: dict) -> np.ndarray:
    """4x4 pose of a nuScenes `ego_pose` or `calibrated_sensor` record (its `rotation` and `translation`)."""
    return make_transform(record["rotation"], record["translation"])


def interpolate_pose(pose_a: np.ndarray, time_a: float, pose_b: np.ndarray, time_b: float, time: float) -> np.ndarray:
    """Pose at `time` between two timed 4x4 poses: linear in translation, spherical-linear in rotation.

    Times are in any common unit (seconds or microseconds); `time` outside [time_a, time_b] extrapolates.
    """
    if time_b == time_a:
        return np.array(pose_a, dtype=np.float64)
    alpha = (time - time_a) / (time_b - time_a)
    qa = matrix_to_quaternion(pose_a[:3, :3])
    qb = matrix_to_quaternion(pose_b[:3, :3])
    if np.dot(qa, qb) < 0:
        qb = -qb
    dot = float(np.clip(np.dot(qa, qb), -1.0, 1.0))
    theta = np.arccos(dot)
    if theta < 1e-9:
        q = qa
    else:
        q = (np.sin((1 - alpha) * theta) * qa + np.sin(alpha * theta) * qb) / np.sin(theta)
    translation = (1 - alpha) * pose_a[:3, 3] + alpha * pose_b[:3, 3]
    return make_transform(q / np.linalg.norm(q), translation)
