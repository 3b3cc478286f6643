"""A replay recorded for the rerun viewer (rerun-sdk): `RerunSink` streams each processed frame into an .rrd file.

Entities (frames: "world" is the nuScenes GLOBAL frame, z up; meters):
    world/ego                       Transform3D ego -> global at the LiDAR sweep
    world/ego/lidar, world/ego/radar  Points3D in the ego frame (the model's input: previous sweeps included,
                                    ego motion compensated to the sweep); LiDAR coloured by height, radar red
    world/objects                   Boxes3D in the global frame: tracks labelled "class #ID", else detections
                                    labelled "class score"; class colours, class_ids = DETECTION_CLASSES index
    world/ego_trajectory            LineStrips3D, the ego positions so far (the last `trajectory_points`)
    world/cameras/CAM_*             Transform3D camera -> global and Pinhole (intrinsics, resolution), at the
                                    camera's own timestamp; .../image the JPEG the model saw; .../boxes the
                                    objects projected into it (LineStrips2D)
    contributions                   the fuser's per-sensor contribution map (an image, forward up)
    metrics/*                       Scalars: latency_ms, processing_ms, objects; log: a TextLog line per frame

Timelines: "sensor_time" (the sensor timestamps: the LiDAR sweep's for the frame, each camera's own for its image)
and "frame" (the processed frame's index). Nothing is kept in memory beyond the trajectory: the stream is written
to the file as it goes.

rerun-sdk 0.23 with numpy 1.x: rerun's own datatype objects (rr.Quaternion, AnnotationContext's ClassDescription...)
call numpy 2's asarray(copy=...) and are silently dropped with a RerunWarning; everything here is passed as plain
numpy arrays, which work.
"""
from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path

import numpy as np
import rerun as rr

from fusion.geometry import matrix_to_quaternion
from fusion.replay.recorded_frame import (RecordedBox, box_corners, camera_to_global, camera_views, encode_image, frame_boxes,
                                          global_to_ego, projected_edges, xyzw)
from fusion.visualization import _height_colors, render_contributions

TIMELINE = "sensor_time"
RADAR_COLOR = (255, 60, 60)


def _pose(transform: np.ndarray):
    """A rerun Transform3D of a [4, 4] child -> parent transform (m)."""
    quaternion = xyzw(matrix_to_quaternion(transform[:3, :3])).astype(np.float32)
    return rr.Transform3D(translation=transform[:3, 3], quaternion=quaternion)


