"""The ROS-free replay (fusion/replay.py, tools/replay.py) on the `tiny_dataroot` fixture: message order, the sync
policy against the dataset's own keyframe pairing, global-frame detections, corrupt / missing / late / out-of-order
messages counted and skipped, bounded buffers, the playback clock (late and dropped frames), the video sinks and
the command line. The model is a freshly initialised tiny_cpu model (no training); tests about the engine's
bookkeeping use a stub detector so that they can replay whole scenes cheaply."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from nuscenes.can_bus.can_bus_api import NuScenesCanBus
from nuscenes.nuscenes import NuScenes
from PIL import Image

from tool_runner import load_tool
from fusion.datasets.can_bus import can_state_at
from fusion.geometry import invert_transform, make_transform, matrix_to_quaternion
from fusion.datasets.datamodule import FusionDataModule
from fusion.replay import (COUNT_KEYS, GifStreamWriter, LatencyHistogram, PlaybackClock, SceneSource, SyncPolicy,
                           VideoSink, engine_for_scene, run_replay)
from fusion.types import CAMERA_NAMES, LIDAR_NAME, RADAR_NAMES, Boxes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"


replay_tool = load_tool("replay")


# ----------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nusc(tiny_dataroot):
    return NuScenes(tiny_dataroot.version, str(tiny_dataroot.dataroot), verbose=False)


@pytest.fixture(scope="module")
def lidar_only(tiny_dataroot, tiny):
    """Data settings of a LiDAR-only model (one sweep): cheap frames for the playback-clock tests."""
    return FusionDataModule(str(tiny_dataroot.dataroot), tiny_dataroot.version, grid=tiny[0].grid,
                            modalities=["lidar"], lidar_sweeps=1, cache_dir=None)


@pytest.fixture(scope="module")
def scene_with_can(tiny_dataroot):
    return next(s for s in tiny_dataroot.scene_names if s not in tiny_dataroot.scenes_without_can)


class FakeClock:
    """now() / sleep() for PlaybackClock: time only moves when someone sleeps or `advance`s it."""

    def __init__(self):
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)

    advance = sleep


class StubDetector:
    """One fixed box per frame; records what the model was given; costs `cost_s` of the given clock (or of wall
    time when `sleep` is True)."""

    def __init__(self, cost_s: float = 0.0, clock: FakeClock | None = None, sleep: bool = False):
        self.cost_s, self.clock, self.sleep = cost_s, clock, sleep
        self.present: list[dict[str, bool]] = []
        self.camera_valid: list[list[bool]] = []

    def predict(self, batch):
        self.present.append({m: bool(v[0]) for m, v in batch.present.items()})
        self.camera_valid.append(batch.cameras.valid[0].tolist() if batch.cameras is not None else [])
        if self.clock is not None:
            self.clock.advance(self.cost_s)
        elif self.sleep:
            time.sleep(self.cost_s)
        box = Boxes(center=torch.tensor([[10.0, -3.0, 0.5]]), size=torch.tensor([[4.5, 1.9, 1.6]]),
                    yaw=torch.tensor([0.4]), velocity=torch.tensor([[2.0, 0.5]]), labels=torch.tensor([0]),
                    attributes=torch.tensor([0]), scores=torch.tensor([0.9]),
                    num_lidar_pts=torch.tensor([-1]), num_radar_pts=torch.tensor([-1]))
        return [box], None  # (boxes, no attention weights)


def channel_chain(nusc, scene_name: str, channel: str) -> list[dict]:
    """Every sample_data record of `channel` in the scene, in chain order."""
    scene = next(s for s in nusc.scene if s["name"] == scene_name)
    sample = nusc.get("sample", scene["first_sample_token"])
    record = nusc.get("sample_data", sample["data"][channel])
    while record["prev"]:
        record = nusc.get("sample_data", record["prev"])
    chain = [record]
    while chain[-1]["next"]:
        chain.append(nusc.get("sample_data", chain[-1]["next"]))
    return chain


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def assert_accounting(summary: dict) -> None:
    """Every received message ends up in exactly one of the outcome counts."""
    for channel, counts in summary["messages"].items():
        outcomes = sum(counts[k] for k in COUNT_KEYS if k != "received")
        assert counts["received"] == outcomes, (channel, counts)


def yaw_of_quaternion(q) -> float:
    w, x, y, z = q
    return math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))


# ----------------------------------------------------------------------------------------------------------------
# The message source
# ----------------------------------------------------------------------------------------------------------------

def test_source_yields_every_sample_data_and_can_message_in_timestamp_order(nusc, tiny_dataroot, scene_with_can):
    from fusion.replay import open_can_bus

    can_bus = open_can_bus(str(tiny_dataroot.dataroot))
    for scene_name in tiny_dataroot.scene_names:
        scene = next(s for s in nusc.scene if s["name"] == scene_name)
        expected = {r["token"] for r in nusc.sample_data
                    if nusc.get("sample", r["sample_token"])["scene_token"] == scene["token"]}
        messages = list(SceneSource(nusc, scene_name, can_bus))
        times = [m.timestamp_us for m in messages]
        assert times == sorted(times)
        sensor = [m for m in messages if m.sensor is not None]
        assert {m.token for m in sensor} == expected and len(sensor) == len(expected)
        assert sum(not m.is_key_frame for m in sensor) > sum(m.is_key_frame for m in sensor)  # sweeps included
        assert all(m.sensor.timestamp_us == m.timestamp_us and os.path.exists(m.sensor.path) for m in sensor)
        can = [m for m in messages if m.can is not None]
        if scene_name == scene_with_can:
            assert {m.channel for m in can} == {"CAN_pose", "CAN_ms_imu", "CAN_vehicle_monitor"}
        else:
            assert not can
    with pytest.raises(ValueError, match="scene-9999"):
        SceneSource(nusc, "scene-9999")


# ----------------------------------------------------------------------------------------------------------------
# End to end with the tiny model
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(nusc, tiny, scene_with_can, tmp_path_factory):
    model, data = tiny
    frames = []
    engine = engine_for_scene(nusc, scene_with_can, model, data, SyncPolicy(every_k_sweeps=7, lidar_sweeps=3,
                                                                             radar_sweeps=3))
    out = tmp_path_factory.mktemp("replay_tiny")
    summary, outputs = run_replay(
        engine, out, model.grid, max_frames=3, video="mp4", png_every=2,
        on_frame=lambda f: frames.append((f.token, f.boxes, f.ego_to_global, f.contributions)))
    return summary, outputs, frames


def test_tiny_model_frames_are_in_timestamp_order_on_the_chosen_sweeps(tiny_run, nusc, scene_with_can):
    summary, outputs, frames = tiny_run
    lines = read_jsonl(outputs.detections)
    assert summary["completed"] and summary["frames"]["processed"] == len(lines) == 3
    assert summary["frames"]["dropped"] == summary["frames"]["late"] == summary["frames"]["failed"] == 0
    sweeps = channel_chain(nusc, scene_with_can, LIDAR_NAME)
    assert [line["lidar_token"] for line in lines] == [sweeps[i]["token"] for i in (0, 7, 14)]
    times = [line["timestamp_us"] for line in lines]
    assert times == sorted(times) and len(set(times)) == 3
    assert [line["timestamp_us"] for line in lines] == [sweeps[i]["timestamp"] for i in (0, 7, 14)]
    for line in lines:
        assert line["latency_ms"] > 0 and line["boxes"]
        assert {"LIDAR_TOP", "CAN", "MAP"} <= set(line["sensors_used"])
        assert set(line["sensors_used"]).isdisjoint(line["sensors_missing"])
    # The middle frame has every sensor in tolerance (the first sweep of a scene may come before some cameras).
    assert set(CAMERA_NAMES + RADAR_NAMES) <= set(lines[1]["sensors_used"])
    latency = summary["latency_ms"]
    assert latency["count"] == 3 and latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"] + 1e-9
    assert_accounting(summary)
    assert all(f[3] is not None and torch.allclose(f[3].sum(0), torch.ones(()), atol=1e-4) for f in frames)


def test_tiny_model_boxes_are_written_in_the_global_frame(tiny_run, nusc):
    summary, outputs, frames = tiny_run
    lines = read_jsonl(outputs.detections)
    for line, (token, boxes, pose, _) in zip(lines, frames):
        assert line["lidar_token"] == token
        record = nusc.get("ego_pose", nusc.get("sample_data", token)["ego_pose_token"])
        devkit_pose = make_transform(record["rotation"], record["translation"])
        np.testing.assert_allclose(np.array(line["ego_to_global"]), devkit_pose, atol=1e-9)
        order = torch.argsort(boxes.scores, descending=True, stable=True)
        written = line["boxes"]
        assert len(written) == min(len(boxes), 500)
        to_ego = invert_transform(devkit_pose)
        ego_quaternion_inverse = matrix_to_quaternion(to_ego[:3, :3])
        for box, i in zip(written, order.tolist()):
            center = to_ego[:3, :3] @ np.array(box["translation"]) + to_ego[:3, 3]
            np.testing.assert_allclose(center, boxes.center[i].double().numpy(), atol=2e-4)
            w, l, h = box["size"]
            np.testing.assert_allclose([l, w, h], boxes.size[i].double().numpy(), rtol=1e-6)
            # Global yaw back to the ego frame: q_ego = q(ego <- global) * q_global.
            q = np.array(box["rotation"])
            a, b = ego_quaternion_inverse, q
            product = [a[0] * b[0] - a[1] * b[1] - a[2] * b[2] - a[3] * b[3],
                       a[0] * b[1] + a[1] * b[0] + a[2] * b[3] - a[3] * b[2],
                       a[0] * b[2] - a[1] * b[3] + a[2] * b[0] + a[3] * b[1],
                       a[0] * b[3] + a[1] * b[2] - a[2] * b[1] + a[3] * b[0]]
            error = (yaw_of_quaternion(product) - float(boxes.yaw[i]) + math.pi) % (2 * math.pi) - math.pi
            assert abs(error) < 1e-4
            velocity = to_ego[:3, :3] @ np.array([*box["velocity"], 0.0])
            np.testing.assert_allclose(velocity[:2], boxes.velocity[i].double().numpy(), atol=1e-4)
            assert box["detection_score"] == pytest.approx(float(boxes.scores[i]), abs=1e-6)


def test_tiny_model_video_and_pictures(tiny_run):
    summary, outputs, _ = tiny_run
    assert outputs.video is not None and outputs.video.suffix == ".mp4" and outputs.video.stat().st_size > 0
    reader = imageio.get_reader(outputs.video, format="FFMPEG")
    try:
        assert reader.count_frames() == 3 == summary["video"]["frames"]
        first = reader.get_data(0)
    finally:
        reader.close()
    pictures = sorted(outputs.frames_dir.glob("*.png"))
    assert [p.name for p in pictures] == ["frame_000000.png", "frame_000002.png"]
    with Image.open(pictures[0]) as png:
        assert abs(png.width - first.shape[1]) <= 1 and abs(png.height - first.shape[0]) <= 1
        assert np.asarray(png).std() > 5  # not a blank picture


# ----------------------------------------------------------------------------------------------------------------
# The sync policy against the dataset's own keyframe pairing
# ----------------------------------------------------------------------------------------------------------------

def test_keyframe_frames_equal_the_datasets_samples(nusc, tiny, tiny_dataroot, scene_with_can):
    """At keyframe sweeps the nearest-in-tolerance policy picks exactly the nuScenes keyframe messages, so the
    replayed Sample (ego motion compensated by the same SampleBuilder) equals the dataset's."""
    model, data = tiny
    policy = SyncPolicy(keyframes_only=True, lidar_sweeps=data.lidar_sweeps, lidar_sweep_stride=data.lidar_sweep_stride,
                        radar_sweeps=data.radar_sweeps)
    engine = engine_for_scene(nusc, scene_with_can, StubDetector(), data, policy)
    frames = list(engine.frames())
    dataset = data.make_dataset(tiny_dataroot.train_split, train=False)
    can_bus = NuScenesCanBus(dataroot=str(tiny_dataroot.dataroot))
    log = {kind: can_bus.get_messages(scene_with_can, kind) for kind in ("pose", "ms_imu", "vehicle_monitor")}
    assert len(frames) == len(dataset) == sum(1 for s in nusc.sample
                                            if nusc.get("scene", s["scene_token"])["name"] == scene_with_can)
    for i, frame in enumerate(frames):
        expected = dataset[i]
        sample_record = nusc.get("sample", expected.token)
        assert frame.sample_token == expected.token and frame.timestamp_us == expected.timestamp_us
        for channel in CAMERA_NAMES + RADAR_NAMES:
            assert frame.messages[channel][0] == sample_record["data"][channel], channel
        lidar = channel_chain(nusc, scene_with_can, LIDAR_NAME)
        index = [r["token"] for r in lidar].index(frame.token)
        stride = data.lidar_sweep_stride  # every stride-th previous sweep, newest first
        previous = [r["token"] for r in lidar[:index]][::-1][stride - 1::stride][:data.lidar_sweeps]
        assert frame.messages[LIDAR_NAME] == [frame.token] + previous
        torch.testing.assert_close(frame.sample.lidar, expected.lidar, rtol=0, atol=0)
        torch.testing.assert_close(frame.sample.radar, expected.radar, rtol=0, atol=0)
        torch.testing.assert_close(frame.sample.cameras.images, expected.cameras.images, rtol=0, atol=0)
        torch.testing.assert_close(frame.sample.cameras.cam_to_ego, expected.cameras.cam_to_ego)
        torch.testing.assert_close(frame.sample.map_raster, expected.map_raster)
        # CAN: interpolated from what a live system has at T + wait (the dataset may also use later messages).
        known = {kind: [m for m in log[kind] if m["utime"] <= frame.timestamp_us + policy.wait_s * 1e6]
                 for kind in log}
        state = can_state_at(known, frame.timestamp_us)
        assert bool(frame.sample.ego.can_valid) == state.valid
        if state.valid:
            assert float(frame.sample.ego.speed) == pytest.approx(state.speed, abs=1e-5)
            assert float(frame.sample.ego.yaw_rate) == pytest.approx(state.yaw_rate, abs=1e-6)
            np.testing.assert_allclose(frame.sample.ego.acceleration.numpy(), state.acceleration, atol=1e-5)
        else:
            assert frame.sample.missing["CAN"] == state.reason
    assert sum(bool(f.sample.ego.can_valid) for f in frames) >= len(frames) // 2


