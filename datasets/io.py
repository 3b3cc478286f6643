"""Parsers for nuScenes sensor files: LiDAR `.pcd.bin`, radar `.pcd` (v0.7 binary) and camera JPEGs.

Every parser takes a path and returns numpy arrays in the SENSOR frame, exactly as stored; bringing them into the
ego frame is the sample builder's job (fusion.datasets.sample_builder). Bad input raises FileNotFoundError or a
`fusion.datasets.safe_io.DataFileError` (a ValueError: EmptyFileError, TruncatedFileError, FileTooLargeError, ...)
whose message names the file; nothing is silently repaired. Sizes and emptiness are checked by the file-reading
layer (fusion.datasets.safe_io) before a byte is parsed. None of these functions needs a NuScenes object.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from fusion.datasets.safe_io import (DataFileError, EmptyFileError, FileTooLargeError, TruncatedFileError,
                                     checked_size, read_bytes)

#: Columns of a nuScenes LiDAR `.pcd.bin`: five little-endian float32 per point.
LIDAR_BIN_FIELDS: tuple[str, ...] = ("x", "y", "z", "intensity", "ring")
LIDAR_POINT_BYTES = 4 * len(LIDAR_BIN_FIELDS)

#: The 18 fields of a nuScenes radar `.pcd`, in file order (the devkit's RadarPointCloud rows).
RADAR_PCD_FIELDS: tuple[str, ...] = (
    "x", "y", "z", "dyn_prop", "id", "rcs", "vx", "vy", "vx_comp", "vy_comp", "is_quality_valid", "ambig_state",
    "x_rms", "y_rms", "invalid_state", "pdh0", "vx_rms", "vy_rms",
)
_PCD_TYPES = {("F", 2): "<f2", ("F", 4): "<f4", ("F", 8): "<f8",
              ("I", 1): "i1", ("I", 2): "<i2", ("I", 4): "<i4", ("I", 8): "<i8",
              ("U", 1): "u1", ("U", 2): "<u2", ("U", 4): "<u4", ("U", 8): "<u8"}
_PCD_MAX_HEADER_BYTES = 64 * 1024
#: Pixels a camera image may have (nuScenes: 1600 x 900 = 1.44 MP); larger ones are refused before decoding.
MAX_CAMERA_PIXELS = 64_000_000
#: Storage types of the nuScenes radar fields (SIZE 4 4 4 1 2 4 4 4 4 4 1 1 1 1 1 1 1 1, TYPE F F F I I F ... I).
_RADAR_FORMATS = ["<f4", "<f4", "<f4", "i1", "<i2", "<f4", "<f4", "<f4", "<f4", "<f4",
                  "i1", "i1", "i1", "i1", "i1", "i1", "i1", "i1"]


def lidar_bin_size(path: str | os.PathLike) -> int:
    """Number of points in a LiDAR `.pcd.bin` from its size, without reading it.

    Raises FileNotFoundError for a missing file, EmptyFileError for a 0-byte one, FileTooLargeError above the bound
    and TruncatedFileError (naming the file) when its size is not a whole number of 20-byte points.
    """
    path = os.fspath(path)
    size = checked_size(path, "LiDAR file")
    if size % LIDAR_POINT_BYTES:
        raise TruncatedFileError(f"corrupt LiDAR file {path}: {size} bytes is not a whole number of "
                                 f"{LIDAR_POINT_BYTES}-byte points (x, y, z, intensity, ring as float32); truncated?")
    return size // LIDAR_POINT_BYTES


def read_lidar_bin(path: str | os.PathLike, out: np.ndarray | None = None) -> np.ndarray:
    """LiDAR points [N, 5] float32 (x, y, z meters in the LiDAR sensor frame; intensity; ring index) of a `.pcd.bin`.

    out: optional C-contiguous float32 [N, 5] array to read into (no allocation); N must match the file.
    Raises FileNotFoundError for a missing file, EmptyFileError for a 0-byte one (the devkit would give an empty
    cloud; a 0-byte sweep is a failed copy) and TruncatedFileError for a size that is not a whole number of
    20-byte points. Non-finite values are returned as they are; the sample builder drops and counts them.
    """
    path = os.fspath(path)
    checked_size(path, "LiDAR file")
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise FileNotFoundError(f"LiDAR file not found: {path}") from None
    except OSError as error:
        raise DataFileError(f"cannot read LiDAR file {path}: {error}") from error
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise EmptyFileError(f"empty LiDAR file {path}: 0 bytes")
        if size % LIDAR_POINT_BYTES:
            raise TruncatedFileError(f"corrupt LiDAR file {path}: {size} bytes is not a whole number of "
                                     f"{LIDAR_POINT_BYTES}-byte points (x, y, z, intensity, ring as float32); "
                                     "truncated?")
        count = size // LIDAR_POINT_BYTES
        if out is None:
            out = np.empty((count, len(LIDAR_BIN_FIELDS)), dtype="<f4")
        elif out.shape != (count, len(LIDAR_BIN_FIELDS)) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"read_lidar_bin: out must be C-contiguous float32 [{count}, 5] for {path}, got "
                             f"{out.dtype} {out.shape}")
        buffer, read = memoryview(out).cast("B"), 0
        while read < size:
            chunk = os.readv(fd, [buffer[read:]])
            if chunk == 0:
                raise TruncatedFileError(f"LiDAR file {path} shrank while reading: {read} of {size} bytes")
            read += chunk
    except OSError as error:
        raise DataFileError(f"cannot read LiDAR file {path}: {error}") from error
    finally:
        os.close(fd)
    return out


@dataclass(frozen=True)
class RadarFilters:
    """Which radar returns to keep, by state (the devkit's RadarPointCloud filters). None keeps every value."""

    invalid_states: tuple[int, ...] | None = (0,)
    dynprop_states: tuple[int, ...] | None = tuple(range(7))
    ambig_states: tuple[int, ...] | None = (3,)

    @staticmethod
    def default() -> "RadarFilters":
        """The devkit's defaults: valid clusters, dyn_prop 0..6, unambiguous Doppler."""
        return RadarFilters()

    @staticmethod
    def none() -> "RadarFilters":
        """Keep every return."""
        return RadarFilters(None, None, None)

    @staticmethod
    def parse(spec: "RadarFilters | str | dict | None") -> "RadarFilters":
        """From a RadarFilters, "default", "none"/None, or a dict of the three fields (lists of ints or null)."""
        if isinstance(spec, RadarFilters):
            return spec
        if spec is None or spec == "none":
            return RadarFilters.none()
        if spec == "default":
            return RadarFilters.default()
        if isinstance(spec, dict):
            unknown = set(spec) - {"invalid_states", "dynprop_states", "ambig_states"}
            if unknown:
                raise ValueError(f"radar_filters: unknown keys {sorted(unknown)}")
            return RadarFilters(**{k: None if v is None else tuple(int(s) for s in v) for k, v in spec.items()})
        raise ValueError(f"radar_filters must be 'default', 'none', a dict or RadarFilters, got {spec!r}")

    def keep(self, points: np.ndarray) -> np.ndarray:
        """Bool mask [N] of the rows of a parsed radar array [N, 18] (RADAR_PCD_FIELDS columns) to keep."""
        keep = np.ones(points.shape[0], dtype=bool)
        for states, field in ((self.invalid_states, "invalid_state"), (self.dynprop_states, "dyn_prop"),
                              (self.ambig_states, "ambig_state")):
            if states is None:
                continue
            values = points[:, RADAR_PCD_FIELDS.index(field)]
            lookup = np.zeros(257, dtype=bool)                 # states are small integers; 256 = anything else
            lookup[[s for s in states if 0 <= s < 256]] = True
            index = np.where((values >= 0) & (values < 256) & (values == np.floor(values)), values, 256)
            keep &= lookup[index.astype(np.int64)]
        return keep


def _parse_pcd_header(path: str, blob: bytes) -> tuple[dict[str, list[str]], int]:
    """Header keys -> values of a PCD file and the byte offset where its data starts. A key given twice is refused
    (which line would count is ambiguous)."""
    header: dict[str, list[str]] = {}
    offset = 0
    while True:
        end = blob.find(b"\n", offset)
        if end < 0:
            raise DataFileError(f"bad radar PCD header in {path}: no 'DATA' line in the first "
                                f"{min(len(blob), _PCD_MAX_HEADER_BYTES)} bytes")
        try:
            line = blob[offset:end].decode("ascii").strip()
        except UnicodeDecodeError:
            raise DataFileError(f"bad radar PCD header in {path}: non-text bytes before the 'DATA' line") from None
        offset = end + 1
        if not line or line.startswith("#"):
            continue
        key, *values = line.split()
        if key.upper() in header:
            raise DataFileError(f"bad radar PCD header in {path}: {key.upper()} line given twice")
        header[key.upper()] = values
        if key.upper() == "DATA":
            return header, offset


def _header_int(path: str, header: dict[str, list[str]], key: str) -> int:
    values = header[key]
    if len(values) != 1 or not values[0].isdigit() or len(values[0]) > 12:
        raise DataFileError(f"bad radar PCD header in {path}: {key} {' '.join(values)!r} is not one non-negative "
                            "integer")
    return int(values[0])


def read_radar_pcd(path: str | os.PathLike, filters: RadarFilters | None = None) -> np.ndarray:
    """Radar returns [N, 18] float64 (RADAR_PCD_FIELDS columns; x, y, z meters and velocities m/s in the radar
    sensor frame) of a nuScenes PCD v0.7 binary file, optionally filtered.

    Gives exactly what nuscenes-devkit's `RadarPointCloud.from_file(path, ...).points.T` gives (same values, same
    order, same "NaN in the first point means an empty cloud" rule), but vectorised with a structured dtype built
    from the header. Reads WIDTH points after the header and ignores trailing bytes (real nuScenes files have
    them). Raises FileNotFoundError for a missing file, EmptyFileError / FileTooLargeError (safe_io), and
    DataFileError naming the file for a bad header: a key or field name given twice, FIELDS other than the
    nuScenes fields in their order (the devkit reads them by position), POINTS other than WIDTH x HEIGHT, an unsupported DATA kind (ascii, binary_compressed); TruncatedFileError for data too short for WIDTH
    points.
    """
    path = os.fspath(path)
    blob = read_bytes(path, "radar file")
    header, data_start = _parse_pcd_header(path, blob[:_PCD_MAX_HEADER_BYTES])
    for key in ("FIELDS", "SIZE", "TYPE", "WIDTH", "HEIGHT", "DATA"):
        if key not in header:
            raise DataFileError(f"bad radar PCD header in {path}: no {key} line")
    data_kind = header["DATA"][0].lower() if header["DATA"] else ""
    if data_kind != "binary":
        raise DataFileError(f"unsupported radar PCD DATA kind {data_kind!r} in {path}: only 'binary' is supported")
    names, sizes, types = header["FIELDS"], header["SIZE"], header["TYPE"]
    counts = header.get("COUNT", ["1"] * len(names))
    if not (len(names) == len(sizes) == len(types) == len(counts)):
        raise DataFileError(f"bad radar PCD header in {path}: FIELDS/SIZE/TYPE/COUNT have different lengths "
                            f"({len(names)}, {len(sizes)}, {len(types)}, {len(counts)})")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataFileError(f"bad radar PCD header in {path}: field(s) {duplicates} given twice in FIELDS")
    if any(c != "1" for c in counts):
        raise DataFileError(f"bad radar PCD header in {path}: COUNT other than 1 is not supported ({counts})")
    missing = [name for name in RADAR_PCD_FIELDS if name not in names]
    if missing:
        raise DataFileError(f"bad radar PCD header in {path}: fields {missing} missing from FIELDS {names}")
    if tuple(names) != RADAR_PCD_FIELDS:  # the devkit reads fields by position: another order means other data
        raise DataFileError(f"bad radar PCD header in {path}: FIELDS must be the {len(RADAR_PCD_FIELDS)} nuScenes "
                            f"radar fields in their order, got {names}")
    try:
        formats = [_PCD_TYPES[(t.upper(), int(s))] for t, s in zip(types, sizes)]
    except (KeyError, ValueError):
        raise DataFileError(f"bad radar PCD header in {path}: SIZE {sizes} / TYPE {types} not understood") from None
    width, height = _header_int(path, header, "WIDTH"), _header_int(path, header, "HEIGHT")
    if height != 1:
        raise DataFileError(f"bad radar PCD header in {path}: WIDTH {width} x HEIGHT {height}; expected HEIGHT 1")
    if "POINTS" in header and _header_int(path, header, "POINTS") != width * height:
        raise DataFileError(f"bad radar PCD header in {path}: POINTS {header['POINTS'][0]} is not WIDTH x HEIGHT "
                            f"= {width * height}")
    dtype = np.dtype({"names": names, "formats": formats})
    needed = width * dtype.itemsize
    available = len(blob) - data_start
    if available < needed:
        raise TruncatedFileError(f"truncated radar file {path}: WIDTH {width} points of {dtype.itemsize} bytes "
                                 f"need {needed} bytes after the header, found {available}")
    records = np.frombuffer(blob, dtype=dtype, count=width, offset=data_start)
    points = np.stack([records[name].astype(np.float64) for name in RADAR_PCD_FIELDS], axis=1) if width else \
        np.zeros((0, len(RADAR_PCD_FIELDS)))
    if width and np.isnan(points[0]).any():  # the devkit's convention for an empty cloud
        return np.zeros((0, len(RADAR_PCD_FIELDS)))
    if filters is not None:
        points = points[filters.keep(points)]
    return points


def write_radar_pcd(path: str | os.PathLike, points: np.ndarray, trailing_bytes: int = 0) -> None:
    """Write radar returns [N, 18] (RADAR_PCD_FIELDS columns, sensor frame) as a nuScenes PCD v0.7 binary file with
    the standard field types, optionally followed by `trailing_bytes` zero bytes (as real files have)."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != len(RADAR_PCD_FIELDS):
        raise ValueError(f"write_radar_pcd: points must be [N, {len(RADAR_PCD_FIELDS)}], got {points.shape}")
    records = np.zeros(len(points), dtype=np.dtype({"names": list(RADAR_PCD_FIELDS), "formats": _RADAR_FORMATS}))
    for i, name in enumerate(RADAR_PCD_FIELDS):
        records[name] = points[:, i]
    sizes = " ".join(str(np.dtype(f).itemsize) for f in _RADAR_FORMATS)
    types = " ".join("F" if np.dtype(f).kind == "f" else "I" for f in _RADAR_FORMATS)
    header = ["# .PCD v0.7 - Point Cloud Data file format", "VERSION 0.7", "FIELDS " + " ".join(RADAR_PCD_FIELDS),
              f"SIZE {sizes}", f"TYPE {types}", "COUNT " + " ".join(["1"] * len(RADAR_PCD_FIELDS)),
              f"WIDTH {len(points)}", "HEIGHT 1", "VIEWPOINT 0 0 0 1 0 0 0", f"POINTS {len(points)}", "DATA binary"]
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(records.tobytes())
        f.write(b"\0" * int(trailing_bytes))


def read_jpeg(path: str | os.PathLike, decode_size: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """RGB image [H, W, 3] uint8 (read-only) of a JPEG and the integer downscale factor it was decoded with.

    decode_size: (width, height) the caller needs at least; when given, the JPEG is decoded with DCT scaling
        (PIL `Image.draft`, 1/2, 1/4 or 1/8) to the smallest size still at least that large. Pixel i of the result
        covers source pixels [i * s, (i + 1) * s) for the returned factor s (1 when not downscaled); update the
        intrinsics with `scale_intrinsics(K, 1 / s)`.
    Raises FileNotFoundError for a missing file, EmptyFileError / FileTooLargeError (a file or image above its
    bound: decompression bombs are refused before decoding), TruncatedFileError / DataFileError naming the file
    for a truncated or corrupt one.
    """
    path = os.fspath(path)
    checked_size(path, "camera image")
    try:
        with Image.open(path) as image:
            full_width, full_height = image.size
            if full_width * full_height > MAX_CAMERA_PIXELS:
                raise FileTooLargeError(f"camera image {path} is {full_width} x {full_height} pixels, above the "
                                        f"{MAX_CAMERA_PIXELS}-pixel bound (decompression bomb?)")
            if decode_size is not None:
                image.draft("RGB", (int(decode_size[0]), int(decode_size[1])))
            if image.mode != "RGB":
                image = image.convert("RGB")
            array = np.asarray(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"camera image not found: {path}") from None
    except DataFileError:
        raise
    except Image.DecompressionBombError as error:
        raise FileTooLargeError(f"camera image {path}: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        kind = TruncatedFileError if "truncated" in str(error) else DataFileError
        raise kind(f"corrupt camera image {path}: {error}") from error
    if array.ndim != 3 or array.shape[2] != 3 or array.size == 0:
        raise DataFileError(f"corrupt camera image {path}: decoded to shape {array.shape}")
    return array, max(1, int(round(full_width / array.shape[1])))


def scale_intrinsics(intrinsics: np.ndarray, scale_x: float, scale_y: float | None = None) -> np.ndarray:
    """Pinhole matrix [3, 3] after resizing the image by (scale_x, scale_y), with pixel centres at integer
    coordinates: u' = (u + 0.5) * scale - 0.5 (the mapping PIL's resize and JPEG DCT scaling use)."""
    scale_y = scale_x if scale_y is None else scale_y
    resize = np.array([[scale_x, 0.0, 0.5 * scale_x - 0.5], [0.0, scale_y, 0.5 * scale_y - 0.5], [0.0, 0.0, 1.0]])
    return resize @ np.asarray(intrinsics, dtype=np.float64)
