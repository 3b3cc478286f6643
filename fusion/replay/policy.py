"""The sync policy: which messages make one replay frame, and how long the replay waits for them.

A policy says (all times are the messages' own timestamps):
- Trigger: every LiDAR sweep, or every k-th (`every_k_sweeps`; with `keyframes_only`, every k-th nuScenes keyframe
  sweep), is the keyframe of one frame at its time T, expressed in the ego frame at T (the sweep's own ego pose).
- Wait: the frame is assembled once the stream has passed T + `wait_s` (default 50 ms), so that a camera or radar
  message taken just after the sweep can still be paired with it, as nuScenes keyframes pair them. `wait_s` = 0 makes
  the policy strictly causal (only messages up to T).
- LiDAR: the trigger sweep plus up to `lidar_sweeps` previous sweeps still buffered, none older than T -
  `max_sweep_age_s`.
- Cameras: per camera, the message nearest to T with |t - T| <= `camera_tolerance_s` (default 60 ms).
- Radar: per radar, the message nearest to T with |t - T| <= `radar_tolerance_s` (default 100 ms), plus that radar's
  previous messages, `radar_sweeps` in all, none older than T - `max_sweep_age_s`.
- CAN: speed, yaw rate and acceleration interpolated at T from the buffered CAN messages
  (fusion.datasets.can_bus.can_state_at). Map: the scene's map layer cropped at the sweep's pose.
Every buffer is bounded (`SyncPolicy.capacity`): its size follows from the policy, not from the drive's length.
"""
from __future__ import annotations

from dataclasses import dataclass

from fusion.datasets.drive_stream import CAN_PREFIX
from fusion.types import LIDAR_NAME, RADAR_NAMES

#: Nominal LiDAR sweep interval (nuScenes: 20 Hz), used until two sweeps have been seen.
NOMINAL_SWEEP_INTERVAL_US = 50_000


@dataclass(frozen=True)
class SyncPolicy:
    """How frames are assembled from the message stream (see the module docstring). Times in seconds."""

    every_k_sweeps: int = 1
    keyframes_only: bool = False
    lidar_sweeps: int = 9
    #: Every k-th previous sweep is used (SampleBuilder.lidar_sweep_stride): lidar_sweeps * k are buffered.
    lidar_sweep_stride: int = 1
    radar_sweeps: int = 6
    camera_tolerance_s: float = 0.06
    radar_tolerance_s: float = 0.10
    wait_s: float = 0.05
    max_sweep_age_s: float = 0.6
    #: Frames waiting for their sync window; when more pile up the oldest is dropped (counted).
    max_pending_frames: int = 8
    #: CAN messages kept per type (pose 50 Hz, ms_imu 100 Hz: 256 cover over 2.5 s).
    can_buffer: int = 256
    #: A message stamped more than this (seconds) after the newest accepted message, or before it, is an absurd
    #: stamp: counted as bad_timestamp and skipped, unless a message of another channel confirms the jump (a real
    #: pause in the recording).
    max_stamp_jump_s: float = 5.0

    def __post_init__(self):
        checks = {"every_k_sweeps": self.every_k_sweeps >= 1, "lidar_sweeps": self.lidar_sweeps >= 0,
                  "lidar_sweep_stride": self.lidar_sweep_stride >= 1,
                  "radar_sweeps": self.radar_sweeps >= 1, "camera_tolerance_s": self.camera_tolerance_s >= 0,
                  "radar_tolerance_s": self.radar_tolerance_s >= 0, "wait_s": 0 <= self.wait_s <= 1.0,
                  "max_sweep_age_s": self.max_sweep_age_s > 0, "max_pending_frames": self.max_pending_frames >= 1,
                  "can_buffer": self.can_buffer >= 2, "max_stamp_jump_s": self.max_stamp_jump_s > 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"SyncPolicy.{name}={getattr(self, name)!r} is out of range")

    @property
    def previous_sweeps_needed(self) -> int:
        """Previous LiDAR sweeps a frame is assembled from (every lidar_sweep_stride-th of them is used)."""
        return self.lidar_sweeps * self.lidar_sweep_stride

    def capacity(self, channel: str) -> int:
        """The bound of `channel`'s buffer (messages): what the policy can still need, plus the pending frames."""
        if channel == LIDAR_NAME:
            return self.previous_sweeps_needed + 1 + self.max_pending_frames
        if channel in RADAR_NAMES:
            return self.radar_sweeps + 2 + self.max_pending_frames
        if channel.startswith(CAN_PREFIX):
            return self.can_buffer
        return 3 + self.max_pending_frames
