"""Knobs of the synthetic nuScenes-format drive generator.

`SyntheticConfig()` is the project's embedded default data set (10 scenes of 13 s, 640x360 images);
`SyntheticConfig.tiny()` is the few-second, low-resolution variant the tests use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

#: Scenes the devkit's NuScenesCanBus refuses (no CAN data) or warns about (route misaligned).
CAN_BLACKLIST = frozenset([161, 162, 163, 164, 165, 166, 167, 168, 170, 171, 172, 173, 174, 175, 176,
                           309, 310, 311, 312, 313, 314])
ROUTE_BLACKLIST = frozenset([
    71, 73, 74, 75, 76, 85, 100, 101, 106, 107, 108, 109, 110, 112, 113, 114, 115, 116, 117, 118, 119,
    261, 262, 263, 264, 276, 302, 303, 304, 305, 306, 334, 388, 389, 390, 436, 499, 500, 501, 502, 504,
    505, 506, 507, 508, 509, 510, 511, 512, 513, 514, 515, 517, 518, 547, 548, 549, 550, 551, 556, 557,
    558, 559, 560, 561, 562, 563, 564, 565, 730, 731, 733, 734, 735, 736, 737, 738, 778, 780, 781, 782,
    783, 784, 904, 905, 1073, 1074])


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that shapes a generated dataroot. Same config + same seed -> byte-identical output.

    Times in seconds, rates in Hz, sizes in pixels, distances in meters.
    """

    scenes: int = 10
    seed: int = 0
    version: str = "v1.0-synth"
    scene_seconds: float = 13.0
    image_width: int = 640
    image_height: int = 360
    #: LiDAR rays per beam and revolution (32 beams); 720 (0.5 deg) gives ~20k returns per sweep in town.
    lidar_azimuth_steps: int = 720
    lidar_max_range: float = 90.0
    #: Fraction of scenes put in the validation split (at least one when there are two scenes or more).
    val_fraction: float = 0.2
    train_split: str = "synth_train"
    val_split: str = "synth_val"
    #: Scene indices (0-based) written without any CAN bus file. None: scene min(2, scenes - 1).
    no_can_scenes: tuple[int, ...] | None = None
    #: Scale of the number of objects around the route (1.0 = a busy nuScenes-like street).
    object_density: float = 1.0
    #: Number of the first scene (names are scene-%04d); blacklisted CAN-bus numbers are skipped.
    first_scene_number: int = 2001
    jpeg_quality: int = 88
    #: Worker processes (one scene each at a time). 0: os.cpu_count().
    workers: int = 0
    lidar_hz: float = 20.0
    camera_hz: float = 12.0
    radar_hz: float = 13.0
    keyframe_hz: float = 2.0
    #: Annotate objects whose center is within this distance of the ego (x-y plane).
    annotation_range: float = 70.0

    def __post_init__(self):
        checks = {
            "scenes": self.scenes >= 1,
            "scene_seconds": self.scene_seconds >= 1.0,
            "image_width": self.image_width >= 64,
            "image_height": self.image_height >= 36,
            "lidar_azimuth_steps": self.lidar_azimuth_steps >= 90,
            "val_fraction": 0.0 <= self.val_fraction < 1.0,
            "jpeg_quality": 10 <= self.jpeg_quality <= 100,
            "workers": self.workers >= 0,
            "object_density": self.object_density >= 0.0,
            "first_scene_number": 1 <= self.first_scene_number,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"SyntheticConfig.{name}={getattr(self, name)!r} is out of range")
        if self.lidar_hz != 20.0 or self.keyframe_hz != 2.0:
            raise ValueError("SyntheticConfig: lidar_hz must be 20 and keyframe_hz 2 (nuScenes keyframes are every "
                             "10th LiDAR sweep)")
        if self.train_split == self.val_split:
            raise ValueError("SyntheticConfig: train_split and val_split must differ")
        if self.scene_numbers()[-1] > 9999:
            raise ValueError("SyntheticConfig: scene numbers must stay below 10000 (names are scene-%04d)")
        for index in self.resolved_no_can_scenes():
            if not 0 <= index < self.scenes:
                raise ValueError(f"SyntheticConfig.no_can_scenes: index {index} is not a scene index "
                                 f"(0..{self.scenes - 1})")

    @staticmethod
    def tiny(seed: int = 0, **overrides) -> "SyntheticConfig":
        """Two short scenes with small images and a coarse LiDAR: a complete dataroot in a few seconds."""
        base = SyntheticConfig(scenes=2, seed=seed, scene_seconds=3.0, image_width=320, image_height=180,
                               lidar_azimuth_steps=360, val_fraction=0.5, object_density=0.8)
        return replace(base, **overrides)

    def scene_numbers(self) -> list[int]:
        numbers, n = [], self.first_scene_number
        while len(numbers) < self.scenes:
            if n not in CAN_BLACKLIST and n not in ROUTE_BLACKLIST:
                numbers.append(n)
            n += 1
        return numbers

    def scene_names(self) -> list[str]:
        return [f"scene-{n:04d}" for n in self.scene_numbers()]

    def val_scene_indices(self) -> list[int]:
        """The last round(scenes * val_fraction) scenes (at least one if there are two scenes or more)."""
        if self.scenes < 2 or self.val_fraction == 0.0:
            return []
        n_val = min(self.scenes - 1, max(1, round(self.scenes * self.val_fraction)))
        return list(range(self.scenes - n_val, self.scenes))

    def resolved_no_can_scenes(self) -> tuple[int, ...]:
        if self.no_can_scenes is None:
            return (min(2, self.scenes - 1),)
        return tuple(self.no_can_scenes)

    def resolved_workers(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)


@dataclass(frozen=True)
class DatarootInfo:
    """What `generate_dataroot` wrote. The first four fields are the `tiny_dataroot` fixture's contract."""

    dataroot: Path
    version: str
    train_split: str
    val_split: str
    scene_names: tuple[str, ...] = ()
    train_scenes: tuple[str, ...] = ()
    val_scenes: tuple[str, ...] = ()
    scenes_without_can: tuple[str, ...] = ()
    num_samples: int = 0
    num_annotations: int = 0
    seed: int = 0
    config: SyntheticConfig = field(default_factory=SyntheticConfig)
