"""Detection metrics: the nuscenes-devkit's DetectionEval over a split (tables, splits, ground truth, the devkit run
from a file or in memory) and the Lightning callback that scores validation epochs with it.

- `run_detection_eval`: the devkit's DetectionEval with the detection_cvpr_2019 config (custom split names come from
  <dataroot>/<version>/splits.json); it writes metrics_summary.json (and the PDF curves) to its output folder.
- `NuScenesDetectionMetrics`: a Lightning callback that scores the validation predictions with the devkit (curves
  off) and logs val/NDS, val/mAP, the TP errors and val/samples, so ModelCheckpoint can keep the best by NDS.
Boxes are in the keyframe ego frame; the devkit sees them in the global frame (fusion.evaluation.submission).
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from fusion.evaluation.submission import default_attribute, make_submission, submission_meta
from fusion.types import MODALITIES, Boxes

if TYPE_CHECKING:  # the devkit is imported lazily: it is slow to import and only needed here
    from nuscenes import NuScenes

DETECTION_CONFIG = "detection_cvpr_2019"
TP_ERROR_NAMES = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE",
                  "attr_err": "mAAE"}


def load_nuscenes(dataroot: str | os.PathLike, version: str, verbose: bool = False) -> "NuScenes":
    """The devkit's NuScenes tables (fusion.datasets.nuscenes_tables.open_nuscenes); FileNotFoundError names the
    dataroot / version folder, ValueError tables the devkit cannot read; a missing map PNG is tolerated."""
    from fusion.datasets.nuscenes_tables import open_nuscenes

    return open_nuscenes(dataroot, version, verbose)


def split_sample_tokens(nusc: "NuScenes", split: str) -> list[str]:
    """Keyframe sample tokens of a split (a devkit split name, or one from <dataroot>/<version>/splits.json), in
    scene order then time order."""
    from nuscenes.utils.splits import get_scenes_of_split

    try:
        scene_names = set(get_scenes_of_split(split, nusc))
    except ValueError as error:
        raise ValueError(f"split {split!r} of {nusc.dataroot}/{nusc.version}: {error}") from error
    tokens = []
    for scene in nusc.scene:
        if scene["name"] not in scene_names:
            continue
        token = scene["first_sample_token"]
        while token:
            tokens.append(token)
            token = nusc.get("sample", token)["next"]
    if not tokens:
        raise ValueError(f"split {split!r} has no samples in {nusc.dataroot}/{nusc.version}")
    return tokens


def keyframe_ego_poses(nusc: "NuScenes", sample_tokens: Iterable[str]) -> dict[str, np.ndarray]:
    """token -> 4x4 ego_to_global (float64) at the sample's LIDAR_TOP keyframe (the frame of the model's Boxes)."""
    from fusion.geometry import pose_record_to_transform

    poses = {}
    for token in sample_tokens:
        lidar = nusc.get("sample_data", nusc.get("sample", token)["data"]["LIDAR_TOP"])
        poses[token] = pose_record_to_transform(nusc.get("ego_pose", lidar["ego_pose_token"]))
    return poses


def ground_truth_boxes(nusc: "NuScenes", sample_token: str, category_to_name: Callable[[str], str | None]
                       ) -> Iterator[tuple[dict, dict]]:
    """(annotation record, submission box geometry) of each box of a sample that the devkit evaluates: its category
    maps to a class (`category_to_name`, the detection or the tracking one) and it has at least one LiDAR or radar
    point. The geometry is GLOBAL frame: sample_token, translation (m), size (w, l, h m), rotation (w, x, y, z),
    velocity (vx, vy m/s, the devkit's box_velocity, 0 where it has none), plus "name" (the class)."""
    for annotation_token in nusc.get("sample", sample_token)["anns"]:
        annotation = nusc.get("sample_annotation", annotation_token)
        name = category_to_name(annotation["category_name"])
        if name is None or annotation["num_lidar_pts"] + annotation["num_radar_pts"] == 0:
            continue
        velocity = np.nan_to_num(np.asarray(nusc.box_velocity(annotation_token), dtype=np.float64)[:2])
        yield annotation, {"sample_token": sample_token, "translation": list(map(float, annotation["translation"])),
                           "size": list(map(float, annotation["size"])),
                           "rotation": list(map(float, annotation["rotation"])),
                           "velocity": [float(v) for v in velocity], "name": name}


def ground_truth_submission(nusc: "NuScenes", split: str) -> dict:
    """The split's ground truth written as a submission (score 1): the boxes the devkit evaluates
    (`ground_truth_boxes` with the detection classes), the annotated attribute or `default_attribute`. A perfect
    detector; scoring it checks the pipeline."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    attribute_names = {a["token"]: a["name"] for a in nusc.attribute}
    results = {}
    for token in split_sample_tokens(nusc, split):
        boxes = []
        for annotation, box in ground_truth_boxes(nusc, token, category_to_detection_name):
            name = box.pop("name")
            attribute = (attribute_names[annotation["attribute_tokens"][0]] if annotation["attribute_tokens"]
                         else default_attribute(name, float(np.linalg.norm(box["velocity"]))))
            boxes.append({**box, "detection_name": name, "detection_score": 1.0, "attribute_name": attribute})
        results[token] = boxes
    return {"meta": submission_meta(MODALITIES), "results": results}


def detection_config():
    """The devkit's detection_cvpr_2019 DetectionConfig."""
    from nuscenes.eval.common.config import config_factory

    return config_factory(DETECTION_CONFIG)


def run_detection_eval(nusc: "NuScenes", split: str, results_path: str | os.PathLike, out_dir: str | os.PathLike,
                       render_curves: bool = True, verbose: bool = True) -> dict:
    """nuscenes-devkit DetectionEval (detection_cvpr_2019) of a submission file on a split. The devkit prints mAP,
    the TP errors, NDS and the per-class table, and writes metrics_summary.json, metrics_details.json and (with
    render_curves) the PDF curves under out_dir/plots. Returns the metrics summary. verbose=False silences it."""
    from nuscenes.eval.detection.evaluate import DetectionEval

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quiet = contextlib.nullcontext() if verbose else _silenced()
    with quiet:
        evaluator = DetectionEval(nusc, detection_config(), result_path=os.fspath(results_path), eval_set=split,
                                  output_dir=os.fspath(out_dir), verbose=verbose)
        return evaluator.main(plot_examples=0, render_curves=render_curves)


@contextlib.contextmanager
def _silenced():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def evaluate_in_memory(nusc: "NuScenes", submission: Mapping, sample_tokens: Sequence[str]) -> dict:
    """The devkit's DetectionEval metrics (detection_cvpr_2019) of an in-memory submission restricted to
    `sample_tokens` (e.g. the samples one validation epoch predicted); no files, no plots, no printing. The devkit's
    own loading, filtering (class range, empty boxes, bike racks) and metric code are used unchanged."""
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt_of_sample_tokens
    from nuscenes.eval.detection.data_classes import DetectionBox
    from nuscenes.eval.detection.evaluate import DetectionEval

    class _InMemoryDetectionEval(DetectionEval):
        def __init__(self):  # DetectionEval.__init__ reads files; set the same attributes from memory instead
            self.nusc, self.cfg, self.verbose = nusc, detection_config(), False
            self.meta = dict(submission["meta"])
            results = {token: submission["results"][token] for token in sample_tokens}
            self.pred_boxes = add_center_dist(nusc, EvalBoxes.deserialize(results, DetectionBox))
            self.gt_boxes = add_center_dist(nusc, load_gt_of_sample_tokens(nusc, list(sample_tokens), DetectionBox))
            self.pred_boxes = filter_eval_boxes(nusc, self.pred_boxes, self.cfg.class_range, verbose=False)
            self.gt_boxes = filter_eval_boxes(nusc, self.gt_boxes, self.cfg.class_range, verbose=False)
            self.sample_tokens = self.gt_boxes.sample_tokens

    with _silenced():
        metrics, _ = _InMemoryDetectionEval().evaluate()
    summary = metrics.serialize()
    summary["meta"] = dict(submission["meta"])
    return summary


def summary_scalars(summary: Mapping, prefix: str = "") -> dict[str, float]:
    """{prefix + "NDS", prefix + "mAP", prefix + "mATE", ...} from a devkit metrics summary."""
    scalars = {f"{prefix}NDS": float(summary["nd_score"]), f"{prefix}mAP": float(summary["mean_ap"])}
    for key, name in TP_ERROR_NAMES.items():
        scalars[f"{prefix}{name}"] = float(summary["tp_errors"][key])
    return scalars


# ------------------------------------------------------------------------------------------------------------------
# Validation scoring during training
# ------------------------------------------------------------------------------------------------------------------

def _boxes_to_numpy(boxes: Boxes) -> dict[str, np.ndarray]:
    """Plain arrays (float32 / int64) of Boxes, e.g. decoded under bf16 autocast, for gathering across ranks."""
    arrays = {}
    for name in Boxes.__dataclass_fields__:
        tensor = getattr(boxes, name).detach().cpu()
        arrays[name] = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    return arrays


def _boxes_from_numpy(arrays: Mapping[str, np.ndarray]) -> Boxes:
    return Boxes(**{name: torch.from_numpy(np.asarray(value)) for name, value in arrays.items()})


class NuScenesDetectionMetrics(Callback):
    """After every validation epoch (not the sanity check), score the epoch's predictions ({sample token: Boxes in
    the ego frame}, returned by FusionDetector.validation_step as {"predictions": ...} and collected here) with the
    devkit's
    DetectionEval (detection_cvpr_2019, no curves) and log `{prefix}NDS`, `{prefix}mAP`, the TP errors
    (`{prefix}mATE` ...) and `{prefix}samples` (how many samples were scored), so a ModelCheckpoint can monitor
    val/NDS.

    Under DDP the predictions of all ranks are gathered on rank 0, which scores them and broadcasts the numbers, so
    every rank logs the same values. The samples scored are those predicted (all of the split unless
    limit_val_batches cuts it). dataroot / version default to the datamodule's (`trainer.datamodule.dataroot`,
    `.version`); the devkit tables are loaded once, on rank 0.
    """

    def __init__(self, dataroot: str | None = None, version: str | None = None, prefix: str = "val/"):
        super().__init__()
        self.dataroot, self.version, self.prefix = dataroot, version, prefix
        self._nusc = None
        self.last_summary: dict | None = None
        self.predictions: dict[str, Boxes] = {}

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.predictions = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(outputs, Mapping) and isinstance(outputs.get("predictions"), Mapping):
            self.predictions.update(outputs["predictions"])

    def _tables(self, trainer) -> "NuScenes":
        datamodule = getattr(trainer, "datamodule", None)
        dataroot = self.dataroot or getattr(datamodule, "dataroot", None)
        version = self.version or getattr(datamodule, "version", None)
        if dataroot is None or version is None:
            raise ValueError("NuScenesDetectionMetrics needs dataroot and version (give them, or use a datamodule "
                             "with .dataroot and .version)")
        if self._nusc is None or (self._nusc.dataroot, self._nusc.version) != (os.fspath(dataroot), version):
            self._nusc = load_nuscenes(dataroot, version)
        return self._nusc

    def score(self, trainer, predictions: Mapping[str, Boxes], meta: Mapping[str, bool]) -> dict[str, float]:
        """Devkit scalars of {token: Boxes} predictions (rank 0)."""
        nusc = self._tables(trainer)
        tokens = sorted(predictions)
        submission = make_submission(predictions, keyframe_ego_poses(nusc, tokens), tokens, meta)
        self.last_summary = evaluate_in_memory(nusc, submission, tokens)
        return {**summary_scalars(self.last_summary, self.prefix), f"{self.prefix}samples": float(len(tokens))}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        local = {token: _boxes_to_numpy(boxes) for token, boxes in self.predictions.items()}
        gathered = [local]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size if trainer.is_global_zero else None
            torch.distributed.gather_object(local, gathered, dst=0)
        scalars = None
        if trainer.is_global_zero:
            predictions = {token: _boxes_from_numpy(arrays) for part in gathered for token, arrays in part.items()}
            if predictions:
                meta = submission_meta(getattr(pl_module, "modalities", MODALITIES))
                scalars = self.score(trainer, predictions, meta)
        scalars = trainer.strategy.broadcast(scalars, src=0)
        if scalars is None:
            return
        for name, value in scalars.items():
            pl_module.log(name, value, prog_bar=name.endswith(("NDS", "mAP")), logger=True, on_epoch=True,
                          sync_dist=False, rank_zero_only=False, batch_size=1)
