"""The annotated road users of a scene's world and their tracks: who is where, on which road, at every time.

Spawning cars, trucks, buses, cyclists, pedestrians, barriers and cones around the ego's route, without collisions
(each object a chain of circles over time), with speed profiles, stops, parking, construction zones and bus stops.
Frames: global (map frame, meters). Times: scene seconds. Tracks are sampled every TRACK_DT seconds as x, y, z (box
bottom), yaw (radians) and the nuScenes attribute index.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import shapes
from .roads import SIDEWALK_HEIGHT, EgoTrajectory, RoadGrid

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


class Spawner:
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


def road_frame(road, direction: int):
    """(unit direction d [2], right vector [2]) of travel along `road` in `direction` (+1/-1)."""
    d = np.array([1.0, 0.0]) if road.axis == 0 else np.array([0.0, 1.0])
    d = d * direction
    return d, np.array([d[1], -d[0]])


def point_on_road(road, along: float, lateral: float, direction: int):
    """Global (x, y) of a point `along` the road (coordinate of its axis) at `lateral` (right of travel)."""
    d, right = road_frame(road, direction)
    base = np.zeros(2)
    base[road.axis] = along
    base[1 - road.axis] = road.center
    return base + right * lateral


def near_intersection(grid: RoadGrid, road, along: float, clearance: float) -> bool:
    for c in grid.of_axis(1 - road.axis):
        if abs(along - c.center) < c.half_total + clearance:
            return True
    return False


def _ego_roads(sp: "Spawner", roads) -> list[tuple]:
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


def _place_near_ego(sp: "Spawner", roads, place) -> None:
    """Call place(road, side, along) beside the ego's road ahead of it (far side first) until one succeeds."""
    for road, direction, along in _ego_roads(sp, roads):
        for side in (-direction, direction):  # the far side first; the ego's own lane stays clear (occupancy)
            for ahead in (20.0, 35.0, 50.0, 65.0, 12.0, 80.0):
                if place(road, side, along + direction * (ahead + float(sp.rng.uniform(-4, 4)))):
                    return


def _construction_zone(sp: "Spawner", road, direction: int, along: float) -> bool:
    """Barriers along a closed parking/outer lane, a taper of cones before it, construction vehicles and workers.
    Returns whether any barrier was placed."""
    rng, grid = sp.rng, sp.grid
    if near_intersection(grid, road, along, 12.0):
        return False
    lateral = road.parking_offset() if road.parking else road.lane_offset(road.lanes_per_dir - 1)
    length = float(rng.uniform(12.0, 25.0))
    d, right = road_frame(road, direction)
    heading = float(np.arctan2(d[1], d[0]))
    inner = lateral - 2.4  # barriers along the inner edge of the zone (long side along the road)
    s, placed = 0.0, 0
    while s < length:
        p = point_on_road(road, along + direction * s, inner, direction)
        placed += sp.add(lambda: shapes.barrier(rng), p[0], p[1], 0.0, heading + np.pi / 2, NO_ATTR, False,
                         margin=0.05) is not None
        s += float(rng.uniform(2.4, 3.2))
    if not placed:
        return False
    n_cones = int(rng.integers(4, 9))  # a taper before the zone, from its inner edge out to the curb side
    for k in range(n_cones):
        p = point_on_road(road, along - direction * (2.0 + 2.5 * k), inner + 2.0 * k / n_cones, direction)
        sp.add(lambda: shapes.traffic_cone(rng), p[0], p[1], 0.0, rng.uniform(-np.pi, np.pi), NO_ATTR, False,
               margin=0.05)
    for k in range(int(rng.integers(1, 3))):
        p = point_on_road(road, along + direction * length * (0.3 + 0.4 * k), lateral - 0.25, direction)
        sp.add(lambda: shapes.construction_vehicle(rng), p[0], p[1], 0.0, heading + rng.choice([0, np.pi]),
               A_PARKED if rng.random() < 0.6 else A_STOPPED, False, margin=0.1)
    for _ in range(int(rng.integers(1, 4))):
        p = point_on_road(road, along + direction * rng.uniform(0, length), lateral + rng.uniform(-1, 1.5),
                           direction)
        sp.add(lambda: shapes.pedestrian(rng, "standing", "construction_worker"), p[0], p[1], 0.0,
               rng.uniform(-np.pi, np.pi), A_STANDING, False, margin=0.1)
    return True


def _bus_stop(sp: "Spawner", road, direction: int, along: float) -> bool:
    """A bus stopped at the curb (parking or outer lane) with people waiting on the sidewalk. Returns success."""
    rng = sp.rng
    if near_intersection(sp.grid, road, along, 15.0):
        return False
    d, right = road_frame(road, direction)
    lateral = road.parking_offset() - 0.6 if road.parking else road.lane_offset(road.lanes_per_dir - 1)
    p = point_on_road(road, along, lateral, direction)
    if sp.add(lambda: shapes.bus(rng, True), p[0], p[1], 0.0, float(np.arctan2(d[1], d[0])), A_STOPPED, False,
              margin=0.1):
        for _ in range(int(rng.integers(1, 4))):
            q = point_on_road(road, along + rng.uniform(-5, 5), road.half_carriageway + rng.uniform(0.8, 2.0),
                               direction)
            sp.add(lambda: shapes.pedestrian(rng, "standing"), q[0], q[1], SIDEWALK_HEIGHT,
                   rng.uniform(-np.pi, np.pi), A_STANDING, False, margin=0.05)
        return True
    return False


