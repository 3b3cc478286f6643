"""Opening a dataroot's devkit tables (`open_nuscenes`): the one place that turns the devkit's own failures on bad
tables into errors that name the table folder.

The devkit builds a MapMask per `map` row when it loads, and asserts the PNG exists: one missing map file would
stop every tool. Here a map row whose file is missing, or whose name leaves the dataroot, gets no mask (the
reader and the replay then mark the map missing, like a missing sensor); the devkit is unchanged otherwise.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Iterator

from fusion.datasets.safe_io import path_problem

#: What the devkit raises on tables that are not what it expects (missing keys, wrong types, bad JSON).
_DEVKIT_TABLE_ERRORS = (KeyError, TypeError, AssertionError, IndexError, AttributeError, ValueError, RecursionError,
                        json.JSONDecodeError)


@contextmanager
def _maps_may_be_missing(dataroot: str) -> Iterator[None]:
    """While the devkit loads: MapMask rows whose file is absent or outside the dataroot get None."""
    import nuscenes.nuscenes as devkit

    real = devkit.MapMask
    prefix = os.path.join(dataroot, "")

    def tolerant_map_mask(path: str, *args, **kwargs):
        written = path[len(prefix):] if path.startswith(prefix) else path
        if path_problem(written) or not os.path.isfile(path):
            return None
        return real(path, *args, **kwargs)

    devkit.MapMask = tolerant_map_mask
    try:
        yield
    finally:
        devkit.MapMask = real


def open_nuscenes(dataroot: str | os.PathLike, version: str, verbose: bool = False):
    """The devkit's NuScenes over <dataroot>/<version>. FileNotFoundError names a missing folder or table;
    ValueError names the table folder when the devkit cannot read the tables (bad JSON, missing keys, wrong
    types). Map rows whose PNG is missing get no mask instead of stopping the load."""
    from nuscenes.nuscenes import NuScenes

    dataroot = os.fspath(dataroot)
    table_root = os.path.join(dataroot, version)
    if not os.path.isdir(table_root):
        raise FileNotFoundError(f"nuScenes dataroot {dataroot} has no version folder {version!r}")
    try:
        with _maps_may_be_missing(dataroot):
            return NuScenes(version=version, dataroot=dataroot, verbose=verbose)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"nuScenes tables of {table_root}: {error}") from None
    except _DEVKIT_TABLE_ERRORS as error:
        raise ValueError(f"nuScenes tables of {table_root} cannot be read by the devkit: "
                         f"{type(error).__name__}: {str(error)[:300]}") from None
