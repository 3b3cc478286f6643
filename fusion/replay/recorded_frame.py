"""What the recordings of a replay (fusion.replay.rerun_sink, fusion.replay.mcap_sink) show of one processed frame:
its objects as boxes in the GLOBAL frame (the tracker's tracks with their IDs when the frame has them, else the
detections), the box corners and their projection into a camera, and the six camera views with their own sensor
timestamps. Both recorders draw the same things from these helpers.

Frames: "global" is the nuScenes global frame; "ego" is the ego frame at the frame's LiDAR sweep (x forward, y left,
z up); a camera frame is x right, y down, z forward. Meters, radians, seconds; timestamps in microseconds.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fusion.evaluation.submission import boxes_to_submission
from fusion.geometry import invert_transform
from fusion.types import DETECTION_CLASSES
from fusion.visualization import CLASS_COLORS

#: Corner pairs of a box's 12 edges, in the corner order of `RecordedBox.corners` (and of Boxes.corners).
BOX_EDGES: tuple[tuple[int, int], ...] = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4),
                                          (0, 4), (1, 5), (2, 6), (3, 7))
_CORNER_SIGNS = np.array([[1, 1, -1], [1, -1, -1], [-1, -1, -1], [-1, 1, -1],
                          [1, 1, 1], [1, -1, 1], [-1, -1, 1], [-1, 1, 1]], dtype=np.float64)


@dataclass(frozen=True)
class RecordedBox:
    """One object of a frame, in the GLOBAL frame.

    translation: [3] box centre, m. size_wlh: [3] (width, length along the heading, height), m (the devkit's wlh).
    rotation_wxyz: [4] unit quaternion (w, x, y, z), box -> global. velocity: [2] (vx, vy) m/s in global axes.
    class_name: a DETECTION_CLASSES name; score in [0, 1]. track_id / age (frames the track has lived): set when the
    box is a tracker's track, None for a plain detection.
    """

    translation: np.ndarray
    size_wlh: np.ndarray
    rotation_wxyz: np.ndarray
    velocity: np.ndarray
    class_name: str
    score: float
    track_id: str | None = None
    age: int | None = None

    @property
    def class_id(self) -> int:
        """Index of the class in DETECTION_CLASSES (-1 for an unknown name)."""
        return DETECTION_CLASSES.index(self.class_name) if self.class_name in DETECTION_CLASSES else -1

    @property
    def color(self) -> tuple[int, int, int]:
        """The class colour of the project's pictures (RGB)."""
        return CLASS_COLORS[self.class_id % len(CLASS_COLORS)] if self.class_id >= 0 else (200, 200, 200)

    @property
    def label(self) -> str:
        """"car #12" for a track, "car 0.87" (class and score) for a detection."""
        if self.track_id is not None:
            return f"{self.class_name} #{self.track_id}"
        return f"{self.class_name} {self.score:.2f}"

    def corners(self) -> np.ndarray:
        """[8, 3] corners in the GLOBAL frame, m (order of `box_corners`)."""
        return box_corners([self])[0]


def box_corners(boxes: list[RecordedBox]) -> np.ndarray:
    """[N, 8, 3] corners of `boxes` in the GLOBAL frame, m: per box the four bottom corners (front-left,
    front-right, rear-right, rear-left), then the same four on top."""
    if not boxes:
        return np.zeros((0, 8, 3))
    size = np.stack([b.size_wlh for b in boxes]).astype(np.float64)
    local = _CORNER_SIGNS[None] * (size[:, [1, 0, 2]] / 2.0)[:, None, :]  # (length, width, height) / 2
    q = np.stack([b.rotation_wxyz for b in boxes]).astype(np.float64)
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    rotation = np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], axis=-1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], axis=-1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=-1)], axis=1)
    translation = np.stack([b.translation for b in boxes]).astype(np.float64)
    return np.einsum("nij,nkj->nki", rotation, local) + translation[:, None, :]


def frame_boxes(frame) -> list[RecordedBox]:
    """The objects of a FrameResult in the GLOBAL frame: its tracks (`frame.tracks`: dicts with tracking_id,
    tracking_name, translation, size, rotation, velocity, tracking_score, age) when it has any, else its detections
    (fusion.evaluation.submission.boxes_to_submission of frame.boxes, without IDs)."""
    tracks = getattr(frame, "tracks", None) or []
    if tracks:
        return [RecordedBox(np.asarray(t["translation"], float), np.asarray(t["size"], float),
                            np.asarray(t["rotation"], float), np.asarray(t["velocity"], float)[:2],
                            str(t["tracking_name"]), float(t["tracking_score"]), str(t["tracking_id"]),
                            int(t["age"]) if t.get("age") is not None else None) for t in tracks]
    detections = boxes_to_submission(frame.token, frame.boxes, frame.ego_to_global)
    return [RecordedBox(np.asarray(d["translation"], float), np.asarray(d["size"], float),
                        np.asarray(d["rotation"], float), np.asarray(d["velocity"], float)[:2],
                        d["detection_name"], float(d["detection_score"])) for d in detections]


