"""Object and structure shapes: boxes and frusta ("parts") plus flat coloured "decals" (windows, lights, stripes).

Everything here is in the owner's local frame: x forward, y left, z up from the ground, meters. The annotation box
of an object is centred at (0, 0, h/2) with size (l, w, h); all its parts fit inside it. Colours are RGB uint8.
The same parts make the LiDAR/radar triangle mesh and the camera's shaded faces, so sensors agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Materials: LiDAR intensity (mean, std), LiDAR dropout probability, radar cross-section dBsm (per return).
M_BUILDING, M_WALL, M_POLE, M_TRUNK, M_FOLIAGE, M_PAINT, M_GLASS, M_TYRE, M_PERSON, M_CONE, M_BARRIER, \
    M_PLASTIC, M_EGO, M_METAL, M_SLAB = range(15)
MATERIAL_INTENSITY = np.array([
    [28, 10], [22, 8], [45, 15], [12, 4], [9, 4], [16, 8], [5, 3], [3, 2], [9, 4], [85, 30], [40, 15],
    [18, 6], [5, 3], [32, 10], [22, 6]], dtype=np.float32)
MATERIAL_DROPOUT = np.array([0.02, 0.02, 0.05, 0.05, 0.45, 0.03, 0.35, 0.1, 0.05, 0.03, 0.02, 0.03, 0.0, 0.03, 0.02],
                            dtype=np.float32)

# Vertex order of a box: bottom (z-) counter-clockwise from (-x, -y), then the same on top.
_CORNER_SIGNS = np.array([[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1],
                          [-1, -1, 1], [1, -1, 1], [1, 1, 1], [-1, 1, 1]], dtype=np.float64)
#: The six faces as corner indices, counter-clockwise seen from outside: bottom, top, front, back, left, right.
BOX_FACES = np.array([[0, 3, 2, 1], [4, 5, 6, 7], [1, 2, 6, 5], [0, 4, 7, 3], [3, 7, 6, 2], [0, 1, 5, 4]])
BOX_TRIANGLES = np.concatenate([BOX_FACES[:, [0, 1, 2]], BOX_FACES[:, [0, 2, 3]]])
FACE_NAMES = ("bottom", "top", "front", "back", "left", "right")


@dataclass
class Shape:
    """Parts (boxes/frusta) and decals of one object or structure, local frame.

    part_center / part_size: [P, 3] m (size = extent along local x, y, z); part_top: [P] top-face scale (1 = box,
    < 1 = frustum); part_color: [P, 3] uint8; part_material: [P] int. decal_quads: [D, 4, 3] m, counter-clockwise
    seen from the side they face; decal_color: [D, 3]; decal_part / decal_face: [D] part and face index (into
    FACE_NAMES) each decal sits on.
    """

    part_center: np.ndarray
    part_size: np.ndarray
    part_top: np.ndarray
    part_color: np.ndarray
    part_material: np.ndarray
    decal_quads: np.ndarray
    decal_color: np.ndarray
    decal_part: np.ndarray
    decal_face: np.ndarray

    def corners(self) -> np.ndarray:
        """[P, 8, 3] part corners (frusta have their top corners pulled in)."""
        signs = _CORNER_SIGNS[None] * np.ones((len(self.part_center), 1, 1))
        scale = np.where(signs[..., 2:3] > 0, self.part_top[:, None, None], 1.0)
        signs = signs.copy()
        signs[..., :2] *= scale[..., 0:1]
        return self.part_center[:, None, :] + signs * self.part_size[:, None, :] / 2.0

    def mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vertices [8P, 3], triangles [12P, 3] int, triangle part index [12P])."""
        corners = self.corners().reshape(-1, 3)
        p = len(self.part_center)
        tris = (BOX_TRIANGLES[None] + 8 * np.arange(p)[:, None, None]).reshape(-1, 3)
        return corners, tris, np.repeat(np.arange(p), 12)

    def face_quads(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(quads [6P, 4, 3], colour [6P, 3], part index [6P]) of all part faces."""
        corners = self.corners()
        quads = corners[:, BOX_FACES].reshape(-1, 4, 3)
        return quads, np.repeat(self.part_color, 6, axis=0), np.repeat(np.arange(len(corners)), 6)


class ShapeBuilder:
    """Accumulates parts and decals."""

    def __init__(self):
        self.parts: list[tuple] = []
        self.decals: list[tuple] = []

    def box(self, x0, x1, y0, y1, z0, z1, color, material, top: float = 1.0) -> int:
        self.parts.append(((x0 + x1) / 2, (y0 + y1) / 2, (z0 + z1) / 2, x1 - x0, y1 - y0, z1 - z0, top,
                           tuple(int(c) for c in color), material))
        return len(self.parts) - 1

    def decal(self, part: int, face: str, u0: float, u1: float, v0: float, v1: float, color) -> None:
        """A rectangle on a face of a (box) part; u, v in [0, 1] across the face (u: horizontal along the face,
        v: vertical for side faces / along y for top and bottom), placed 1 cm outside it."""
        cx, cy, cz, l, w, h, _, _, _ = self.parts[part]
        eps = 0.012
        hx, hy, hz = l / 2, w / 2, h / 2
        if face in ("front", "back"):
            sx = 1 if face == "front" else -1
            ys = (-hy + u0 * w, -hy + u1 * w)
            zs = (-hz + v0 * h, -hz + v1 * h)
            pts = [(sx * (hx + eps), ys[0], zs[0]), (sx * (hx + eps), ys[1], zs[0]),
                   (sx * (hx + eps), ys[1], zs[1]), (sx * (hx + eps), ys[0], zs[1])]
            normal = np.array([sx, 0.0, 0.0])
        elif face in ("left", "right"):
            sy = 1 if face == "left" else -1
            xs = (-hx + u0 * l, -hx + u1 * l)
            zs = (-hz + v0 * h, -hz + v1 * h)
            pts = [(xs[0], sy * (hy + eps), zs[0]), (xs[1], sy * (hy + eps), zs[0]),
                   (xs[1], sy * (hy + eps), zs[1]), (xs[0], sy * (hy + eps), zs[1])]
            normal = np.array([0.0, sy, 0.0])
        elif face == "top":
            xs = (-hx + u0 * l, -hx + u1 * l)
            ys = (-hy + v0 * w, -hy + v1 * w)
            pts = [(xs[0], ys[0], hz + eps), (xs[1], ys[0], hz + eps), (xs[1], ys[1], hz + eps),
                   (xs[0], ys[1], hz + eps)]
            normal = np.array([0.0, 0.0, 1.0])
        else:
            raise ValueError(f"decal face {face!r} not supported")
        quad = np.array(pts) + np.array([cx, cy, cz])
        n = np.cross(quad[1] - quad[0], quad[2] - quad[0])
        if np.dot(n, normal) < 0:
            quad = quad[::-1]
        self.decals.append((quad, tuple(int(c) for c in color), part, FACE_NAMES.index(face)))

    def build(self) -> Shape:
        p = np.array([q[:7] for q in self.parts], dtype=np.float64).reshape(-1, 7)
        colors = np.array([q[7] for q in self.parts], dtype=np.uint8).reshape(-1, 3)
        materials = np.array([q[8] for q in self.parts], dtype=np.int64)
        if self.decals:
            quads = np.stack([d[0] for d in self.decals])
            dcol = np.array([d[1] for d in self.decals], dtype=np.uint8)
            dpart = np.array([d[2] for d in self.decals], dtype=np.int64)
            dface = np.array([d[3] for d in self.decals], dtype=np.int64)
        else:
            quads, dcol = np.zeros((0, 4, 3)), np.zeros((0, 3), np.uint8)
            dpart, dface = np.zeros(0, np.int64), np.zeros(0, np.int64)
        return Shape(p[:, :3], p[:, 3:6], p[:, 6], colors, materials, quads, dcol, dpart, dface)


# ----------------------------------------------------------------------------------------------------------------
# Object classes. Each builder returns (size (l, w, h), Shape) for one object with class-typical proportions.

CAR_COLORS = [(228, 228, 226), (28, 28, 32), (160, 164, 170), (95, 97, 102), (165, 28, 30), (32, 58, 140),
              (24, 34, 68), (38, 88, 58), (188, 172, 138), (120, 20, 24)]
GLASS = (34, 44, 56)
TYRE = (18, 18, 20)
SKIN = [(224, 186, 150), (190, 140, 100), (140, 95, 65), (95, 64, 44)]
CLOTHES = [(30, 32, 40), (60, 70, 110), (150, 30, 40), (200, 200, 200), (40, 90, 60), (200, 160, 40),
           (90, 60, 40), (120, 120, 130), (170, 80, 140)]
TROUSERS = [(25, 28, 40), (40, 50, 80), (60, 60, 60), (150, 130, 100), (20, 20, 22)]


def _wheels(b: ShapeBuilder, body: int, l: float, xs: list[float], radius: float) -> None:
    """Dark tyre rectangles on both sides of `body` at the given x positions (meters from the centre)."""
    cx, cy, cz, bl, bw, bh = b.parts[body][:6]
    for x in xs:
        u0 = (x - radius - (cx - bl / 2)) / bl
        u1 = (x + radius - (cx - bl / 2)) / bl
        v1 = min(1.0, (2 * radius - (cz - bh / 2)) / bh)
        v0 = 0.0
        for face in ("left", "right"):
            b.decal(body, face, max(u0, 0.0), min(u1, 1.0), v0, max(v1, 0.05), TYRE)


def car(rng: np.random.Generator, braking: bool = False):
    kind = rng.choice(["sedan", "suv", "van"], p=[0.6, 0.3, 0.1])
    l = float(rng.normal(4.6, 0.3) if kind != "van" else rng.normal(5.1, 0.3))
    w = float(rng.normal(1.92, 0.07))
    h = float({"sedan": rng.normal(1.52, 0.06), "suv": rng.normal(1.75, 0.07), "van": rng.normal(2.0, 0.1)}[kind])
    colour = CAR_COLORS[int(rng.integers(len(CAR_COLORS)))]
    b = ShapeBuilder()
    belt = 0.58 * h if kind != "van" else 0.5 * h
    body = b.box(-l / 2, l / 2, -w / 2, w / 2, 0.18, belt, colour, M_PAINT)
    if kind == "van":
        cabin = b.box(-l / 2 + 0.05, l / 2 - 0.7, -w / 2 + 0.05, w / 2 - 0.05, belt, h, colour, M_PAINT)
    else:
        cabin = b.box(-l * 0.32, l * 0.18, -w / 2 + 0.1, w / 2 - 0.1, belt, h, colour, M_PAINT)
    for face in ("left", "right"):
        b.decal(cabin, face, 0.08, 0.92, 0.12, 0.85, GLASS)
    b.decal(cabin, "front", 0.06, 0.94, 0.08, 0.85, GLASS)
    b.decal(cabin, "back", 0.1, 0.9, 0.15, 0.85, GLASS)
    _wheels(b, body, l, [l * 0.31, -l * 0.31], 0.33)
    lamp = (255, 40, 30) if braking else (130, 20, 20)
    b.decal(body, "back", 0.03, 0.2, 0.55, 0.85, lamp)
    b.decal(body, "back", 0.8, 0.97, 0.55, 0.85, lamp)
    b.decal(body, "front", 0.04, 0.2, 0.55, 0.8, (235, 235, 215))
    b.decal(body, "front", 0.8, 0.96, 0.55, 0.8, (235, 235, 215))
    b.decal(body, "back", 0.38, 0.62, 0.25, 0.45, (230, 230, 220))  # plate
    return np.array([l, w, h]), b.build(), "vehicle.car"


def truck(rng: np.random.Generator, braking: bool = False):
    l = float(np.clip(rng.normal(7.0, 1.4), 5.0, 10.5))
    w = float(rng.normal(2.45, 0.1))
    h = float(np.clip(rng.normal(3.0, 0.35), 2.3, 3.8))
    cab_colour = [(210, 210, 210), (170, 30, 30), (30, 60, 140), (220, 120, 20), (40, 40, 45)][int(rng.integers(5))]
    box_colour = [(232, 232, 228), (190, 190, 190), (150, 150, 150), (200, 180, 120)][int(rng.integers(4))]
    b = ShapeBuilder()
    cab_len = 2.1
    cab = b.box(l / 2 - cab_len, l / 2, -w / 2 + 0.05, w / 2 - 0.05, 0.45, h * 0.85, cab_colour, M_PAINT)
    cargo = b.box(-l / 2, l / 2 - cab_len - 0.15, -w / 2, w / 2, 0.9, h, box_colour, M_PAINT)
    b.box(-l / 2 + 0.3, l / 2 - cab_len, -w / 2 + 0.3, w / 2 - 0.3, 0.45, 0.9, (35, 35, 38), M_METAL)
    b.decal(cab, "front", 0.06, 0.94, 0.55, 0.9, GLASS)
    for face in ("left", "right"):
        b.decal(cab, face, 0.1, 0.7, 0.55, 0.88, GLASS)
        b.decal(cargo, face, 0.0, 1.0, 0.1, 0.2, cab_colour)
    _wheels(b, cab, l, [l / 2 - 1.1], 0.5)
    lamp = (255, 40, 30) if braking else (140, 25, 20)
    b.decal(cargo, "back", 0.02, 0.12, 0.02, 0.1, lamp)
    b.decal(cargo, "back", 0.88, 0.98, 0.02, 0.1, lamp)
    return np.array([l, w, h]), b.build(), "vehicle.truck"


def bus(rng: np.random.Generator, braking: bool = False):
    bendy = rng.random() < 0.1
    l = float(np.clip(rng.normal(11.5, 0.8), 9.5, 13.0))
    w = float(rng.normal(2.9, 0.08))
    h = float(rng.normal(3.4, 0.15))
    livery = [(190, 35, 35), (35, 120, 70), (40, 80, 170), (235, 235, 230), (230, 180, 30)][int(rng.integers(5))]
    b = ShapeBuilder()
    body = b.box(-l / 2, l / 2, -w / 2, w / 2, 0.3, h, livery, M_PAINT)
    for face in ("left", "right"):
        b.decal(body, face, 0.04, 0.96, 0.4, 0.82, GLASS)
        b.decal(body, face, 0.0, 1.0, 0.28, 0.34, (240, 240, 240))
    b.decal(body, "front", 0.05, 0.95, 0.35, 0.92, GLASS)
    b.decal(body, "back", 0.1, 0.9, 0.55, 0.85, GLASS)
    b.decal(body, "top", 0.05, 0.95, 0.1, 0.9, (200, 200, 200))
    _wheels(b, body, l, [l / 2 - 2.5, -l / 2 + 3.0], 0.5)
    lamp = (255, 40, 30) if braking else (140, 25, 20)
    b.decal(body, "back", 0.02, 0.12, 0.08, 0.2, lamp)
    b.decal(body, "back", 0.88, 0.98, 0.08, 0.2, lamp)
    return np.array([l, w, h]), b.build(), "vehicle.bus.bendy" if bendy else "vehicle.bus.rigid"


def trailer(rng: np.random.Generator, braking: bool = False):
    l = float(np.clip(rng.normal(11.0, 2.0), 6.0, 14.0))
    w = float(rng.normal(2.55, 0.08))
    h = float(np.clip(rng.normal(3.8, 0.25), 3.0, 4.2))
    colour = [(235, 235, 235), (180, 185, 190), (120, 130, 140), (160, 60, 40), (60, 90, 130)][int(rng.integers(5))]
    b = ShapeBuilder()
    box = b.box(-l / 2, l / 2, -w / 2, w / 2, 1.15, h, colour, M_METAL)
    b.box(-l / 2 + 0.2, -l / 2 + 3.0, -w / 2 + 0.15, w / 2 - 0.15, 0.1, 1.15, (30, 30, 32), M_TYRE)
    b.box(l / 2 - 1.5, l / 2 - 1.1, -w / 2 + 0.2, w / 2 - 0.2, 0.0, 1.15, (70, 70, 70), M_METAL)  # landing gear
    for face in ("left", "right"):
        b.decal(box, face, 0.0, 1.0, 0.0, 0.06, (200, 40, 40))  # reflective tape
        b.decal(box, face, 0.0, 1.0, 0.94, 1.0, (90, 90, 95))
    b.decal(box, "back", 0.49, 0.51, 0.0, 1.0, (70, 70, 70))  # door seam
    return np.array([l, w, h]), b.build(), "vehicle.trailer"


def construction_vehicle(rng: np.random.Generator, braking: bool = False):
    l = float(np.clip(rng.normal(6.5, 1.0), 4.5, 9.0))
    w = float(rng.normal(2.8, 0.15))
    h = float(np.clip(rng.normal(3.2, 0.4), 2.5, 4.2))
    yellow = [(235, 180, 25), (230, 140, 20), (225, 200, 40)][int(rng.integers(3))]
    b = ShapeBuilder()
    base = b.box(-l / 2, l / 2 - 1.6, -w / 2, w / 2, 0.0, 1.1, (32, 32, 30), M_TYRE)  # tracks / wheels
    body = b.box(-l / 2, l / 2 - 2.0, -w / 2 + 0.1, w / 2 - 0.1, 1.1, 2.0, yellow, M_PAINT)
    cab = b.box(-0.6, 1.0, -w / 2 + 0.2, 0.3, 2.0, h, yellow, M_PAINT)
    b.box(l / 2 - 2.0, l / 2, -0.35, 0.35, 1.4, h * 0.75, yellow, M_METAL)  # boom towards the front
    b.box(l / 2 - 1.0, l / 2, -w / 2 + 0.2, w / 2 - 0.2, 0.0, 0.8, (60, 60, 58), M_METAL)  # bucket
    for face in ("left", "right", "front"):
        b.decal(cab, face, 0.1, 0.9, 0.3, 0.9, GLASS)
    b.decal(body, "left", 0.05, 0.5, 0.3, 0.6, (20, 20, 20))
    b.decal(body, "right", 0.5, 0.95, 0.3, 0.6, (20, 20, 20))
    del base
    return np.array([l, w, h]), b.build(), "vehicle.construction"


def _rider(b: ShapeBuilder, rng, x0, x1, seat: float, jacket=None) -> None:
    jacket = jacket or CLOTHES[int(rng.integers(len(CLOTHES)))]
    b.box(x0, x1, -0.22, 0.22, seat, seat + 0.62, jacket, M_PERSON)
    helmet = [(20, 20, 20), (220, 220, 220), (200, 30, 30), (30, 60, 160)][int(rng.integers(4))]
    b.box((x0 + x1) / 2 - 0.14, (x0 + x1) / 2 + 0.14, -0.14, 0.14, seat + 0.62, seat + 0.9, helmet, M_PLASTIC)


def motorcycle(rng: np.random.Generator, with_rider: bool):
    l = float(rng.normal(2.1, 0.12))
    w = float(rng.normal(0.8, 0.06))
    colour = [(25, 25, 28), (180, 30, 30), (30, 60, 150), (200, 200, 200), (230, 140, 20)][int(rng.integers(5))]
    b = ShapeBuilder()
    frame = b.box(-l / 2 + 0.2, l / 2 - 0.2, -0.18, 0.18, 0.3, 0.95, colour, M_PAINT)
    b.box(-l / 2, -l / 2 + 0.6, -0.08, 0.08, 0.0, 0.6, TYRE, M_TYRE)
    b.box(l / 2 - 0.6, l / 2, -0.08, 0.08, 0.0, 0.6, TYRE, M_TYRE)
    b.box(l / 2 - 0.5, l / 2 - 0.35, -w / 2, w / 2, 0.95, 1.1, (50, 50, 50), M_METAL)  # handlebar
    b.decal(frame, "back", 0.3, 0.7, 0.6, 0.8, (140, 25, 20))
    h = 1.1
    if with_rider:
        _rider(b, rng, -0.35, 0.05, 0.85)
        h = 0.85 + 0.9
    return np.array([l, w, h]), b.build(), "vehicle.motorcycle"


def bicycle(rng: np.random.Generator, with_rider: bool):
    l = float(rng.normal(1.75, 0.08))
    w = 0.62
    colour = [(20, 20, 22), (200, 30, 30), (30, 80, 170), (220, 220, 220), (40, 130, 70)][int(rng.integers(5))]
    b = ShapeBuilder()
    frame = b.box(-l / 2 + 0.3, l / 2 - 0.3, -0.04, 0.04, 0.35, 0.9, colour, M_METAL)
    b.box(-l / 2, -l / 2 + 0.68, -0.03, 0.03, 0.0, 0.68, TYRE, M_TYRE)
    b.box(l / 2 - 0.68, l / 2, -0.03, 0.03, 0.0, 0.68, TYRE, M_TYRE)
    b.box(l / 2 - 0.45, l / 2 - 0.38, -w / 2, w / 2, 0.9, 1.02, (40, 40, 40), M_METAL)
    del frame
    h = 1.05
    if with_rider:
        _rider(b, rng, -0.3, 0.1, 0.95)
        h = 0.95 + 0.9
    return np.array([l, w, h]), b.build(), "vehicle.bicycle"


def pedestrian(rng: np.random.Generator, pose: str, kind: str = "adult"):
    """pose: 'moving' (stride), 'standing' or 'sitting'. kind: adult, child, construction_worker, police_officer."""
    scale = float(rng.normal(0.72, 0.06)) if kind == "child" else float(rng.normal(1.0, 0.05))
    jacket = CLOTHES[int(rng.integers(len(CLOTHES)))]
    if kind == "construction_worker":
        jacket = (245, 150, 20) if rng.random() < 0.5 else (215, 230, 40)
    if kind == "police_officer":
        jacket = (25, 35, 80)
    trousers = TROUSERS[int(rng.integers(len(TROUSERS)))]
    skin = SKIN[int(rng.integers(len(SKIN)))]
    b = ShapeBuilder()
    if pose == "sitting":
        h = 1.25 * scale
        l = 0.85 * scale
        b.box(-l / 2, -l / 2 + 0.3 * scale, -0.2 * scale, 0.2 * scale, 0.45 * scale, 1.0 * scale, jacket, M_PERSON)
        b.box(-l / 2, l / 2, -0.18 * scale, 0.18 * scale, 0.35 * scale, 0.5 * scale, trousers, M_PERSON)  # thighs
        b.box(l / 2 - 0.15 * scale, l / 2, -0.16 * scale, 0.16 * scale, 0.0, 0.35 * scale, trousers, M_PERSON)
        b.box(-l / 2 + 0.02, -l / 2 + 0.26 * scale, -0.11 * scale, 0.11 * scale, 1.0 * scale, h, skin, M_PERSON)
        w = 0.55 * scale
        return np.array([l, w, h]), b.build(), f"human.pedestrian.{kind}"
    h = float(rng.normal(1.75, 0.07)) * scale
    w = 0.62 * scale
    stride = 0.22 * scale if pose == "moving" else 0.0
    l = max(0.55 * scale, 0.3 * scale + 2 * stride)
    leg = 0.47 * h
    if pose == "moving":
        b.box(stride - 0.07, stride + 0.07, 0.03, 0.15, 0.0, leg, trousers, M_PERSON)
        b.box(-stride - 0.07, -stride + 0.07, -0.15, -0.03, 0.0, leg, trousers, M_PERSON)
        b.box(-0.09, 0.09, -0.15, 0.15, leg - 0.2, leg, trousers, M_PERSON)
    else:
        b.box(-0.09, 0.09, -0.16, 0.16, 0.0, leg, trousers, M_PERSON)
    torso = b.box(-0.12 * scale, 0.12 * scale, -w / 2 + 0.05, w / 2 - 0.05, leg, 0.86 * h, jacket, M_PERSON)
    b.box(-0.1 * scale, 0.1 * scale, -0.1 * scale, 0.1 * scale, 0.86 * h, h, skin, M_PERSON)
    if kind == "construction_worker":
        b.decal(torso, "front", 0.0, 1.0, 0.45, 0.55, (230, 230, 230))
        b.decal(torso, "back", 0.0, 1.0, 0.45, 0.55, (230, 230, 230))
    if rng.random() < 0.25:  # backpack or bag
        b.box(-0.12 * scale - 0.16, -0.12 * scale, -0.15, 0.15, leg + 0.2, 0.8 * h,
              [(30, 30, 30), (120, 40, 40), (40, 60, 120)][int(rng.integers(3))], M_PLASTIC)
        l = max(l, 0.56 * scale + 0.3)
    return np.array([l, w, h]), b.build(), f"human.pedestrian.{kind}"


def barrier(rng: np.random.Generator):
    """nuScenes barriers are long across their heading: size l ~0.5 (along the heading) x w ~2.5."""
    concrete = rng.random() < 0.35
    w = float(np.clip(rng.normal(2.5, 0.4), 1.2, 3.5))
    l = float(np.clip(rng.normal(0.55, 0.12), 0.3, 0.8))
    h = float(np.clip(rng.normal(1.0, 0.1), 0.75, 1.25))
    b = ShapeBuilder()
    if concrete:
        body = b.box(-l / 2, l / 2, -w / 2, w / 2, 0.0, h, (188, 186, 178), M_BARRIER, top=0.5)
        del body
    else:
        body = b.box(-l / 2 * 0.5, l / 2 * 0.5, -w / 2, w / 2, 0.35, h, (235, 235, 235), M_BARRIER)
        b.box(-l / 2, l / 2, -w / 2, -w / 2 + 0.1, 0.0, 0.35, (60, 60, 60), M_METAL)
        b.box(-l / 2, l / 2, w / 2 - 0.1, w / 2, 0.0, 0.35, (60, 60, 60), M_METAL)
        n = 5
        for k in range(n):
            if k % 2 == 0:
                for face in ("front", "back"):
                    b.decal(body, face, k / n, (k + 1) / n, 0.0, 1.0, (215, 30, 30))
    return np.array([l, w, h]), b.build(), "movable_object.barrier"


def traffic_cone(rng: np.random.Generator):
    h = float(np.clip(rng.normal(0.95, 0.12), 0.6, 1.2))
    base = float(np.clip(rng.normal(0.42, 0.04), 0.3, 0.55))
    b = ShapeBuilder()
    b.box(-base / 2, base / 2, -base / 2, base / 2, 0.0, 0.05, (30, 30, 30), M_PLASTIC)
    top = 0.18
    # three stacked frusta: orange, white band, orange tip
    z1, z2 = 0.05 + 0.45 * (h - 0.05), 0.05 + 0.65 * (h - 0.05)

    def width_at(z):
        return 0.8 * base * (1 - (1 - top) * (z - 0.05) / (h - 0.05))

    orange = (245, 95, 20)
    for z0, z1_, c in ((0.05, z1, orange), (z1, z2, (240, 240, 240)), (z2, h, orange)):
        w0, w1 = width_at(z0), width_at(z1_)
        b.box(-w0 / 2, w0 / 2, -w0 / 2, w0 / 2, z0, z1_, c, M_CONE, top=w1 / w0)
    return np.array([base, base, h]), b.build(), "movable_object.trafficcone"


def trash_bin(rng: np.random.Generator):
    """A wheelie bin: movable_object.pushable_pullable (annotated, not a detection class)."""
    l, w, h = 0.7, 0.6, float(rng.normal(1.05, 0.05))
    colour = [(40, 90, 50), (60, 60, 65), (30, 60, 140), (140, 90, 30)][int(rng.integers(4))]
    b = ShapeBuilder()
    b.box(-l / 2, l / 2, -w / 2, w / 2, 0.0, h, colour, M_PLASTIC)
    return np.array([l, w, h]), b.build(), "movable_object.pushable_pullable"


# ----------------------------------------------------------------------------------------------------------------
# Static structures (local frame = their own centre on the ground).

FACADES = [(196, 182, 150), (150, 72, 58), (160, 160, 158), (222, 218, 205), (176, 140, 105), (110, 120, 130),
           (205, 195, 170), (120, 88, 70)]


def building(rng: np.random.Generator, l: float, w: float, h: float, street_face: str) -> Shape:
    """A block building with rows of windows (or window ribbons) on its street-facing side."""
    colour = FACADES[int(rng.integers(len(FACADES)))]
    b = ShapeBuilder()
    body = b.box(-l / 2, l / 2, -w / 2, w / 2, 0.0, h, colour, M_BUILDING)
    floors = max(1, int(h // 3.3))
    ribbon = rng.random() < 0.45
    glass = (40 + int(rng.integers(0, 30)), 55 + int(rng.integers(0, 30)), 70 + int(rng.integers(0, 40)))
    along = l if street_face in ("left", "right") else w
    for f in range(min(floors, 5)):
        v0 = (f * 3.3 + 1.0) / h
        v1 = min((f * 3.3 + 2.4) / h, 0.98)
        if f == 0 and rng.random() < 0.5:  # shop windows on the ground floor
            b.decal(body, street_face, 0.05, 0.95, 0.3 / h, 2.6 / h, glass)
        elif ribbon:
            b.decal(body, street_face, 0.03, 0.97, v0, v1, glass)
        else:
            n = min(max(1, int(along // 4.5)), 6)
            for k in range(n):
                u0 = (k + 0.25) / n
                b.decal(body, street_face, u0, u0 + 0.5 / n, v0, v1, glass)
    return b.build()


def wall(rng: np.random.Generator, l: float, h: float) -> Shape:
    b = ShapeBuilder()
    colour = [(150, 140, 125), (120, 110, 100), (175, 170, 160), (95, 80, 70)][int(rng.integers(4))]
    b.box(-l / 2, l / 2, -0.15, 0.15, 0.0, h, colour, M_WALL)
    return b.build()


def street_light(rng: np.random.Generator) -> Shape:
    h = float(rng.uniform(6.5, 8.5))
    b = ShapeBuilder()
    b.box(-0.12, 0.12, -0.12, 0.12, 0.0, h, (75, 78, 82), M_POLE)
    b.box(-0.1, 0.1, -1.5, 0.1, h - 0.2, h, (75, 78, 82), M_POLE)  # arm over the road (local -y)
    return b.build()


def tree(rng: np.random.Generator) -> Shape:
    trunk_h = float(rng.uniform(2.0, 3.0))
    crown = float(rng.uniform(2.6, 4.2))
    green = (int(rng.integers(40, 80)), int(rng.integers(90, 135)), int(rng.integers(35, 60)))
    b = ShapeBuilder()
    b.box(-0.17, 0.17, -0.17, 0.17, 0.0, trunk_h + 0.5, (88, 62, 40), M_TRUNK)
    b.box(-crown / 2, crown / 2, -crown / 2, crown / 2, trunk_h, trunk_h + crown * 0.9, green, M_FOLIAGE, top=0.55)
    return b.build()


def traffic_light(rng: np.random.Generator) -> Shape:
    b = ShapeBuilder()
    b.box(-0.1, 0.1, -0.1, 0.1, 0.0, 3.2, (45, 45, 45), M_POLE)
    head = b.box(-0.18, 0.18, -0.2, 0.2, 3.2, 4.2, (35, 35, 35), M_METAL)
    light = [(230, 40, 30), (240, 200, 40), (40, 220, 90)][int(rng.integers(3))]
    b.decal(head, "front", 0.25, 0.75, 0.55, 0.8, light)
    return b.build()


def slab(l: float, w: float) -> Shape:
    """A raised sidewalk / block surface (the curb is its edge), SIDEWALK_HEIGHT tall."""
    from .roads import SIDEWALK_HEIGHT
    b = ShapeBuilder()
    b.box(-l / 2, l / 2, -w / 2, w / 2, 0.0, SIDEWALK_HEIGHT, (158, 154, 146), M_SLAB)
    return b.build()


@dataclass
class PlacedShape:
    """A static shape placed in the global frame: pose (x, y, z, yaw)."""

    shape: Shape
    x: float
    y: float
    z: float
    yaw: float
    kind: str = "structure"
    extent: np.ndarray = field(default_factory=lambda: np.zeros(2))
