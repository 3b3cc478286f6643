"""Box velocities measured from the sensors' own motion evidence: the LiDAR sweeps' time lags and radar Doppler.

Why a measurement and not only the head's regression: the multi-sweep LiDAR cloud holds each moving object several
times, once per sweep, displaced by velocity x time lag, and radar measures the radial velocity directly; but the
velocity head, trained on a few hundred keyframes of a mostly static world, does not turn that evidence into
velocities (docs/benchmarks.md, issue 11 diagnosis: predicted speeds about half the true ones, 2.7 m/s error on
moving boxes, while a least-squares fit on the same points is within 0.5 m/s). This stage measures each detected
box's velocity from the points around it and combines the measurement with the head's prediction by their
uncertainties. It has no trained parameters and runs after decoding, identically for PyTorch and onnxruntime.

The LiDAR measurement, per box (`_lidar_fit`): the box's points in the newest sweep (inside the box grown by
`margin_m`, above its bottom + `ground_clearance_m` to leave the road out) are the template. Each older sweep, newest
first, is searched for the same object around where the current velocity estimate puts it (within `search_m`):
every (template point, older point) pair votes for the shift between them and the vote histogram's peak is the
object's displacement (a point-set cross-correlation; it does not depend on which parts of the surface each sweep
happened to sample, which a centroid does). The velocity is the least-squares line through the origin of
displacement against time lag, updated after each sweep. A fit whose displacements stray from a constant velocity
by more than `max_residual_m` matched something else (a neighbour, a wall) and is not used. The object stands still
instead when zero displacement collects nearly as many votes over all the sweeps (`still_preference`).
Where that fit finds nothing (one wrong early match sends the later searches astray: a vehicle moving along its own
axis matches its long sides at many shifts; or the object moved beyond the first search), the joint search
(`_joint_fit`) scores every velocity on a grid in the box's frame against all sweeps at once and keeps a clear,
unique winner, refined by the sweep-by-sweep fit started from it. The two halves of a truck-trailer rig then share
the better of their measurements (`fusion.heads.rigs`).
The LiDAR fit and the head's velocity are combined by their inverse variances (`lidar_sigma_floor` at least for the
fit, `head_sigma` for the head). The radar returns inside the box's footprint moved back along that velocity each
measure v . u = r (u: unit line of sight from the ego origin, r: ego-motion compensated radial speed); those within
`radar_gate_sigmas` of the prior correct its component along their mean line of sight by their median disagreement,
weighted by the two uncertainties (a one-dimensional Kalman update: Doppler says nothing about the sideways motion).
Frames: ego frame at the keyframe; meters, seconds, m/s.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from fusion.heads.rigs import share_rig_velocities
from fusion.types import DETECTION_CLASSES, LIDAR_FEATURES, RADAR_FEATURES, Batch, Boxes

_LX, _LY, _LZ, _LT = (LIDAR_FEATURES.index(name) for name in ("x", "y", "z", "time_lag"))
_RX, _RY, _RVX, _RVY, _RT = (RADAR_FEATURES.index(name) for name in ("x", "y", "vx_comp", "vy_comp", "time_lag"))
# classes nuScenes gives no velocity (the devkit does not score it): the joint search leaves them out (its cost)
_NO_VELOCITY_LABELS = [DETECTION_CLASSES.index(name) for name in ("barrier", "traffic_cone")]


@dataclass(frozen=True)
class PointMotionSettings:
    """Settings of `measure_velocities` (meters, seconds, m/s).

    search_m: how far (meters, each axis) an older sweep's displacement may lie from where the current velocity
        estimate puts it; bin_m: the vote histogram's bin.
    margin_m: growth of the box footprint (each side) and of its top when selecting the newest sweep's points.
    ridge_fraction / ridge_bins: the vote peak is the middle of the histogram cells within ridge_bins of the
        highest that have at least ridge_fraction of its votes (a straight surface votes along a ridge).
    still_preference: the object is taken as standing still when the vote histograms at zero displacement have,
        summed over the sweeps, at least this share of the fitted displacements' votes (1 or more: never).
    max_residual_m: a fit whose sweeps' displacements stray from a constant velocity by more than this (RMS,
        meters) is not used (it matched something else: a neighbour, a wall).
    ground_clearance_m: points lower than the box bottom + this are left out (the road under the object).
    min_points: fewest newest-sweep LiDAR points of a box for a fit; min_votes: fewest votes at the peak for an
        older sweep to count; max_template_points / max_candidate_points: at most this many points per box of the
        newest / of an older sweep take part (random, seeded; bounds the cost).
    min_time_span_s: the oldest matched sweep must be at least this much older than the newest for a fit.
    lidar_sigma_floor: the smallest uncertainty (m/s, per axis) given to a LiDAR fit; its statistical standard error
        ignores that the points sample the object's surface differently in each sweep.
    head_sigma: uncertainty (m/s, per axis) of the head's velocity where the LiDAR gives no fit.
    radar_sigma: uncertainty (m/s) of one radar radial speed; radar_gate_sigmas: a return whose radial speed
        disagrees with the LiDAR / head velocity by more than this many standard deviations (of the two together)
        is clutter and left out.
    use_radar: whether radar returns take part.
    min_score: boxes scoring below this keep the head's velocity (bounds the cost when many weak boxes are kept).
        Default 0, every box: the devkit scores low-scoring boxes too, and on the selection drives 0.1 left every
        matched trailer (all below 0.1) with the head's velocity, mAVE 0.74 -> 1.79 m/s.
    joint_max_speed: the joint search (`_joint_fit`, for boxes the sweep-by-sweep fit leaves without a velocity)
        tries velocities up to this fast along the box's heading (m/s); 0 switches the search off.
    joint_max_across: and up to this fast across it (m/s); joint_speed_bin: the velocity grid's step (m/s).
    joint_still_preference: the joint search takes the object as standing still when zero velocity scores at least
        this share of the best velocity's score.
    joint_min_sweep_share: the best velocity must reach at least this share of the vote peak in every older sweep
        that holds points of the object (a velocity that only one sweep supports matched something else).
    joint_unique_ratio / joint_unique_radius: the best velocity must also beat every velocity farther than
        joint_unique_radius (m/s) from it: their best score may be at most joint_unique_ratio of its (a second,
        distant answer nearly as good is the aperture problem's ambiguity, not a measurement).
    joint_sigma: uncertainty (m/s, per axis) given to a joint-search velocity.
    joint_template_points / joint_candidate_points: at most this many points per box of the newest / of an older
        sweep take part in the joint search.
    rig_max_gap_m: a trailer and a truck lying end to end with at most this gap (meters) are one rig and
        share the better of their two LiDAR measurements (`fusion.heads.rigs`); 0 switches it off.
    """

    search_m: float = 2.4
    bin_m: float = 0.2
    margin_m: float = 0.3
    ridge_fraction: float = 0.8
    ridge_bins: int = 4
    max_residual_m: float = 0.25
    still_preference: float = 0.8
    ground_clearance_m: float = 0.3
    min_points: int = 4
    min_votes: int = 4
    max_template_points: int = 64
    max_candidate_points: int = 256
    min_time_span_s: float = 0.1
    lidar_sigma_floor: float = 0.3
    head_sigma: float = 4.0
    radar_sigma: float = 0.3
    radar_gate_sigmas: float = 3.0
    use_radar: bool = True
    min_score: float = 0.0
    joint_max_speed: float = 20.0
    joint_max_across: float = 3.0
    joint_speed_bin: float = 0.25
    joint_still_preference: float = 0.6
    joint_min_sweep_share: float = 0.6
    joint_unique_ratio: float = 0.9
    joint_unique_radius: float = 2.0
    joint_sigma: float = 1.0
    joint_template_points: int = 32
    joint_candidate_points: int = 256
    rig_max_gap_m: float = 2.5

    def __post_init__(self):
        for name in ("search_m", "bin_m", "max_residual_m", "still_preference", "margin_m", "ground_clearance_m",
                     "min_time_span_s", "lidar_sigma_floor", "head_sigma", "radar_sigma", "radar_gate_sigmas",
                     "min_score", "joint_max_speed", "joint_max_across", "joint_still_preference",
                     "joint_min_sweep_share", "joint_unique_ratio", "joint_unique_radius", "joint_sigma",
                     "rig_max_gap_m"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0 or (name.endswith("sigma") and value == 0):
                raise ValueError(f"PointMotionSettings.{name} must be a finite number > 0 (>= 0 for margins), "
                                 f"got {value}")
        if not np.isfinite(self.joint_speed_bin) or self.joint_speed_bin <= 0:
            raise ValueError(f"PointMotionSettings.joint_speed_bin must be a finite number > 0, got "
                             f"{self.joint_speed_bin}")
        if self.bin_m <= 0 or self.search_m < self.bin_m:
            raise ValueError(f"PointMotionSettings: bin_m must be > 0 and search_m >= bin_m, got {self.bin_m} and "
                             f"{self.search_m}")
        if not 0 < self.ridge_fraction <= 1 or self.ridge_bins < 0:
            raise ValueError(f"PointMotionSettings: ridge_fraction must be in (0, 1] and ridge_bins >= 0, got "
                             f"{self.ridge_fraction} and {self.ridge_bins}")
        for name in ("min_points", "min_votes", "max_template_points", "max_candidate_points",
                     "joint_template_points", "joint_candidate_points"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PointMotionSettings.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class MotionMeasurement:
    """Per box of one sample: velocity [N, 2] (m/s, ego frame), lidar_points [N] (the box's LiDAR points in the
    newest sweep; 0 for boxes not measured), lidar_fit [N] bool (the LiDAR fit was used), radar_returns [N] (returns
    used)."""

    velocity: np.ndarray
    lidar_points: np.ndarray
    lidar_fit: np.ndarray
    radar_returns: np.ndarray


def _pairs(tree: cKDTree, centers: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(box index, point index) of every point within radii[b] (meters, BEV) of centers[b]."""
    lists = tree.query_ball_point(centers, radii)
    counts = np.fromiter((len(found) for found in lists), dtype=np.int64, count=len(lists))
    boxes = np.repeat(np.arange(len(lists)), counts)
    points = np.fromiter((i for found in lists for i in found), dtype=np.int64, count=int(counts.sum()))
    return boxes, points


def _box_frame(boxes: Boxes, box: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(along, across) [K, 2] meters of points xy [K, 2] (ego frame) in the frame of box[K]: from its centre, along
    its heading and to its left."""
    offset = xy - boxes.center.numpy()[box, :2]
    yaw = boxes.yaw.numpy()[box]
    cos, sin = np.cos(yaw), np.sin(yaw)
    return np.stack([offset[:, 0] * cos + offset[:, 1] * sin, -offset[:, 0] * sin + offset[:, 1] * cos], 1)


def _inside(boxes: Boxes, box: np.ndarray, xy: np.ndarray, z: np.ndarray | None, margin: float,
            clearance: float = 0.0) -> np.ndarray:
    """Which (box, point) pairs lie inside the box footprint grown by margin (meters) and, unless z is None, above
    its bottom + clearance and below its top + margin. xy [K, 2], z [K] in the ego frame; box [K] box index."""
    center = boxes.center.numpy()[box]
    size = boxes.size.numpy()[box]
    along, across = _box_frame(boxes, box, xy).T
    inside = (np.abs(along) <= size[:, 0] / 2 + margin) & (np.abs(across) <= size[:, 1] / 2 + margin)
    if z is None:
        return inside
    bottom = center[:, 2] - size[:, 2] / 2
    return inside & (z >= bottom + clearance) & (z <= bottom + size[:, 2] + margin)


def _group_pairs(first_group: np.ndarray, second_group: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j) with first_group[i] == second_group[j] (both sorted ascending): the per-group cartesian
    products, as index arrays into the two."""
    second_count = np.bincount(second_group, minlength=groups)
    second_start = np.concatenate([[0], np.cumsum(second_count)[:-1]])
    repeat = second_count[first_group]
    first = np.repeat(np.arange(len(first_group)), repeat)
    block_start = np.repeat(np.cumsum(repeat) - repeat, repeat)
    second = second_start[first_group[first]] + np.arange(len(first)) - block_start
    return first, second


def _capped(group: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted by group) of at most `cap` members per group, chosen at random (seeded: reproducible)."""
    order = np.lexsort((rng.random(len(group)), group))
    group = group[order]
    start = np.searchsorted(group, group, side="left")
    return order[np.arange(len(group)) - start < cap]


def _displacements(boxes: Boxes, template: tuple[np.ndarray, np.ndarray], candidates: tuple[np.ndarray, np.ndarray],
                   predicted: np.ndarray, settings: PointMotionSettings
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(displacement [N, 2] meters, votes [N], votes at zero displacement [N], votes at the peak [N]; the last two
    3 x 3-smoothed, 0 at zero when it lies outside the window) of each box's points between the reference sweep
    (template: box index [A], xy [A, 2]) and an older sweep (candidates: box index [C], xy [C, 2]), searched within
    `settings.search_m` of predicted [N, 2]: every (template, candidate) pair of a box votes for the shift between
    them (a point-set cross-correlation: it does not depend on which parts of the surface each sweep happened to
    sample). The peak of the 3 x 3-smoothed vote histogram (the middle of its ridge) is refined to the mean shift of
    the votes within one bin of it. A peak on the edge of the search window gets 0 votes (the object may lie beyond
    it). Whether the object stands still is decided over all sweeps by the caller (`_lidar_fit`)."""
    n = len(boxes)
    displacement, votes = np.zeros((n, 2)), np.zeros(n)
    t_box, t_xy = template
    c_box, c_xy = candidates
    if len(t_box) == 0 or len(c_box) == 0:
        return displacement, votes, np.zeros(n), np.zeros(n)
    first, second = _group_pairs(t_box, c_box, n)
    box = t_box[first]
    shift = c_xy[second] - t_xy[first] - predicted[box]  # relative to the prediction
    side = int(round(settings.search_m / settings.bin_m))
    width = 2 * side + 1
    cell = np.floor(shift / settings.bin_m + 0.5).astype(np.int64) + side
    inside = ((cell >= 0) & (cell < width)).all(1)
    box, shift, cell = box[inside], shift[inside], cell[inside]
    histogram = np.bincount((box * width + cell[:, 1]) * width + cell[:, 0], minlength=n * width * width)
    histogram = histogram.reshape(n, width, width).astype(np.float64)
    padded = np.pad(histogram, ((0, 0), (1, 1), (1, 1)))
    smoothed = sum(padded[:, 1 + dy:1 + dy + width, 1 + dx:1 + dx + width] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    peak = smoothed.reshape(n, -1).argmax(1)
    peak_cell = np.stack([peak % width, peak // width], 1)  # (x, y) bin
    # along a straight surface the votes form a ridge, not a point: take the middle of the ridge's top part
    steps = np.arange(width)
    bins_x, bins_y = np.meshgrid(steps, steps, indexing="xy")  # [width, width], (y, x) order like the histogram
    top = smoothed >= settings.ridge_fraction * smoothed.reshape(n, -1).max(1)[:, None, None]
    top &= (np.abs(bins_x[None] - peak_cell[:, 0, None, None]) <= settings.ridge_bins)
    top &= (np.abs(bins_y[None] - peak_cell[:, 1, None, None]) <= settings.ridge_bins)
    weight = np.where(top, smoothed, 0.0)
    weight_sum = np.maximum(weight.sum((1, 2)), 1e-9)
    ridge = np.stack([(weight * bins_x).sum((1, 2)), (weight * bins_y).sum((1, 2))], 1) / weight_sum[:, None]
    peak_cell = np.rint(ridge).astype(np.int64)
    # a static object's points also vote along ridges: the votes at zero displacement let the caller decide
    still = np.rint(-predicted / settings.bin_m).astype(np.int64) + side
    still_inside = ((still >= 0) & (still < width)).all(1)
    rows = np.arange(n)
    still_votes = smoothed[rows, np.clip(still[:, 1], 0, width - 1), np.clip(still[:, 0], 0, width - 1)]
    peak_votes = smoothed[rows, peak_cell[:, 1], peak_cell[:, 0]]
    still_votes = np.where(still_inside, still_votes, 0.0)
    near = (np.abs(cell - peak_cell[box]) <= 1).all(1)
    votes = np.bincount(box[near], minlength=n).astype(np.float64)
    at_edge = ((peak_cell <= 0) | (peak_cell >= width - 1)).any(1)  # the object may lie beyond the search window
    votes[at_edge] = 0.0
    total = np.stack([np.bincount(box[near], shift[near, k], minlength=n) for k in range(2)], 1)
    displacement = predicted + total / np.maximum(votes, 1.0)[:, None]
    return displacement, votes, still_votes, peak_votes


def _lidar_fit(boxes: Boxes, points: np.ndarray, velocity: np.ndarray, settings: PointMotionSettings
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(velocity [N, 2], standard error [N] m/s per axis, reference points [N], fit supported [N]) of the LiDAR
    fit: the object's points in the newest sweep (inside the box grown by margin_m, above its bottom + clearance)
    are matched against each older sweep in turn (`_displacements`, searched around where the current velocity
    puts them), and the velocity is the least-squares line through the origin of displacement against time lag,
    updated after each sweep so that the next, older one is searched in the right place."""
    n = len(boxes)
    supported = np.zeros(n, dtype=bool)
    sigma = np.full(n, np.inf)
    used = np.zeros(n, dtype=np.int64)
    if len(points) == 0 or n == 0:
        return velocity, sigma, used, supported
    rng = np.random.default_rng(0)
    lags, sweep_of_point = np.unique(np.round(points[:, 3], 3), return_inverse=True)
    centers = boxes.center.numpy()[:, :2].astype(np.float64)
    half_diagonal = 0.5 * np.hypot(boxes.size.numpy()[:, 0], boxes.size.numpy()[:, 1])

    def box_points(sweep: int, offset: np.ndarray, margin: float, cap: int
                   ) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        """((box index, xy) of at most `cap` of the sweep's points inside each box moved by offset [N, 2] and grown
        by margin (meters), sorted by box; how many there were per box [N])."""
        mine = sweep_of_point == sweep
        xy, z = points[mine, :2], points[mine, 2]
        if len(xy) == 0:
            return (np.zeros(0, dtype=np.int64), np.zeros((0, 2))), np.zeros(n, dtype=np.int64)
        box, point = _pairs(cKDTree(xy), centers + offset, half_diagonal + margin)
        moved = xy[point] - offset[box]
        keep = _inside(boxes, box, moved, z[point], margin, settings.ground_clearance_m)
        box, point = box[keep], point[keep]
        chosen = _capped(box, cap, rng)
        return (box[chosen], xy[point[chosen]]), np.bincount(box, minlength=n)

    template, used = box_points(0, np.zeros((n, 2)), settings.margin_m, settings.max_template_points)
    numerator, denominator = np.zeros((n, 2)), np.zeros(n)
    still_sum, peak_sum = np.zeros(n), np.zeros(n)
    observations = []
    for sweep in range(1, len(lags)):
        lag = lags[sweep] - lags[0]
        predicted = -velocity * lag
        candidates, _ = box_points(sweep, predicted, settings.margin_m + settings.search_m,
                                   settings.max_candidate_points)
        displacement, votes, still_votes, peak_votes = _displacements(boxes, template, candidates, predicted, settings)
        valid = (votes >= settings.min_votes) & (used >= settings.min_points)
        numerator += np.where(valid[:, None], displacement * lag, 0.0)
        denominator += np.where(valid, lag * lag, 0.0)
        observations.append((lag, displacement, valid))
        still_sum += np.where(valid, still_votes, 0.0)
        peak_sum += np.where(valid, peak_votes, 0.0)
        has_fit = denominator > 0
        velocity = np.where(has_fit[:, None], -numerator / np.where(has_fit, denominator, 1.0)[:, None], velocity)
    residual, count, span = np.zeros(n), np.zeros(n), np.zeros(n)
    for lag, displacement, valid in observations:
        residual += np.where(valid, ((displacement + velocity * lag) ** 2).sum(1), 0.0)
        count += valid
        span = np.where(valid, np.maximum(span, lag), span)
    # per-axis standard error of the slope: residual spread (meters) over sqrt(sum of squared lags)
    spread = np.sqrt(residual / np.maximum(2 * (count - 1), 1))
    supported = (count >= 1) & (span >= settings.min_time_span_s) & (spread <= settings.max_residual_m)
    # Standing still wins when zero displacement, over all the sweeps together, collects nearly as many votes as the
    # fitted motion. Decided jointly, not sweep by sweep: a long object moving along its axis still overlaps itself
    # most at the first, shortest lag (an 11 m trailer at 11 m/s keeps 85 % of its votes at zero after 0.15 s),
    # but less and less at the later ones.
    still = (count >= 1) & (span >= settings.min_time_span_s) & (still_sum > 0) & (
        still_sum >= settings.still_preference * peak_sum)
    velocity = np.where(still[:, None], 0.0, velocity)
    spread = np.where(still, 0.0, spread)
    supported |= still
    sigma = np.where(supported, spread / np.sqrt(np.maximum(denominator, 1e-12)), np.inf)
    return velocity, sigma, used, supported


def _box_frame_points(boxes: Boxes, xy: np.ndarray, z: np.ndarray, grow_along: np.ndarray, grow_across: np.ndarray,
                      clearance: float, margin: float, cap: int, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(box index [K], (along, across) [K, 2] meters in the box's frame) of at most `cap` points per box of one sweep
    (xy [P, 2], z [P], ego frame) inside each box's footprint grown by grow_along / grow_across [N] (meters, each
    side), above its bottom + clearance and below its top + margin; sorted by box."""
    if len(xy) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 2))
    centers = boxes.center.numpy()[:, :2].astype(np.float64)
    size = boxes.size.numpy().astype(np.float64)
    radii = 0.5 * np.hypot(size[:, 0] + 2 * grow_along, size[:, 1] + 2 * grow_across)
    box, point = _pairs(cKDTree(xy), centers, radii)
    along, across = _box_frame(boxes, box, xy[point]).T
    bottom = boxes.center.numpy()[box, 2] - size[box, 2] / 2
    keep = ((np.abs(along) <= size[box, 0] / 2 + grow_along[box])
            & (np.abs(across) <= size[box, 1] / 2 + grow_across[box])
            & (z[point] >= bottom + clearance) & (z[point] <= bottom + size[box, 2] + margin))
    box, local = box[keep], np.stack([along[keep], across[keep]], 1)
    chosen = _capped(box, cap, rng)
    return box[chosen], local[chosen]


def _joint_fit(boxes: Boxes, points: np.ndarray, todo: np.ndarray, settings: PointMotionSettings
               ) -> tuple[np.ndarray, np.ndarray]:
    """(velocity [N, 2] m/s ego frame, found [N] bool) of the boxes marked in todo [N], from every sweep at once.

    The sweep-by-sweep fit (`_lidar_fit`) searches each older sweep around where the sweeps before it put the
    object, so one wrong early match (the aperture problem: a vehicle moving along its own axis overlaps itself, and
    its long sides match at many shifts along it) sends the later searches astray, the displacements disagree and
    no velocity is kept. Here every velocity on a grid in the box's frame (along its heading up to
    joint_max_speed, across up to joint_max_across, joint_speed_bin steps) is scored at once: the score is the sum
    over the older sweeps of that sweep's (template point, older point) vote histogram at the displacement the
    velocity predicts (velocity x time lag), each histogram divided by its own peak. The true velocity is the only
    one that all sweeps support; a side's ridge of shifts scales with the lag and agrees only there. The object
    stands still when zero velocity scores at least joint_still_preference of the best. A best velocity is not kept
    when some sweep holding the object's points gives it less than joint_min_sweep_share of its peak, or when a
    velocity farther than joint_unique_radius from it scores more than joint_unique_ratio of it (two answers: a
    box shorter than its object, a long side seen without its ends)."""
    n = len(boxes)
    velocity, found = np.zeros((n, 2)), np.zeros(n, dtype=bool)
    index = np.flatnonzero(todo)
    if len(index) == 0 or len(points) == 0:
        return velocity, found
    part = boxes.select(torch.from_numpy(np.asarray(todo, dtype=bool)))
    m = len(index)
    rng = np.random.default_rng(0)
    lags, sweep_of_point = np.unique(np.round(points[:, 3], 3), return_inverse=True)
    step = settings.joint_speed_bin
    speeds_along = np.arange(-settings.joint_max_speed, settings.joint_max_speed + step / 2, step)
    speeds_across = np.arange(-settings.joint_max_across, settings.joint_max_across + step / 2, step)
    grid_along, grid_across = np.meshgrid(speeds_along, speeds_across, indexing="ij")  # [A, C] m/s, box frame

    def sweep_points(sweep: int, grow_along: float, grow_across: float, cap: int):
        mine = sweep_of_point == sweep
        return _box_frame_points(part, points[mine, :2], points[mine, 2], np.full(m, grow_along),
                                 np.full(m, grow_across), settings.ground_clearance_m, settings.margin_m, cap, rng)

    t_box, t_local = sweep_points(0, settings.margin_m, settings.margin_m, settings.joint_template_points)
    has_template = np.bincount(t_box, minlength=m) >= settings.min_points
    score = np.zeros((m,) + grid_along.shape)
    weakest = np.full((m,) + grid_along.shape, np.inf)  # the lowest share of its peak any sweep gives a velocity
    still = np.zeros(m)
    sweeps_seen = np.zeros(m, dtype=np.int64)
    for sweep in range(1, len(lags)):
        lag = lags[sweep] - lags[0]
        reach_along, reach_across = settings.joint_max_speed * lag, settings.joint_max_across * lag
        c_box, c_local = sweep_points(sweep, settings.margin_m + reach_along, settings.margin_m + reach_across,
                                      settings.joint_candidate_points)
        if len(t_box) == 0 or len(c_box) == 0:
            continue
        first, second = _group_pairs(t_box, c_box, m)
        box = t_box[first]
        shift = c_local[second] - t_local[first]  # older minus newest: -velocity x lag, box frame
        half = np.ceil(np.array([reach_along, reach_across]) / settings.bin_m).astype(np.int64) + 1
        cell = np.floor(shift / settings.bin_m + 0.5).astype(np.int64) + half
        inside = ((cell >= 0) & (cell <= 2 * half)).all(1)
        box, cell = box[inside], cell[inside]
        shape = tuple(2 * half + 1)
        histogram = np.bincount((box * shape[0] + cell[:, 0]) * shape[1] + cell[:, 1],
                                minlength=m * shape[0] * shape[1])
        histogram = histogram.reshape((m,) + shape).astype(np.float64)
        padded = np.pad(histogram, ((0, 0), (1, 1), (1, 1)))
        smoothed = sum(padded[:, 1 + da:1 + da + shape[0], 1 + dc:1 + dc + shape[1]]
                       for da in (-1, 0, 1) for dc in (-1, 0, 1))
        peak = smoothed.reshape(m, -1).max(1)
        seen = peak > 0
        share = smoothed / np.maximum(peak, 1.0)[:, None, None]
        cell_along = np.clip(np.rint(-grid_along * lag / settings.bin_m).astype(np.int64) + half[0], 0, shape[0] - 1)
        cell_across = np.clip(np.rint(-grid_across * lag / settings.bin_m).astype(np.int64) + half[1], 0, shape[1] - 1)
        sampled = share[:, cell_along, cell_across]  # [m, A, C]
        score += sampled
        weakest = np.where(seen[:, None, None], np.minimum(weakest, sampled), weakest)
        still += share[:, half[0], half[1]]
        sweeps_seen += seen
    best = score.reshape(m, -1).argmax(1)
    rows = np.arange(m)
    best_score = score.reshape(m, -1)[rows, best]
    usable = has_template & (sweeps_seen >= 2) & (best_score > 0)
    standing = usable & (still >= settings.joint_still_preference * best_score)
    # the best velocity must stand out from every distant one (else the sides matched at several shifts)
    best_along, best_across = np.unravel_index(best, grid_along.shape)
    radius = int(round(settings.joint_unique_radius / step))
    index_along, index_across = np.meshgrid(np.arange(grid_along.shape[0]), np.arange(grid_along.shape[1]),
                                            indexing="ij")
    near = ((np.abs(index_along[None] - best_along[:, None, None]) <= radius)
            & (np.abs(index_across[None] - best_across[:, None, None]) <= radius))
    runner_up = np.where(near, -np.inf, score).reshape(m, -1).max(1)
    unique = runner_up <= settings.joint_unique_ratio * best_score
    moving = (usable & ~standing & unique
              & (weakest.reshape(m, -1)[rows, best] >= settings.joint_min_sweep_share))
    along, across = grid_along.reshape(-1)[best], grid_across.reshape(-1)[best]
    yaw = part.yaw.numpy().astype(np.float64)
    local = np.where(moving[:, None], np.stack([along, across], 1), 0.0)
    velocity[index] = np.stack([local[:, 0] * np.cos(yaw) - local[:, 1] * np.sin(yaw),
                                local[:, 0] * np.sin(yaw) + local[:, 1] * np.cos(yaw)], 1)
    found[index] = standing | moving
    return velocity, found


def _refined(boxes: Boxes, points: np.ndarray, velocity: np.ndarray, todo: np.ndarray, settings: PointMotionSettings
             ) -> tuple[np.ndarray, np.ndarray]:
    """(velocity [N, 2] m/s, its uncertainty [N] m/s per axis): the joint search's velocity of the boxes marked in
    todo refined by the sweep-by-sweep fit started from it (the grid is coarse for the oldest sweeps' resolution),
    with that fit's uncertainty (at least lidar_sigma_floor); joint_sigma and the joint velocity unchanged where the
    fit is not supported, stands still or strays more than joint_unique_radius from it."""
    sigma = np.full(len(velocity), settings.joint_sigma)
    index = np.flatnonzero(todo)
    if len(index) == 0:
        return velocity, sigma
    part = boxes.select(torch.from_numpy(np.asarray(todo, dtype=bool)))
    fitted, fit_sigma, _, supported = _lidar_fit(part, points, velocity[index].copy(), settings)
    keep = (supported & fitted.any(1)
            & (np.linalg.norm(fitted - velocity[index], axis=1) <= settings.joint_unique_radius))
    refined = velocity.copy()
    refined[index[keep]] = fitted[keep]
    sigma[index[keep]] = np.maximum(fit_sigma[keep], settings.lidar_sigma_floor)
    return refined, sigma


def _radar_update(boxes: Boxes, radar: np.ndarray, prior: np.ndarray, prior_sigma: np.ndarray,
                  settings: PointMotionSettings) -> tuple[np.ndarray, np.ndarray]:
    """(velocity [N, 2], returns used [N]): the prior velocity [N, 2] (per-axis sigma [N]) updated with the radial
    speeds of the radar returns radar [R, 5] (x, y, vx_comp, vy_comp, time_lag; ego frame) inside each box's
    footprint moved by the prior velocity."""
    n = len(boxes)
    used = np.zeros(n, dtype=np.int64)
    if len(radar) == 0 or n == 0:
        return prior, used
    xy, radial_vector, lag = radar[:, :2], radar[:, 2:4], radar[:, 4]
    distance = np.linalg.norm(xy, axis=1)
    sight = xy / np.maximum(distance, 1e-6)[:, None]  # unit line of sight from the ego origin
    radial = (radial_vector * sight).sum(1)  # compensated radial speed, m/s (+ away from the ego)
    tree = cKDTree(xy)
    half_diagonal = 0.5 * np.hypot(boxes.size.numpy()[:, 0], boxes.size.numpy()[:, 1])
    radii = half_diagonal + settings.margin_m + np.linalg.norm(prior, axis=1) * float(np.abs(lag).max())
    box, point = _pairs(tree, boxes.center.numpy()[:, :2].astype(np.float64), radii)
    moved = xy[point] + prior[box] * lag[point, None]
    # radar heights are coarse (nuScenes radar has no elevation): only the footprint is tested
    keep = _inside(boxes, box, moved, None, settings.margin_m)
    box, point = box[keep], point[keep]
    u = sight[point]
    innovation = radial[point] - (prior[box] * u).sum(1)
    gate = settings.radar_gate_sigmas * np.sqrt(np.minimum(prior_sigma[box], 1e6) ** 2 + settings.radar_sigma ** 2)
    consistent = (np.abs(innovation) <= gate) & (distance[point] > 1.0)
    box, u, innovation = box[consistent], u[consistent], innovation[consistent]
    if len(box) == 0:
        return prior, used
    # Doppler measures only the speed along the line of sight, and the returns of one object see it along nearly
    # the same line: solving for both components from their small angle differences would amplify their noise
    # into the sideways one. So the update is one-dimensional, along the returns' mean line of sight, by their
    # median innovation (robust to a clutter return inside the box).
    order = np.lexsort((innovation, box))
    box, u, innovation = box[order], u[order], innovation[order]
    count = np.bincount(box, minlength=n)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    has = count > 0
    median = np.zeros(n)
    low, high = start + (count - 1) // 2, start + count // 2
    median[has] = (innovation[low[has]] + innovation[high[has]]) / 2
    sight_sum = np.stack([np.bincount(box, u[:, k], minlength=n) for k in range(2)], 1)
    mean_sight = sight_sum / np.maximum(np.linalg.norm(sight_sum, axis=1), 1e-9)[:, None]
    prior_variance = np.minimum(prior_sigma, 1e6) ** 2
    gain = prior_variance / (prior_variance + settings.radar_sigma ** 2 / np.maximum(count, 1))
    correction = np.where(has[:, None], (gain * median)[:, None] * mean_sight, 0.0)
    return prior + correction, count.astype(np.int64)


def measure_velocities(boxes: Boxes, lidar_points: Tensor | None, radar_points: Tensor | None,
                       settings: PointMotionSettings = PointMotionSettings()) -> MotionMeasurement:
    """Velocities [N, 2] (m/s, ego frame) of the boxes of one sample from lidar_points [P, 5] (LIDAR_FEATURES, ego
    frame at the keyframe, sweeps motion-compensated for the ego, time_lag seconds >= 0) and radar_points [R, 8]
    (RADAR_FEATURES, same frame), starting from the boxes' own (predicted) velocities. Either cloud may be None or
    empty (absent sensor): without LiDAR the head's velocity is the prior of the radar update; without both the
    head's velocity is returned unchanged. Non-finite points are ignored. Boxes scoring below settings.min_score
    keep the head's velocity (they are not measured)."""
    boxes = boxes.to("cpu")
    head = np.nan_to_num(boxes.velocity.numpy().astype(np.float64))
    measured = boxes.scores.numpy() >= settings.min_score
    result = MotionMeasurement(head, np.zeros(len(boxes), dtype=np.int64), np.zeros(len(boxes), dtype=bool),
                               np.zeros(len(boxes), dtype=np.int64))
    if not measured.any():
        return result
    part = _measure(boxes.select(torch.from_numpy(measured)), head[measured], lidar_points, radar_points, settings)
    for name in ("velocity", "lidar_points", "lidar_fit", "radar_returns"):
        getattr(result, name)[measured] = getattr(part, name)
    return result


def _measure(boxes: Boxes, head: np.ndarray, lidar_points: Tensor | None, radar_points: Tensor | None,
             settings: PointMotionSettings) -> MotionMeasurement:
    """`measure_velocities` for boxes (CPU, at least one) with head velocities head [N, 2]."""
    n = len(boxes)
    lidar = np.zeros((0, 4))
    if lidar_points is not None and lidar_points.numel():
        lidar = lidar_points.detach().cpu().double().numpy()[:, [_LX, _LY, _LZ, _LT]]
        lidar = lidar[np.isfinite(lidar).all(1) & (lidar[:, 3] >= 0)]
    velocity, sigma, used, supported = _lidar_fit(boxes, lidar, head.copy(), settings)
    lidar_sigma = np.where(supported, np.maximum(sigma, settings.lidar_sigma_floor), np.inf)
    if settings.joint_max_speed > 0:
        movable = ~np.isin(boxes.labels.numpy(), _NO_VELOCITY_LABELS)
        todo = ~supported & (used >= settings.min_points) & movable
        joint_velocity, found = _joint_fit(boxes, lidar, todo, settings)
        joint_velocity, joint_sigma = _refined(boxes, lidar, joint_velocity, found & joint_velocity.any(1), settings)
        velocity = np.where(found[:, None], joint_velocity, velocity)
        lidar_sigma = np.where(found, joint_sigma, lidar_sigma)
        supported = supported | found
    if settings.rig_max_gap_m > 0:
        velocity, lidar_sigma = share_rig_velocities(boxes, velocity, lidar_sigma, settings.rig_max_gap_m)
        supported = np.isfinite(lidar_sigma)
    # the LiDAR fit and the head's velocity, each weighted by its inverse variance
    lidar_weight, head_weight = 1.0 / lidar_sigma ** 2, 1.0 / settings.head_sigma ** 2
    velocity = (np.where(supported[:, None], velocity, 0.0) * lidar_weight[:, None] + head * head_weight) / (
        lidar_weight + head_weight)[:, None]
    sigma = 1.0 / np.sqrt(lidar_weight + head_weight)
    radar_used = np.zeros(n, dtype=np.int64)
    if settings.use_radar and radar_points is not None and radar_points.numel():
        radar = radar_points.detach().cpu().double().numpy()[:, [_RX, _RY, _RVX, _RVY, _RT]]
        radar = radar[np.isfinite(radar).all(1)]  # a radar sweep may be newer than the keyframe (lag < 0)
        velocity, radar_used = _radar_update(boxes, radar, velocity, sigma, settings)
    return MotionMeasurement(velocity, used, supported, radar_used)


def with_measured_velocities(boxes: Boxes, lidar_points: Tensor | None, radar_points: Tensor | None,
                             settings: PointMotionSettings = PointMotionSettings()) -> Boxes:
    """The boxes with their velocity replaced by `measure_velocities` (same device and dtype as boxes.velocity)."""
    measured = measure_velocities(boxes, lidar_points, radar_points, settings)
    velocity = torch.as_tensor(measured.velocity, dtype=boxes.velocity.dtype, device=boxes.velocity.device)
    return replace(boxes, velocity=velocity)


def point_motion_settings(value: "PointMotionSettings | dict | None") -> PointMotionSettings | None:
    """A model's `point_motion` setting (None: off; a dict of PointMotionSettings fields, {} for the defaults) as
    PointMotionSettings; ValueError naming an unknown field."""
    if value is None or isinstance(value, PointMotionSettings):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"point_motion must be null or a mapping of PointMotionSettings fields, got {value!r}")
    known = set(PointMotionSettings.__dataclass_fields__)
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"point_motion: unknown field(s) {unknown}; known: {sorted(known)}")
    return PointMotionSettings(**value)


def sample_clouds(batch: Batch, index: int) -> tuple[Tensor | None, Tensor | None]:
    """(LiDAR points, radar points) of sample `index` of the batch, None where the batch marks the sensor absent."""
    lidar = radar = None
    if "lidar" in batch.present and bool(batch.present["lidar"][index]):
        lidar = batch.lidar_points[batch.lidar_batch == index]
    if "radar" in batch.present and bool(batch.present["radar"][index]):
        radar = batch.radar_points[batch.radar_batch == index]
    return lidar, radar