@dataclass(frozen=True)
class CameraView:
    """One camera of a frame as the model saw it.

    name: channel (e.g. "CAM_FRONT"); timestamp_us: the image's own sensor timestamp. image: [H, W, 3] uint8 RGB
    (the model's input resolution). intrinsics: [3, 3] pinhole matrix in pixels of `image`. cam_to_ego: [4, 4]
    camera frame -> ego frame at the frame's LiDAR sweep (ego motion to the sweep already compensated), m.
    """

    name: str
    timestamp_us: int
    image: np.ndarray
    intrinsics: np.ndarray
    cam_to_ego: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.image.shape[1], self.image.shape[0]


def camera_views(frame) -> list[CameraView]:
    """The valid cameras of a FrameResult (missing or corrupt ones are left out), each at its own timestamp
    (the frame's sweep timestamp plus the camera's time offset)."""
    cameras = frame.sample.cameras
    if cameras is None:
        return []
    images = cameras.images.detach().cpu().numpy()
    intrinsics = cameras.intrinsics.detach().cpu().double().numpy()
    cam_to_ego = cameras.cam_to_ego.detach().cpu().double().numpy()
    valid = cameras.valid.detach().cpu().numpy()
    offsets = cameras.time_offsets.detach().cpu().double().numpy()
    return [CameraView(name, frame.timestamp_us + int(round(offsets[i] * 1e6)),
                       np.ascontiguousarray(images[i].transpose(1, 2, 0)), intrinsics[i], cam_to_ego[i])
            for i, name in enumerate(cameras.names) if valid[i]]


def camera_to_global(frame, view: CameraView) -> np.ndarray:
    """[4, 4] camera frame -> GLOBAL frame of `view` (through the ego pose at the frame's sweep), m."""
    return np.asarray(frame.ego_to_global, dtype=np.float64) @ view.cam_to_ego


def projected_edges(corners_global: np.ndarray, view: CameraView, global_to_ego: np.ndarray
                    ) -> dict[int, np.ndarray]:
    """The edges of boxes projected into `view`: box index -> [12, 2, 2] pixel segments ((u, v) start, end), for
    the boxes wholly in front of the camera and overlapping the image (as fusion.visualization draws them).
    corners_global: [N, 8, 3] (`box_corners`); global_to_ego: [4, 4] inverse of the frame's ego pose."""
    if len(corners_global) == 0:
        return {}
    global_to_camera = invert_transform(view.cam_to_ego) @ global_to_ego
    camera = corners_global @ global_to_camera[:3, :3].T + global_to_camera[:3, 3]  # [N, 8, 3]
    depth = camera[..., 2]
    in_front = (depth > 0.1).all(axis=1)
    uvw = camera @ view.intrinsics.T
    uv = uvw[..., :2] / np.where(depth > 0.1, depth, 1.0)[..., None]
    width, height = view.size
    overlaps = ((uv[..., 0].max(axis=1) >= 0) & (uv[..., 0].min(axis=1) < width)
                & (uv[..., 1].max(axis=1) >= 0) & (uv[..., 1].min(axis=1) < height))
    starts, ends = [a for a, _ in BOX_EDGES], [b for _, b in BOX_EDGES]
    return {int(i): np.stack([uv[i, starts], uv[i, ends]], axis=1) for i in np.flatnonzero(in_front & overlaps)}


def global_to_ego(frame) -> np.ndarray:
    """[4, 4] GLOBAL -> ego frame at the frame's sweep."""
    return invert_transform(np.asarray(frame.ego_to_global, dtype=np.float64))


def encode_image(image: np.ndarray, kind: str = "jpeg", quality: int = 90) -> bytes:
    """[H, W, 3] uint8 RGB -> JPEG or PNG bytes."""
    buffer = io.BytesIO()
    picture = Image.fromarray(np.ascontiguousarray(image))
    if kind == "jpeg":
        picture.save(buffer, format="JPEG", quality=quality)
    else:
        picture.save(buffer, format="PNG")
    return buffer.getvalue()


def xyzw(rotation_wxyz) -> np.ndarray:
    """A (w, x, y, z) quaternion as [4] (x, y, z, w), the order rerun and Foxglove use."""
    w, x, y, z = np.asarray(rotation_wxyz, dtype=np.float64)
    return np.array([x, y, z, w])
