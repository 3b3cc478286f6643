"""Multi-object tracking on top of the detector: a CenterPoint-style tracker in the global frame, tracking
submissions and the nuscenes-devkit's TrackingEval (AMOTA, AMOTP, IDS, MOTA, ...).

- `fusion.tracking.tracker`: the tracker (greedy association by velocity-propagated centre distance, per-class
  gates, birth / death by score and age), `Track`, `TrackerConfig`.
- `fusion.tracking.submission`: detections -> tracking submission per scene, the ground truth as one, validation.
- `fusion.tracking.metrics`: the devkit's TrackingEval from a file or in memory.
Frames: global (x, y, z meters; rotation (w, x, y, z); velocity (vx, vy) m/s), time in seconds.
"""
from fusion.tracking.metrics import (TRACKING_CONFIG, TRACKING_METRICS, evaluate_tracking_in_memory,
                                     run_tracking_eval, split_of_scene, tracking_config, tracking_scalars)
from fusion.tracking.submission import (TRACKING_BOX_FIELDS, ground_truth_tracking_submission, scene_samples,
                                        track_submission, tracking_box_problems, validate_tracking_submission)
from fusion.tracking.tracker import (CENTERPOINT_MATCH_DISTANCE_M, TRACKING_CLASSES, Track, Tracker,
                                     TrackerConfig)

__all__ = ["CENTERPOINT_MATCH_DISTANCE_M", "TRACKING_BOX_FIELDS", "TRACKING_CLASSES", "TRACKING_CONFIG",
           "TRACKING_METRICS", "Track", "Tracker", "TrackerConfig", "evaluate_tracking_in_memory",
           "ground_truth_tracking_submission", "run_tracking_eval", "scene_samples", "split_of_scene",
           "track_submission", "tracking_box_problems", "tracking_config", "tracking_scalars",
           "validate_tracking_submission"]
