"""Parity of two runtimes' detections: the same boxes (centres within 1 cm, same classes, scores within 1e-3).

`compare_boxes` matches the boxes one to one (same class, nearest centre); a box is allowed to be missing from
the other list only when its score is within the score tolerance of the decoding threshold (or of the lowest
score kept when `max_boxes` cut the list), where a 1e-6 difference in a score can legitimately keep it or not.
`sensor_subsets` gives the checks the issue asks for: all sensors, then each one missing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fusion.deploy.inputs import decode
from fusion.types import Boxes

CENTRE_TOLERANCE_M = 0.01
SCORE_TOLERANCE = 1e-3


@dataclass
class BoxParity:
    """One comparison. reference / candidate: box counts; matched: boxes paired; unmatched: boxes of either list
    without a partner that were not borderline; max_centre_error_m (meters, ego frame) / max_score_error over the
    matched pairs; borderline: unpaired boxes whose score is within the tolerance of the cut."""

    reference: int
    candidate: int
    matched: int
    unmatched: int
    borderline: int
    max_centre_error_m: float
    max_score_error: float

    @property
    def ok(self) -> bool:
        return (self.unmatched == 0 and self.max_centre_error_m <= CENTRE_TOLERANCE_M
                and self.max_score_error <= SCORE_TOLERANCE)


def _cut(boxes: Boxes, score_threshold: float, max_boxes: int) -> float:
    """The score below which a box may be in one list only: the threshold, or the lowest kept score if the list
    was cut at max_boxes."""
    if len(boxes) >= max_boxes:
        return max(score_threshold, float(boxes.scores.min()))
    return score_threshold


def compare_boxes(reference: Boxes, candidate: Boxes, score_threshold: float, max_boxes: int,
                  centre_tolerance_m: float = CENTRE_TOLERANCE_M, score_tolerance: float = SCORE_TOLERANCE
                  ) -> BoxParity:
    """Match `candidate` to `reference` (ego frame, meters): each reference box, best first, takes the nearest
    unpaired candidate box of its class within centre_tolerance_m."""
    reference, candidate = reference.to("cpu"), candidate.to("cpu")
    cut = max(_cut(reference, score_threshold, max_boxes), _cut(candidate, score_threshold, max_boxes))
    distance = torch.cdist(reference.center.double(), candidate.center.double())  # [Nr, Nc]
    distance[reference.labels[:, None] != candidate.labels[None, :]] = float("inf")
    paired = torch.zeros(len(candidate), dtype=torch.bool)
    centre_error, score_error, matched, unmatched, borderline = 0.0, 0.0, 0, 0, 0
    for i in torch.argsort(reference.scores, descending=True).tolist():
        row = distance[i].masked_fill(paired, float("inf"))
        j = int(row.argmin()) if len(candidate) else -1
        if j >= 0 and float(row[j]) <= centre_tolerance_m:
            paired[j] = True
            matched += 1
            centre_error = max(centre_error, float(row[j]))
            score_error = max(score_error, abs(float(reference.scores[i]) - float(candidate.scores[j])))
        elif float(reference.scores[i]) < cut + score_tolerance:
            borderline += 1
        else:
            unmatched += 1
    for j in torch.nonzero(~paired).flatten().tolist():
        if float(candidate.scores[j]) < cut + score_tolerance:
            borderline += 1
        else:
            unmatched += 1
    return BoxParity(len(reference), len(candidate), matched, unmatched, borderline, centre_error, score_error)


def sensor_subsets(modalities: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """[(label, modalities to remove)]: all sensors, then each modality missing."""
    return [("all", ())] + [(f"no_{m}", (m,)) for m in modalities]


@dataclass
class ParityRecord:
    """One sample under one sensor subset: its token, the subset label ("all", "no_lidar", ...), the box parity and
    the largest |difference| of the raw head maps (heatmap logits, regressions; their own units)."""

    token: str
    subset: str
    boxes: BoxParity
    max_map_difference: float


def check_parity(model, detector, batches, score_threshold: float | None = None) -> list[ParityRecord]:
    """Run the PyTorch `model` (a FusionDetector) and `detector` (an OnnxDetector) on every Batch of one sample in
    `batches`, with all sensors and with each one removed (Batch.without), and compare their detections."""
    threshold = model.hparams.get("score_threshold", 0.1) if score_threshold is None else score_threshold
    max_boxes = model.hparams.get("max_boxes", 500)
    records = []
    model.eval()
    for batch in batches:
        for label, removed in sensor_subsets(tuple(model.modalities)):
            view = batch.without(*removed)
            with torch.no_grad():
                reference_maps, _ = model(view)
            candidate_maps, _ = detector.run(view)
            reference = model.decode(reference_maps, threshold, view)[0]
            candidate = decode(candidate_maps, detector.spec, threshold, view)[0]
            difference = max(float((getattr(reference_maps, name).float() - getattr(candidate_maps, name)).abs().max())
                             for name in ("heatmap", "offset", "height", "size", "rotation", "velocity"))
            records.append(ParityRecord(batch.tokens[0], label,
                                        compare_boxes(reference, candidate, threshold, max_boxes), difference))
    return records
