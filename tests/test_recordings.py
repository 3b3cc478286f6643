"""Replay recordings for viewers (fusion/replay/rerun_sink.py, fusion/replay/mcap_sink.py, `tools/replay.py --rerun
--mcap`), read back with the libraries' own readers (rerun.dataframe, mcap.reader with the protobuf decoder): entities
and channels, message counts, sensor timestamps, and box poses against detections.jsonl; tracks with IDs when a frame
has them, detections otherwise. A freshly initialised tiny_cpu model (no training) or a stub detector, a few frames
of the `tiny_dataroot` fixture."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import rerun as rr
import torch
from mcap.reader import make_reader
from mcap_protobuf.decoder import DecoderFactory
from nuscenes.nuscenes import NuScenes

from tool_runner import load_tool
from fusion.geometry import make_transform, matrix_to_quaternion, rotation_z
from fusion.replay import SyncPolicy, engine_for_scene
from fusion.replay.mcap_sink import McapSink
from fusion.replay.recorded_frame import (BOX_EDGES, CameraView, RecordedBox, box_corners, frame_boxes,
                                          projected_edges)
from fusion.replay.rerun_sink import RerunSink
from fusion.types import CAMERA_NAMES, DETECTION_CLASSES, Boxes
from fusion.visualization import project_to_image

#: rerun drops what it cannot log with a RerunWarning (e.g. its datatype objects under numpy 1.x): fail on it.
pytestmark = pytest.mark.filterwarnings("error::rerun.error_utils.RerunWarning")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"


replay_tool = load_tool("replay")


@pytest.fixture(scope="module")
def nusc(tiny_dataroot):
    return NuScenes(tiny_dataroot.version, str(tiny_dataroot.dataroot), verbose=False)


class StubDetector:
    """Two fixed boxes per frame (ego frame), no attention."""

    def predict(self, batch):
        boxes = Boxes(center=torch.tensor([[10.0, -3.0, 0.5], [-6.0, 4.0, 0.8]]),
                      size=torch.tensor([[4.5, 1.9, 1.6], [0.8, 0.7, 1.8]]), yaw=torch.tensor([0.4, -1.2]),
                      velocity=torch.tensor([[2.0, 0.5], [0.0, 1.0]]), labels=torch.tensor([0, 7]),
                      attributes=torch.tensor([0, -1]), scores=torch.tensor([0.9, 0.6]),
                      num_lidar_pts=torch.tensor([-1, -1]), num_radar_pts=torch.tensor([-1, -1]))
        return [boxes], None


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


# ----------------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------------

def rerun_column(path: Path, entity: str, component: str) -> tuple[list[int], list]:
    """(sensor_time in ns, values) of one component of one entity of an .rrd, one row per logged time."""
    recording = rr.dataframe.load_recording(str(path))
    view = recording.view(index="sensor_time", contents={entity: [f"rerun.components.{component}"]},
                          include_semantically_empty_columns=True)
    table = view.select().read_all()
    times = table.column("sensor_time").cast(pa.int64()).to_pylist()
    return times, table.column(f"{entity}:{component}").to_pylist()


def rerun_entities(path: Path) -> set[str]:
    return {column.entity_path for column in rr.dataframe.load_recording(str(path)).schema().component_columns()}


def mcap_messages(path: Path) -> list[tuple[str, int, object]]:
    """(topic, log_time ns, decoded protobuf message or parsed JSON) of every message, in log-time order."""
    out = []
    with open(path, "rb") as handle:
        reader = make_reader(handle, decoder_factories=[DecoderFactory()])
        for schema, channel, message in reader.iter_messages(log_time_order=True):
            if channel.message_encoding == "json":
                out.append((channel.topic, message.log_time, json.loads(message.data)))
        handle.seek(0)
        reader = make_reader(handle, decoder_factories=[DecoderFactory()])
        protobuf_topics = [c.topic for c in reader.get_summary().channels.values() if c.message_encoding == "protobuf"]
        for schema, channel, message, decoded in reader.iter_decoded_messages(topics=protobuf_topics,
                                                                              log_time_order=True):
            out.append((channel.topic, message.log_time, decoded))
    return sorted(out, key=lambda m: m[1])


def mcap_schemas(path: Path) -> dict[str, str]:
    """topic -> schema name."""
    with open(path, "rb") as handle:
        summary = make_reader(handle).get_summary()
    return {c.topic: summary.schemas[c.schema_id].name for c in summary.channels.values()}


def assert_box_matches(cube_or_rerun, jsonl_box: dict) -> None:
    translation, quaternion_xyzw, size_lwh = cube_or_rerun
    assert np.allclose(translation, jsonl_box["translation"], atol=1e-2)
    w, x, y, z = jsonl_box["rotation"]
    assert np.allclose(quaternion_xyzw, [x, y, z, w], atol=1e-5) or np.allclose(quaternion_xyzw, [-x, -y, -z, -w],
                                                                                atol=1e-5)
    width, length, height = jsonl_box["size"]
    assert np.allclose(size_lwh, [length, width, height], atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# The command line: both recordings of a real (untrained) model's replay
# ----------------------------------------------------------------------------------------------------------------

def test_cli_writes_rerun_and_mcap_that_match_the_detections(tiny, tiny_dataroot, nusc, tmp_path, capsys):
    model, _ = tiny
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "epoch": 0}, checkpoint)
    out, rrd, mcap_path = tmp_path / "out", tmp_path / "rec" / "drive.rrd", tmp_path / "rec" / "drive.mcap"
    scene = tiny_dataroot.scene_names[0]
    code = replay_tool.main(["--dataroot", str(tiny_dataroot.dataroot), "--version", tiny_dataroot.version,
                             "--scene", scene, "--checkpoint", str(checkpoint), "--config", str(CONFIG),
                             "--out", str(out), "--every-k-sweeps", "10", "--max-frames", "2", "--video", "none",
                             "--png-every", "0", "--device", "cpu", "--score-threshold", "0.0",
                             "--no-tracking",  # the recorded boxes are then the detections, compared below
                             "--rerun", str(rrd), "--mcap", str(mcap_path)])
    printed = capsys.readouterr().out
    assert code == 0
    assert str(rrd) in printed and str(mcap_path) in printed and "not counted in latency" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recordings"] == {"rerun": str(rrd), "mcap": str(mcap_path)}
    assert set(summary["recording_s"]) == {"rerun", "mcap"} and all(s > 0 for s in summary["recording_s"].values())
    lines = read_jsonl(out / "detections.jsonl")
    assert len(lines) == 2 and all(line["boxes"] for line in lines)
    frame_times_ns = [line["timestamp_us"] * 1000 for line in lines]
    camera_times_ns = {name: {r["timestamp"] * 1000 for r in nusc.sample_data if r["channel"] == name}
                       for name in CAMERA_NAMES}

    # rerun: the entities, one row per frame at the sweep's timestamp, boxes as in the JSONL
    entities = rerun_entities(rrd)
    expected = {"/world/ego", "/world/ego/lidar", "/world/ego/radar", "/world/objects", "/world/ego_trajectory",
                "/contributions", "/metrics/latency_ms", "/log"}
    expected |= {f"/world/cameras/{name}{suffix}" for name in CAMERA_NAMES for suffix in ("", "/image", "/boxes")}
    assert expected <= entities, expected - entities
    times, centers = rerun_column(rrd, "/world/objects", "PoseTranslation3D")
    _, quaternions = rerun_column(rrd, "/world/objects", "PoseRotationQuat")
    _, half_sizes = rerun_column(rrd, "/world/objects", "HalfSize3D")
    _, labels = rerun_column(rrd, "/world/objects", "Text")
    assert times == frame_times_ns
    for row, line in enumerate(lines):
        assert len(centers[row]) == len(line["boxes"])
        for i in (0, len(line["boxes"]) - 1):
            assert_box_matches((centers[row][i], quaternions[row][i], 2 * np.array(half_sizes[row][i])),
                               line["boxes"][i])
        assert labels[row][0] == f"{line['boxes'][0]['detection_name']} {line['boxes'][0]['detection_score']:.2f}"
    times, ego = rerun_column(rrd, "/world/ego", "Translation3D")
    assert times == frame_times_ns
    assert np.allclose(ego[0], np.array(lines[0]["ego_to_global"])[:3, 3], atol=1e-2)
    times, _ = rerun_column(rrd, "/world/ego/lidar", "Position3D")
    assert times == frame_times_ns
    latency_times, latencies = rerun_column(rrd, "/metrics/latency_ms", "Scalar")
    assert latency_times == frame_times_ns
    assert np.allclose(np.ravel(latencies), [line["latency_ms"] for line in lines], atol=1e-2)
    image_times, blobs = rerun_column(rrd, "/world/cameras/CAM_FRONT/image", "Blob")
    assert len(image_times) == 2 and set(image_times) <= camera_times_ns["CAM_FRONT"]  # the image's own time
    assert all(abs(t - f) <= 60e6 for t, f in zip(image_times, frame_times_ns))
    _, resolutions = rerun_column(rrd, "/world/cameras/CAM_FRONT", "Resolution")
    assert resolutions[0][0] == [256.0, 96.0]  # the model's input size (tiny_cpu image_size [96, 256])

    viewer_check = subprocess.run([str(Path(sys.executable).parent / "rerun"), "rrd", "verify", str(rrd)],
                                  capture_output=True, text=True, timeout=120)
    assert viewer_check.returncode == 0, viewer_check.stderr  # the viewer's own loader reads every chunk

    # MCAP: the Foxglove schemas, counts per topic, log times, the same boxes
    schemas = mcap_schemas(mcap_path)
    assert schemas["/LIDAR_TOP"] == "foxglove.PointCloud" and schemas["/RADAR"] == "foxglove.PointCloud"
    assert schemas["/objects"] == "foxglove.SceneUpdate" and schemas["/tf"] == "foxglove.FrameTransforms"
    assert schemas["/ego_trajectory"] == "foxglove.PosesInFrame" and schemas["/log"] == "foxglove.Log"
    assert schemas["/contributions"] == "foxglove.CompressedImage"
    assert schemas["/metrics"] == "fusion.replay.FrameMetrics"
    for name in CAMERA_NAMES:
        assert schemas[f"/{name}/image"] == "foxglove.CompressedImage"
        assert schemas[f"/{name}/calibration"] == "foxglove.CameraCalibration"
        assert schemas[f"/{name}/boxes"] == "foxglove.ImageAnnotations"
    messages = mcap_messages(mcap_path)
    counts = Counter(topic for topic, _, _ in messages)
    for topic in ("/LIDAR_TOP", "/RADAR", "/objects", "/ego_trajectory", "/contributions", "/log", "/metrics"):
        assert counts[topic] == 2, topic
    images_written = sum(counts[f"/{name}/image"] for name in CAMERA_NAMES)
    assert 2 <= images_written <= 2 * len(CAMERA_NAMES)  # a camera out of tolerance is missing from its frame
    for name in CAMERA_NAMES:
        assert counts[f"/{name}/calibration"] == counts[f"/{name}/boxes"] == counts[f"/{name}/image"]
    assert counts["/tf"] == 2 + images_written  # the ego per frame, each camera per image
    by_topic = {topic: [(t, m) for tp, t, m in messages if tp == topic] for topic in counts}
    assert [t for t, _ in by_topic["/objects"]] == frame_times_ns
    for (t, update), line in zip(by_topic["/objects"], lines):
        assert len(update.deletions) == 1 and len(update.entities) == len(line["boxes"])
        assert update.entities[0].timestamp.ToNanoseconds() == t
        cube = update.entities[0].cubes[0]
        position, orientation = cube.pose.position, cube.pose.orientation
        assert_box_matches(([position.x, position.y, position.z],
                            [orientation.x, orientation.y, orientation.z, orientation.w],
                            [cube.size.x, cube.size.y, cube.size.z]), line["boxes"][0])
        assert update.entities[0].frame_id == "global" and update.entities[0].texts[0].text.startswith(
            line["boxes"][0]["detection_name"])
    for (t, metrics), line in zip(by_topic["/metrics"], lines):
        assert metrics["latency_ms"] == line["latency_ms"] and metrics["timestamp_us"] * 1000 == t
    ego_transforms = [(t, m.transforms[0]) for t, m in by_topic["/tf"] if m.transforms[0].child_frame_id == "ego"]
    assert [t for t, _ in ego_transforms] == frame_times_ns
    first = ego_transforms[0][1].translation
    assert np.allclose([first.x, first.y, first.z], np.array(lines[0]["ego_to_global"])[:3, 3], atol=1e-6)
    images = by_topic["/CAM_FRONT/image"]
    assert [t for t, _ in images] == image_times  # the same sensor timestamps in both recordings
    assert images[0][1].format == "jpeg" and images[0][1].data == bytes(blobs[0][0])
    calibration = by_topic["/CAM_FRONT/calibration"][0][1]
    assert (calibration.width, calibration.height) == (256, 96) and calibration.frame_id == "CAM_FRONT"
    cloud = by_topic["/LIDAR_TOP"][0][1]
    assert [f.name for f in cloud.fields] == ["x", "y", "z", "intensity"] and cloud.frame_id == "ego"
    assert len(cloud.data) // cloud.point_stride == len(rerun_column(rrd, "/world/ego/lidar", "Position3D")[1][0])
    assert len(by_topic["/ego_trajectory"][1][1].poses) == 2


def test_cli_rejects_an_unwritable_recording_path(tiny, tiny_dataroot, tmp_path, capsys):
    model, _ = tiny
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 0}, checkpoint)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = replay_tool.main(["--dataroot", str(tiny_dataroot.dataroot), "--version", tiny_dataroot.version,
                             "--scene", tiny_dataroot.scene_names[0], "--checkpoint", str(checkpoint),
                             "--config", str(CONFIG), "--out", str(tmp_path / "o"), "--device", "cpu",
                             "--rerun", str(tmp_path / "fine.rrd"), "--mcap", str(blocker / "drive.mcap")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --mcap") and str(blocker / "drive.mcap") in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------------
# Tracks (the tracker's contract) and the detections fallback, through the sinks directly
# ----------------------------------------------------------------------------------------------------------------

def test_tracks_are_drawn_with_their_ids_and_frames_without_tracks_fall_back_to_detections(tiny, nusc,
                                                                                          tiny_dataroot, tmp_path):
    _, data = tiny
    engine = engine_for_scene(nusc, tiny_dataroot.scene_names[0], StubDetector(), data,
                              SyncPolicy(every_k_sweeps=10, lidar_sweeps=1, radar_sweeps=1), tracker=None)
    rrd, mcap_path = tmp_path / "t.rrd", tmp_path / "t.mcap"
    sinks = [RerunSink(rrd), McapSink(mcap_path)]
    frames = []
    for frame in engine.frames(max_frames=3):
        if frame.index < 2:  # the tracker's output (GLOBAL frame), as Part A's FrameResult.tracks carries it
            x, y = frame.ego_to_global[:2, 3]
            frame.tracks = [
                {"tracking_id": "7", "tracking_name": "car", "translation": [x + 5.0, y, 1.0],
                 "size": [1.9, 4.5, 1.6], "rotation": [np.cos(0.15), 0.0, 0.0, np.sin(0.15)],
                 "velocity": [3.0, 0.0], "tracking_score": 0.8, "age": frame.index + 1},
                {"tracking_id": "12", "tracking_name": "pedestrian", "translation": [x, y + 3.0, 0.9],
                 "size": [0.7, 0.8, 1.8], "rotation": [1.0, 0.0, 0.0, 0.0], "velocity": [0.0, 1.0],
                 "tracking_score": 0.6, "age": 1}]
        frames.append((frame.timestamp_us, getattr(frame, "tracks", [])))
        assert len(frame_boxes(frame)) == 2
        for sink in sinks:
            sink.append(frame)
    for sink in sinks:
        sink.close()
    assert len(frames) == 3 and not frames[2][1]

    times, labels = rerun_column(rrd, "/world/objects", "Text")
    _, centers = rerun_column(rrd, "/world/objects", "PoseTranslation3D")
    assert times == [t * 1000 for t, _ in frames]
    assert labels[0] == ["car #7", "pedestrian #12"] and labels[1] == labels[0]
    assert labels[2] == ["car 0.90", f"{DETECTION_CLASSES[7]} 0.60"]  # no tracks: the detections, with their scores
    assert np.allclose(centers[1][0], frames[1][1][0]["translation"], atol=1e-2)

    updates = [(t, m) for topic, t, m in mcap_messages(mcap_path) if topic == "/objects"]
    assert [t for t, _ in updates] == [t * 1000 for t, _ in frames]
    first = updates[0][1].entities
    assert [e.id for e in first] == ["7", "12"]
    metadata = {kv.key: kv.value for kv in first[0].metadata}
    assert metadata["tracking_id"] == "7" and metadata["class"] == "car" and metadata["age"] == "1"
    assert {kv.key: kv.value for kv in updates[1][1].entities[0].metadata}["age"] == "2"
    cube = first[0].cubes[0]
    assert np.allclose([cube.size.x, cube.size.y, cube.size.z], [4.5, 1.9, 1.6])
    assert np.isclose(cube.pose.orientation.z, np.sin(0.15)) and np.isclose(cube.pose.orientation.w, np.cos(0.15))
    assert [e.id for e in updates[2][1].entities] == ["detection-0", "detection-1"]
    assert all(len(m.deletions) == 1 for _, m in updates)  # each update replaces the previous frame's objects


def test_box_corners_and_projection_follow_the_box_pose():
    """A box's corners in the global frame: length along its heading, width across, height up."""
    yaw = 0.5
    box = RecordedBox(np.array([100.0, 50.0, 1.0]), np.array([2.0, 4.0, 1.5]),
                      np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]), np.zeros(2), "car", 0.5)
    corners = box.corners()
    front = corners[[0, 1, 4, 5]].mean(axis=0)
    assert np.allclose(front[:2], box.translation[:2] + 2.0 * np.array([np.cos(yaw), np.sin(yaw)]))
    assert np.isclose(np.linalg.norm(corners[0] - corners[1]), 2.0)  # the width, across the heading
    assert np.isclose(corners[4, 2] - corners[0, 2], 1.5) and np.allclose(corners.mean(axis=0), box.translation)
    assert box.label == "car 0.50" and box.color == (255, 158, 0)
    assert np.allclose(box_corners([box, box])[1], corners)


