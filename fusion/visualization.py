"""Pictures of what the model sees and predicts: a BEV view, the six cameras with projected boxes, and the
per-modality contribution maps of the fuser. Pure numpy + Pillow, fast enough for one picture per replayed frame.

BEV pictures put the ego's forward direction (+x) up and its left (+y) to the left; the ego sits where the
BEVGrid's origin falls. All inputs are in the ego frame (meters) unless noted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from fusion.grid import BEVGrid
from fusion.types import DETECTION_CLASSES, MODALITIES, Boxes, CameraImages

#: One colour per detection class (RGB), in DETECTION_CLASSES order.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 158, 0), (255, 99, 71), (233, 150, 70), (255, 69, 0), (255, 140, 0),
    (112, 128, 144), (255, 61, 99), (220, 20, 60), (0, 0, 230), (47, 79, 79),
)
GT_COLOR = (60, 220, 60)
#: One colour per modality for contribution maps, in MODALITIES order (camera, lidar, radar, gps).
MODALITY_COLORS: tuple[tuple[int, int, int], ...] = ((255, 200, 0), (0, 170, 255), (255, 60, 60), (120, 255, 120))


@dataclass
class BevCanvas:
    """Maps ego-frame meters to picture pixels: `pixels_per_meter`, forward up, left to the left."""

    grid: BEVGrid
    pixels_per_meter: float = 6.0

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the picture in pixels."""
        x_extent, y_extent = self.grid.extent
        return int(round(y_extent * self.pixels_per_meter)), int(round(x_extent * self.pixels_per_meter))

    def to_pixels(self, xy: np.ndarray) -> np.ndarray:
        """[N, 2] ego-frame (x, y) meters -> [N, 2] picture (u, v) pixels, float."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        u = (self.grid.y_max - xy[:, 1]) * self.pixels_per_meter
        v = (self.grid.x_max - xy[:, 0]) * self.pixels_per_meter
        return np.stack([u, v], axis=1)


def _as_numpy(value) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _height_colors(z: np.ndarray) -> np.ndarray:
    """[N, 3] uint8 colours from heights (meters): blue low through yellow high."""
    t = np.clip((z + 2.0) / 5.0, 0.0, 1.0)
    return np.stack([60 + 195 * t, 120 + 100 * t, 255 - 200 * t], axis=1).astype(np.uint8)


def render_bev(grid: BEVGrid, lidar=None, radar=None, boxes: Boxes | None = None, gt_boxes: Boxes | None = None,
               map_raster=None, trajectory=None, pixels_per_meter: float = 6.0, score_threshold: float = 0.0,
               title: str | None = None) -> Image.Image:
    """A bird's-eye-view picture.

    lidar: [N, >=3] points (x, y, z meters). radar: [M, >=6] points with (vx_comp, vy_comp) in columns 4 and 5
    (fusion.types.RADAR_FEATURES), drawn as dots with 1-second velocity arrows. boxes: predictions, coloured by class,
    those below `score_threshold` skipped. gt_boxes: ground truth in green. map_raster: [1, H, W] or [H, W] drivable
    area on `grid`. trajectory: [T, 2] ego positions (x, y meters) in the current ego frame, drawn as a path.
    """
    canvas = BevCanvas(grid, pixels_per_meter)
    width, height = canvas.size
    picture = np.full((height, width, 3), 18, dtype=np.uint8)

    raster = _as_numpy(map_raster)
    if raster is not None and raster.size > 1:
        raster = raster.reshape(raster.shape[-2:])
        # Grid row i <-> y, column j <-> x; the picture wants x up and +y left: transpose and flip both axes.
        shown = np.ascontiguousarray(raster.T[::-1, ::-1])
        tile = np.asarray(Image.fromarray((np.clip(shown, 0, 1) * 255).astype(np.uint8)).resize(
            (width, height), Image.NEAREST), dtype=np.float32) / 255.0
        picture = (picture + tile[..., None] * np.array([28, 34, 44])).astype(np.uint8)

    points = _as_numpy(lidar)
    if points is not None and len(points):
        uv = canvas.to_pixels(points[:, :2]).astype(np.int64)
        keep = (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
        picture[uv[keep, 1], uv[keep, 0]] = _height_colors(points[keep, 2])

    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)

    # The ego vehicle (4.1 x 1.8 m), and its trajectory.
    ego = Boxes(center=torch.zeros(1, 3), size=torch.tensor([[4.1, 1.8, 1.6]]), yaw=torch.zeros(1),
                velocity=torch.zeros(1, 2), labels=torch.zeros(1, dtype=torch.long), attributes=torch.full((1,), -1),
                scores=torch.ones(1), num_lidar_pts=torch.zeros(1, dtype=torch.long),
                num_radar_pts=torch.zeros(1, dtype=torch.long))
    _draw_boxes(draw, canvas, ego, fixed_color=(255, 255, 255))
    path = _as_numpy(trajectory)
    if path is not None and len(path) > 1:
        draw.line([tuple(p) for p in canvas.to_pixels(path[:, :2])], fill=(255, 255, 255), width=2)

    if gt_boxes is not None and len(gt_boxes):
        _draw_boxes(draw, canvas, gt_boxes, fixed_color=GT_COLOR)
    if boxes is not None and len(boxes):
        _draw_boxes(draw, canvas, boxes.select(boxes.scores >= score_threshold))

    radar_points = _as_numpy(radar)
    if radar_points is not None and len(radar_points):
        start = canvas.to_pixels(radar_points[:, :2])
        end = canvas.to_pixels(radar_points[:, :2] + radar_points[:, 4:6])
        for (u0, v0), (u1, v1) in zip(start, end):
            draw.line([(u0, v0), (u1, v1)], fill=(255, 60, 60), width=1)
            draw.ellipse([u0 - 2, v0 - 2, u0 + 2, v0 + 2], fill=(255, 60, 60))

    if title:
        draw.text((6, 6), title, fill=(255, 255, 255))
    return image


def _draw_boxes(draw: ImageDraw.ImageDraw, canvas: BevCanvas, boxes: Boxes, fixed_color=None) -> None:
    """Box footprints with a heading tick, class-coloured unless `fixed_color`."""
    corners = boxes.corners()[:, :4, :2].detach().cpu().numpy()
    centers = boxes.center[:, :2].detach().cpu().numpy()
    labels = boxes.labels.detach().cpu().numpy()
    for footprint, center, label in zip(corners, centers, labels):
        color = fixed_color or CLASS_COLORS[int(label) % len(CLASS_COLORS)]
        uv = [tuple(p) for p in canvas.to_pixels(footprint)]
        draw.polygon(uv, outline=color)
        front = canvas.to_pixels(footprint[:2].mean(axis=0))[0]
        draw.line([tuple(canvas.to_pixels(center)[0]), tuple(front)], fill=color, width=1)


def project_to_image(points_ego: np.ndarray, cam_to_ego: np.ndarray, intrinsics: np.ndarray,
                     min_depth: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Project ego-frame points [N, 3] (meters) into a camera: returns (uv [N, 2] pixels, in_front [N] bool)."""
    ego_to_cam = np.linalg.inv(np.asarray(cam_to_ego, dtype=np.float64))
    cam = np.asarray(points_ego, dtype=np.float64) @ ego_to_cam[:3, :3].T + ego_to_cam[:3, 3]
    depth = cam[:, 2]
    in_front = depth > min_depth
    uvw = cam @ np.asarray(intrinsics, dtype=np.float64).T
    uv = uvw[:, :2] / np.where(in_front, depth, 1.0)[:, None]
    return uv, in_front


