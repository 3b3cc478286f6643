"""Offline replay of a recorded drive through the detector, as if it were live (no ROS).

    drive stream (fusion.datasets.drive_stream.SceneSource: time-ordered messages) -> playback clock
    (fusion.replay.clock) -> sync policy (fusion.replay.policy) -> SampleBuilder -> the data module's inference
    transforms -> collate -> the model (fusion.replay.engine) -> sinks (fusion.replay.sinks: JSONL, PNG, MP4/GIF,
    summary)

`fusion.replay.scene.engine_for_scene` wires an engine for one scene with a trained model's data settings;
`fusion.replay.latency` keeps the latency percentiles. Frames: ego frame at the keyframe sweep (x forward, y left,
z up; meters, radians, seconds) unless a name says global. The names below are re-exported for convenience.
"""
from fusion.datasets.can_bus import open_can_bus
from fusion.datasets.drive_stream import SceneSource, StreamMessage, can_channel, first_scene_of_split
from fusion.replay.clock import PlaybackClock
from fusion.replay.engine import COUNT_KEYS, Detector, FrameResult, ReplayEngine
from fusion.replay.latency import LatencyHistogram
from fusion.replay.policy import NOMINAL_SWEEP_INTERVAL_US, SyncPolicy
from fusion.replay.scene import engine_for_scene
from fusion.replay.sinks import GifStreamWriter, ReplayOutputs, VideoSink, frame_record, render_frame, run_replay

__all__ = ["COUNT_KEYS", "NOMINAL_SWEEP_INTERVAL_US", "Detector", "FrameResult", "GifStreamWriter", "LatencyHistogram",
           "PlaybackClock", "ReplayEngine", "ReplayOutputs", "SceneSource", "StreamMessage", "SyncPolicy", "VideoSink",
           "can_channel", "engine_for_scene", "first_scene_of_split", "frame_record", "open_can_bus", "render_frame",
           "run_replay"]
