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
from .actors import (MAP_MARGIN, TRACK_DT, Actor, Spawner, near_intersection, point_on_road, road_frame,
                     spawn_actors)


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


def _static_structures(rng, grid: RoadGrid, span, spawner: Spawner) -> list[shapes.PlacedShape]:
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
            d, right = road_frame(road, direction)
            lat = road.half_carriageway + 0.6
            a = lo + rng.uniform(0, 10)
            k = 0
            while a < hi:
                if not near_intersection(grid, road, a, 2.0):
                    p = point_on_road(road, a, lat, direction)
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
                    p = point_on_road(road, c.center - direction * (c.half_total + 0.8), lat, direction)
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
    spawner = Spawner(rng, grid, ego, times, (scene_start, scene_end), density)
    # structures and actors around the drive (+-70 m), inside the map
    span_inner = (MAP_MARGIN - 70, width_m - MAP_MARGIN + 70, MAP_MARGIN - 70, height_m - MAP_MARGIN + 70)
    statics = _static_structures(rng, grid, span_inner, spawner)
    spawn_actors(spawner, span_inner)
    elevation = rng.uniform(np.radians(25), np.radians(65))
    azimuth = rng.uniform(-np.pi, np.pi)
    sun = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
    overcast = rng.random() < 0.35
    brightness = float(rng.uniform(0.55, 0.8) if rng.random() < 0.15 else rng.uniform(0.85, 1.1))
    sky_top = (170, 172, 176) if overcast else (92, 142, 205)
    sky_horizon = (205, 206, 208) if overcast else (185, 210, 232)
    return World(grid, raster, ground_rgb, width_m, height_m, ego, statics, spawner.actors, times, sun, brightness,
                 sky_top, sky_horizon)


__all__ = ["World", "build_world", "RASTER_RESOLUTION"]
