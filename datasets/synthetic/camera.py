"""Camera rendering: the ground texture through the ground-plane homography, sky with haze, blob shadows, then
shaded faces of structures and objects drawn far-to-near (painter's algorithm with an occlusion test against the
static geometry), then auto-exposure, vignetting, sensor noise, occasional blur, JPEG.

Frames: camera x right, y down, z forward; intrinsics K [3, 3] in pixels of the rendered image. The ego never
pitches or rolls (the world is flat), so each camera's horizon, sky and haze are fixed per log and precomputed.
Objects are drawn where their 3D parts project, so boxes projected with the dataroot's calibration land on them.
"""
from __future__ import annotations

import cv2
import numpy as np
import open3d as o3d

from . import shapes
from .raycast import SceneGeometry
from .roads import RASTER_RESOLUTION, GROUND_COLORS, G_TERRAIN

NEAR = 0.15
BIG_ITEM_OFFSET = 1.0e4  # painter's sort key offset that puts buildings behind every small item


def _shape_quads(shape: shapes.Shape):
    """(quads [Q, 4, 3] local, colours [Q, 3], parent [Q] (own index for faces, the face's index for decals))."""
    fq, fc, _ = shape.face_quads()
    parent_faces = np.arange(len(fq))
    dparent = shape.decal_part * 6 + shape.decal_face
    quads = np.concatenate([fq, shape.decal_quads]) if len(shape.decal_quads) else fq
    colours = np.concatenate([fc, shape.decal_color]) if len(shape.decal_quads) else fc
    parent = np.concatenate([parent_faces, dparent])
    return quads, colours, parent


