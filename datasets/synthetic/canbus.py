"""CAN bus expansion files of one scene, consistent with the ego trajectory, as the devkit's NuScenesCanBus reads:
scene-XXXX_pose.json (50 Hz), _ms_imu.json (100 Hz), _vehicle_monitor.json (2 Hz), _meta.json, _route.json.

Units as in nuScenes: pose.pos global meters, pose.vel ego-frame m/s, accelerations m/s^2 with gravity on +z,
rotation rates rad/s, ms_imu.q relative to an arbitrary IMU yaw reference; vehicle_monitor.vehicle_speed km/h,
yaw_rate deg/s, steering deg (positive left). Streams carry sensor noise and occasional gaps (missing messages).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fusion.geometry import yaw_to_quaternion

from .roads import EgoTrajectory

GRAVITY = 9.80665
WHEEL_RADIUS = 0.305
STEERING_RATIO = 15.5
WHEELBASE = 2.588


def _gaps(rng: np.random.Generator, times: np.ndarray, max_gaps: int, length: tuple[float, float]) -> np.ndarray:
    keep = np.ones(len(times), bool)
    for _ in range(int(rng.integers(0, max_gaps + 1))):
        start = rng.uniform(times[0], times[-1])
        keep &= ~((times >= start) & (times < start + rng.uniform(*length)))
    return keep


def _r(v: float, nd: int = 6) -> float:
    return float(round(float(v), nd))


def can_messages(ego: EgoTrajectory, t_start: float, t_end: float, to_utime, rng: np.random.Generator) -> dict:
    """All messages of one scene: {'pose': [...], 'ms_imu': [...], 'vehicle_monitor': [...], 'route': [[x, y]...],
    'meta': {...}}. to_utime maps scene seconds to integer microseconds."""
    out = {}
    # pose, 50 Hz
    t = np.arange(t_start + rng.uniform(0, 0.02), t_end, 0.02)
    t = t[_gaps(rng, t, 2, (0.2, 1.2))]
    xy, yaw, v, yaw_rate, a_long, a_lat = ego.state(t)
    n = len(t)
    pose = []
    for i in range(n):
        q = yaw_to_quaternion(yaw[i] + rng.normal(0, 0.0015))
        pose.append({
            "accel": [_r(a_long[i] + rng.normal(0, 0.08)), _r(a_lat[i] + rng.normal(0, 0.08)),
                      _r(GRAVITY + rng.normal(0, 0.05))],
            "orientation": [_r(c, 9) for c in q],
            "pos": [_r(xy[i, 0] + rng.normal(0, 0.015)), _r(xy[i, 1] + rng.normal(0, 0.015)), 0.0],
            "rotation_rate": [_r(rng.normal(0, 0.004)), _r(rng.normal(0, 0.004)),
                              _r(yaw_rate[i] + rng.normal(0, 0.003))],
            "utime": int(to_utime(t[i])),
            "vel": [_r(v[i] + rng.normal(0, 0.03)), _r(rng.normal(0, 0.01)), 0.0],
        })
    out["pose"] = pose
    # ms_imu, 100 Hz: noisier accelerations, a gyro bias and an arbitrary yaw reference.
    t = np.arange(t_start + rng.uniform(0, 0.01), t_end, 0.01)
    t = t[_gaps(rng, t, 2, (0.1, 0.8))]
    xy, yaw, v, yaw_rate, a_long, a_lat = ego.state(t)
    yaw_ref = rng.uniform(-np.pi, np.pi)
    bias = rng.normal(0, 0.002)
    out["ms_imu"] = [{
        "linear_accel": [_r(a_long[i] + rng.normal(0, 0.2)), _r(a_lat[i] + rng.normal(0, 0.2)),
                         _r(GRAVITY + rng.normal(0, 0.12))],
        "q": [_r(c, 9) for c in yaw_to_quaternion(yaw[i] - yaw_ref)],
        "rotation_rate": [_r(rng.normal(0, 0.01)), _r(rng.normal(0, 0.01)),
                          _r(yaw_rate[i] + bias + rng.normal(0, 0.006))],
        "utime": int(to_utime(t[i])),
    } for i in range(len(t))]
    # vehicle_monitor, 2 Hz (an occasional message is missing).
    t = np.arange(t_start + rng.uniform(0, 0.5), t_end, 0.5)
    t = t[rng.random(len(t)) > 0.04]
    xy, yaw, v, yaw_rate, a_long, a_lat = ego.state(t)
    s_now = ego._interp(ego.s, t)
    _, _, kappa_ahead = ego.path.at(s_now + 20.0)
    _, _, kappa = ego.path.at(s_now)
    steer = np.degrees(np.arctan(WHEELBASE * kappa)) * STEERING_RATIO + rng.normal(0, 0.3, len(t))
    steer_speed = np.gradient(steer, t) if len(t) > 1 else np.zeros(len(t))
    battery = int(rng.integers(55, 96))
    vm = []
    for i in range(len(t)):
        rpm = v[i] / (2 * np.pi * WHEEL_RADIUS) * 60.0
        diff = 1.0 + kappa[i] * 0.75
        braking = a_long[i] < -0.3
        vm.append({
            "available_distance": int(battery * 1.3),
            "battery_level": battery,
            "brake": int(min(126, max(0.0, -a_long[i]) * 8)) if braking else 0,
            "brake_switch": (3 if a_long[i] < -1.0 else 2) if braking else 1,
            "gear_position": 7,
            "left_signal": int(kappa_ahead[i] > 0.03),
            "rear_left_rpm": _r(rpm / diff, 4),
            "rear_right_rpm": _r(rpm * diff, 4),
            "right_signal": int(kappa_ahead[i] < -0.03),
            "steering": _r(round(steer[i], 1), 1),
            "steering_speed": _r(round(steer_speed[i], 1), 1),
            "throttle": int(np.clip(a_long[i] * 40 + v[i] * 2.0, 0, 300)) if a_long[i] > 0.05 else 0,
            "utime": int(to_utime(t[i])),
            "vehicle_speed": _r(round(max(0.0, v[i] * 3.6 + rng.normal(0, 0.05)), 2), 2),
            "yaw_rate": _r(round(np.degrees(yaw_rate[i]) + rng.normal(0, 0.1), 1), 1),
        })
    out["vehicle_monitor"] = vm
    # Baseline route: the path from 50 m before to 50 m after the scene.
    s0 = float(ego._interp(ego.s, t_start)) - 50.0
    s1 = float(ego._interp(ego.s, t_end)) + 50.0
    pts, _, _ = ego.path.at(np.arange(max(s0, 0.0), min(s1, ego.path.length), 0.5))
    out["route"] = [[_r(p[0], 4), _r(p[1], 4)] for p in pts]
    out["meta"] = _meta(out)
    return out


def _meta(messages: dict) -> dict:
    meta = {}
    for name in ("ms_imu", "pose", "vehicle_monitor"):
        msgs = messages[name]
        utimes = np.array([m["utime"] for m in msgs], dtype=np.int64)
        span = float((utimes[-1] - utimes[0]) / 1e6) if len(utimes) > 1 else 0.0
        stats = {}
        for key in msgs[0]:
            if key == "utime":
                continue
            vals = np.array([m[key] for m in msgs], dtype=np.float64)
            diff = np.diff(vals, axis=0) if len(vals) > 1 else np.zeros_like(vals)

            def js(x):
                return np.round(x, 6).tolist()
            stats[key] = {"max": js(vals.max(0)), "mean": js(vals.mean(0)), "min": js(vals.min(0)),
                          "std": js(vals.std(0)), "max_diff": js(diff.max(0)), "mean_diff": js(diff.mean(0)),
                          "min_diff": js(diff.min(0)), "std_diff": js(diff.std(0))}
        meta[name] = {"message_count": len(msgs), "message_freq": round(len(msgs) / span, 6) if span else 0.0,
                      "timespan": round(span, 6), "var_stats": stats}
    return meta


def write_can_bus(can_dir: Path, scene_name: str, messages: dict) -> None:
    can_dir.mkdir(parents=True, exist_ok=True)
    for name in ("pose", "ms_imu", "vehicle_monitor", "route", "meta"):
        with open(can_dir / f"{scene_name}_{name}.json", "w") as f:
            json.dump(messages[name], f, separators=(",", ":"))