def test_tolerances_decide_what_is_missing(nusc, tiny, scene_with_can):
    """With a zero camera tolerance and a causal policy no camera is ever paired (their clocks differ from the
    LiDAR's): cameras are marked missing with the reason, and the model runs on the other sensors."""
    _, data = tiny
    stub = StubDetector()
    policy = SyncPolicy(every_k_sweeps=5, camera_tolerance_s=0.0, wait_s=0.0, lidar_sweeps=2, radar_sweeps=2)
    engine = engine_for_scene(nusc, scene_with_can, stub, data, policy)
    frames = list(engine.frames())
    assert frames and all(not p["camera"] and p["lidar"] for p in stub.present)
    assert all(p["radar"] for p in stub.present[1:])  # the scene's first sweep may come before any radar
    for frame in frames:
        assert all("no message within 0 ms" in frame.sensors_missing[c] or "no message received"
                   in frame.sensors_missing[c] for c in CAMERA_NAMES)
        for channel in RADAR_NAMES:  # causal: nothing newer than the sweep
            if channel in frame.messages:
                assert nusc.get("sample_data", frame.messages[channel][0])["timestamp"] <= frame.timestamp_us
    summary = engine.summary()
    assert all(summary["messages"][c]["used"] == 0 and summary["messages"][c]["skipped"] > 0 for c in CAMERA_NAMES)
    assert_accounting(summary)
    # As fast as possible, a replay is deterministic: the same frames from the same messages.
    again = list(engine_for_scene(nusc, scene_with_can, StubDetector(), data, policy).frames())
    assert [(f.token, f.messages, f.sensors_missing) for f in again] == \
        [(f.token, f.messages, f.sensors_missing) for f in frames]
    torch.testing.assert_close(again[-1].sample.lidar, frames[-1].sample.lidar, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Robustness: corrupt, missing, late and out-of-order messages
# ----------------------------------------------------------------------------------------------------------------

def corrupted_copy(tiny_dataroot, nusc, scene_name: str, out: Path) -> dict:
    """A copy of the dataroot (sensor files symlinked, tables copied) with one truncated LiDAR sweep, one garbage
    JPEG, one deleted radar file, two radar sweeps whose timestamps are swapped (out of order) and one sample_data
    row whose ego pose is missing. Returns what was broken."""
    source = Path(tiny_dataroot.dataroot)
    for item in source.iterdir():
        if item.name == tiny_dataroot.version:
            shutil.copytree(item, out / item.name)
        else:
            shutil.copytree(item, out / item.name, copy_function=os.symlink)
    broken = {"lidar": channel_chain(nusc, scene_name, LIDAR_NAME)[12],
              "camera": channel_chain(nusc, scene_name, "CAM_FRONT")[8],
              "radar": channel_chain(nusc, scene_name, "RADAR_FRONT")[10],
              "swapped": channel_chain(nusc, scene_name, "RADAR_BACK_LEFT")[14:16],
              "no_pose": channel_chain(nusc, scene_name, "CAM_BACK_RIGHT")[20]}
    lidar_path = out / broken["lidar"]["filename"]
    payload = lidar_path.read_bytes()
    lidar_path.unlink()
    lidar_path.write_bytes(payload[: len(payload) // 2 + 7])  # not a whole number of 20-byte points
    camera_path = out / broken["camera"]["filename"]
    camera_path.unlink()
    camera_path.write_bytes(b"this is not a jpeg" * 50)
    (out / broken["radar"]["filename"]).unlink()
    table = out / tiny_dataroot.version / "sample_data.json"
    rows = json.loads(table.read_text())
    by_token = {row["token"]: row for row in rows}
    first, second = (by_token[r["token"]] for r in broken["swapped"])
    first["timestamp"], second["timestamp"] = second["timestamp"], first["timestamp"]
    by_token[broken["no_pose"]["token"]]["ego_pose_token"] = "no-such-ego-pose"
    table.write_text(json.dumps(rows))
    return broken


def inject(messages, delayed_channel: str, delayed_index: int, delay_us: int, bad_can_index: int):
    """Pass the stream through, delivering the delayed_index-th message of `delayed_channel` only after the stream
    passed its timestamp + delay_us (late), and stripping "vel" from the bad_can_index-th CAN pose message."""
    held, seen, poses = None, 0, 0
    for message in messages:
        if message.channel == "CAN_pose":
            if poses == bad_can_index:
                message = dataclasses.replace(message, can={k: v for k, v in message.can.items() if k != "vel"})
            poses += 1
        if message.channel == delayed_channel:
            seen += 1
            if seen - 1 == delayed_index:
                held = message
                continue
        yield message
        if held is not None and message.timestamp_us > held.timestamp_us + delay_us:
            yield held
            held = None
    if held is not None:
        yield held


def test_corrupted_drive_replays_to_the_end_and_counts_every_bad_message(tiny_dataroot, nusc, tiny, scene_with_can,
                                                                          tmp_path):
    _, data = tiny
    broken = corrupted_copy(tiny_dataroot, nusc, scene_with_can, tmp_path / "root")
    bad_nusc = NuScenes(tiny_dataroot.version, str(tmp_path / "root"), verbose=False)
    stub = StubDetector()
    engine = engine_for_scene(bad_nusc, scene_with_can, stub, data, SyncPolicy(lidar_sweeps=1, radar_sweeps=2))
    engine.source = inject(engine.source, "CAM_BACK", 10, 60_000, bad_can_index=40)
    frames = []
    summary, outputs = run_replay(engine, tmp_path / "out", data.grid, video="none", png_every=0,
                                  on_frame=lambda f: frames.append((f.token, f.sensors_missing)))
    messages = summary["messages"]
    sweeps = channel_chain(nusc, scene_with_can, LIDAR_NAME)
    assert summary["completed"] and summary["frames"]["failed"] == 0
    assert summary["frames"]["processed"] == summary["frames"]["triggered"] == len(sweeps)
    assert messages[LIDAR_NAME]["corrupt"] == 1
    assert messages["CAM_FRONT"]["corrupt"] == 1
    assert messages["RADAR_FRONT"]["missing_file"] == 1
    assert messages["RADAR_BACK_LEFT"]["out_of_order"] == 1
    assert messages["CAM_BACK"]["late"] == 1
    assert messages["CAM_BACK_RIGHT"]["corrupt"] == 1  # the table row without its ego pose
    assert messages["CAN_pose"]["corrupt"] == 1
    for channel, counts in messages.items():
        expected_bad = {("LIDAR_TOP", "corrupt"), ("CAM_FRONT", "corrupt"), ("RADAR_FRONT", "missing_file"),
                        ("RADAR_BACK_LEFT", "out_of_order"), ("CAM_BACK", "late"), ("CAM_BACK_RIGHT", "corrupt"),
                        ("CAN_pose", "corrupt")}
        for key in ("corrupt", "missing_file", "out_of_order", "late"):
            assert counts[key] == int((channel, key) in expected_bad), (channel, key, counts)
    assert_accounting(summary)
    # The frame of the truncated sweep ran without LiDAR (on the other sensors), naming the file.
    lines = read_jsonl(outputs.detections)
    assert [line["lidar_token"] for line in lines] == [s["token"] for s in sweeps]
    bad_frame = [line["lidar_token"] for line in lines].index(broken["lidar"]["token"])
    assert "LIDAR_TOP" in lines[bad_frame]["sensors_missing"]
    assert broken["lidar"]["filename"].split("/")[-1] in lines[bad_frame]["sensors_missing"]["LIDAR_TOP"]
    assert not stub.present[bad_frame]["lidar"] and stub.present[bad_frame]["camera"]
    camera_reasons = [missing.get("CAM_FRONT", "") for _, missing in frames]
    assert sum(broken["camera"]["filename"].split("/")[-1] in reason for reason in camera_reasons) == 1


# ----------------------------------------------------------------------------------------------------------------
# Bounded memory
# ----------------------------------------------------------------------------------------------------------------

class LoopedSource:
    """A long drive: the scene's messages `repeats` times, each repeat shifted later in time (same files)."""

    def __init__(self, source: SceneSource, repeats: int):
        self.source, self.repeats = source, repeats
        self.scene_name = source.scene_name

    def __iter__(self):
        messages = list(self.source)
        span = messages[-1].timestamp_us - messages[0].timestamp_us + 100_000
        for repeat in range(self.repeats):
            shift = repeat * span
            for m in messages:
                sensor = dataclasses.replace(m.sensor, timestamp_us=m.sensor.timestamp_us + shift) if m.sensor else None
                can = dict(m.can, utime=m.can["utime"] + shift) if m.can else None
                yield dataclasses.replace(m, timestamp_us=m.timestamp_us + shift, sensor=sensor, can=can)


def test_buffers_stay_bounded_over_a_long_drive(nusc, tiny, scene_with_can):
    _, data = tiny
    policy = SyncPolicy(every_k_sweeps=20, lidar_sweeps=3, radar_sweeps=3)
    engine = engine_for_scene(nusc, scene_with_can, StubDetector(), data, policy, trajectory_points=40)
    engine.source = LoopedSource(engine.source, repeats=6)
    frames = sum(1 for _ in engine.frames())
    summary = engine.summary()
    assert frames == summary["frames"]["processed"] == summary["frames"]["triggered"] >= 6
    high, capacity = summary["buffer_high_water"], summary["buffer_capacity"]
    assert set(high) >= {LIDAR_NAME, *CAMERA_NAMES, *RADAR_NAMES, "CAN_pose", "CAN_ms_imu"}
    for channel, peak in high.items():
        assert peak <= capacity[channel], channel
        assert summary["messages"][channel]["received"] > 2 * peak or channel == "CAN_vehicle_monitor", channel
    assert high[LIDAR_NAME] == policy.lidar_sweeps + 1 + policy.max_pending_frames  # full, never more
    assert len(engine.trajectory) == 40
    assert all(len(buffer) == 0 for buffer in engine.buffers.values())  # flushed at the end
    assert_accounting(summary)


def test_latency_histogram_percentiles_are_within_one_percent():
    values = np.random.default_rng(0).lognormal(3.0, 0.8, 5000)
    histogram = LatencyHistogram()
    for value in values:
        histogram.add(value)
    for q in (50, 95, 99):
        exact = np.percentile(values, q, method="inverted_cdf")
        assert histogram.percentile(q) == pytest.approx(exact, rel=0.011)
    assert len(histogram.buckets) < 700 and histogram.summary()["max"] == pytest.approx(values.max())


# ----------------------------------------------------------------------------------------------------------------
# The playback clock
# ----------------------------------------------------------------------------------------------------------------

def test_real_time_with_a_slow_model_counts_late_and_dropped_frames(nusc, lidar_only, scene_with_can):
    """A model costing 120 ms per frame against LiDAR sweeps every 50 ms (rate 1.0, simulated clock): frames fall
    behind (late) and, beyond 250 ms, are dropped; the same replay as fast as possible drops nothing."""
    data = lidar_only
    policy = SyncPolicy(lidar_sweeps=1, radar_sweeps=1)
    clock = FakeClock()
    stub = StubDetector(cost_s=0.12, clock=clock)
    engine = engine_for_scene(nusc, scene_with_can, stub, data, policy, max_lag_s=0.25,
                              clock=PlaybackClock(1.0, now=clock.now, sleep=clock.sleep))
    frames = list(engine.frames())
    counts = engine.summary()["frames"]
    sweeps = len(channel_chain(nusc, scene_with_can, LIDAR_NAME))
    assert counts["triggered"] == sweeps
    assert counts["processed"] + counts["dropped"] == sweeps
    assert counts["dropped"] >= sweeps // 3 and counts["late"] >= 3
    assert counts["processed"] == len(frames) and sum(f.late for f in frames) == counts["late"]
    assert not frames[0].late
    for frame in frames:
        assert frame.processing_ms == pytest.approx(120.0, abs=1e-6)  # only the model costs simulated time
        assert frame.latency_ms <= 120.0 + 250.0 + 1e-6  # never started beyond the drop bound
        lag_ms = frame.latency_ms - frame.processing_ms  # late: more than one sweep interval (~50 ms) behind
        assert (lag_ms > 49.0) if frame.late else (lag_ms < 51.0)
    stream_s = (frames[-1].timestamp_us - frames[0].timestamp_us) * 1e-6
    assert clock.t - 1000.0 >= stream_s  # the simulated wall clock paced the stream

    fast = engine_for_scene(nusc, scene_with_can, StubDetector(), data, policy)
    list(fast.frames())
    assert fast.summary()["frames"] == {"triggered": sweeps, "processed": sweeps, "dropped": 0, "late": 0,
                                        "failed": 0}


def test_real_time_paces_by_the_wall_clock(nusc, lidar_only, scene_with_can):
    data = lidar_only
    policy = SyncPolicy(every_k_sweeps=2, lidar_sweeps=1, radar_sweeps=1)
    engine = engine_for_scene(nusc, scene_with_can, StubDetector(cost_s=0.1, sleep=True), data, policy, rate=4.0,
                              max_lag_s=0.15)
    list(engine.frames())
    summary = engine.summary()
    assert summary["wall_time_s"] >= summary["stream_seconds"] / 4.0 * 0.99
    assert summary["frames"]["dropped"] >= 1 and summary["frames"]["late"] >= 1
    assert summary["frames"]["processed"] + summary["frames"]["dropped"] == summary["frames"]["triggered"]
    with pytest.raises(ValueError, match="rate"):
        PlaybackClock(-1.0)


# ----------------------------------------------------------------------------------------------------------------
# Video sinks
# ----------------------------------------------------------------------------------------------------------------

def pictures(n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        array = np.zeros((61, 81, 3), np.uint8)  # odd sizes: the MP4 writer pads them
        array[:, : 10 * (i + 1)] = (200, 40, 40)
        out.append(Image.fromarray(array))
    return out


def test_gif_is_streamed_frame_by_frame(tmp_path):
    writer = GifStreamWriter(tmp_path / "a.gif", fps=10)
    for picture in pictures(4):
        writer.append(picture)
    writer.close()
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (81, 61)
        gif.seek(2)
        frame = np.asarray(gif.convert("RGB")).astype(int)
    assert np.abs(frame[30, 25] - (200, 40, 40)).max() <= 8 and frame[30, 60].max() <= 8


def test_video_falls_back_to_gif_when_ffmpeg_fails(tmp_path, monkeypatch):
    def broken_writer(*args, **kwargs):
        raise RuntimeError("ffmpeg is not available")

    monkeypatch.setattr(imageio, "get_writer", broken_writer)
    messages = []
    sink = VideoSink(tmp_path / "replay", "mp4", fps=10, log=messages.append)
    for picture in pictures(3):
        sink.append(picture)
    sink.close()
    assert sink.path == tmp_path / "replay.gif" and sink.frames == 3 and "GIF" in messages[0]
    with Image.open(sink.path) as gif:
        assert gif.n_frames == 3
    assert not (tmp_path / "replay.mp4").exists()


def test_mp4_has_every_frame(tmp_path):
    sink = VideoSink(tmp_path / "replay", "mp4", fps=10)
    for picture in pictures(5):
        sink.append(picture)
    sink.close()
    reader = imageio.get_reader(sink.path, format="FFMPEG")
    try:
        assert reader.count_frames() == 5
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------

def test_cli_replays_the_first_scene_of_a_split(tiny, tiny_dataroot, tmp_path, capsys):
    model, _ = tiny
    run = tmp_path / "runs" / "tiny"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 0}, checkpoint)  # weights only: --config says the rest
    out = tmp_path / "out"
    code = replay_tool.main(["--dataroot", str(tiny_dataroot.dataroot), "--version", tiny_dataroot.version,
                             "--split", tiny_dataroot.val_split, "--checkpoint", str(checkpoint),
                             "--config", str(CONFIG), "--out", str(out),
                             "--rate", "max", "--every-k-sweeps", "10", "--max-frames", "2", "--video", "gif",
                             "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    for name in ("detections.jsonl", "summary.json", "replay.gif", "frames"):
        assert str(out / name) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scene"] == tiny_dataroot.val_scenes[0] and summary["frames"]["processed"] == 2
    assert summary["stopped_at_max_frames"] and summary["config"] == str(CONFIG)
    lines = read_jsonl(out / "detections.jsonl")
    assert len(lines) == 2 and all("CAN" in line["sensors_missing"] and "CAN" not in line["sensors_used"]
                                   for line in lines)  # the validation scene has no CAN bus data
    with Image.open(out / "replay.gif") as gif:
        assert gif.n_frames == 2
    assert len(list((out / "frames").glob("*.png"))) == 2


def test_cli_rejects_bad_input_with_clear_messages(tiny_dataroot, tmp_path, capsys):
    with pytest.raises(SystemExit):
        replay_tool.parse_args(["--dataroot", "x", "--version", "v", "--scene", "s", "--checkpoint", "c",
                                "--out", "o", "--rate", "fast"])
    assert "--rate must be 'max' or a positive number" in capsys.readouterr().err
    lonely = tmp_path / "a" / "b" / "lonely.ckpt"
    lonely.parent.mkdir(parents=True)
    lonely.write_bytes(b"")
    code = replay_tool.main(["--dataroot", str(tiny_dataroot.dataroot), "--version", tiny_dataroot.version,
                             "--scene", "scene-2001", "--checkpoint", str(lonely), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load checkpoint" in err and "lonely.ckpt" in err
    code = replay_tool.main(["--dataroot", str(tmp_path), "--version", tiny_dataroot.version, "--scene", "scene-2001",
                             "--checkpoint", str(lonely), "--config", str(CONFIG), "--out", str(tmp_path / "o")])
    assert code == 2 and "has no table folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        replay_tool.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "Sync policy" in help_text and "--sync-wait-ms" in help_text and "--every-k-sweeps" in help_text