def _place(quads: np.ndarray, x, y, z, yaw) -> np.ndarray:
    """Quads [Q, 4, 3] from local to global frames given poses (scalars or [Q, 1] arrays)."""
    x, y, z, yaw = (np.asarray(v, dtype=np.float64) for v in (x, y, z, yaw))
    c, s = np.cos(yaw), np.sin(yaw)
    out = np.empty_like(quads)
    out[..., 0] = x + c * quads[..., 0] - s * quads[..., 1]
    out[..., 1] = y + s * quads[..., 0] + c * quads[..., 1]
    out[..., 2] = z + quads[..., 2]
    return out


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of a polygon [n, 3] (camera frame) to z >= NEAR."""
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        ina, inb = a[2] >= NEAR, b[2] >= NEAR
        if ina:
            out.append(a)
        if ina != inb:
            f = (NEAR - a[2]) / (b[2] - a[2])
            out.append(a + f * (b - a))
    return np.array(out)


class CameraRenderer:
    def __init__(self, geometry: SceneGeometry, calibrations: dict, width: int, height: int):
        world = geometry.world
        self.geometry = geometry
        self.world = world
        self.width, self.height = width, height
        self.ground_bgr = np.ascontiguousarray(world.ground_rgb[..., ::-1])
        self.border = tuple(int(c) for c in GROUND_COLORS[G_TERRAIN][::-1])
        # Static items (everything but the raised block slabs, which the ground texture shows).
        quads, colours, parents, owners, big = [], [], [], [], []
        self.static_centre, self.static_half, self.static_yaw, self.static_big = [], [], [], []
        offset = 0
        self.static_item_of_structure = np.full(len(world.statics), -1)
        item = 0
        for si, placed in enumerate(world.statics):
            if placed.kind == "slab":
                continue
            q, c, p = _shape_quads(placed.shape)
            quads.append(_place(q, placed.x, placed.y, placed.z, placed.yaw))
            colours.append(c)
            parents.append(p + offset)
            owners.append(np.full(len(q), item))
            offset += len(q)
            corners = placed.shape.corners().reshape(-1, 3)
            self.static_centre.append([placed.x, placed.y])
            self.static_half.append([np.abs(corners[:, 0]).max(), np.abs(corners[:, 1]).max()])
            self.static_yaw.append(placed.yaw)
            self.static_big.append(placed.kind in ("building", "wall"))
            self.static_item_of_structure[si] = item
            item += 1
        self.static_quads = np.concatenate(quads) if quads else np.zeros((0, 4, 3))
        self.static_colours = np.concatenate(colours).astype(np.float32) if quads else np.zeros((0, 3), np.float32)
        self.static_parent = np.concatenate(parents) if quads else np.zeros(0, np.int64)
        self.static_owner = np.concatenate(owners) if quads else np.zeros(0, np.int64)
        self.static_centre = np.array(self.static_centre).reshape(-1, 2)
        self.static_half = np.array(self.static_half).reshape(-1, 2)
        self.static_yaw = np.array(self.static_yaw)
        self.static_big = np.array(self.static_big, dtype=bool)
        self.static_normals = self._normals(self.static_quads)
        # Actors: local quads of all actors, concatenated (parent indices are global in the concatenation).
        aq, ac, ap, ao = [], [], [], []
        offset = 0
        for a in world.actors:
            q, c, p = _shape_quads(a.shape)
            aq.append(q)
            ac.append(c.astype(np.float32))
            ap.append(p + offset)
            ao.append(np.full(len(q), a.index))
            offset += len(q)
        self.actor_quads = np.concatenate(aq) if aq else np.zeros((0, 4, 3))
        self.actor_colours = np.concatenate(ac) if ac else np.zeros((0, 3), np.float32)
        self.actor_parent = np.concatenate(ap) if ap else np.zeros(0, np.int64)
        self.actor_owner = np.concatenate(ao) if ao else np.zeros(0, np.int64)
        self.actor_size = np.array([a.size for a in world.actors]).reshape(-1, 3)
        # Per-camera fixed sky / haze layers.
        self.layers = {ch: self._sky_layers(cal) for ch, cal in calibrations.items() if cal.modality == "camera"}
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        r2 = ((xx - width / 2) / (width / 2)) ** 2 + ((yy - height / 2) / (height / 2)) ** 2
        self.noise_bank = None
        self.vignette = np.repeat((1.0 - 0.18 * r2)[..., None], 3, axis=2).astype(np.float32)

    @staticmethod
    def _normals(quads: np.ndarray) -> np.ndarray:
        n = np.cross(quads[:, 1] - quads[:, 0], quads[:, 2] - quads[:, 0])
        return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)

    def _sky_layers(self, cal):
        """Sky colour image, sky mask and haze weight for a camera on a level ego."""
        k = cal.intrinsic_matrix()
        rot = cal.sensor_to_ego()[:3, :3]
        kinv = np.linalg.inv(k)
        u = np.arange(self.width) + 0.5
        v = np.arange(self.height) + 0.5
        rays = np.stack(np.meshgrid(u, v), axis=-1)
        rays = np.concatenate([rays, np.ones((self.height, self.width, 1))], axis=-1) @ kinv.T
        rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
        dz = (rays @ rot.T)[..., 2]
        height = cal.translation[2]
        sky = dz > -0.002
        # haze: ground further than ~120 m fades into the horizon colour
        with np.errstate(divide="ignore"):
            dist = np.where(dz < 0, height / np.maximum(-dz, 1e-6), np.inf)
        haze = np.clip((dist - 120.0) / 400.0, 0.0, 0.85).astype(np.float32)
        top = np.array(self.world.sky_top[::-1], np.float32)
        hor = np.array(self.world.sky_horizon[::-1], np.float32)
        f = np.clip(dz / 0.35, 0.0, 1.0)[..., None]
        sky_img = (hor * (1 - f) + top * f).astype(np.uint8)
        rows = np.nonzero(haze.max(axis=1) > 0)[0]
        band = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 0)
        ground_rows = np.nonzero(~sky.all(axis=1))[0]
        ground_row = int(ground_rows.min()) if len(ground_rows) else self.height
        return sky_img, sky.astype(np.uint8), haze[..., None], band, hor, ground_row

    def render(self, channel: str, t: float, cam_to_global: np.ndarray, k: np.ndarray,
               rng: np.random.Generator, exposure: float) -> np.ndarray:
        """BGR uint8 image [H, W, 3] of camera `channel` at scene time t."""
        world = self.world
        w, h = self.width, self.height
        rot, pos = cam_to_global[:3, :3], cam_to_global[:3, 3]
        # Ground: homography from raster pixels to image pixels.
        rt = rot.T
        hom = k @ np.column_stack([rt[:, 0], rt[:, 1], -rt @ pos])
        a = np.array([[1 / RASTER_RESOLUTION, 0, -0.5], [0, 1 / RASTER_RESOLUTION, -0.5], [0, 0, 1]])
        m = a @ np.linalg.inv(hom)
        sky_img, sky_mask, haze, band, hor, ground_row = self.layers[channel]
        img = sky_img.copy()
        if ground_row < h:  # warp only the rows below the (fixed) horizon
            m = m @ np.array([[1.0, 0, 0], [0, 1.0, ground_row], [0, 0, 1.0]])
            img[ground_row:] = cv2.warpPerspective(self.ground_bgr, m, (w, h - ground_row),
                                                   flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                                   borderMode=cv2.BORDER_CONSTANT, borderValue=self.border)
        if band[1] > band[0]:
            sl = slice(band[0], band[1])
            img[sl] = (img[sl].astype(np.float32) * (1 - haze[sl]) + hor * haze[sl]).astype(np.uint8)
        cv2.copyTo(sky_img, sky_mask, img)
        # Actors near the camera.
        if world.actors:
            ax, ay, az, ayaw, _ = world.actor_poses(t)
            radius = 0.5 * np.hypot(self.actor_size[:, 0], self.actor_size[:, 1])
            near_mask = (np.hypot(ax - pos[0], ay - pos[1]) < 110.0)
            near = np.nonzero(near_mask)[0]
        else:
            near = np.zeros(0, np.int64)
        if len(near):
            self._draw_shadows(img, near, ax, ay, ayaw, az, rt, pos, k)
        # Gather quads: statics within 160 m, actors near.
        sd = np.hypot(self.static_centre[:, 0] - pos[0], self.static_centre[:, 1] - pos[1]) - \
            np.hypot(self.static_half[:, 0], self.static_half[:, 1])
        # Field-of-view culling by bearing and angular size (items and actors).
        fwd = rot[:, 2]
        cam_yaw = np.arctan2(fwd[1], fwd[0])
        half_fov = np.arctan(w / 2.0 / k[0, 0]) + 0.12

        def in_view(cx, cy, radius):
            dist = np.hypot(cx - pos[0], cy - pos[1])
            bearing = np.arctan2(cy - pos[1], cx - pos[0]) - cam_yaw
            off = np.abs((bearing + np.pi) % (2 * np.pi) - np.pi)
            return (off - np.arctan(radius / np.maximum(dist, 1e-3)) < half_fov) | (dist < radius + 1.0)

        static_radius = np.hypot(self.static_half[:, 0], self.static_half[:, 1])
        item_sel = (sd < 160.0) & in_view(self.static_centre[:, 0], self.static_centre[:, 1], static_radius)
        static_items = np.nonzero(item_sel)[0]
        qidx = np.nonzero(item_sel[self.static_owner])[0]
        lookup = np.full(len(self.static_owner), -1)
        lookup[qidx] = np.arange(len(qidx))
        quads = [self.static_quads[qidx]]
        colours = [self.static_colours[qidx]]
        owner_key_item = [self.static_owner[qidx]]
        parents_local = [lookup[self.static_parent[qidx]]]
        n_static_items = len(self.static_centre)
        item_keys = np.full(n_static_items + len(world.actors), np.inf)
        # item keys for statics: nearest point of the footprint (big) or centre distance (small).
        cx, cy = self.static_centre[static_items, 0], self.static_centre[static_items, 1]
        c, s = np.cos(self.static_yaw[static_items]), np.sin(self.static_yaw[static_items])
        dx, dy = pos[0] - cx, pos[1] - cy
        lx, ly = c * dx + s * dy, -s * dx + c * dy
        half = self.static_half[static_items]
        nearest = np.hypot(np.maximum(np.abs(lx) - half[:, 0], 0), np.maximum(np.abs(ly) - half[:, 1], 0))
        centre_d = np.hypot(dx, dy)
        # Buildings and walls are drawn first (far to near among themselves); small items and actors after them,
        # except those whose centre a building hides (see _occlusion_keys): they go right before that building.
        item_keys[static_items] = np.where(self.static_big[static_items], BIG_ITEM_OFFSET + nearest, centre_d)
        if len(near):
            near_mask &= in_view(ax, ay, radius)
            near = np.nonzero(near_mask)[0]
        if len(near):
            aidx = np.nonzero(near_mask[self.actor_owner])[0]
            alookup = np.full(len(self.actor_owner), -1)
            alookup[aidx] = np.arange(len(aidx)) + len(qidx)
            o = self.actor_owner[aidx]
            quads.append(_place(self.actor_quads[aidx], ax[o, None], ay[o, None], az[o, None], ayaw[o, None]))
            colours.append(self.actor_colours[aidx])
            owner_key_item.append(n_static_items + o)
            parents_local.append(alookup[self.actor_parent[aidx]])
            # Small items (actors) hidden behind a building are drawn before that building.
            centres = np.stack([ax[near], ay[near], az[near] + 0.5 * self.actor_size[near, 2]], axis=1)
            item_keys[n_static_items + near] = np.hypot(ax[near] - pos[0], ay[near] - pos[1])
            self._occlusion_keys(pos, centres, n_static_items + near, item_keys)
        small_static = static_items[~self.static_big[static_items]]
        if len(small_static):
            centres = np.concatenate([self.static_centre[small_static], np.full((len(small_static), 1), 2.0)], 1)
            self._occlusion_keys(pos, centres, small_static, item_keys)
        quads = np.concatenate(quads)
        colours = np.concatenate(colours)
        owner = np.concatenate(owner_key_item)
        parents = np.concatenate(parents_local)
        if len(quads):
            self._draw_quads(img, quads, colours, owner, parents, item_keys, rt, pos, k)
        return self._post(img, rng, exposure)

    def _occlusion_keys(self, pos, centres, items, item_keys):
        d = centres - pos
        dist = np.linalg.norm(d, axis=1)
        dirs = d / np.maximum(dist[:, None], 1e-6)
        rays = o3d.core.Tensor(np.concatenate([np.broadcast_to(pos, d.shape), dirs], 1).astype(np.float32))
        res = self.geometry.static_scene.cast_rays(rays, nthreads=1)
        th = res["t_hit"].numpy()
        prim = res["primitive_ids"].numpy().astype(np.int64)
        blocked = np.isfinite(th) & (th < dist - 0.5)
        for j in np.nonzero(blocked)[0]:
            structure = self.geometry.static_owner[prim[j]]
            it = self.static_item_of_structure[structure]
            if it >= 0 and self.static_big[it] and np.isfinite(item_keys[it]):
                item_keys[items[j]] = max(item_keys[items[j]], item_keys[it] + 0.01)

    def _draw_shadows(self, img, near, ax, ay, ayaw, az, rt, pos, k):
        """Dark blob shadows under the actors (footprint + a short smear away from the sun)."""
        sun = self.world.sun
        shift = -sun[:2] / max(np.linalg.norm(sun[:2]), 1e-6) * min(1.0 / np.tan(np.arcsin(sun[2])), 1.5)
        size = self.actor_size[near]
        hl, hw = size[:, 0] / 2 + 0.15, size[:, 1] / 2 + 0.15
        corners = np.stack([np.stack([hl, hw], 1), np.stack([-hl, hw], 1), np.stack([-hl, -hw], 1),
                            np.stack([hl, -hw], 1)], 1)  # [A, 4, 2]
        c, s = np.cos(ayaw[near])[:, None], np.sin(ayaw[near])[:, None]
        gx = ax[near, None] + c * corners[..., 0] - s * corners[..., 1]
        gy = ay[near, None] + s * corners[..., 0] + c * corners[..., 1]
        smear = (np.minimum(size[:, 2], 2.0) * 0.4)[:, None]
        gx = np.concatenate([gx, gx + shift[0] * smear], 1)
        gy = np.concatenate([gy, gy + shift[1] * smear], 1)
        gz = np.broadcast_to(az[near, None] + 0.01, gx.shape)
        cam = (np.stack([gx, gy, gz], -1) - pos) @ rt.T  # [A, 8, 3]
        ok = cam[..., 2].min(axis=1) >= NEAR
        uv = cam @ k.T
        uv = uv[..., :2] / np.maximum(uv[..., 2:3], NEAR)
        h, w = img.shape[:2]
        ok &= (uv[..., 0].max(1) >= 0) & (uv[..., 0].min(1) < w) & (uv[..., 1].max(1) >= 0) & (uv[..., 1].min(1) < h)
        colour = tuple(int(v) for v in (np.array([44, 44, 46]) * self.world.brightness))
        fixed = np.round(np.clip(uv, -1e5, 1e5) * 4).astype(np.int32)
        for j in np.nonzero(ok)[0]:
            cv2.fillConvexPoly(img, cv2.convexHull(fixed[j]), colour, lineType=cv2.LINE_8, shift=2)

    def _draw_quads(self, img, quads, colours, owner, parents, item_keys, rt, pos, k):
        cam = (quads - pos) @ rt.T  # [Q, 4, 3]
        centroid = cam.mean(axis=1)
        normal = np.cross(cam[:, 1] - cam[:, 0], cam[:, 2] - cam[:, 0])
        facing = np.einsum("ij,ij->i", normal, centroid) < 0
        in_front = cam[:, :, 2].max(axis=1) > NEAR
        # Faces only when their parent face is facing too (decals inherit from their face).
        visible = facing & in_front & facing[parents]
        idx = np.nonzero(visible)[0]
        if not len(idx):
            return
        quad_key = np.linalg.norm(centroid, axis=1)
        quad_key = quad_key[parents]  # decals sort with their face...
        is_decal = parents != np.arange(len(parents))
        order_key = quad_key - is_decal * 1e-3  # ...and right after it
        ik = item_keys[owner]
        idx = idx[np.isfinite(ik[idx])]
        order = idx[np.lexsort((-order_key[idx], -ik[idx]))]
        # Lambert shading with the sun, in the global frame.
        n_global = normal[order] @ rt
        n_global /= np.maximum(np.linalg.norm(n_global, axis=1, keepdims=True), 1e-9)
        shade = 0.52 + 0.48 * np.clip(n_global @ self.world.sun, 0.0, 1.0)
        col = np.clip(colours[order][:, ::-1] * shade[:, None] * self.world.brightness, 0, 255).astype(np.int64)
        w, h = self.width, self.height
        pts_all = cam[order]
        ok = pts_all[:, :, 2].min(axis=1) >= NEAR
        uv = np.zeros(pts_all.shape[:2] + (2,))
        z = np.maximum(pts_all[..., 2:3], NEAR)
        proj = pts_all @ k.T
        uv[...] = proj[..., :2] / z
        umin, umax = uv[..., 0].min(1), uv[..., 0].max(1)
        vmin, vmax = uv[..., 1].min(1), uv[..., 1].max(1)
        outside = (umax < 0) | (umin >= w) | (vmax < 0) | (vmin >= h) | ((umax - umin) * (vmax - vmin) < 1.0)
        fixed = np.round(np.clip(uv, -1e5, 1e5) * 4).astype(np.int32)
        col_list = col.tolist()
        for j in range(len(order)):
            if ok[j]:
                if outside[j]:
                    continue
                cv2.fillConvexPoly(img, fixed[j], col_list[j], lineType=cv2.LINE_8, shift=2)
            else:
                poly = _clip_near(pts_all[j])
                if len(poly) < 3:
                    continue
                p = poly @ k.T
                p = p[:, :2] / p[:, 2:3]
                cv2.fillConvexPoly(img, np.round(np.clip(p, -1e5, 1e5) * 4).astype(np.int32), col_list[j],
                                   lineType=cv2.LINE_8, shift=2)

    def _post(self, img, rng, exposure):
        gain = self.world.brightness * exposure
        img = cv2.multiply(img, self.vignette, scale=gain, dtype=cv2.CV_8U)
        if rng.random() < 0.12:
            img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.7, 1.6)))
        if self.noise_bank is None:  # a few frames of sensor noise, reused at random
            self.noise_bank = [np.round(rng.normal(0.0, rng.uniform(1.5, 3.5), img.shape)).astype(np.int16)
                               for _ in range(6)]
        return cv2.add(img, self.noise_bank[int(rng.integers(len(self.noise_bank)))], dtype=cv2.CV_8U)


def encode_jpeg(img_bgr: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
