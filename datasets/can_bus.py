"""The CAN bus: nuScenes CAN messages (pose, ms_imu, vehicle_monitor) -> the ego's `CanState` at a timestamp.

Reads a scene's messages through the devkit's NuScenesCanBus (`open_can_bus`, `scene_can_messages`) and
interpolates speed (m/s, forward), yaw rate (rad/s, counter-clockwise) and acceleration (m/s^2, ego frame) at a
keyframe (`can_state_at`). `CAN_KEYS` / `can_message_problem` say what a usable message carries (an integer utime
and finite values under its keys); a bad record is dropped and counted on its own (`usable_can_messages`), the rest
of its file is kept, and one unreadable file costs only its own message type. Replay checks each message it
receives against the same rule.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

#: Longest gap (seconds) between the two CAN messages around a keyframe that still counts as data, per message type.
CAN_MAX_GAP_S: dict[str, float] = {"pose": 0.2, "ms_imu": 0.2, "vehicle_monitor": 1.2}
#: CAN bus message types read, and the keys each must carry (those can_state_at reads).
CAN_KINDS: tuple[str, ...] = ("pose", "ms_imu", "vehicle_monitor")
CAN_KEYS: dict[str, tuple[str, ...]] = {"pose": ("vel", "accel", "rotation_rate"),
                                        "ms_imu": ("linear_accel", "rotation_rate"),
                                        "vehicle_monitor": ("vehicle_speed", "yaw_rate")}
#: Values a key must have at least (vectors are x, y, z).
_CAN_VALUE_SIZES: dict[str, int] = {"rotation_rate": 3, "accel": 3, "linear_accel": 3}



@dataclass(frozen=True)
class CanState:
    """CAN bus state at a keyframe. speed m/s (forward), yaw_rate rad/s (counter-clockwise), acceleration [3] m/s^2
    in the ego frame. valid=False (values NaN) when there is no data; `reason` says why."""

    speed: float = float("nan")
    yaw_rate: float = float("nan")
    acceleration: tuple[float, float, float] = (float("nan"),) * 3
    valid: bool = False
    reason: str = ""

    @staticmethod
    def absent(reason: str) -> "CanState":
        return CanState(reason=reason)


def _interpolate_messages(messages: Sequence[dict], key: str, timestamp_us: int, max_gap_s: float,
                          size: int) -> np.ndarray | None:
    """Value [size] of `key` linearly interpolated at `timestamp_us` between the two messages around it, or None
    when they are more than `max_gap_s` apart (or, outside the messages' span, the nearest one is more than
    max_gap_s / 2 away), or when the records used are malformed (callers pass usable_can_messages; a malformed
    record still never raises here)."""
    if not messages:
        return None
    try:
        times = np.array([m["utime"] for m in messages], dtype=np.int64)
        if times.shape != (len(messages),):
            return None
        order = np.argsort(times, kind="stable")
        times = times[order]

        def value(i: int) -> np.ndarray:
            array = np.asarray(messages[order[i]][key], dtype=np.float64).reshape(-1)
            if array.shape[0] < size:
                raise ValueError(f"{key} has {array.shape[0]} values, expected {size}")
            return array[:size]

        right = int(np.searchsorted(times, timestamp_us, side="left"))
        if right < len(times) and times[right] == timestamp_us:
            return value(right)
        if right == 0 or right == len(times):
            nearest = 0 if right == 0 else len(times) - 1
            if abs(int(times[nearest]) - timestamp_us) * 1e-6 > max_gap_s / 2:
                return None
            return value(nearest)
        t0, t1 = int(times[right - 1]), int(times[right])
        if (t1 - t0) * 1e-6 > max_gap_s:
            return None
        alpha = (timestamp_us - t0) / (t1 - t0)
        return (1 - alpha) * value(right - 1) + alpha * value(right)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError):
        return None


def can_state_at(messages: Mapping[str, Sequence[dict]], timestamp_us: int,
                 max_gap_s: Mapping[str, float] | None = None) -> CanState:
    """The CAN state at `timestamp_us` from nuScenes CAN bus messages (as `NuScenesCanBus.get_messages` returns them).

    messages: message type -> list of messages; the types used are "pose" (vel m/s, accel m/s^2, rotation_rate
        rad/s, all in the ego frame), "ms_imu" (linear_accel m/s^2, rotation_rate rad/s, ego frame) and
        "vehicle_monitor" (vehicle_speed km/h, yaw_rate deg/s). Missing types are fine.
    Sources, best first: speed from pose.vel[0], else vehicle_monitor.vehicle_speed; yaw rate from
    ms_imu.rotation_rate[2], else pose.rotation_rate[2], else vehicle_monitor.yaw_rate; acceleration from
    ms_imu.linear_accel, else pose.accel. The state is valid only when all three are known at the keyframe
    (interpolated between messages at most CAN_MAX_GAP_S apart); otherwise it is absent (NaN) with the reason.
    """
    gaps = dict(CAN_MAX_GAP_S, **(max_gap_s or {}))

    def get(kind: str, key: str, size: int):
        msgs = messages.get(kind) or []
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[0], dict) or key not in msgs[0]:
            return None
        return _interpolate_messages(msgs, key, timestamp_us, gaps[kind], size)

    speed = get("pose", "vel", 1)
    speed = float(speed[0]) if speed is not None else None
    if speed is None:
        kmh = get("vehicle_monitor", "vehicle_speed", 1)
        speed = float(kmh[0]) / 3.6 if kmh is not None else None
    yaw_rate = None
    for kind in ("ms_imu", "pose"):
        rate = get(kind, "rotation_rate", 3)
        if rate is not None:
            yaw_rate = float(rate[2])
            break
    if yaw_rate is None:
        deg = get("vehicle_monitor", "yaw_rate", 1)
        yaw_rate = float(np.deg2rad(deg[0])) if deg is not None else None
    acceleration = get("ms_imu", "linear_accel", 3)
    if acceleration is None:
        acceleration = get("pose", "accel", 3)
    unknown = [name for name, value in (("speed", speed), ("yaw rate", yaw_rate), ("acceleration", acceleration))
               if value is None or not np.isfinite(np.asarray(value, dtype=np.float64)).all()]
    if unknown:
        kinds = sorted(k for k, v in messages.items() if v)
        return CanState.absent(f"no CAN {', '.join(unknown)} at t={timestamp_us} us "
                               f"(message types available: {kinds or 'none'})")
    return CanState(float(speed), float(yaw_rate), tuple(float(a) for a in acceleration), True, "")


def can_message_problem(kind: str, message) -> str:
    """Why a CAN message of type `kind` cannot be used ("" if it can): not an object, no integer utime, a key of
    CAN_KEYS[kind] missing, not numeric or not finite."""
    if not isinstance(message, dict):
        return "not a dict"
    utime = message.get("utime")
    if isinstance(utime, bool) or not isinstance(utime, (int, np.integer)) or not -2**63 <= utime < 2**63:
        return "no integer 'utime'"
    for key in CAN_KEYS.get(kind, ()):
        if key not in message:
            return f"no {key!r}"
        try:
            values = np.asarray(message[key], dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            return f"{key!r} is not numeric"
        if values.ndim > 1 or values.size < _CAN_VALUE_SIZES.get(key, 1):
            return f"{key!r} is not a number or a vector of {_CAN_VALUE_SIZES.get(key, 1)}"
        if not np.isfinite(values).all():
            return f"{key!r} is not finite"
    return ""


def open_can_bus(dataroot: str):
    """A NuScenesCanBus over <dataroot>/can_bus, or a string saying why there is none."""
    try:
        from nuscenes.can_bus.can_bus_api import NuScenesCanBus
        return NuScenesCanBus(dataroot=dataroot)
    except Exception as error:  # the devkit raises a bare Exception when can_bus/ is absent
        return f"no CAN bus data in {dataroot}: {error}"


def usable_can_messages(kind: str, messages, dropped: Counter | None = None) -> list[dict]:
    """The messages of type `kind` that `can_message_problem` accepts; each one dropped is counted in `dropped`
    as "<kind>: <why>"."""
    if not isinstance(messages, list):
        if dropped is not None:
            dropped[f"{kind}: the file is not a list of messages"] += 1
        return []
    usable = []
    for message in messages:
        problem = can_message_problem(kind, message)
        if problem:
            if dropped is not None:
                dropped[f"{kind}: {problem}"] += 1
        else:
            usable.append(message)
    return usable


def scene_can_messages(can_bus, scene_name: str, cache: dict | None = None, dropped: Counter | None = None
                       ) -> dict | str:
    """Message type (pose, ms_imu, vehicle_monitor) -> messages of one scene from a NuScenesCanBus, or a string
    saying why the scene has no CAN data. `cache` (scene name -> result) avoids reading a scene twice.

    A type whose file is missing or unreadable is left out (the others are kept). With `dropped` (a Counter), bad
    messages are removed record by record (usable_can_messages) and counted there; without it they are returned as
    read (the replay counts each one as it arrives)."""
    cache = {} if cache is None else cache
    if scene_name in cache:
        return cache[scene_name]
    if isinstance(can_bus, str):
        cache[scene_name] = can_bus
        return can_bus
    messages: dict[str, list] = {}
    reasons = []
    if not re.match(r"^scene-\d\d\d\d$", scene_name):
        reasons.append(f"scene name {scene_name!r} is not of the devkit's 'scene-NNNN' form")
    for kind in CAN_KINDS if not reasons else ():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                raw = can_bus.get_messages(scene_name, kind, print_warnings=False)
        except FileNotFoundError:
            reasons.append(f"no {kind} file")
            continue
        except Exception as error:  # the devkit raises bare Exceptions / AssertionErrors; JSON errors per file
            if "does not have any CAN bus data" in str(error):  # its blacklist: no type of this scene is usable
                reasons.append(str(error))
                break
            reasons.append(f"{kind} file unreadable: {type(error).__name__}: {str(error)[:200]}")
            continue
        if dropped is not None:
            raw = usable_can_messages(kind, raw, dropped)
        elif not isinstance(raw, list):
            reasons.append(f"{kind} file is not a list of messages")
            continue
        messages[kind] = raw
    result: dict | str = messages if messages else f"{scene_name} has no CAN bus data: {'; '.join(reasons)}"
    cache[scene_name] = result
    return result
