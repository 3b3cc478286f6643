"""Replay sinks: what a replay writes as it goes: detections as JSON Lines (global frame), BEV pictures (PNG every
k-th frame), a video of the drive (MP4, or GIF written frame by frame in constant memory) and the summary JSON.

`run_replay` drives an engine and feeds every processed frame to the sinks; the summary is written at the end, also
when the replay fails. Recordings for viewers (fusion.replay.rerun_sink, fusion.replay.mcap_sink) are `Recorder`s
passed to run_replay; the time they take is outside the frames' latency and reported as summary["recording_s"].
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np
from PIL import GifImagePlugin, Image

from fusion.evaluation.submission import boxes_to_submission
from fusion.geometry import invert_transform
from fusion.grid import BEVGrid
from fusion.replay.engine import FrameResult, ReplayEngine
from fusion.replay.policy import NOMINAL_SWEEP_INTERVAL_US
from fusion.visualization import render_bev, render_contributions, side_by_side


def frame_record(frame: FrameResult) -> dict:
    """The JSON Lines record of a frame: timestamp, tokens, latency, sensors, and the boxes in the GLOBAL frame
    (fusion.evaluation.submission.boxes_to_submission: translation m, size (w, l, h) m, rotation (w, x, y, z), velocity
    (vx, vy) m/s in global axes, detection_name, detection_score, attribute_name), and the tracks reported at the
    frame, also GLOBAL (tracking_id, tracking_name, translation, size, rotation, velocity, tracking_score, age in
    frames; fusion.tracking.Track.to_dict)."""
    boxes = boxes_to_submission(frame.token, frame.boxes, frame.ego_to_global)
    for box in boxes:
        box.pop("sample_token", None)
    return {
        "frame": frame.index,
        "timestamp_us": frame.timestamp_us,
        "lidar_token": frame.token,
        "sample_token": frame.sample_token,
        "scene": frame.scene_name,
        "latency_ms": round(frame.latency_ms, 3),
        "processing_ms": round(frame.processing_ms, 3),
        "late": frame.late,
        "sensors_used": frame.sensors_used,
        "sensors_missing": frame.sensors_missing,
        "ego_to_global": frame.ego_to_global.tolist(),
        "boxes": boxes,
        "tracks": list(frame.tracks),
    }


def render_frame(frame: FrameResult, grid: BEVGrid, trajectory_global: Sequence[np.ndarray] = (),
                 contributions: bool = True, pixels_per_meter: float = 5.0, start_us: int | None = None
                 ) -> Image.Image:
    """BEV picture of a frame (LiDAR, radar with velocities, map, predicted boxes, the ego's trajectory so far in
    the frame's ego frame), with the fuser's contribution map beside it when available. trajectory_global: ego
    positions [3] in the global frame, meters; start_us: the drive's start, for the time in the title."""
    trajectory = None
    if len(trajectory_global):
        positions = np.stack(list(trajectory_global))
        to_ego = invert_transform(frame.ego_to_global)
        trajectory = positions @ to_ego[:3, :3].T + to_ego[:3, 3]
    sample = frame.sample
    seconds = (frame.timestamp_us - (start_us if start_us is not None else frame.timestamp_us)) * 1e-6
    title = (f"{frame.scene_name}  t={seconds:.2f}s  frame {frame.index}  {len(frame.boxes)} boxes  "
             f"{frame.latency_ms:.0f} ms{'  LATE' if frame.late else ''}")
    bev = render_bev(grid, lidar=sample.lidar, radar=sample.radar, boxes=frame.boxes, map_raster=sample.map_raster,
                     trajectory=trajectory, pixels_per_meter=pixels_per_meter, title=title)
    if contributions and frame.contributions is not None:
        picture = render_contributions(frame.contributions, frame.contribution_modalities,
                                       cell_pixels=max(1, round(bev.height / frame.contributions.shape[-2])))
        bev = side_by_side(bev, picture)
    return bev


class GifStreamWriter:
    """An animated GIF written frame by frame (constant memory): the first frame's palette is the global colour
    table, every frame carries its own local palette (PIL's GifImagePlugin getheader / getdata)."""

    def __init__(self, path: str | os.PathLike, fps: float):
        self.path = Path(path)
        self.duration_ms = max(20, int(round(1000.0 / fps)))
        self.file = open(self.path, "wb")
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def append(self, image: Image.Image) -> None:
        frame = image.convert("RGB")
        if self.size is None:
            self.size = frame.size
        elif frame.size != self.size:
            frame = frame.resize(self.size, Image.BILINEAR)
        paletted = frame.quantize(colors=256)
        if self.frames == 0:
            header, _ = GifImagePlugin.getheader(paletted, info={"loop": 0, "duration": self.duration_ms})
            self.file.write(b"".join(header))
        self.file.write(b"".join(GifImagePlugin.getdata(paletted, duration=self.duration_ms,
                                                        include_color_table=True)))
        self.frames += 1

    def close(self) -> None:
        if not self.file.closed:
            self.file.write(b";")
            self.file.close()


class VideoSink:
    """The drive as a video, written incrementally: MP4 (H.264 through imageio-ffmpeg) or GIF. When the MP4 writer
    fails (no ffmpeg, codec error), the frames from then on go to a GIF next to it (`error` says so, and where the
    MP4's earlier frames are). `path` is where the video ended up; `frames` how many frames it has."""

    def __init__(self, out_stem: str | os.PathLike, kind: str, fps: float, log: Callable[[str], None] = print):
        if kind not in ("mp4", "gif"):
            raise ValueError(f"video kind must be 'mp4' or 'gif', got {kind!r}")
        self.stem, self.kind, self.fps, self.log = Path(out_stem), kind, fps, log
        self.path: Path | None = None
        self.frames = 0
        self.error = ""
        self._writer = None

    def _open_gif(self) -> None:
        self.kind, self.path = "gif", self.stem.with_suffix(".gif")
        self._writer = GifStreamWriter(self.path, self.fps)

    def append(self, image: Image.Image) -> None:
        array = np.asarray(image.convert("RGB"))
        if self.kind == "mp4":
            height, width = array.shape[:2]
            array = np.pad(array, ((0, height % 2), (0, width % 2), (0, 0)))  # H.264 (yuv420p) wants even sizes
            try:
                if self._writer is None:
                    import imageio.v2 as imageio
                    self.path = self.stem.with_suffix(".mp4")
                    self._writer = imageio.get_writer(self.path, format="FFMPEG", mode="I", fps=self.fps,
                                                      codec="libx264", macro_block_size=1, quality=7,
                                                      ffmpeg_log_level="error")
                self._writer.append_data(array)
                self.frames += 1
                return
            except Exception as error:  # imageio-ffmpeg raises RuntimeError/OSError/BrokenPipeError, etc.
                mp4, written = self.path, self.frames
                self._close_writer()
                if written == 0 and mp4 is not None and mp4.exists():
                    mp4.unlink()
                kept = f" (its first {written} frames kept in {mp4})" if written else ""
                self.error = f"MP4 writing failed ({error}){kept}; writing the frames from here on to a GIF"
                self.log(self.error)
                self.frames = 0
                self._open_gif()
        if self._writer is None:
            self._open_gif()
        self._writer.append(Image.fromarray(array))
        self.frames += 1

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception as error:  # a failed ffmpeg pipe can fail again on close
                self.error = self.error or f"closing the video failed: {error}"

    def close(self) -> None:
        self._close_writer()


class Recorder(Protocol):
    """A recording written frame by frame (e.g. fusion.replay.rerun_sink.RerunSink, fusion.replay.mcap_sink.McapSink):
    `name` keys its summary entries, `path` is its file; append(frame) takes each processed FrameResult, close()
    finishes the file."""

    name: str
    path: Path

    def append(self, frame: FrameResult) -> None: ...

    def close(self) -> None: ...


@dataclass
class ReplayOutputs:
    """Where a replay wrote its outputs (None where disabled)."""

    out_dir: Path
    detections: Path
    summary: Path
    frames_dir: Path | None = None
    video: Path | None = None
    recordings: dict[str, Path] | None = None


def run_replay(engine: ReplayEngine, out_dir: str | os.PathLike, grid: BEVGrid, *, max_frames: int | None = None,
               video: str = "mp4", png_every: int = 1, video_fps: float | None = None, contributions: bool = True,
               extra_summary: Mapping | None = None, on_frame: Callable[[FrameResult], None] | None = None,
               log: Callable[[str], None] = print, recorders: Sequence[Recorder] = ()) -> tuple[dict, ReplayOutputs]:
    """Run `engine` and write its sinks into `out_dir`: detections.jsonl (one line per processed frame, flushed as
    it goes), summary.json (written at the end, also when the replay fails), frames/frame_NNNNNN.png every
    `png_every` processed frames (0: none), and replay.mp4 / replay.gif (video "mp4" | "gif" | "none") of every
    processed frame. Each of `recorders` gets every processed frame after the model has run on it (outside its
    latency); their wall time, closing included, goes to summary["recording_s"][name] and their files to
    summary["recordings"]. on_frame(frame) is called for each processed frame after its sinks. Returns (summary,
    outputs)."""
    if video not in ("mp4", "gif", "none"):
        raise ValueError(f"video must be 'mp4', 'gif' or 'none', got {video!r}")
    if png_every < 0:
        raise ValueError(f"png_every must be >= 0, got {png_every}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs = ReplayOutputs(out, out / "detections.jsonl", out / "summary.json")
    if png_every:
        outputs.frames_dir = out / "frames"
        outputs.frames_dir.mkdir(exist_ok=True)
        for stale in outputs.frames_dir.glob("frame_*.png"):  # a previous replay's pictures
            stale.unlink()
    fps = video_fps or max(1.0, 1e6 / (NOMINAL_SWEEP_INTERVAL_US * engine.policy.every_k_sweeps))
    sink = VideoSink(out / "replay", video, fps, log) if video != "none" else None
    completed, error_text = False, ""
    recording_s = {recorder.name: 0.0 for recorder in recorders}
    try:
        with open(outputs.detections, "w") as detections:
            for frame in engine.frames(max_frames):
                detections.write(json.dumps(frame_record(frame)) + "\n")
                detections.flush()
                need_png = png_every and frame.index % png_every == 0
                if need_png or sink is not None:
                    picture = render_frame(frame, grid, engine.trajectory, contributions,
                                           start_us=engine.stream_span_us[0])
                    if need_png:
                        picture.save(outputs.frames_dir / f"frame_{frame.index:06d}.png")
                    if sink is not None:
                        sink.append(picture)
                for recorder in recorders:
                    started = time.perf_counter()
                    recorder.append(frame)
                    recording_s[recorder.name] += time.perf_counter() - started
                if on_frame is not None:
                    on_frame(frame)
        completed = True
    except BaseException as error:
        error_text = f"{type(error).__name__}: {error}"
        raise
    finally:
        if sink is not None:
            sink.close()
            outputs.video = sink.path
        close_errors = {}
        for recorder in recorders:
            started = time.perf_counter()
            try:
                recorder.close()
            except Exception as error:  # reported in the summary, raised below unless the replay failed already
                close_errors[recorder.name] = f"{type(error).__name__}: {error}"
            recording_s[recorder.name] += time.perf_counter() - started
        if recorders:
            outputs.recordings = {recorder.name: Path(recorder.path) for recorder in recorders}
        summary = engine.summary()
        summary.update(dict(extra_summary or {}))
        summary["completed"] = completed
        if error_text:
            summary["error"] = error_text
        summary["video"] = {"path": str(outputs.video) if outputs.video else None,
                            "frames": sink.frames if sink is not None else 0,
                            "kind": sink.kind if sink is not None else "none",
                            "error": sink.error if sink is not None else ""}
        summary["outputs"] = {"detections": str(outputs.detections), "summary": str(outputs.summary),
                              "frames_dir": str(outputs.frames_dir) if outputs.frames_dir else None,
                              "video": str(outputs.video) if outputs.video else None}
        if recorders:
            summary["recordings"] = {name: str(path) for name, path in outputs.recordings.items()}
            summary["recording_s"] = {name: round(seconds, 3) for name, seconds in recording_s.items()}
            if close_errors:
                summary["recording_errors"] = close_errors
        temporary = outputs.summary.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(temporary, outputs.summary)
    if close_errors:
        raise RuntimeError(f"finishing the recordings failed: {close_errors}")
    return summary, outputs