_BOX_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))


def render_cameras(cameras: CameraImages, boxes: Boxes | None = None, gt_boxes: Boxes | None = None,
                   columns: int = 3, tile_width: int = 480, score_threshold: float = 0.0) -> Image.Image:
    """The cameras of one sample (leading [Ncam]) in a mosaic, with predicted (class colours) and ground-truth
    (green) boxes drawn as projected 3D wireframes. Invalid cameras show as dark tiles with their name."""
    images = _as_numpy(cameras.images)
    n_cams, _, img_h, img_w = images.shape
    scale = tile_width / img_w
    tile_height = int(round(img_h * scale))
    rows = (n_cams + columns - 1) // columns
    mosaic = Image.new("RGB", (columns * tile_width, rows * tile_height), (10, 10, 10))
    box_sets = []
    if gt_boxes is not None and len(gt_boxes):
        box_sets.append((gt_boxes, GT_COLOR))
    if boxes is not None and len(boxes):
        box_sets.append((boxes.select(boxes.scores >= score_threshold), None))
    for index in range(n_cams):
        tile = Image.fromarray(np.ascontiguousarray(images[index].transpose(1, 2, 0))).resize(
            (tile_width, tile_height), Image.BILINEAR)
        draw = ImageDraw.Draw(tile)
        valid = bool(_as_numpy(cameras.valid)[index])
        if valid:
            cam_to_ego = _as_numpy(cameras.cam_to_ego)[index]
            intrinsics = _as_numpy(cameras.intrinsics)[index] * np.array([[scale], [scale], [1.0]])
            for box_set, color in box_sets:
                _draw_projected_boxes(draw, box_set, cam_to_ego, intrinsics, color, (tile_width, tile_height))
        name = cameras.names[index] if index < len(cameras.names) else f"camera {index}"
        draw.text((5, 5), name if valid else f"{name} (missing)", fill=(255, 255, 255))
        mosaic.paste(tile, ((index % columns) * tile_width, (index // columns) * tile_height))
    return mosaic


def _draw_projected_boxes(draw, boxes: Boxes, cam_to_ego, intrinsics, fixed_color, size) -> None:
    corners = boxes.corners().detach().cpu().numpy()
    labels = boxes.labels.detach().cpu().numpy()
    width, height = size
    for box_corners, label in zip(corners, labels):
        uv, in_front = project_to_image(box_corners, cam_to_ego, intrinsics)
        if in_front.sum() < 8:
            continue  # Boxes crossing the image plane are skipped rather than drawn wrapped around.
        if (uv[:, 0].max() < 0) or (uv[:, 0].min() >= width) or (uv[:, 1].max() < 0) or (uv[:, 1].min() >= height):
            continue
        color = fixed_color or CLASS_COLORS[int(label) % len(CLASS_COLORS)]
        for a, b in _BOX_EDGES:
            draw.line([tuple(uv[a]), tuple(uv[b])], fill=color, width=2)


def render_contributions(contributions, modalities=MODALITIES, cell_pixels: int = 3) -> Image.Image:
    """Per-modality contribution map [M, H, W] (shares summing to 1 per cell, from the fuser's attention) as one
    picture: each cell coloured by the mix of modality colours, forward up. Absent modalities are all zero."""
    shares = _as_numpy(contributions).astype(np.float32)
    if shares.ndim != 3 or shares.shape[0] != len(modalities):
        raise ValueError(f"contributions must be [M={len(modalities)}, H, W], got {list(shares.shape)}")
    palette = np.array([MODALITY_COLORS[MODALITIES.index(m)] if m in MODALITIES else (200, 200, 200)
                        for m in modalities], dtype=np.float32)
    colored = np.einsum("mhw,mc->hwc", shares, palette)
    shown = np.ascontiguousarray(colored.transpose(1, 0, 2)[::-1, ::-1])
    image = Image.fromarray(np.clip(shown, 0, 255).astype(np.uint8))
    image = image.resize((image.width * cell_pixels, image.height * cell_pixels), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    for i, modality in enumerate(modalities):
        draw.rectangle([5, 5 + 14 * i, 15, 15 + 14 * i], fill=tuple(int(c) for c in palette[i]))
        draw.text((20, 4 + 14 * i), modality, fill=(255, 255, 255))
    return image


def side_by_side(*pictures: Image.Image, background=(0, 0, 0)) -> Image.Image:
    """Pictures pasted left to right, top-aligned."""
    width = sum(p.width for p in pictures)
    height = max(p.height for p in pictures)
    out = Image.new("RGB", (width, height), background)
    x = 0
    for p in pictures:
        out.paste(p, (x, 0))
        x += p.width
    return out


def class_legend() -> list[tuple[str, tuple[int, int, int]]]:
    """(class name, colour) pairs used by the pictures."""
    return list(zip(DETECTION_CLASSES, CLASS_COLORS))
