"""`FusionDataModule`: the nuScenes reader (fusion.datasets.nuscenes.NuScenesDataset) as a LightningDataModule.

Training samples get the global BEV augmentation (rotation, scaling, flips, translation; applied consistently to
every sensor and the boxes by fusion.datasets.transforms) and an optional random image resize/crop; every sample is
resized to the fixed model input `image_size` and filtered to the grid's point range. Sensors the model does not use
(`modalities`) are not decoded where the reader allows it and are removed from the samples, so an ablation does not
pay for them. Batches are collated by fusion.datasets.collate.collate_samples.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from fusion.datasets.collate import collate_samples
from fusion.datasets.nuscenes import NuScenesDataset
from fusion.datasets.sampling import class_balanced_sampler
from fusion.datasets.transforms import Compose, GlobalAugmentation, ImageResizeCrop, PointRangeFilter
from fusion.grid import BEVGrid
from fusion.types import CAMERA_NAMES, DETECTION_CLASSES, LIDAR_NAME, MODALITIES, RADAR_NAMES, Sample

#: Full resolution of nuScenes camera images (width, height); used to pick the JPEG decode size.
NUSCENES_IMAGE_SIZE = (1600, 900)


class KeepModalities:
    """Remove the sensors of modalities the model does not use from a Sample (recorded in Sample.missing), so that
    they are neither collated nor counted as present. The ego pose always stays (evaluation needs it)."""

    def __init__(self, modalities: Sequence[str]):
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; expected a subset of {MODALITIES}")
        self.modalities = tuple(modalities)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        if set(self.modalities) == set(MODALITIES):
            return sample
        missing = dict(sample.missing)
        changes = {}
        reason = "modality not used by the model"
        if "lidar" not in self.modalities and sample.lidar is not None:
            changes["lidar"] = None
            missing[LIDAR_NAME] = reason
        if "radar" not in self.modalities and sample.radar is not None:
            changes["radar"] = None
            missing.update({name: reason for name in RADAR_NAMES})
        if "camera" not in self.modalities and sample.cameras is not None:
            changes["cameras"] = None
            missing.update({name: reason for name in sample.cameras.names})
        if "gps" not in self.modalities:
            nan = torch.full_like(sample.ego.speed, float("nan"))
            changes["ego"] = replace(sample.ego, speed=nan, yaw_rate=nan.clone(),
                                     acceleration=torch.full_like(sample.ego.acceleration, float("nan")),
                                     can_valid=torch.zeros_like(sample.ego.can_valid))
            changes["map_raster"] = None
            missing.update({"CAN": reason, "MAP": reason})
        return replace(sample, missing=missing, **changes)


class FusionDataModule(pl.LightningDataModule):
    """Train / validation / test / predict data over a nuScenes-format dataroot.

    Args:
        dataroot / version: the dataroot and its table folder (default: the synthetic drives' "v1.0-synth").
        train_split / val_split / test_split: split names (devkit or <dataroot>/<version>/splits.json);
            test_split defaults to val_split. predict uses the val split.
        grid: the model's BEVGrid (the CLI links it from model.grid): map crop, point range, augmentation.
        modalities: sensors to read (the model's branches); others are skipped or removed from the samples.
        image_size: (height, width) of the model's camera input, pixels.
        cameras: camera channels to read, in order.
        lidar_sweeps / lidar_sweep_stride / radar_sweeps / radar_filters: passed to the reader (SampleBuilder).
        batch_size / val_batch_size / num_workers: DataLoader settings (val_batch_size defaults to batch_size).
        cache_dir: the reader's index cache (NPZ) folder; None keeps the index in memory.
        on_missing: the reader's policy for missing sensor files ("error" or "mark_missing").
        augment: training-time BEV augmentation; rotation_deg (uniform +-), scale_range, flip (x and y, each with
            probability 0.5), translation_std_m (normal, per axis x/y/z), image_resize_range (random image
            resize factor before the crop, None for none).
        drop_empty_boxes: the devkit's rule (boxes without LiDAR and radar points are not ground truth).
        supervision_modalities: sensors kept in the training samples as supervision only, not as model inputs
            (e.g. [lidar] for a camera-only model whose depth is supervised by LiDAR); the reader always reads the
            LiDAR keyframe sweep, and validation / test samples never keep them.
        class_balanced: draw training keyframes with class-balanced weights (fusion.datasets.sampling; CBGS-style)
            instead of shuffling.
    """

    def __init__(
        self,
        dataroot: str,
        version: str = "v1.0-synth",
        train_split: str = "synth_train",
        val_split: str = "synth_val",
        test_split: str | None = None,
        grid: BEVGrid | None = None,
        modalities: list[str] = list(MODALITIES),
        image_size: tuple[int, int] = (256, 704),
        cameras: list[str] = list(CAMERA_NAMES),
        lidar_sweeps: int = 9,
        lidar_sweep_stride: int = 1,
        radar_sweeps: int = 6,
        radar_filters: str = "default",
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        cache_dir: str | None = None,
        on_missing: Literal["error", "mark_missing"] = "mark_missing",
        augment: bool = True,
        rotation_deg: float = 22.5,
        scale_range: tuple[float, float] = (0.95, 1.05),
        flip: bool = True,
        translation_std_m: float = 0.2,
        image_resize_range: tuple[float, float] | None = (0.94, 1.06),
        drop_empty_boxes: bool = True,
        class_balanced: bool = False,
        supervision_modalities: list[str] = [],
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["grid"])
        if grid is not None and not isinstance(grid, BEVGrid):
            raise ValueError(f"FusionDataModule: grid must be a BEVGrid, got {type(grid).__name__}")
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ValueError(f"FusionDataModule: modalities must be a non-empty subset of {MODALITIES}, "
                             f"got {list(modalities)}")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"FusionDataModule: image_size must be (height, width) > 0, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"FusionDataModule: batch_size must be >= 1, got {batch_size}")
        self.dataroot, self.version = dataroot, version
        self.train_split, self.val_split = train_split, val_split
        self.test_split = test_split or val_split
        self.grid = grid if grid is not None else BEVGrid()
        self.modalities = tuple(modalities)
        self.image_size = tuple(image_size)
        self.cameras = tuple(cameras)
        self.lidar_sweeps, self.radar_sweeps, self.radar_filters = lidar_sweeps, radar_sweeps, radar_filters
        self.lidar_sweep_stride = lidar_sweep_stride
        self.class_balanced = class_balanced
        unknown = set(supervision_modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"FusionDataModule: supervision_modalities must be a subset of {MODALITIES}, "
                             f"got {list(supervision_modalities)}")
        self.supervision_modalities = tuple(m for m in supervision_modalities if m not in self.modalities)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.cache_dir, self.on_missing = cache_dir, on_missing
        self.augment = augment
        self.rotation_deg, self.scale_range, self.flip = rotation_deg, tuple(scale_range), flip
        self.translation_std_m = translation_std_m
        self.image_resize_range = tuple(image_resize_range) if image_resize_range else None
        self.drop_empty_boxes = drop_empty_boxes
        self.datasets: dict[str, NuScenesDataset] = {}

    # ---------------------------------------------------------------- transforms and datasets
    def transforms(self, train: bool) -> Compose:
        """The per-sample pipeline: drop unused sensors, (train) BEV augmentation, point-range filter, image
        resize/crop to image_size."""
        steps: list = [KeepModalities(self.modalities + (self.supervision_modalities if train else ()))]
        if train and self.augment:
            angle = math.radians(self.rotation_deg)
            steps.append(GlobalAugmentation(
                rotation_range=(-angle, angle), scale_range=self.scale_range,
                flip_x_prob=0.5 if self.flip else 0.0, flip_y_prob=0.5 if self.flip else 0.0,
                translation_std=(self.translation_std_m,) * 3, grid=self.grid))
        steps.append(PointRangeFilter(self.grid))
        if "camera" in self.modalities:
            height, width = self.image_size
            steps.append(ImageResizeCrop((width, height), self.image_resize_range if train and self.augment else None,
                                         crop_x="random" if train and self.augment and self.image_resize_range
                                         else "center"))
        return Compose(steps)

    def reader_options(self, train: bool = False) -> dict:
        """The SampleBuilder settings of this data (also accepted by NuScenesDataset): only the sensors of the model's
        modalities are read, JPEGs are decoded no larger than the model's input needs. Replay builds its
        SampleBuilder from these, so live and offline samples are made the same way."""
        use_cameras = "camera" in self.modalities
        height, width = self.image_size
        resize = ImageResizeCrop((width, height), self.image_resize_range if train and self.augment else None)
        return dict(
            grid=self.grid,
            lidar_sweeps=self.lidar_sweeps if "lidar" in self.modalities else 0,
            lidar_sweep_stride=self.lidar_sweep_stride,
            radar_sweeps=self.radar_sweeps if "radar" in self.modalities else 1,
            radar_filters=self.radar_filters,
            cameras=self.cameras if use_cameras else (),
            radars=RADAR_NAMES if "radar" in self.modalities else (),
            camera_decode_size=resize.decode_size(NUSCENES_IMAGE_SIZE) if use_cameras else None,
            on_missing=self.on_missing,
        )

    def make_dataset(self, split: str, train: bool, **reader_overrides) -> NuScenesDataset:
        """The dataset of a split with this data's reader settings and transforms; `reader_overrides` replace reader
        options (e.g. lidar_keep_rings=2 for LiDAR thinned to every other beam)."""
        return NuScenesDataset(
            self.dataroot, self.version, split,
            load_map="gps" in self.modalities,
            transforms=self.transforms(train),
            cache_dir=self.cache_dir,
            drop_empty_boxes=self.drop_empty_boxes,
            **{**self.reader_options(train), **reader_overrides},
        )

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": [("train", self.train_split, True), ("val", self.val_split, False)],
                  "validate": [("val", self.val_split, False)],
                  "test": [("test", self.test_split, False)],
                  "predict": [("predict", self.val_split, False)]}
        for key, split, train in wanted.get(stage, []) if stage else sum(wanted.values(), []):
            if key not in self.datasets:
                self.datasets[key] = self.make_dataset(split, train)

    # ---------------------------------------------------------------- loaders
    def _loader(self, key: str, shuffle: bool, batch_size: int) -> DataLoader:
        if key not in self.datasets:
            raise RuntimeError(f"FusionDataModule: call setup() before asking for the {key} loader")
        sampler = None
        if key == "train" and self.class_balanced:
            dataset = self.datasets[key]
            labels = [dataset.ground_truth(i).labels.numpy() for i in range(len(dataset))]
            sampler, shuffle = class_balanced_sampler(labels, len(DETECTION_CLASSES)), False
        return DataLoader(self.datasets[key], batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=self.num_workers,
                          collate_fn=collate_samples, persistent_workers=self.num_workers > 0,
                          drop_last=shuffle and len(self.datasets[key]) > batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.val_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", False, self.val_batch_size)
