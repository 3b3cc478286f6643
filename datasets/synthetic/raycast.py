"""Ray casting against a scene's geometry (open3d's Embree-backed RaycastingScene).

The static geometry (raised blocks, buildings, walls, poles, trees) is one mesh built once per scene; the actors
(and the ego's own body) are a second mesh rebuilt for each sensor time. The road is the analytic plane z = 0.
All coordinates are global, meters.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d

from . import shapes
from .world import World

GROUND = -2  # hit kinds
STATIC = -3
EGO = -1
NO_HIT = -4

#: The ego vehicle (a Renault Zoe) in the ego frame (rear axle origin), as boxes (x0, x1, y0, y1, z0, z1), meters:
#: body up to the belt line, and the cabin roof under the LiDAR (whose lowest beams hit it within ~0.6 m).
EGO_BOXES = ((-0.75, 3.35, -0.88, 0.88, 0.2, 1.0), (0.0, 1.9, -0.7, 0.7, 1.0, 1.5))


def _placed_mesh(shape: shapes.Shape, x: float, y: float, z: float, yaw: float):
    v, t, part = shape.mesh()
    c, s = np.cos(yaw), np.sin(yaw)
    out = np.empty_like(v)
    out[:, 0] = x + c * v[:, 0] - s * v[:, 1]
    out[:, 1] = y + s * v[:, 0] + c * v[:, 1]
    out[:, 2] = z + v[:, 2]
    return out, t, shape.part_material[part]


@dataclass
class Hits:
    """Result of casting rays: distance t [N] (inf where nothing within range), kind [N] (actor index >= 0, or
    GROUND / STATIC / EGO / NO_HIT), material [N] (shapes.M_* for meshes, -1 for ground), static id [N] (index of
    the static structure hit, -1 otherwise), normal [N, 3] (global unit normal of the surface hit)."""

    t: np.ndarray
    kind: np.ndarray
    material: np.ndarray
    static_id: np.ndarray
    normal: np.ndarray


class SceneGeometry:
    def __init__(self, world: World):
        self.world = world
        verts, tris, mats, owner = [], [], [], []
        offset = 0
        for i, placed in enumerate(world.statics):
            v, t, m = _placed_mesh(placed.shape, placed.x, placed.y, placed.z, placed.yaw)
            verts.append(v)
            tris.append(t + offset)
            mats.append(m)
            owner.append(np.full(len(t), i))
            offset += len(v)
        self.static_scene = o3d.t.geometry.RaycastingScene()
        if verts:
            self.static_scene.add_triangles(o3d.core.Tensor(np.concatenate(verts).astype(np.float32)),
                                            o3d.core.Tensor(np.concatenate(tris).astype(np.uint32)))
            self.static_material = np.concatenate(mats)
            self.static_owner = np.concatenate(owner)
        else:
            self.static_material = np.zeros(0, np.int64)
            self.static_owner = np.zeros(0, np.int64)
        # Actors: local vertices concatenated once; posed per time.
        local, tris, mats, owner_v, owner_t = [], [], [], [], []
        offset = 0
        for a in world.actors:
            v, t, part = a.shape.mesh()
            local.append(v)
            tris.append(t + offset)
            mats.append(a.shape.part_material[part])
            owner_v.append(np.full(len(v), a.index))
            owner_t.append(np.full(len(t), a.index))
            offset += len(v)
        ego = shapes.ShapeBuilder()
        for box in EGO_BOXES:
            ego.box(*box, (0, 0, 0), shapes.M_EGO)
        ev, et, _ = ego.build().mesh()
        self.ego_vertices = ev
        self.ego_triangles = et
        if local:
            self.actor_local = np.concatenate(local)
            self.actor_triangles = np.concatenate(tris)
            self.actor_material = np.concatenate(mats)
            self.actor_vertex_owner = np.concatenate(owner_v)
            self.actor_triangle_owner = np.concatenate(owner_t)
        else:
            self.actor_local = np.zeros((0, 3))
            self.actor_triangles = np.zeros((0, 3), np.int64)
            self.actor_material = np.zeros(0, np.int64)
            self.actor_vertex_owner = np.zeros(0, np.int64)
            self.actor_triangle_owner = np.zeros(0, np.int64)

    def dynamic_scene(self, t: float, ego_pose: np.ndarray):
        """(RaycastingScene of actors + ego body at scene time t, triangle owner [T], triangle material [T])."""
        if len(self.world.actors):
            x, y, z, yaw, _ = self.world.actor_poses(t)
        else:
            x = y = z = yaw = np.zeros(0)
        o = self.actor_vertex_owner
        c, s = np.cos(yaw)[o], np.sin(yaw)[o]
        lv = self.actor_local
        verts = np.empty_like(lv)
        verts[:, 0] = x[o] + c * lv[:, 0] - s * lv[:, 1]
        verts[:, 1] = y[o] + s * lv[:, 0] + c * lv[:, 1]
        verts[:, 2] = z[o] + lv[:, 2]
        ego_verts = self.ego_vertices @ ego_pose[:3, :3].T + ego_pose[:3, 3]
        all_verts = np.concatenate([verts, ego_verts]).astype(np.float32)
        all_tris = np.concatenate([self.actor_triangles, self.ego_triangles + len(verts)]).astype(np.uint32)
        owner = np.concatenate([self.actor_triangle_owner, np.full(len(self.ego_triangles), EGO)])
        material = np.concatenate([self.actor_material, np.full(len(self.ego_triangles), shapes.M_EGO)])
        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(o3d.core.Tensor(all_verts), o3d.core.Tensor(all_tris))
        return scene, owner, material

    def cast(self, origins: np.ndarray, directions: np.ndarray, dynamic, max_range: float) -> Hits:
        """Cast rays (origins [N, 3] or [3], unit directions [N, 3], global) against the road plane, the static mesh
        and `dynamic` (from dynamic_scene). Hits beyond max_range are NO_HIT."""
        n = len(directions)
        origins = np.broadcast_to(origins, (n, 3))
        rays = o3d.core.Tensor(np.concatenate([origins, directions], axis=1).astype(np.float32))
        scene, owner, material = dynamic
        rs = self.static_scene.cast_rays(rays, nthreads=1)
        rd = scene.cast_rays(rays, nthreads=1)
        ts = rs["t_hit"].numpy().astype(np.float64)
        td = rd["t_hit"].numpy().astype(np.float64)
        dz = directions[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            tg = np.where(dz < -1e-6, -origins[:, 2] / dz, np.inf)
        t = np.minimum(np.minimum(ts, td), tg)
        kind = np.full(n, NO_HIT, np.int64)
        mat = np.full(n, -1, np.int64)
        static_id = np.full(n, -1, np.int64)
        normal = np.zeros((n, 3))
        hit_g = (tg <= t) & np.isfinite(tg)
        kind[hit_g] = GROUND
        normal[hit_g] = (0.0, 0.0, 1.0)
        hit_s = (ts <= t) & np.isfinite(ts) & ~hit_g
        prim_s = rs["primitive_ids"].numpy()[hit_s].astype(np.int64)
        kind[hit_s] = STATIC
        mat[hit_s] = self.static_material[prim_s]
        static_id[hit_s] = self.static_owner[prim_s]
        normal[hit_s] = rs["primitive_normals"].numpy()[hit_s]
        hit_d = (td <= t) & np.isfinite(td) & ~hit_g & ~hit_s
        prim_d = rd["primitive_ids"].numpy()[hit_d].astype(np.int64)
        kind[hit_d] = owner[prim_d]
        mat[hit_d] = material[prim_d]
        normal[hit_d] = rd["primitive_normals"].numpy()[hit_d]
        far = t > max_range
        kind[far] = NO_HIT
        t[far] = np.inf
        return Hits(t, kind, mat, static_id, normal)
