"""One scene's world: road grid, ground raster, static structures, the ego trajectory and the actors' tracks.

Frames: global (map frame, meters; the map crop starts at (0, 0)). Times: scene seconds (0 = first LiDAR sweep).
Actor tracks are sampled on a common grid `World.times` (every TRACK_DT s) as x, y, z (box bottom), yaw, and the
nuScenes attribute index at each time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import shapes
from .roads import (RASTER_RESOLUTION, SIDEWALK_HEIGHT, EgoTrajectory, Path, RoadGrid, coloured_ground, make_grid,
                    plan_route, rasterize_ground, simulate_speed)

TRACK_DT = 0.05
MAP_MARGIN = 110.0  # meters of map around the drive (the devkit crops axes_limit * sqrt(2) around the ego)

ATTRIBUTE_NAMES = ("vehicle.moving", "vehicle.stopped", "vehicle.parked", "cycle.with_rider", "cycle.without_rider",
                   "pedestrian.sitting_lying_down", "pedestrian.standing", "pedestrian.moving")
NO_ATTR = -1
A_MOVING, A_STOPPED, A_PARKED, A_WITH_RIDER, A_WITHOUT_RIDER, A_SITTING, A_STANDING, A_PED_MOVING = range(8)

#: Radar cross-section (dBsm) range by category prefix.
RCS_BY_CATEGORY = {
    "vehicle.car": (5.0, 15.0), "vehicle.truck": (15.0, 25.0), "vehicle.bus": (17.0, 27.0),
    "vehicle.trailer": (15.0, 25.0), "vehicle.construction": (15.0, 24.0), "vehicle.motorcycle": (0.0, 6.0),
    "vehicle.bicycle": (-6.0, 2.0), "human.pedestrian": (-8.0, -1.0), "movable_object.barrier": (-2.0, 8.0),
    "movable_object.trafficcone": (-14.0, -6.0), "movable_object.pushable_pullable": (-6.0, 2.0),
}


@dataclass
class Actor:
    """An annotated object. size (l, w, h) m; tracks [T] on World.times: x, y, z (bottom of the box), yaw (rad),
    attribute index into ATTRIBUTE_NAMES (NO_ATTR for classes without attributes)."""

    index: int
    category: str
    size: np.ndarray
    shape: shapes.Shape
    rcs: float
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    yaw: np.ndarray
    attribute: np.ndarray
    moving: bool


@dataclass
class World:
    grid: RoadGrid
    raster: np.ndarray          # semantic ground classes [H, W], row j = y in [j*res, (j+1)*res)
    ground_rgb: np.ndarray      # [H, W, 3] RGB texture of the raster
    width_m: float
    height_m: float
    ego: EgoTrajectory
    statics: list[shapes.PlacedShape]
    actors: list[Actor]
    times: np.ndarray
    sun: np.ndarray             # unit vector towards the sun, global frame
    brightness: float           # scene lighting factor (1 = bright day)
    sky_top: tuple[int, int, int]
    sky_horizon: tuple[int, int, int]

    def __post_init__(self):
        n = len(self.times)
        stack = (lambda name: np.stack([getattr(a, name) for a in self.actors]) if self.actors  # noqa: E731
                 else np.zeros((0, n)))
        self._x, self._y, self._z, self._yaw = stack("x"), stack("y"), stack("z"), stack("yaw")
        self._attr = stack("attribute").astype(np.int64)
        self._dyaw = np.angle(np.exp(1j * np.diff(self._yaw, axis=1))) if self.actors else np.zeros((0, n - 1))

    def actor_poses(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, z, yaw, attribute) [A] of every actor at scene time t (linear interpolation; attribute of the
        nearest track sample)."""
        f = float(np.clip((t - self.times[0]) / TRACK_DT, 0.0, len(self.times) - 1.000001))
        i = int(f)
        w = f - i
        xs = self._x[:, i] * (1 - w) + self._x[:, i + 1] * w
        ys = self._y[:, i] * (1 - w) + self._y[:, i + 1] * w
        zs = self._z[:, i] * (1 - w) + self._z[:, i + 1] * w
        yaws = self._yaw[:, i] + self._dyaw[:, i] * w
        attrs = self._attr[:, i if w < 0.5 else i + 1]
        return xs, ys, zs, yaws, attrs

    def actor_velocities(self, t: float) -> np.ndarray:
        """[A, 2] ground velocity (m/s, global) of every actor at time t (central difference over 0.1 s)."""
        x0, y0, *_ = self.actor_poses(t - 0.05)
        x1, y1, *_ = self.actor_poses(t + 0.05)
        return np.stack([(x1 - x0) / 0.1, (y1 - y0) / 0.1], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Collision bookkeeping: every object is a chain of circles over time.

class Occupancy:
    def __init__(self, times: np.ndarray):
        self.sample = np.arange(0, len(times), 5)  # every 0.25 s
        self.centres = np.zeros((0, len(self.sample), 2))
        self.radii = np.zeros(0)

    @staticmethod
    def circles(size, x, y, yaw, sample, margin):
        l, w = float(size[0]), float(size[1])
        if l < w:  # barriers: long across the heading; circles of about the short side's diameter
            n = max(1, int(np.ceil(2.0 * w / max(l, 0.3))))
            offsets = np.stack([np.zeros(n), -w / 2 + (np.arange(n) + 0.5) * w / n], axis=1)
            r = np.hypot(w / (2 * n), l / 2) + margin
        else:
            n = max(1, int(np.ceil(2.0 * l / max(w, 0.3))))
            offsets = np.stack([-l / 2 + (np.arange(n) + 0.5) * l / n, np.zeros(n)], axis=1)
            r = np.hypot(l / (2 * n), w / 2) + margin
        c, s = np.cos(yaw[sample]), np.sin(yaw[sample])
        cx = x[sample][None] + offsets[:, 0:1] * c[None] - offsets[:, 1:2] * s[None]
        cy = y[sample][None] + offsets[:, 0:1] * s[None] + offsets[:, 1:2] * c[None]
        return np.stack([cx, cy], axis=-1), np.full(n, r)

    def try_add(self, size, x, y, yaw, margin=0.25, force=False) -> bool:
        centres, radii = self.circles(size, x, y, yaw, self.sample, margin)
        if len(self.radii) and not force:
            d = np.linalg.norm(centres[:, None] - self.centres[None], axis=-1)  # [C, A, T]
            if np.any(d < (radii[:, None, None] + self.radii[None, :, None])):
                return False
        self.centres = np.concatenate([self.centres, centres])
        self.radii = np.concatenate([self.radii, radii])
        return True


# ----------------------------------------------------------------------------------------------------------------

def _smooth_speed_profile(rng, times, v, stop_prob):
    """Speed [T] (m/s): constant v, or with a stop (decelerate, wait, accelerate)."""
    speed = np.full(len(times), v)
    stops = False
    if rng.random() < stop_prob:
        t_stop = rng.uniform(times[0] + 1.0, max(times[-1] - 2.0, times[0] + 1.5))
        dur = rng.uniform(2.0, 6.0)
        ramp = max(v / 2.0, 0.5)
        f = np.clip(np.minimum(np.abs(times - t_stop) - 0.0, np.abs(times - (t_stop + dur))) / ramp, 0.0, 1.0)
        inside = (times >= t_stop) & (times <= t_stop + dur)
        speed = np.where(inside, 0.0, v * f)
        stops = True
    return speed, stops


class _Spawner:
    """Places actors around the ego's route without collisions."""

    def __init__(self, rng, grid: RoadGrid, ego: EgoTrajectory, times: np.ndarray, scene_times, density):
        self.rng, self.grid, self.ego, self.times, self.density = rng, grid, ego, times, density
        self.occ = Occupancy(times)
        self.actors: list[Actor] = []
        exy, eyaw, *_ = ego.state(times)
        self.ego_xy = exy
        self.ego_yaw = eyaw
        in_scene = (times >= scene_times[0]) & (times <= scene_times[1])
        self.route_xy = exy[in_scene][::4]
        self.scene_mask = in_scene
        # The ego itself occupies space (rear axle origin, body centre 1.3 m ahead).
        cx = exy[:, 0] + 1.3 * np.cos(eyaw)
        cy = exy[:, 1] + 1.3 * np.sin(eyaw)
        self.occ.try_add(np.array([4.4, 2.0, 1.6]), cx, cy, eyaw, margin=0.6)

    def near_route(self, x: np.ndarray, y: np.ndarray, radius: float) -> bool:
        """Whether the (possibly moving) object comes within radius of the ego during the scene."""
        dx = x[self.scene_mask] - self.ego_xy[self.scene_mask, 0]
        dy = y[self.scene_mask] - self.ego_xy[self.scene_mask, 1]
        return bool(np.min(dx * dx + dy * dy) < radius * radius)

    def near_path(self, x: float, y: float, radius: float) -> bool:
        d = np.hypot(self.route_xy[:, 0] - x, self.route_xy[:, 1] - y)
        return bool(d.min() < radius)

    def add(self, category_builder, x, y, z, yaw, attribute, moving, margin=0.25, size_shape=None,
            force=False) -> Actor | None:
        """Add an actor with these tracks (scalars or [T]) unless it collides with one already placed (force:
        add anyway, for parts of a rig such as a semi-trailer) or never comes near the ego."""
        n = len(self.times)
        x = np.broadcast_to(np.asarray(x, dtype=np.float64), (n,)).copy()
        y = np.broadcast_to(np.asarray(y, dtype=np.float64), (n,)).copy()
        z = np.broadcast_to(np.asarray(z, dtype=np.float64), (n,)).copy()
        yaw = np.broadcast_to(np.asarray(yaw, dtype=np.float64), (n,)).copy()
        attribute = np.broadcast_to(np.asarray(attribute, dtype=np.int64), (n,)).copy()
        if not self.near_route(x, y, 85.0):
            return None
        size, shape, category = size_shape if size_shape is not None else category_builder()
        if not self.occ.try_add(size, x, y, yaw, margin, force):
            return None
        prefix = next(k for k in RCS_BY_CATEGORY if category.startswith(k))
        lo, hi = RCS_BY_CATEGORY[prefix]
        actor = Actor(len(self.actors), category, size, shape, float(self.rng.uniform(lo, hi)), x, y, z, yaw,
                      attribute, moving)
        self.actors.append(actor)
        return actor


def _road_frame(road, direction: int):
    """(unit direction d [2], right vector [2]) of travel along `road` in `direction` (+1/-1)."""
    d = np.array([1.0, 0.0]) if road.axis == 0 else np.array([0.0, 1.0])
    d = d * direction
    return d, np.array([d[1], -d[0]])


def _point_on_road(road, along: float, lateral: float, direction: int):
    """Global (x, y) of a point `along` the road (coordinate of its axis) at `lateral` (right of travel)."""
    d, right = _road_frame(road, direction)
    base = np.zeros(2)
    base[road.axis] = along
    base[1 - road.axis] = road.center
    return base + right * lateral


def _near_intersection(grid: RoadGrid, road, along: float, clearance: float) -> bool:
    for c in grid.of_axis(1 - road.axis):
        if abs(along - c.center) < c.half_total + clearance:
            return True
    return False


def _ego_roads(sp: "_Spawner", roads) -> list[tuple]:
    """[(road, travel direction +-1, coordinate along the road)] of the ego at a few times of the scene."""
    times = sp.times[sp.scene_mask]
    out = []
    for t in times[[len(times) // 4, len(times) // 2, 3 * len(times) // 4, 0]]:
        xy, yaw, *_ = sp.ego.state(np.array([t]))
        axis = 0 if abs(np.cos(yaw[0])) > abs(np.sin(yaw[0])) else 1
        for r in roads:
            if r.axis == axis and abs(xy[0, 1 - axis] - r.center) < r.half_carriageway:
                direction = 1 if (np.cos(yaw[0]) if axis == 0 else np.sin(yaw[0])) > 0 else -1
                out.append((r, direction, float(xy[0, axis])))
    return out


def _place_near_ego(sp: "_Spawner", roads, place) -> None:
    """Call place(road, side, along) beside the ego's road ahead of it (far side first) until one succeeds."""
    for road, direction, along in _ego_roads(sp, roads):
        for side in (-direction, direction):  # the far side first; the ego's own lane stays clear (occupancy)
            for ahead in (20.0, 35.0, 50.0, 65.0, 12.0, 80.0):
                if place(road, side, along + direction * (ahead + float(sp.rng.uniform(-4, 4)))):
                    return


def _construction_zone(sp: "_Spawner", road, direction: int, along: float) -> bool:
    """Barriers along a closed parking/outer lane, a taper of cones before it, construction vehicles and workers.
    Returns whether any barrier was placed."""
    rng, grid = sp.rng, sp.grid
    if _near_intersection(grid, road, along, 12.0):
        return False
    lateral = road.parking_offset() if road.parking else road.lane_offset(road.lanes_per_dir - 1)
    length = float(rng.uniform(12.0, 25.0))
    d, right = _road_frame(road, direction)
    heading = float(np.arctan2(d[1], d[0]))
    inner = lateral - 2.4  # barriers along the inner edge of the zone (long side along the road)
    s, placed = 0.0, 0
    while s < length:
        p = _point_on_road(road, along + direction * s, inner, direction)
        placed += sp.add(lambda: shapes.barrier(rng), p[0], p[1], 0.0, heading + np.pi / 2, NO_ATTR, False,
                         margin=0.05) is not None
        s += float(rng.uniform(2.4, 3.2))
    if not placed:
        return False
    n_cones = int(rng.integers(4, 9))  # a taper before the zone, from its inner edge out to the curb side
    for k in range(n_cones):
        p = _point_on_road(road, along - direction * (2.0 + 2.5 * k), inner + 2.0 * k / n_cones, direction)
        sp.add(lambda: shapes.traffic_cone(rng), p[0], p[1], 0.0, rng.uniform(-np.pi, np.pi), NO_ATTR, False,
               margin=0.05)
    for k in range(int(rng.integers(1, 3))):
        p = _point_on_road(road, along + direction * length * (0.3 + 0.4 * k), lateral - 0.25, direction)
        sp.add(lambda: shapes.construction_vehicle(rng), p[0], p[1], 0.0, heading + rng.choice([0, np.pi]),
               A_PARKED if rng.random() < 0.6 else A_STOPPED, False, margin=0.1)
    for _ in range(int(rng.integers(1, 4))):
        p = _point_on_road(road, along + direction * rng.uniform(0, length), lateral + rng.uniform(-1, 1.5),
                           direction)
        sp.add(lambda: shapes.pedestrian(rng, "standing", "construction_worker"), p[0], p[1], 0.0,
               rng.uniform(-np.pi, np.pi), A_STANDING, False, margin=0.1)
    return True


def _bus_stop(sp: "_Spawner", road, direction: int, along: float) -> bool:
    """A bus stopped at the curb (parking or outer lane) with people waiting on the sidewalk. Returns success."""
    rng = sp.rng
    if _near_intersection(sp.grid, road, along, 15.0):
        return False
    d, right = _road_frame(road, direction)
    lateral = road.parking_offset() - 0.6 if road.parking else road.lane_offset(road.lanes_per_dir - 1)
    p = _point_on_road(road, along, lateral, direction)
    if sp.add(lambda: shapes.bus(rng, True), p[0], p[1], 0.0, float(np.arctan2(d[1], d[0])), A_STOPPED, False,
              margin=0.1):
        for _ in range(int(rng.integers(1, 4))):
            q = _point_on_road(road, along + rng.uniform(-5, 5), road.half_carriageway + rng.uniform(0.8, 2.0),
                               direction)
            sp.add(lambda: shapes.pedestrian(rng, "standing"), q[0], q[1], SIDEWALK_HEIGHT,
                   rng.uniform(-np.pi, np.pi), A_STANDING, False, margin=0.05)
        return True
    return False


def _spawn_actors(sp: _Spawner, span: tuple[float, float, float, float]):
    rng, grid, times, density = sp.rng, sp.grid, sp.times, sp.density
    x0, x1, y0, y1 = span
    roads = [r for r in grid.roads
             if (r.axis == 0 and y0 - 30 < r.center < y1 + 30) or (r.axis == 1 and x0 - 30 < r.center < x1 + 30)]
    lo_hi = {0: (x0 - 40, x1 + 40), 1: (y0 - 40, y1 + 40)}

    def vehicle_builder(braking=False):
        u = rng.random()
        if u < 0.74:
            return shapes.car(rng, braking)
        if u < 0.88:
            return shapes.truck(rng, braking)
        if u < 0.96:
            return shapes.bus(rng, braking)
        return shapes.trailer(rng, braking) if u < 0.98 else shapes.construction_vehicle(rng, braking)

    # --- Lead vehicle following the ego's route ahead of it.
    if rng.random() < 0.45 * min(1.0, density):
        s_ego = sp.ego._interp(sp.ego.s, times)
        v_ego = sp.ego._interp(sp.ego.v, times)
        gap = 9.0 + 1.3 * v_ego + rng.uniform(0, 5)
        xy, heading, _ = sp.ego.path.at(s_ego + gap)
        speed = np.gradient(s_ego + gap, times)
        attr = np.where(speed > 0.4, A_MOVING, A_STOPPED)
        sp.add(lambda: shapes.car(rng, True), xy[:, 0], xy[:, 1], 0.0, heading, attr, True, margin=0.1)

    # --- Construction zones and bus stops: one of each beside the ego's own road, ahead of it (so every scene, and
    # so every split, has barriers, cones, construction vehicles and a bus), and some elsewhere.
    _place_near_ego(sp, roads, lambda road, direction, along: _construction_zone(sp, road, direction, along))
    _place_near_ego(sp, roads, lambda road, direction, along: _bus_stop(sp, road, direction, along))
    for _ in range(int(rng.poisson(2.0 * density))):
        road = roads[int(rng.integers(len(roads)))]
        lo, hi = lo_hi[road.axis]
        _construction_zone(sp, road, int(rng.choice([-1, 1])), float(rng.uniform(lo, hi)))

    # --- Parked vehicles along parking lanes, bins/bikes/pedestrians on sidewalks.
    for road in roads:
        lo, hi = lo_hi[road.axis]
        for direction in (-1, 1):
            d, right = _road_frame(road, direction)
            heading = float(np.arctan2(d[1], d[0]))
            if road.parking:
                a = lo
                while a < hi:
                    a += float(rng.uniform(5.5, 9.0))
                    if rng.random() > 0.65 * density or _near_intersection(grid, road, a, 8.0):
                        continue
                    p = _point_on_road(road, a, road.parking_offset() + rng.normal(0, 0.1), direction)
                    u = rng.random()
                    if u < 0.04:
                        builder = lambda: shapes.motorcycle(rng, False)  # noqa: E731
                        attr = A_WITHOUT_RIDER
                    elif u < 0.09:
                        builder = lambda: shapes.trailer(rng)  # noqa: E731
                        attr = A_PARKED
                    else:
                        builder = vehicle_builder
                        attr = A_PARKED
                    sp.add(builder, p[0], p[1], 0.0, heading + rng.normal(0, 0.03), attr, False,
                           margin=0.15)
            # Sidewalk: the band between the curb and the back of the sidewalk, raised.
            sw_in = road.half_carriageway
            sw_out = road.half_total
            a = lo
            while a < hi:
                a += float(rng.uniform(10.0, 22.0)) / max(density, 0.2)
                if _near_intersection(grid, road, a, 0.0):
                    continue
                u = rng.random()
                lat = float(rng.uniform(sw_in + 0.8, sw_out - 0.4))
                p = _point_on_road(road, a, lat, direction)
                z = SIDEWALK_HEIGHT
                if u < 0.35:  # walking along the sidewalk
                    v = float(rng.uniform(0.9, 1.7)) * rng.choice([-1, 1])
                    along = a + v * (times - times[0]) * direction
                    pts = np.stack([_point_on_road(road, s, lat, direction) for s in along[::20]])
                    xs = np.interp(times, times[::20], pts[:, 0])
                    ys = np.interp(times, times[::20], pts[:, 1])
                    on_crossing = np.zeros(len(times), bool)
                    for c in grid.of_axis(1 - road.axis):  # crossing a side street: down on the road
                        on_crossing |= np.abs(along - c.center) < c.half_carriageway
                    z = np.where(on_crossing, 0.0, SIDEWALK_HEIGHT)
                    kind = "child" if rng.random() < 0.1 else ("police_officer" if rng.random() < 0.03 else "adult")
                    sp.add(lambda: shapes.pedestrian(rng, "moving", kind), xs, ys, z,
                           heading + (0 if v > 0 else np.pi), A_PED_MOVING, True, margin=0.05)
                elif u < 0.5:
                    for g in range(int(rng.integers(1, 3))):
                        q = p + rng.normal(0, 0.5, 2)
                        sp.add(lambda: shapes.pedestrian(rng, "standing"), q[0], q[1], z,
                               rng.uniform(-np.pi, np.pi), A_STANDING, False, margin=0.05)
                elif u < 0.56:
                    q = _point_on_road(road, a, sw_out - 0.4, direction)
                    sp.add(lambda: shapes.pedestrian(rng, "sitting"), q[0], q[1], z, heading - np.pi / 2,
                           A_SITTING, False, margin=0.05)
                elif u < 0.66:
                    q = _point_on_road(road, a, sw_in + 0.5, direction)
                    sp.add(lambda: shapes.bicycle(rng, False), q[0], q[1], z, heading + rng.normal(0, 0.2),
                           A_WITHOUT_RIDER, False, margin=0.05)
                elif u < 0.74:
                    q = _point_on_road(road, a, sw_out - 0.5, direction)
                    sp.add(lambda: shapes.trash_bin(rng), q[0], q[1], z, heading, NO_ATTR, False, margin=0.05)
                elif u < 0.8:
                    q = _point_on_road(road, a, sw_in + 0.45, direction)
                    sp.add(lambda: shapes.traffic_cone(rng), q[0], q[1], z, rng.uniform(-np.pi, np.pi), NO_ATTR,
                           False, margin=0.05)

    # --- Moving traffic: platoons per travel lane, straight along the road.
    for road in roads:
        lo, hi = lo_hi[road.axis]
        for direction in (-1, 1):
            d, right = _road_frame(road, direction)
            heading = float(np.arctan2(d[1], d[0]))
            for lane in range(road.lanes_per_dir):
                v = float(rng.uniform(4.0, 12.0))
                speed, stops = _smooth_speed_profile(rng, times, v, 0.3)
                s_profile = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * np.diff(times))])
                a = lo - 60.0 - rng.uniform(0, 30)
                while a < hi + 60:
                    a += float(rng.uniform(10.0, 38.0)) / max(density, 0.2)
                    u = rng.random()
                    start = a if direction > 0 else (lo + hi) - a
                    along = start + direction * s_profile
                    xy = np.stack([_point_on_road(road, s, road.lane_offset(lane) + rng.normal(0, 0.05), direction)
                                   for s in along[::20]])
                    xs = np.interp(times, times[::20], xy[:, 0])
                    ys = np.interp(times, times[::20], xy[:, 1])
                    attr = np.where(speed > 0.4, A_MOVING, A_STOPPED)
                    if u < 0.06 and lane == road.lanes_per_dir - 1:
                        builder = lambda: shapes.bicycle(rng, True)  # noqa: E731
                        along_bike = start + direction * s_profile * 0.45  # cyclists ride slower, near the edge
                        xy = np.stack([_point_on_road(road, s, road.lane_offset(lane) + 1.0, direction)
                                       for s in along_bike[::20]])
                        xs = np.interp(times, times[::20], xy[:, 0])
                        ys = np.interp(times, times[::20], xy[:, 1])
                        attr = np.full(len(times), A_WITH_RIDER)
                    elif u < 0.1:
                        builder = lambda: shapes.motorcycle(rng, True)  # noqa: E731
                        attr = np.full(len(times), A_WITH_RIDER)
                    else:
                        built = vehicle_builder(stops)
                        builder = None
                        if built[2] == "vehicle.truck" and rng.random() < 0.35:  # a semi with its trailer
                            trailer = shapes.trailer(rng, stops)
                            back = (built[0][0] + trailer[0][0]) / 2 + 0.6
                            if sp.add(None, xs, ys, 0.0, heading, attr, True, margin=0.3, size_shape=built):
                                sp.add(None, xs - d[0] * back, ys - d[1] * back, 0.0, heading, attr, True,
                                       margin=0.1, size_shape=trailer, force=True)
                            continue
                        builder = (lambda b=built: b)  # noqa: E731
                    sp.add(builder, xs, ys, 0.0, heading, attr, True, margin=0.3)

    # --- Lines of barriers on the centre line (road works), and buses stopped at bus stops.
    for _ in range(int(rng.poisson(2.0 * density))):
        road = roads[int(rng.integers(len(roads)))]
        lo, hi = lo_hi[road.axis]
        start = float(rng.uniform(lo, hi))
        d, right = _road_frame(road, 1)
        heading = float(np.arctan2(d[1], d[0]))
        for k in range(int(rng.integers(4, 12))):
            along = start + k * 2.7
            if _near_intersection(grid, road, along, 3.0):
                continue
            p = _point_on_road(road, along, 0.0, 1)
            sp.add(lambda: shapes.barrier(rng), p[0], p[1], 0.0, heading + np.pi / 2, NO_ATTR, False, margin=0.02)
    for _ in range(int(rng.poisson(1.0 * density))):  # cones along a lane edge
        road = roads[int(rng.integers(len(roads)))]
        direction = int(rng.choice([-1, 1]))
        start = float(rng.uniform(*lo_hi[road.axis]))
        lateral = road.lanes_per_dir * road.lane_width - 0.3
        for k in range(int(rng.integers(4, 10))):
            if not _near_intersection(grid, road, start + 3.0 * k, 2.0):
                p = _point_on_road(road, start + 3.0 * k, lateral, direction)
                sp.add(lambda: shapes.traffic_cone(rng), p[0], p[1], 0.0, rng.uniform(-np.pi, np.pi), NO_ATTR,
                       False, margin=0.02)
    for _ in range(int(rng.poisson(1.5 * density))):
        road = roads[int(rng.integers(len(roads)))]
        _bus_stop(sp, road, int(rng.choice([-1, 1])), float(rng.uniform(*lo_hi[road.axis])))

    # --- Pedestrians crossing at crosswalks.
    for _ in range(int(rng.poisson(3 * density))):
        road = roads[int(rng.integers(len(roads)))]
        cross = [c for c in grid.of_axis(1 - road.axis) if lo_hi[road.axis][0] < c.center < lo_hi[road.axis][1]]
        if not cross:
            continue
        c = cross[int(rng.integers(len(cross)))]
        side = rng.choice([-1, 1])
        along = c.center + side * (c.half_total + 2.2)
        v = float(rng.uniform(1.0, 1.6))
        t_start = rng.uniform(times[0], max(times[-1] - 5.0, times[0] + 0.5))
        width = 2 * road.half_total
        lat = np.clip((times - t_start) * v, 0.0, width) - road.half_total
        sgn = rng.choice([-1, 1])
        pts = np.stack([_point_on_road(road, along, sgn * l_, 1) for l_ in lat[::10]])
        xs = np.interp(times, times[::10], pts[:, 0])
        ys = np.interp(times, times[::10], pts[:, 1])
        moving = ((times > t_start) & (lat < road.half_total - 0.01)).astype(bool)
        d, right = _road_frame(road, 1)
        walk_dir = right * sgn
        yaw = float(np.arctan2(walk_dir[1], walk_dir[0]))
        on_sidewalk = np.abs(lat) > road.half_carriageway
        z = np.where(on_sidewalk, SIDEWALK_HEIGHT, 0.0)
        attr = np.where(moving, A_PED_MOVING, A_STANDING)
        sp.add(lambda: shapes.pedestrian(rng, "moving"), xs, ys, z, yaw, attr, True, margin=0.05)