class RerunSink:
    """Writes a replay as a rerun recording at `path`, one `append(frame)` per processed FrameResult; `close()`
    finishes the file. application_id names the recording in the viewer."""

    name = "rerun"

    def __init__(self, path: str | os.PathLike, application_id: str = "fusion_replay",
                 trajectory_points: int = 2000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = rr.RecordingStream(application_id)
        self.stream.save(str(self.path))
        self.trajectory: deque[np.ndarray] = deque(maxlen=trajectory_points)
        self.camera_names: set[str] = set()  # cameras logged so far
        self.frames = 0
        self.closed = False
        self.stream.log("world", rr.ViewCoordinates.RIGHT_HAND_Z_UP, static=True)

    def _at(self, timestamp_us: int, frame_index: int) -> None:
        self.stream.set_time(TIMELINE, timestamp=np.datetime64(int(timestamp_us), "us"))
        self.stream.set_time("frame", sequence=frame_index)

    def append(self, frame) -> None:
        """Log one FrameResult (see the module docstring for what goes where)."""
        log = self.stream.log
        self._at(frame.timestamp_us, frame.index)
        ego_to_global = np.asarray(frame.ego_to_global, dtype=np.float64)
        log("world/ego", _pose(ego_to_global))
        sample = frame.sample
        if sample.lidar is not None and len(sample.lidar):
            points = sample.lidar[:, :3].detach().cpu().numpy()
            log("world/ego/lidar", rr.Points3D(points, colors=_height_colors(points[:, 2]), radii=0.05))
        else:
            log("world/ego/lidar", rr.Clear(recursive=False))
        if sample.radar is not None and len(sample.radar):
            log("world/ego/radar", rr.Points3D(sample.radar[:, :3].detach().cpu().numpy(), colors=RADAR_COLOR,
                                               radii=0.3))
        else:
            log("world/ego/radar", rr.Clear(recursive=False))
        boxes = frame_boxes(frame)
        log("world/objects", self._boxes(boxes))
        self.trajectory.append(ego_to_global[:3, 3].copy())
        log("world/ego_trajectory", rr.LineStrips3D([np.stack(self.trajectory)], colors=(255, 255, 255),
                                                    radii=0.15))
        if frame.contributions is not None:
            picture = render_contributions(frame.contributions, frame.contribution_modalities, cell_pixels=4)
            log("contributions", rr.EncodedImage(contents=encode_image(np.asarray(picture), "png"),
                                                 media_type="image/png"))
        log("metrics/latency_ms", rr.Scalars(frame.latency_ms))
        log("metrics/processing_ms", rr.Scalars(frame.processing_ms))
        log("metrics/objects", rr.Scalars(len(boxes)))
        record = {"frame": frame.index, "latency_ms": round(frame.latency_ms, 3), "late": frame.late,
                  "objects": len(boxes), "sensors_missing": frame.sensors_missing}
        level = rr.TextLogLevel.WARN if frame.late or frame.sensors_missing else rr.TextLogLevel.INFO
        log("log", rr.TextLog(json.dumps(record), level=level))
        self._cameras(frame, boxes)
        self.frames += 1

    def _boxes(self, boxes: list[RecordedBox]):
        if not boxes:
            return rr.Boxes3D(centers=np.zeros((0, 3), np.float32), half_sizes=np.zeros((0, 3), np.float32))
        length_width_height = np.stack([b.size_wlh[[1, 0, 2]] for b in boxes])
        return rr.Boxes3D(
            centers=np.stack([b.translation for b in boxes]).astype(np.float32),
            half_sizes=(length_width_height / 2.0).astype(np.float32),
            quaternions=np.stack([xyzw(b.rotation_wxyz) for b in boxes]).astype(np.float32),
            colors=np.array([b.color for b in boxes], dtype=np.uint8),
            class_ids=np.array([max(b.class_id, 0) for b in boxes], dtype=np.uint16),
            labels=[b.label for b in boxes])

    def _cameras(self, frame, boxes: list[RecordedBox]) -> None:
        log = self.stream.log
        to_ego, corners = global_to_ego(frame), box_corners(boxes)
        seen = set()
        for view in camera_views(frame):
            seen.add(view.name)
            self._at(view.timestamp_us, frame.index)
            path = f"world/cameras/{view.name}"
            log(path, _pose(camera_to_global(frame, view)))
            log(path, rr.Pinhole(image_from_camera=view.intrinsics.astype(np.float32), resolution=view.size))
            log(f"{path}/image", rr.EncodedImage(contents=encode_image(view.image), media_type="image/jpeg"))
            segments, colors, labels = [], [], []
            for index, edges in projected_edges(corners, view, to_ego).items():
                segments.extend(edges.astype(np.float32))
                colors.extend([boxes[index].color] * len(edges))
                labels.extend([boxes[index].label] + [""] * (len(edges) - 1))
            log(f"{path}/boxes", rr.LineStrips2D(np.stack(segments), colors=np.array(colors, dtype=np.uint8),
                                                 labels=labels) if segments else rr.Clear(recursive=False))
        self.camera_names |= seen
        missing = sorted(self.camera_names - seen)
        if missing:
            self._at(frame.timestamp_us, frame.index)
            for name in missing:  # a missing image must not leave the previous one on screen
                log(f"world/cameras/{name}", rr.Clear(recursive=True))

    def close(self) -> None:
        """Flush and finish the .rrd file."""
        if not self.closed:
            self.stream.flush(blocking=True)
            self.stream.disconnect()
            self.closed = True