def spawn_actors(sp: Spawner, span: tuple[float, float, float, float]):
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
            d, right = road_frame(road, direction)
            heading = float(np.arctan2(d[1], d[0]))
            if road.parking:
                a = lo
                while a < hi:
                    a += float(rng.uniform(5.5, 9.0))
                    if rng.random() > 0.65 * density or near_intersection(grid, road, a, 8.0):
                        continue
                    p = point_on_road(road, a, road.parking_offset() + rng.normal(0, 0.1), direction)
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
                if near_intersection(grid, road, a, 0.0):
                    continue
                u = rng.random()
                lat = float(rng.uniform(sw_in + 0.8, sw_out - 0.4))
                p = point_on_road(road, a, lat, direction)
                z = SIDEWALK_HEIGHT
                if u < 0.35:  # walking along the sidewalk
                    v = float(rng.uniform(0.9, 1.7)) * rng.choice([-1, 1])
                    along = a + v * (times - times[0]) * direction
                    pts = np.stack([point_on_road(road, s, lat, direction) for s in along[::20]])
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
                    q = point_on_road(road, a, sw_out - 0.4, direction)
                    sp.add(lambda: shapes.pedestrian(rng, "sitting"), q[0], q[1], z, heading - np.pi / 2,
                           A_SITTING, False, margin=0.05)
                elif u < 0.66:
                    q = point_on_road(road, a, sw_in + 0.5, direction)
                    sp.add(lambda: shapes.bicycle(rng, False), q[0], q[1], z, heading + rng.normal(0, 0.2),
                           A_WITHOUT_RIDER, False, margin=0.05)
                elif u < 0.74:
                    q = point_on_road(road, a, sw_out - 0.5, direction)
                    sp.add(lambda: shapes.trash_bin(rng), q[0], q[1], z, heading, NO_ATTR, False, margin=0.05)
                elif u < 0.8:
                    q = point_on_road(road, a, sw_in + 0.45, direction)
                    sp.add(lambda: shapes.traffic_cone(rng), q[0], q[1], z, rng.uniform(-np.pi, np.pi), NO_ATTR,
                           False, margin=0.05)

    # --- Moving traffic: platoons per travel lane, straight along the road.
    for road in roads:
        lo, hi = lo_hi[road.axis]
        for direction in (-1, 1):
            d, right = road_frame(road, direction)
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
                    xy = np.stack([point_on_road(road, s, road.lane_offset(lane) + rng.normal(0, 0.05), direction)
                                   for s in along[::20]])
                    xs = np.interp(times, times[::20], xy[:, 0])
                    ys = np.interp(times, times[::20], xy[:, 1])
                    attr = np.where(speed > 0.4, A_MOVING, A_STOPPED)
                    if u < 0.06 and lane == road.lanes_per_dir - 1:
                        builder = lambda: shapes.bicycle(rng, True)  # noqa: E731
                        along_bike = start + direction * s_profile * 0.45  # cyclists ride slower, near the edge
                        xy = np.stack([point_on_road(road, s, road.lane_offset(lane) + 1.0, direction)
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
        d, right = road_frame(road, 1)
        heading = float(np.arctan2(d[1], d[0]))
        for k in range(int(rng.integers(4, 12))):
            along = start + k * 2.7
            if near_intersection(grid, road, along, 3.0):
                continue
            p = point_on_road(road, along, 0.0, 1)
            sp.add(lambda: shapes.barrier(rng), p[0], p[1], 0.0, heading + np.pi / 2, NO_ATTR, False, margin=0.02)
    for _ in range(int(rng.poisson(1.0 * density))):  # cones along a lane edge
        road = roads[int(rng.integers(len(roads)))]
        direction = int(rng.choice([-1, 1]))
        start = float(rng.uniform(*lo_hi[road.axis]))
        lateral = road.lanes_per_dir * road.lane_width - 0.3
        for k in range(int(rng.integers(4, 10))):
            if not near_intersection(grid, road, start + 3.0 * k, 2.0):
                p = point_on_road(road, start + 3.0 * k, lateral, direction)
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
        pts = np.stack([point_on_road(road, along, sgn * l_, 1) for l_ in lat[::10]])
        xs = np.interp(times, times[::10], pts[:, 0])
        ys = np.interp(times, times[::10], pts[:, 1])
        moving = ((times > t_start) & (lat < road.half_total - 0.01)).astype(bool)
        d, right = road_frame(road, 1)
        walk_dir = right * sgn
        yaw = float(np.arctan2(walk_dir[1], walk_dir[0]))
        on_sidewalk = np.abs(lat) > road.half_carriageway
        z = np.where(on_sidewalk, SIDEWALK_HEIGHT, 0.0)
        attr = np.where(moving, A_PED_MOVING, A_STANDING)
        sp.add(lambda: shapes.pedestrian(rng, "moving"), xs, ys, z, yaw, attr, True, margin=0.05)
