"""A replay recorded for Foxglove: `McapSink` streams each processed frame into an MCAP file of Foxglove-schema
protobuf messages (mcap, mcap-protobuf-support, foxglove-schemas-protobuf; no ROS).

Topics (frame ids: "global" the nuScenes global frame, "ego" the ego frame at the LiDAR sweep, "CAM_*" a camera
frame, x right, y down, z forward; meters):
    /tf                      foxglove.FrameTransforms: global -> ego at the sweep; ego -> CAM_* at each image's time
    /LIDAR_TOP, /RADAR       foxglove.PointCloud in "ego" (the model's input: previous sweeps included, ego motion
                             compensated); LiDAR fields x, y, z, intensity; radar x, y, z, rcs, vx, vy (m/s, ego)
    /objects                 foxglove.SceneUpdate in "global": one cube (+ label) per track, id = tracking ID (or per
                             detection when the frame has no tracks), metadata: class, score, velocity, age; each
                             update first deletes the previous frame's entities
    /ego_trajectory          foxglove.PosesInFrame in "global": the ego poses so far (the last `trajectory_points`)
    /CAM_*/image             foxglove.CompressedImage (JPEG, the model's input) at the camera's own timestamp
    /CAM_*/calibration       foxglove.CameraCalibration (K, P; no distortion: the images are rectified)
    /CAM_*/boxes             foxglove.ImageAnnotations: the objects projected into the image (line lists)
    /contributions           foxglove.CompressedImage (PNG): the fuser's per-sensor contribution map
    /log                     foxglove.Log: one line per frame (WARNING when late or a sensor is missing)
    /metrics                 JSON (jsonschema): frame, latency_ms, processing_ms, objects, late, sensors_missing,
                             so that Foxglove's Plot panel can plot /metrics.latency_ms

Every message's log time and publish time is its sensor timestamp (ns). Written chunk by chunk (zstd); nothing is
kept in memory beyond the trajectory and the current chunk.
"""
from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path

import numpy as np
from foxglove_schemas_protobuf.CameraCalibration_pb2 import CameraCalibration
from foxglove_schemas_protobuf.Color_pb2 import Color
from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage
from foxglove_schemas_protobuf.CubePrimitive_pb2 import CubePrimitive
from foxglove_schemas_protobuf.FrameTransform_pb2 import FrameTransform
from foxglove_schemas_protobuf.FrameTransforms_pb2 import FrameTransforms
from foxglove_schemas_protobuf.ImageAnnotations_pb2 import ImageAnnotations
from foxglove_schemas_protobuf.KeyValuePair_pb2 import KeyValuePair
from foxglove_schemas_protobuf.Log_pb2 import Log
from foxglove_schemas_protobuf.PackedElementField_pb2 import PackedElementField
from foxglove_schemas_protobuf.Point2_pb2 import Point2
from foxglove_schemas_protobuf.PointCloud_pb2 import PointCloud
from foxglove_schemas_protobuf.PointsAnnotation_pb2 import PointsAnnotation
from foxglove_schemas_protobuf.Pose_pb2 import Pose
from foxglove_schemas_protobuf.PosesInFrame_pb2 import PosesInFrame
from foxglove_schemas_protobuf.Quaternion_pb2 import Quaternion
from foxglove_schemas_protobuf.SceneEntity_pb2 import SceneEntity
from foxglove_schemas_protobuf.SceneEntityDeletion_pb2 import SceneEntityDeletion
from foxglove_schemas_protobuf.SceneUpdate_pb2 import SceneUpdate
from foxglove_schemas_protobuf.TextPrimitive_pb2 import TextPrimitive
from foxglove_schemas_protobuf.Vector3_pb2 import Vector3
from mcap.writer import CompressionType, Writer
from mcap_protobuf.schema import register_schema

from fusion.geometry import matrix_to_quaternion
from fusion.replay.recorded_frame import (RecordedBox, box_corners, camera_views, encode_image, frame_boxes, global_to_ego,
                                          projected_edges, xyzw)
from fusion.visualization import render_contributions

