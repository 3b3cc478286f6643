"""The file-reading layer: every file the reader, the replay and the tools take from outside goes through here.

It owns four questions, answered before a parser looks at a byte:
- Where: a path written in a nuScenes table (`sample_data.filename`, `map.filename`) must stay inside the dataroot.
  It is judged on the path AS WRITTEN (lexically: not absolute, no `..` component, no NUL), never on where a
  symlink leads, so `samples/` or `sweeps/` linked to another disk keep working (`data_path`).
- Present: a missing file raises FileNotFoundError naming it.
- Empty / too large: a 0-byte file raises `EmptyFileError`, a file above the kind's size bound `FileTooLargeError`
  (`checked_size`, `read_bytes`). Truncation is the parser's call (it knows the format) and raises
  `TruncatedFileError`.
- Pixels: images are decoded under Pillow's decompression-bomb limit; `image_pixel_limit` raises it only for the
  duration of one read (the map rasters), never process-wide.

Every error here is a ValueError subclass (or FileNotFoundError) whose message names the file: the documented
exceptions of the reader (docs/reliability.md). `fault_kind(error)` names the fault for the replay's counters.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

from PIL import Image

#: Size bounds (bytes) per kind of file. Real nuScenes files: LiDAR ~2 MB, radar ~10 kB, JPEG ~200 kB, CAN JSON
#: up to ~20 MB, tables up to ~500 MB, submissions up to ~1 GB.
MAX_FILE_BYTES: dict[str, int] = {
    "LiDAR file": 512 << 20,
    "radar file": 64 << 20,
    "camera image": 256 << 20,
    "map raster": 2 << 30,
    "results file": 4 << 30,
}
#: Pixels a map raster may have (nuScenes masks are at most ~4e8 px at 0.1 m); other images keep Pillow's limit.
MAP_MAX_PIXELS = 1_000_000_000

_PIXEL_LIMIT_LOCK = threading.Lock()


class DataFileError(ValueError):
    """A data file that cannot be used (the message names it). Base of the reader's documented file errors."""

    kind = "corrupt"


class EmptyFileError(DataFileError):
    """A 0-byte file."""

    kind = "empty"


class TruncatedFileError(DataFileError):
    """A file shorter than its own header (or format) says."""

    kind = "truncated"


class FileTooLargeError(DataFileError):
    """A file (or image) above the size bound of its kind."""

    kind = "too_large"


class DataPathError(DataFileError):
    """A path from a table that leaves the dataroot (absolute, `..`, NUL); refused without being opened."""

    kind = "outside_dataroot"


def fault_kind(error: BaseException) -> str:
    """The replay's counter for a read error: missing_file, empty, truncated, too_large, outside_dataroot or
    corrupt."""
    if isinstance(error, FileNotFoundError):
        return "missing_file"
    return getattr(error, "kind", "corrupt")


def path_problem(written: object) -> str:
    """Why a table's file name is not a path inside the dataroot ("" when it is). Judged lexically on the name as
    written: a symlinked folder inside the dataroot is fine wherever it points."""
    if not isinstance(written, str) or not written:
        return f"file name must be a non-empty string, got {written!r}"[:200]
    if "\0" in written:
        return f"file name {written!r} contains a NUL byte"[:200]
    if os.path.isabs(written) or written.startswith(("/", "\\")) or (len(written) > 1 and written[1] == ":"):
        return f"file name {written!r} is absolute; it must be relative to the dataroot"[:200]
    parts = written.replace("\\", "/").split("/")
    if ".." in parts:
        return f"file name {written!r} contains '..'; it must stay inside the dataroot"[:200]
    return ""


def data_path(dataroot: str | os.PathLike, written: object, field: str = "filename") -> str:
    """<dataroot>/<written> for a file name from a table; DataPathError (naming the field) when it would leave the
    dataroot. Nothing is opened or resolved."""
    problem = path_problem(written)
    if problem:
        raise DataPathError(f"{field}: {problem} (dataroot {os.fspath(dataroot)})")
    return os.path.join(os.fspath(dataroot), written)


def checked_size(path: str | os.PathLike, kind: str, max_bytes: int | None = None) -> int:
    """Size in bytes of an existing, non-empty file within its kind's bound (MAX_FILE_BYTES[kind] by default).

    Raises FileNotFoundError, EmptyFileError, FileTooLargeError or DataFileError (not a regular file), each naming
    the file and its kind ("LiDAR file", "radar file", ...)."""
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{kind} not found: {path}") from None
    except (OSError, ValueError) as error:  # ValueError: embedded NUL
        raise DataFileError(f"cannot read {kind} {path}: {error}") from None
    if not os.path.isfile(path):
        raise DataFileError(f"{kind} {path} is not a regular file")
    if stat.st_size == 0:
        raise EmptyFileError(f"empty {kind} {path}: 0 bytes")
    bound = MAX_FILE_BYTES.get(kind) if max_bytes is None else max_bytes
    if bound is not None and stat.st_size > bound:
        raise FileTooLargeError(f"{kind} {path} is {stat.st_size} bytes, above the {bound}-byte bound")
    return stat.st_size


def read_bytes(path: str | os.PathLike, kind: str, max_bytes: int | None = None) -> bytes:
    """The whole file, after `checked_size`; a file that changes size while read raises TruncatedFileError."""
    path = os.fspath(path)
    size = checked_size(path, kind, max_bytes)
    try:
        with open(path, "rb") as handle:
            blob = handle.read(size + 1)
    except OSError as error:
        raise DataFileError(f"cannot read {kind} {path}: {error}") from None
    if len(blob) != size:
        raise TruncatedFileError(f"{kind} {path} changed size while being read ({size} -> {len(blob)} bytes)")
    return blob


@contextmanager
def image_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit raised to `max_pixels` for the reads inside the block only (restored
    after; a lock keeps two threads from interleaving). Use it for trusted large rasters (maps), nothing else."""
    with _PIXEL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = int(max_pixels)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous
