"""nuScenes detection evaluation: Boxes (ego frame) -> submission JSON (global frame) -> nuscenes-devkit DetectionEval.

One module per job:
- `fusion.evaluation.submission`: ego <-> global boxes, writing a split's submission, validating a submission.
- `fusion.evaluation.metrics`: the devkit's tables, splits and DetectionEval (from a file or in memory), and the
  Lightning callback that scores validation epochs.
- `fusion.evaluation.robustness`: the robustness conditions, inference over a split under one, and the table.
The names below are re-exported for convenience.
"""
from fusion.evaluation.metrics import (DETECTION_CONFIG, TP_ERROR_NAMES, NuScenesDetectionMetrics, detection_config,
                                       evaluate_in_memory, ground_truth_submission, keyframe_ego_poses,
                                       load_nuscenes, run_detection_eval, split_sample_tokens, summary_scalars)
from fusion.evaluation.robustness import (GpsNoise, RobustnessCondition, RobustnessRow, apply_condition,
                                          format_robustness_table, predict_split, robustness_conditions)
from fusion.evaluation.submission import (BOX_FIELDS, MAX_BOXES_PER_SAMPLE, META_KEYS, MOVING_SPEED_MPS,
                                          QUATERNION_NORM_TOLERANCE, SubmissionError, boxes_to_submission,
                                          default_attribute, load_submission, make_submission, submission_meta,
                                          submission_to_boxes, validate_submission, write_submission)

__all__ = ["BOX_FIELDS", "DETECTION_CONFIG", "MAX_BOXES_PER_SAMPLE", "META_KEYS", "MOVING_SPEED_MPS",
           "QUATERNION_NORM_TOLERANCE", "TP_ERROR_NAMES", "GpsNoise", "NuScenesDetectionMetrics", "RobustnessCondition",
           "RobustnessRow", "SubmissionError", "apply_condition", "boxes_to_submission", "default_attribute",
           "detection_config", "evaluate_in_memory", "format_robustness_table", "ground_truth_submission",
           "keyframe_ego_poses", "load_nuscenes", "load_submission", "make_submission", "predict_split",
           "robustness_conditions", "run_detection_eval", "split_sample_tokens", "submission_meta",
           "submission_to_boxes", "summary_scalars", "validate_submission", "write_submission"]