def _static_structures(rng, grid: RoadGrid, span, spawner: _Spawner) -> list[shapes.PlacedShape]:
    """Raised blocks (sidewalks with curbs), buildings, walls, street lights, trees and traffic lights."""
    x0, x1, y0, y1 = span
    out: list[shapes.PlacedShape] = []
    xs = sorted(grid.of_axis(1), key=lambda r: r.center)
    ys = sorted(grid.of_axis(0), key=lambda r: r.center)
    footprints: list[tuple[float, float, float, float]] = []

    def overlaps(b):
        return any(b[0] < f[1] and f[0] < b[1] and b[2] < f[3] and f[2] < b[3] for f in footprints)

    for i in range(len(xs) - 1):
        for j in range(len(ys) - 1):
            bx0, bx1 = xs[i].center + xs[i].half_carriageway, xs[i + 1].center - xs[i + 1].half_carriageway
            by0, by1 = ys[j].center + ys[j].half_carriageway, ys[j + 1].center - ys[j + 1].half_carriageway
            if bx1 < x0 - 40 or bx0 > x1 + 40 or by1 < y0 - 40 or by0 > y1 + 40:
                continue
            out.append(shapes.PlacedShape(shapes.slab(bx1 - bx0, by1 - by0), (bx0 + bx1) / 2, (by0 + by1) / 2, 0.0,
                                          0.0, "slab"))
            # Buildings along the four edges of the block (lot = inside the sidewalks).
            lx0, lx1 = xs[i].center + xs[i].half_total, xs[i + 1].center - xs[i + 1].half_total
            ly0, ly1 = ys[j].center + ys[j].half_total, ys[j + 1].center - ys[j + 1].half_total
            for edge in ("south", "north", "west", "east"):
                horizontal = edge in ("south", "north")
                a, b = (lx0, lx1) if horizontal else (ly0, ly1)
                depth_max = ((ly1 - ly0) if horizontal else (lx1 - lx0)) / 2 - 1.0
                pos = a + rng.uniform(0, 4)
                while pos < b - 6:
                    length = float(rng.uniform(9.0, 32.0))
                    length = min(length, b - pos)
                    setback = float(rng.uniform(0.0, 3.0))
                    depth = float(min(rng.uniform(10.0, 26.0), depth_max))
                    kind = rng.random()
                    if depth < 4 or length < 5:
                        pos += length + rng.uniform(1, 6)
                        continue
                    if horizontal:
                        cx = pos + length / 2
                        cy = (ly0 + setback + depth / 2) if edge == "south" else (ly1 - setback - depth / 2)
                        box = (pos, pos + length, cy - depth / 2, cy + depth / 2)
                        l_, w_ = length, depth
                        face = "right" if edge == "south" else "left"
                    else:
                        cy = pos + length / 2
                        cx = (lx0 + setback + depth / 2) if edge == "west" else (lx1 - setback - depth / 2)
                        box = (cx - depth / 2, cx + depth / 2, pos, pos + length)
                        l_, w_ = depth, length
                        face = "back" if edge == "west" else "front"
                    if not overlaps(box):
                        if kind < 0.8:
                            h = float(np.clip(rng.lognormal(np.log(11.0), 0.5), 4.0, 45.0))
                            shape = shapes.building(rng, l_, w_, h, face)
                            out.append(shapes.PlacedShape(shape, cx, cy, shapes_z(), 0.0, "building",
                                                          np.array([l_, w_])))
                            footprints.append(box)
                        elif kind < 0.9:
                            h = float(rng.uniform(1.2, 2.5))
                            if horizontal:
                                wy = ly0 + 0.3 if edge == "south" else ly1 - 0.3
                                out.append(shapes.PlacedShape(shapes.wall(rng, length, h), cx, wy, shapes_z(), 0.0,
                                                              "wall"))
                            else:
                                wx = lx0 + 0.3 if edge == "west" else lx1 - 0.3
                                out.append(shapes.PlacedShape(shapes.wall(rng, length, h), wx, cy, shapes_z(),
                                                              np.pi / 2, "wall"))
                    pos += length + float(rng.uniform(0.5, 8.0))
    # Street furniture on the sidewalks (curb side), avoiding intersections.
    for road in grid.roads:
        lo, hi = (x0 - 40, x1 + 40) if road.axis == 0 else (y0 - 40, y1 + 40)
        trees = rng.random() < 0.6
        for direction in (-1, 1):
            d, right = _road_frame(road, direction)
            lat = road.half_carriageway + 0.6
            a = lo + rng.uniform(0, 10)
            k = 0
            while a < hi:
                if not _near_intersection(grid, road, a, 2.0):
                    p = _point_on_road(road, a, lat, direction)
                    if k % 3 == 0:
                        yaw = float(np.arctan2(-right[1], -right[0])) + np.pi / 2
                        out.append(shapes.PlacedShape(shapes.street_light(rng), p[0], p[1], shapes_z(), yaw, "pole"))
                    elif trees:
                        out.append(shapes.PlacedShape(shapes.tree(rng), p[0], p[1], shapes_z(), 0.0, "tree"))
                a += float(rng.uniform(9.0, 14.0))
                k += 1
            # traffic light at the corner before each intersection
            for c in grid.of_axis(1 - road.axis):
                if lo < c.center < hi:
                    p = _point_on_road(road, c.center - direction * (c.half_total + 0.8), lat, direction)
                    out.append(shapes.PlacedShape(shapes.traffic_light(rng), p[0], p[1], shapes_z(),
                                                  float(np.arctan2(-d[1], -d[0])), "pole"))
    for s in out:  # structures occupy space: actors avoid them
        if s.kind in ("pole", "tree"):
            n = len(spawner.times)
            spawner.occ.try_add(np.array([0.5, 0.5, 1.0]), np.full(n, s.x), np.full(n, s.y), np.zeros(n), margin=0.1)
    return out