def test_projected_edges_agree_with_the_camera_pictures_projection():
    """Vectorised projection == fusion.visualization.project_to_image box by box; boxes behind the camera or
    outside the image are left out."""
    cam_to_ego = np.array([[0.0, 0.0, 1.0, 1.5], [-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 1.6], [0, 0, 0, 1]])
    view = CameraView("CAM_FRONT", 0, np.zeros((96, 256, 3), np.uint8),
                      np.array([[120.0, 0, 128], [0, 120.0, 48], [0, 0, 1]]), cam_to_ego)
    ego_to_global = make_transform(rotation_z(0.3), [400.0, 1100.0, 0.0])
    to_ego = np.linalg.inv(ego_to_global)

    def at(x_ego, y_ego):
        center = ego_to_global @ np.array([x_ego, y_ego, 1.0, 1.0])
        return RecordedBox(center[:3], np.array([1.9, 4.5, 1.6]), matrix_to_quaternion(rotation_z(0.8)),
                           np.zeros(2), "car", 0.9)

    boxes = [at(15.0, 2.0), at(-15.0, 0.0), at(12.0, 80.0), at(30.0, -4.0)]  # ahead, behind, far left, ahead
    corners = box_corners(boxes)
    edges = projected_edges(corners, view, to_ego)
    assert sorted(edges) == [0, 3]
    for index, segments in edges.items():
        corners_ego = corners[index] @ to_ego[:3, :3].T + to_ego[:3, 3]
        uv, in_front = project_to_image(corners_ego, cam_to_ego, view.intrinsics)
        assert in_front.all() and segments.shape == (12, 2, 2)
        assert np.allclose(segments[:, 0], uv[[a for a, _ in BOX_EDGES]])
        assert np.allclose(segments[:, 1], uv[[b for _, b in BOX_EDGES]])