METRICS_SCHEMA = {
    "type": "object",
    "title": "fusion.replay.FrameMetrics",
    "properties": {
        "frame": {"type": "integer"}, "timestamp_us": {"type": "integer"}, "latency_ms": {"type": "number"},
        "processing_ms": {"type": "number"}, "objects": {"type": "integer"}, "late": {"type": "boolean"},
        "sensors_missing": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


class McapSink:
    """Writes a replay as an MCAP file at `path`, one `append(frame)` per processed FrameResult; `close()` writes
    the index and footer."""

    name = "mcap"

    def __init__(self, path: str | os.PathLike, trajectory_points: int = 2000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "wb")
        self.writer = Writer(self.file, compression=CompressionType.ZSTD)
        self.writer.start(profile="", library="fusion replay (mcap-protobuf-support)")
        self.channels: dict[str, int] = {}
        self.schemas: dict[str, int] = {}
        self.sequence: dict[str, int] = {}
        self.trajectory: deque[np.ndarray] = deque(maxlen=trajectory_points)
        self.frames = 0
        self.closed = False

    # -- writing -----------------------------------------------------------------------------------------------

    def _channel(self, topic: str, schema_name: str, schema_data: bytes | None = None, message_class=None) -> int:
        """The channel id of `topic`, registered with its schema on first use: a protobuf message class, or a
        JSON schema (schema_data) for JSON messages."""
        if topic not in self.channels:
            if schema_name not in self.schemas:
                if message_class is not None:
                    self.schemas[schema_name] = register_schema(self.writer, message_class)
                else:
                    self.schemas[schema_name] = self.writer.register_schema(schema_name, "jsonschema", schema_data)
            self.channels[topic] = self.writer.register_channel(
                topic, "protobuf" if message_class is not None else "json", self.schemas[schema_name])
        return self.channels[topic]

    def _write(self, topic: str, message, timestamp_us: int) -> None:
        channel = self._channel(topic, type(message).DESCRIPTOR.full_name, message_class=type(message))
        self._add(topic, channel, message.SerializeToString(), timestamp_us)

    def _write_json(self, topic: str, record: dict, timestamp_us: int) -> None:
        channel = self._channel(topic, METRICS_SCHEMA["title"], json.dumps(METRICS_SCHEMA).encode())
        self._add(topic, channel, json.dumps(record).encode(), timestamp_us)

    def _add(self, topic: str, channel: int, data: bytes, timestamp_us: int) -> None:
        sequence = self.sequence.get(topic, 0)
        self.sequence[topic] = sequence + 1
        nanoseconds = int(timestamp_us) * 1000
        self.writer.add_message(channel, log_time=nanoseconds, data=data, publish_time=nanoseconds,
                                sequence=sequence)

    # -- message builders --------------------------------------------------------------------------------------

    def _stamp(self, message, timestamp_us: int):
        message.timestamp.FromMicroseconds(int(timestamp_us))
        return message

    def _pose(self, translation, rotation_xyzw):
        x, y, z, w = (float(v) for v in rotation_xyzw)
        return Pose(position=Vector3(x=float(translation[0]), y=float(translation[1]),
                                                              z=float(translation[2])),
                               orientation=Quaternion(x=x, y=y, z=z, w=w))

    def _transform(self, parent: str, child: str, transform: np.ndarray, timestamp_us: int):
        x, y, z, w = xyzw(matrix_to_quaternion(transform[:3, :3]))
        message = FrameTransform(
            parent_frame_id=parent, child_frame_id=child,
            translation=Vector3(x=float(transform[0, 3]), y=float(transform[1, 3]),
                                              z=float(transform[2, 3])),
            rotation=Quaternion(x=float(x), y=float(y), z=float(z), w=float(w)))
        return self._stamp(message, timestamp_us)

    def _point_cloud(self, points: np.ndarray, fields: tuple[str, ...], timestamp_us: int):
        float32 = PackedElementField.NumericType.FLOAT32
        data = np.ascontiguousarray(points[:, :len(fields)], dtype=np.float32)
        message = PointCloud(
            frame_id="ego", pose=self._pose((0, 0, 0), (0, 0, 0, 1)), point_stride=4 * len(fields),
            fields=[PackedElementField(name=name, offset=4 * i, type=float32)
                    for i, name in enumerate(fields)],
            data=data.tobytes())
        return self._stamp(message, timestamp_us)

    def _color(self, rgb, alpha: float = 1.0):
        return Color(r=rgb[0] / 255.0, g=rgb[1] / 255.0, b=rgb[2] / 255.0, a=alpha)

    def _scene_update(self, boxes: list[RecordedBox], timestamp_us: int):
        deletion = self._stamp(SceneEntityDeletion(
            type=SceneEntityDeletion.Type.ALL), timestamp_us)
        entities = []
        for index, box in enumerate(boxes):
            width, length, height = (float(v) for v in box.size_wlh)
            metadata = {"class": box.class_name, "score": f"{box.score:.3f}",
                        "velocity": f"{box.velocity[0]:.2f}, {box.velocity[1]:.2f}"}
            if box.track_id is not None:
                metadata.update(tracking_id=box.track_id, age="" if box.age is None else str(box.age))
            label_position = np.asarray(box.translation, dtype=np.float64) + (0.0, 0.0, height / 2.0 + 0.5)
            entity = SceneEntity(
                frame_id="global", id=box.track_id if box.track_id is not None else f"detection-{index}",
                metadata=[KeyValuePair(key=k, value=v) for k, v in metadata.items()],
                cubes=[CubePrimitive(
                    pose=self._pose(box.translation, xyzw(box.rotation_wxyz)),
                    size=Vector3(x=length, y=width, z=height), color=self._color(box.color, 0.4))],
                texts=[TextPrimitive(
                    pose=self._pose(label_position, (0, 0, 0, 1)), billboard=True, font_size=14.0,
                    scale_invariant=True, color=self._color(box.color), text=box.label)])
            entities.append(self._stamp(entity, timestamp_us))
        return SceneUpdate(deletions=[deletion], entities=entities)

    # -- frames ------------------------------------------------------------------------------------------------

    def append(self, frame) -> None:
        """Write one FrameResult (see the module docstring for the topics)."""
        t = frame.timestamp_us
        ego_to_global = np.asarray(frame.ego_to_global, dtype=np.float64)
        self._write("/tf", FrameTransforms(
            transforms=[self._transform("global", "ego", ego_to_global, t)]), t)
        sample = frame.sample
        if sample.lidar is not None and len(sample.lidar):
            self._write("/LIDAR_TOP", self._point_cloud(sample.lidar.detach().cpu().numpy(),
                                                        ("x", "y", "z", "intensity"), t), t)
        if sample.radar is not None and len(sample.radar):
            self._write("/RADAR", self._point_cloud(sample.radar.detach().cpu().numpy(),
                                                    ("x", "y", "z", "rcs", "vx", "vy"), t), t)
        boxes = frame_boxes(frame)
        self._write("/objects", self._scene_update(boxes, t), t)
        self.trajectory.append(ego_to_global)
        self._write("/ego_trajectory", self._stamp(PosesInFrame(
            frame_id="global",
            poses=[self._pose(pose[:3, 3], xyzw(matrix_to_quaternion(pose[:3, :3]))) for pose in self.trajectory]),
            t), t)
        if frame.contributions is not None:
            picture = render_contributions(frame.contributions, frame.contribution_modalities, cell_pixels=4)
            self._write("/contributions", self._stamp(CompressedImage(
                frame_id="ego", data=encode_image(np.asarray(picture), "png"), format="png"), t), t)
        self._cameras(frame, boxes)
        record = {"frame": frame.index, "timestamp_us": int(t), "latency_ms": round(frame.latency_ms, 3),
                  "processing_ms": round(frame.processing_ms, 3), "objects": len(boxes), "late": bool(frame.late),
                  "sensors_missing": dict(frame.sensors_missing)}
        self._write_json("/metrics", record, t)
        level = Log.Level.WARNING if frame.late or frame.sensors_missing else Log.Level.INFO
        text = (f"frame {frame.index}: {len(boxes)} objects, latency {frame.latency_ms:.1f} ms"
                f"{', LATE' if frame.late else ''}"
                + (f", missing: {', '.join(sorted(frame.sensors_missing))}" if frame.sensors_missing else ""))
        self._write("/log", self._stamp(Log(level=level, message=text, name="replay"), t), t)
        self.frames += 1

    def _cameras(self, frame, boxes: list[RecordedBox]) -> None:
        to_ego, corners = global_to_ego(frame), box_corners(boxes)
        line_list = PointsAnnotation.Type.LINE_LIST
        for view in camera_views(frame):
            t, name = view.timestamp_us, view.name
            self._write("/tf", FrameTransforms(
                transforms=[self._transform("ego", name, view.cam_to_ego, t)]), t)
            width, height = view.size
            k = view.intrinsics
            projection = np.concatenate([k, np.zeros((3, 1))], axis=1)
            self._write(f"/{name}/calibration", self._stamp(CameraCalibration(
                frame_id=name, width=width, height=height, distortion_model="plumb_bob", D=[0.0] * 5,
                K=k.reshape(-1).tolist(), R=np.eye(3).reshape(-1).tolist(), P=projection.reshape(-1).tolist()), t), t)
            self._write(f"/{name}/image", self._stamp(CompressedImage(
                frame_id=name, data=encode_image(view.image), format="jpeg"), t), t)
            annotations = [self._stamp(PointsAnnotation(
                type=line_list, thickness=2.0, outline_color=self._color(boxes[index].color),
                points=[Point2(x=float(u), y=float(v)) for u, v in edges.reshape(-1, 2)]), t)
                for index, edges in projected_edges(corners, view, to_ego).items()]
            self._write(f"/{name}/boxes", self._stamp(ImageAnnotations(points=annotations), t), t)

    def close(self) -> None:
        """Write the MCAP index and footer, close the file."""
        if not self.closed:
            self.writer.finish()
            self.file.close()
            self.closed = True
