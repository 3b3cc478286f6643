"""Road grid, the ego's route and trajectory, and the ground raster (semantic classes at 0.1 m).

Frames: `global` (the map frame, meters, x east, y north, z up). The world is generated around the route and then
shifted so that the map crop starts at global (0, 0), as nuScenes' MapMask expects (pixel (x / 0.1, H - y / 0.1)).
Right-hand traffic.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

RASTER_RESOLUTION = 0.1  # meters per raster pixel, the nuScenes map resolution

# Ground raster classes.
G_TERRAIN, G_ASPHALT, G_MARKING, G_YELLOW, G_CROSSWALK, G_SIDEWALK, G_CURB, G_GRASS, G_LOT = range(9)
DRIVABLE_CLASSES = (G_ASPHALT, G_MARKING, G_YELLOW, G_CROSSWALK)
#: Ground colours, RGB.
GROUND_COLORS = np.array([
    [112, 104, 88],   # terrain
    [78, 78, 80],     # asphalt
    [215, 215, 210],  # white marking
    [210, 175, 60],   # yellow centre line
    [205, 205, 200],  # crosswalk stripes
    [158, 154, 146],  # sidewalk
    [185, 183, 178],  # curb
    [78, 104, 58],    # grass
    [98, 96, 92],     # lot (paved)
], dtype=np.uint8)
#: LiDAR intensity (mean, std) of each ground class.
GROUND_INTENSITY = np.array([[12, 5], [7, 3], [75, 20], [60, 18], [65, 20], [22, 6], [30, 8], [10, 5], [14, 5]],
                            dtype=np.float32)
SIDEWALK_HEIGHT = 0.15


@dataclass
class Road:
    """A straight road of the grid. axis 0 runs along x (its centre line is y = center), axis 1 along y."""

    axis: int
    center: float
    lanes_per_dir: int
    lane_width: float
    parking: bool
    sidewalk: float

    @property
    def half_carriageway(self) -> float:
        return self.lanes_per_dir * self.lane_width + (2.4 if self.parking else 0.0)

    @property
    def half_total(self) -> float:
        return self.half_carriageway + self.sidewalk

    def lane_offset(self, lane: int) -> float:
        """Lateral offset (meters, to the right of travel) of travel lane `lane` (0 = next to the centre line)."""
        return (lane + 0.5) * self.lane_width

    def parking_offset(self) -> float:
        return self.lanes_per_dir * self.lane_width + 1.2


@dataclass
class RoadGrid:
    roads: list[Road]

    def of_axis(self, axis: int) -> list[Road]:
        return [r for r in self.roads if r.axis == axis]

    def shifted(self, offset: np.ndarray) -> "RoadGrid":
        return RoadGrid([Road(r.axis, r.center - offset[1 - r.axis], r.lanes_per_dir, r.lane_width, r.parking,
                              r.sidewalk) for r in self.roads])


def make_grid(rng: np.random.Generator, extent: float = 700.0) -> RoadGrid:
    """An irregular Manhattan grid over [-extent/2, extent/2]^2: block spacing 75-140 m, 1 or 2 lanes per
    direction, parking lanes on some roads."""
    roads = []
    for axis in (0, 1):
        c = -extent / 2.0 + rng.uniform(0, 60)
        while c < extent / 2.0:
            lanes = 2 if rng.random() < 0.3 else 1
            roads.append(Road(axis, float(c), lanes, float(rng.uniform(3.2, 3.7)), bool(rng.random() < 0.55),
                              float(rng.uniform(2.6, 4.2))))
            c += rng.uniform(75.0, 140.0)
    return RoadGrid(roads)


def _right(d: np.ndarray) -> np.ndarray:
    return np.array([d[1], -d[0]])


def _left(d: np.ndarray) -> np.ndarray:
    return np.array([-d[1], d[0]])


@dataclass
class Path:
    """A smooth planar path sampled every `step` m: xy [N, 2], heading [N] (rad), curvature [N] (1/m)."""

    xy: np.ndarray
    heading: np.ndarray
    curvature: np.ndarray
    step: float

    @property
    def length(self) -> float:
        return (len(self.xy) - 1) * self.step

    def at(self, s: np.ndarray):
        """Position [.., 2], heading, curvature at arc lengths s (clamped to the path)."""
        s = np.clip(np.asarray(s, dtype=np.float64), 0.0, self.length)
        f = s / self.step
        i = np.minimum(f.astype(np.int64), len(self.xy) - 2)
        a = (f - i)[..., None]
        xy = self.xy[i] * (1 - a) + self.xy[i + 1] * a
        dh = np.angle(np.exp(1j * (self.heading[i + 1] - self.heading[i])))
        heading = self.heading[i] + dh * a[..., 0]
        curvature = self.curvature[i] * (1 - a[..., 0]) + self.curvature[i + 1] * a[..., 0]
        return xy, heading, curvature


def _resample(points: list[np.ndarray], curvatures: list[np.ndarray], step: float) -> Path:
    xy = np.concatenate(points)
    kappa = np.concatenate(curvatures)
    seg = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    keep = np.concatenate([[True], seg > 1e-6])
    xy, kappa = xy[keep], kappa[keep]
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))])
    s_new = np.arange(0.0, s[-1], step)
    x = np.interp(s_new, s, xy[:, 0])
    y = np.interp(s_new, s, xy[:, 1])
    k = np.interp(s_new, s, kappa)
    xy_new = np.stack([x, y], axis=1)
    d = np.gradient(xy_new, axis=0)
    heading = np.unwrap(np.arctan2(d[:, 1], d[:, 0]))
    return Path(xy_new, heading, k, step)


@dataclass
class RoutePlan:
    path: Path
    turns: list[str]
    #: Arc length (m) of the stop line before each intersection the route enters, in order.
    stop_lines: list[float]


def plan_route(rng: np.random.Generator, grid: RoadGrid, length: float, step: float = 0.2) -> RoutePlan:
    """A route through the grid: start mid-block in the rightmost lane, go straight or turn at intersections."""
    axis = int(rng.integers(0, 2))
    roads = grid.of_axis(axis)
    road = roads[len(roads) // 2 + int(rng.integers(-1, 2))]
    d = np.array([1.0, 0.0]) if axis == 0 else np.array([0.0, 1.0])
    if rng.random() < 0.5:
        d = -d
    lane = road.lanes_per_dir - 1
    # Start 50-85 m before an intersection near the grid centre (the ego reaches it during the scene).
    crossing = sorted(grid.of_axis(1 - axis), key=lambda r: abs(r.center))[0]
    along = crossing.center - float(d[axis]) * float(rng.uniform(50.0, 85.0))
    base = np.zeros(2)
    base[axis] = along
    base[1 - axis] = road.center
    pos = base + _right(d) * road.lane_offset(lane)
    points, curvs, turns, stops = [pos[None]], [np.zeros(1)], [], []
    travelled = 0.0
    n_turns_max = int(rng.choice([0, 1, 1, 2]))
    while travelled < length:
        cross = [r for r in grid.of_axis(1 - axis)]
        coord = pos[axis]  # position along the current road
        sign = d[axis]
        # roads crossing ahead, i.e. centre ahead of us by more than their half width + 12 m
        ahead = sorted([r for r in cross if (r.center - coord) * sign > r.half_total + 12.0],
                       key=lambda r: (r.center - coord) * sign)
        if not ahead:
            break
        nxt = ahead[0]
        stops.append(travelled + (nxt.center - coord) * sign - nxt.half_total - 1.0)
        turn = "straight"
        if len(turns) < n_turns_max and travelled + (nxt.center - coord) * sign > 45.0:
            turn = str(rng.choice(["left", "right", "straight"], p=[0.4, 0.4, 0.2]))
        if turn == "straight":
            end = pos + d * ((nxt.center - coord) * sign + nxt.half_total + 10.0)
            points.append(np.linspace(pos, end, 50)[1:])
            curvs.append(np.zeros(49))
            travelled += np.linalg.norm(end - pos)
            pos = end
            continue
        d2 = _left(d) if turn == "left" else _right(d)
        lane2 = 0 if turn == "left" else nxt.lanes_per_dir - 1
        # Lane lines: current y = pos (const along d); new: nxt centre + right(d2) * offset
        corner = pos.copy()
        corner[axis] = nxt.center + (_right(d2) * nxt.lane_offset(lane2))[axis]
        r = float(rng.uniform(5.0, 7.0)) if turn == "right" else float(rng.uniform(9.0, 12.0))
        t1 = corner - d * r
        t2 = corner + d2 * r
        normal = _left(d) if turn == "left" else _right(d)
        centre = t1 + normal * r
        a0 = np.arctan2(*(t1 - centre)[::-1])
        a1 = np.arctan2(*(t2 - centre)[::-1])
        da = np.angle(np.exp(1j * (a1 - a0)))
        angles = a0 + da * np.linspace(0.0, 1.0, 40)
        arc = centre + r * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        points.append(np.linspace(pos, t1, 40)[1:])
        curvs.append(np.zeros(39))
        points.append(arc[1:])
        curvs.append(np.full(39, (1.0 if turn == "left" else -1.0) / r))
        travelled += np.linalg.norm(t1 - pos) + abs(da) * r
        pos, d, axis = t2, d2, 1 - axis
        turns.append(turn)
        exit_len = nxt.half_total + 8.0
        end = pos + d * exit_len
        points.append(np.linspace(pos, end, 20)[1:])
        curvs.append(np.zeros(19))
        travelled += exit_len
        pos = end
    return RoutePlan(_resample(points, curvs, step), turns, stops)


@dataclass
class EgoTrajectory:
    """The ego's motion sampled every `dt` s from `t0` (scene seconds): arc length s, speed v (m/s), longitudinal
    acceleration (m/s^2), and the path it follows. Ego frame = rear axle on the ground, x forward."""

    path: Path
    t0: float
    dt: float
    s: np.ndarray
    v: np.ndarray
    a: np.ndarray

    def _interp(self, arr: np.ndarray, t):
        f = (np.asarray(t, dtype=np.float64) - self.t0) / self.dt
        f = np.clip(f, 0.0, len(arr) - 1.000001)
        i = f.astype(np.int64)
        w = f - i
        return arr[i] * (1 - w) + arr[i + 1] * w

    def state(self, t):
        """(xy [.., 2], yaw, speed, yaw_rate, accel_long, accel_lat) at scene times t (seconds)."""
        s = self._interp(self.s, t)
        v = self._interp(self.v, t)
        a = self._interp(self.a, t)
        xy, yaw, kappa = self.path.at(s)
        return xy, yaw, v, v * kappa, a, v * v * kappa


def simulate_speed(rng: np.random.Generator, plan: RoutePlan, t_start: float, t_end: float,
                   dt: float = 0.01) -> EgoTrajectory:
    """Speed profile along the route: cruise speed, curvature limit (1.8 m/s^2 lateral), comfortable accelerations,
    and in some scenes a stop at a stop line for a few seconds."""
    path = plan.path
    cruise = float(rng.uniform(5.5, 11.0))
    a_lat, a_acc, a_dec = 1.8, 1.6, 2.5
    s_grid = np.arange(0.0, path.length, 1.0)
    _, _, kappa = path.at(s_grid)
    kappa = np.maximum(np.abs(kappa), 1e-4)
    v_limit = np.minimum(cruise, np.sqrt(a_lat / kappa))
    s0 = 30.0  # leave some path behind the start for the sweeps before the first keyframe
    stop_at, stop_until = None, None
    candidates = [s for s in plan.stop_lines if s0 + 25.0 < s < s0 + cruise * (t_end - t_start) * 0.7]
    if candidates and rng.random() < 0.35:
        stop_at = candidates[0]
        stop_until = float(rng.uniform(2.0, 4.5))  # seconds stopped
    n = int(np.ceil((t_end - t_start) / dt)) + 2
    s = np.empty(n)
    v = np.empty(n)
    a = np.empty(n)
    s[0], v[0] = s0, cruise * float(rng.uniform(0.6, 1.0))
    acc_prev, stopped_since = 0.0, None
    for k in range(n):
        ahead = s_grid[(s_grid >= s[k]) & (s_grid < s[k] + 60.0)]
        lim = v_limit[(s_grid >= s[k]) & (s_grid < s[k] + 60.0)]
        allowed = np.min(np.sqrt(lim ** 2 + 2.0 * 1.0 * np.maximum(ahead - s[k] - 3.0, 0.0))) if len(ahead) \
            else cruise
        if stop_at is not None:
            if stopped_since is None:
                remaining = stop_at - s[k]
                allowed = min(allowed, np.sqrt(2.0 * 1.3 * max(remaining, 0.0)))
                if remaining < 1.0 and v[k] < 0.05:
                    stopped_since = k * dt
            elif k * dt - stopped_since < stop_until:
                allowed = 0.0
        target_acc = np.clip((allowed - v[k]) / 0.8, -a_dec, a_acc)
        acc = acc_prev + np.clip(target_acc - acc_prev, -4.0 * dt, 4.0 * dt)  # jerk limit 4 m/s^3
        if v[k] <= 0.0 and acc < 0:
            acc = 0.0
        a[k] = acc
        acc_prev = acc
        if k + 1 < n:
            v[k + 1] = max(0.0, v[k] + acc * dt)
            s[k + 1] = s[k] + 0.5 * (v[k] + v[k + 1]) * dt
    return EgoTrajectory(path, t_start, dt, s, v, a)


def rasterize_ground(grid: RoadGrid, width_m: float, height_m: float, rng: np.random.Generator) -> np.ndarray:
    """Semantic ground raster [H, W] uint8 over [0, width_m] x [0, height_m], row j = y in [j*res, (j+1)*res)
    (bottom-up; flip rows to get the nuScenes map PNG)."""
    res = RASTER_RESOLUTION
    W, H = int(np.ceil(width_m / res)), int(np.ceil(height_m / res))
    img = np.full((H, W), G_LOT, np.uint8)

    def px(v):
        return int(round(v / res))

    x_roads, y_roads = grid.of_axis(1), grid.of_axis(0)  # axis 1 roads are vertical lines x = centre
    # Blocks: everything off the carriageways is sidewalk near the roads, grass/lot/terrain inside.
    for r in grid.roads:
        lo, hi = r.center - r.half_total, r.center + r.half_total
        if r.axis == 0:
            img[max(px(lo), 0):max(px(hi), 0), :] = G_SIDEWALK
        else:
            img[:, max(px(lo), 0):max(px(hi), 0)] = G_SIDEWALK
    # Grass strips and patches inside blocks (behind sidewalks) for variety.
    for _ in range(int(W * H * res * res / 2500)):
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        sx, sy = rng.uniform(40, 250), rng.uniform(40, 250)
        mask_cls = img[int(min(cy, H - 1)), int(min(cx, W - 1))]
        if mask_cls == G_LOT:
            cv2.rectangle(img, (int(cx - sx / 2), int(cy - sy / 2)), (int(cx + sx / 2), int(cy + sy / 2)),
                          int(G_GRASS), -1)
    for r in grid.roads:  # re-paint sidewalks over grass that spilled on them
        for side in (-1, 1):
            lo = r.center + side * r.half_carriageway
            hi = r.center + side * r.half_total
            a, b = sorted((px(lo), px(hi)))
            a, b = max(a, 0), max(b, 0)
            if r.axis == 0:
                img[a:b, :][img[a:b, :] == G_GRASS] = G_SIDEWALK
            else:
                img[:, a:b][img[:, a:b] == G_GRASS] = G_SIDEWALK
    # Carriageways: all curbs first, then all asphalt, so crossing roads cut through each other's curbs.
    curb = max(1, px(0.2))
    for r in grid.roads:
        lo, hi = px(r.center - r.half_carriageway), px(r.center + r.half_carriageway)
        if r.axis == 0:
            img[max(lo - curb, 0):max(hi + curb, 0), :] = G_CURB
        else:
            img[:, max(lo - curb, 0):max(hi + curb, 0)] = G_CURB
    for r in grid.roads:
        lo, hi = px(r.center - r.half_carriageway), px(r.center + r.half_carriageway)
        if r.axis == 0:
            img[max(lo, 0):max(hi, 0), :] = G_ASPHALT
        else:
            img[:, max(lo, 0):max(hi, 0)] = G_ASPHALT
    marking = img.copy()
    for r in grid.roads:
        crossing = y_roads if r.axis == 1 else x_roads

        def outside_intersections(coords):
            keep = np.ones_like(coords, dtype=bool)
            for c in crossing:
                keep &= np.abs(coords - c.center) > c.half_total + 1.0
            return keep

        along = np.arange(0, (W if r.axis == 0 else H)) * res
        # Centre line: double yellow; lane separators: dashed white (3 m on, 6 m off); edge lines white.
        lines = [(-0.12, G_YELLOW, False, 0.12), (0.12, G_YELLOW, False, 0.12)]
        for k in range(1, r.lanes_per_dir):
            lines += [(k * r.lane_width, G_MARKING, True, 0.12), (-k * r.lane_width, G_MARKING, True, 0.12)]
        edge = r.lanes_per_dir * r.lane_width
        lines += [(edge, G_MARKING, False, 0.15), (-edge, G_MARKING, False, 0.15)]
        keep = outside_intersections(along)
        for offset, cls, dashed, width in lines:
            ok = keep & ((along % 9.0) < 3.0) if dashed else keep
            c = r.center + offset
            a, b = px(c - width / 2), max(px(c + width / 2), px(c - width / 2) + 1)
            if a < 0:
                continue
            idx = np.nonzero(ok)[0]
            if r.axis == 0:
                marking[a:b, idx] = cls
            else:
                marking[idx, a:b] = cls
        # Crosswalks on both sides of each intersection along this road.
        for c in crossing:
            for side in (-1, 1):
                start = c.center + side * (c.half_total + 0.5)
                stop = start + side * 3.5
                lo_a, hi_a = sorted((px(start), px(stop)))
                stripes = np.arange(r.center - r.half_carriageway + 0.3, r.center + r.half_carriageway - 0.3, 1.2)
                for st in stripes:
                    a, b = px(st), px(st + 0.6)
                    if a < 0 or hi_a <= 0:
                        continue
                    if r.axis == 0:
                        marking[a:b, max(lo_a, 0):hi_a] = G_CROSSWALK
                    else:
                        marking[max(lo_a, 0):hi_a, a:b] = G_CROSSWALK
    return marking


def drivable_png(raster: np.ndarray) -> np.ndarray:
    """The nuScenes semantic prior: uint8 [H, W], 255 = drivable, 0 = not, rows top-down (PNG order)."""
    drivable = np.isin(raster, DRIVABLE_CLASSES).astype(np.uint8) * 255
    return np.ascontiguousarray(drivable[::-1])


def coloured_ground(raster: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB texture [H, W, 3] uint8 of the ground raster with low-frequency stains and fine grain."""
    colour = GROUND_COLORS[raster].astype(np.int16)
    h, w = raster.shape
    low = cv2.resize(rng.normal(0.0, 7.0, (max(h // 40, 2), max(w // 40, 2))).astype(np.float32), (w, h),
                     interpolation=cv2.INTER_LINEAR)
    grain = rng.integers(-6, 7, size=(h, w), dtype=np.int16)
    colour += (low.astype(np.int16) + grain)[..., None]
    return np.clip(colour, 0, 255).astype(np.uint8)
