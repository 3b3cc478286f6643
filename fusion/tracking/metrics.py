"""Tracking metrics with the nuscenes-devkit's TrackingEval (tracking_nips_2019: AMOTA, AMOTP, MOTA, MOTP, IDS,
recall, ...), from a submission file over a split or from an in-memory submission over some samples of a scene.
Boxes are in the global frame (fusion.tracking.submission)."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    from nuscenes import NuScenes

TRACKING_CONFIG = "tracking_nips_2019"
#: The headline metrics of a devkit tracking summary (all reported by `tracking_scalars`).
TRACKING_METRICS = ("amota", "amotp", "recall", "motar", "mota", "motp", "mt", "ml", "faf", "tp", "fp", "fn", "ids",
                    "frag", "tid", "lgd")


def tracking_config():
    """The devkit's tracking_nips_2019 TrackingConfig."""
    from nuscenes.eval.common.config import config_factory

    return config_factory(TRACKING_CONFIG)


@contextlib.contextmanager
def _silenced():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def run_tracking_eval(nusc: "NuScenes", split: str, results_path: str | os.PathLike, out_dir: str | os.PathLike,
                      render_curves: bool = True, verbose: bool = True) -> dict:
    """The devkit's TrackingEval (tracking_nips_2019) of a tracking submission file on a split (a devkit split or
    one of <dataroot>/<version>/splits.json). Writes metrics_summary.json, metrics_details.json and (with
    render_curves) the PDF curves under out_dir/plots; returns the metrics summary. verbose=False silences it."""
    from nuscenes.eval.tracking.evaluate import TrackingEval

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext() if verbose else _silenced():
        evaluator = TrackingEval(tracking_config(), os.fspath(results_path), split, os.fspath(out_dir),
                                 nusc.version, nusc.dataroot, verbose=verbose)
        return evaluator.main(render_curves=render_curves)


def split_of_scene(nusc: "NuScenes", scene_name: str) -> str:
    """A split name (from <dataroot>/<version>/splits.json, else the devkit's) whose scenes include `scene_name`;
    the devkit's create_tracks wants one."""
    import json

    from nuscenes.utils.splits import create_splits_scenes

    custom = Path(nusc.dataroot) / nusc.version / "splits.json"
    splits = json.loads(custom.read_text()) if custom.is_file() else {}
    for name, scenes in list(splits.items()) + list(create_splits_scenes(verbose=False).items()):
        if scene_name in scenes:
            return name
    raise ValueError(f"scene {scene_name!r} is in no split of {nusc.dataroot}/{nusc.version} (splits.json) nor of "
                     f"the devkit")


def evaluate_tracking_in_memory(nusc: "NuScenes", submission: Mapping, sample_tokens: Sequence[str]) -> dict:
    """The devkit's TrackingEval summary (tracking_nips_2019) of an in-memory tracking submission restricted to
    `sample_tokens` (keyframes of one or more scenes); no files, no plots, no printing. The devkit's loading,
    filtering, track building (with its interpolation) and metric code are used unchanged."""
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt_of_sample_tokens
    from nuscenes.eval.tracking.data_classes import TrackingBox
    from nuscenes.eval.tracking.evaluate import TrackingEval
    from nuscenes.eval.tracking.loaders import create_tracks

    scenes = {nusc.get("scene", nusc.get("sample", t)["scene_token"])["name"] for t in sample_tokens}
    splits = {split_of_scene(nusc, name) for name in scenes}
    if len(splits) != 1:
        raise ValueError(f"the samples' scenes {sorted(scenes)} are not all in one split")
    split = splits.pop()

    class _InMemoryTrackingEval(TrackingEval):
        def __init__(self):  # TrackingEval.__init__ reads files; set the same attributes from memory instead
            self.cfg, self.verbose, self.render_classes, self.output_dir = tracking_config(), False, None, ""
            self.meta = dict(submission["meta"])
            results = {token: list(submission["results"][token]) for token in sample_tokens}
            pred_boxes = add_center_dist(nusc, EvalBoxes.deserialize(results, TrackingBox))
            gt_boxes = add_center_dist(nusc, load_gt_of_sample_tokens(nusc, list(sample_tokens), TrackingBox))
            pred_boxes = filter_eval_boxes(nusc, pred_boxes, self.cfg.class_range, verbose=False)
            gt_boxes = filter_eval_boxes(nusc, gt_boxes, self.cfg.class_range, verbose=False)
            self.sample_tokens = gt_boxes.sample_tokens
            self.tracks_gt = create_tracks(gt_boxes, nusc, split, gt=True)
            self.tracks_pred = create_tracks(pred_boxes, nusc, split, gt=False)

    with _silenced():
        metrics, _ = _InMemoryTrackingEval().evaluate()
    summary = metrics.serialize()
    summary["meta"] = dict(submission["meta"])
    return summary


def tracking_scalars(summary: Mapping) -> dict[str, float]:
    """{"amota": ..., "amotp": ..., "ids": ...} from a devkit tracking summary (NaN where the devkit has none)."""
    return {name: float(summary[name]) for name in TRACKING_METRICS if name in summary}