def shapes_z() -> float:
    """Structures stand on the raised block surface."""
    return SIDEWALK_HEIGHT


def build_world(rng: np.random.Generator, scene_seconds: float, scene_start: float, scene_end: float,
                density: float) -> World:
    """Generate a scene's world. The ego drives during [scene_start, scene_end] (scene seconds)."""
    grid = make_grid(rng)
    plan = plan_route(rng, grid, length=30.0 + 13.0 * (scene_end + 1.5) + 80.0)
    ego = simulate_speed(rng, plan, scene_start - 1.5, scene_end + 1.5)
    # Crop: everything the ego passes (+ margin); shift so that the crop starts at (0, 0).
    xy, *_ = ego.state(np.arange(scene_start - 1.5, scene_end + 1.5, 0.1))
    lo = xy.min(axis=0) - MAP_MARGIN
    hi = xy.max(axis=0) + MAP_MARGIN
    offset = np.floor(lo)
    grid = grid.shifted(offset)
    path = Path(plan.path.xy - offset, plan.path.heading, plan.path.curvature, plan.path.step)
    ego = EgoTrajectory(path, ego.t0, ego.dt, ego.s, ego.v, ego.a)
    width_m, height_m = float(np.ceil(hi[0] - offset[0])), float(np.ceil(hi[1] - offset[1]))
    raster = rasterize_ground(grid, width_m, height_m, rng)
    ground_rgb = coloured_ground(raster, rng)
    times = np.arange(scene_start - 1.0, scene_end + 1.0 + TRACK_DT, TRACK_DT)
    spawner = _Spawner(rng, grid, ego, times, (scene_start, scene_end), density)
    # structures and actors around the drive (+-70 m), inside the map
    span_inner = (MAP_MARGIN - 70, width_m - MAP_MARGIN + 70, MAP_MARGIN - 70, height_m - MAP_MARGIN + 70)
    statics = _static_structures(rng, grid, span_inner, spawner)
    _spawn_actors(spawner, span_inner)
    elevation = rng.uniform(np.radians(25), np.radians(65))
    azimuth = rng.uniform(-np.pi, np.pi)
    sun = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
    overcast = rng.random() < 0.35
    brightness = float(rng.uniform(0.55, 0.8) if rng.random() < 0.15 else rng.uniform(0.85, 1.1))
    sky_top = (170, 172, 176) if overcast else (92, 142, 205)
    sky_horizon = (205, 206, 208) if overcast else (185, 210, 232)
    return World(grid, raster, ground_rgb, width_m, height_m, ego, statics, spawner.actors, times, sun, brightness,
                 sky_top, sky_horizon)


__all__ = ["World", "Actor", "build_world", "ATTRIBUTE_NAMES", "NO_ATTR", "RASTER_RESOLUTION"]
