"""Which classes a checkpoint may make us import: the allow-list checked before anything in a checkpoint's saved
hyper-parameters reaches jsonargparse (which imports every `class_path`, and any dotted name given where a callable
is expected).

Allowed: classes and callables of this package (`fusion.`), plus the exact names the user gives on the command line
(`--allow-class module.Class`). Everything else is refused with `ClassNotAllowedError` naming the checkpoint and
the field, before any import.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

#: Package prefixes whose classes a checkpoint may always name.
ALLOWED_PACKAGES: tuple[str, ...] = ("fusion.",)
#: A string jsonargparse could resolve as an import path: dotted Python identifiers.
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_IDENTIFIER_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class ClassNotAllowedError(ValueError):
    """A checkpoint names a class (or import path) outside the allow-list."""


@dataclass(frozen=True)
class ClassAllowList:
    """Package prefixes (ending in ".") and exact dotted names that may be imported from a checkpoint."""

    packages: tuple[str, ...] = ALLOWED_PACKAGES
    names: frozenset[str] = field(default_factory=frozenset)

    @staticmethod
    def with_names(names: Iterable[str] | None) -> "ClassAllowList":
        """The default allow-list plus exact `module.Class` names (from --allow-class); ValueError for a name that
        is not a dotted Python path."""
        names = list(names or ())
        for name in names:
            if not isinstance(name, str) or not _IMPORT_PATH.match(name):
                raise ValueError(f"--allow-class {name!r}: expected a full dotted name such as module.Class")
        return ClassAllowList(names=frozenset(names))

    def allows(self, name: str) -> bool:
        return name in self.names or any(name.startswith(prefix) for prefix in self.packages)


def import_paths(value: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """(field, value) of every `class_path` / `_class_path` value and every string that looks like a dotted import
    path, anywhere in a nested structure of dicts and lists."""
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}.{key}" if where else str(key)
            if key in ("class_path", "_class_path"):
                yield here, item
            else:
                yield from import_paths(item, here)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from import_paths(item, f"{where}[{i}]")
    elif isinstance(value, str) and _IMPORT_PATH.match(value):
        yield where, value


def check_class_paths(hyper_parameters: Any, allow: ClassAllowList | None, source: str) -> None:
    """Raise ClassNotAllowedError (naming `source` and the field) for the first class path or import path in
    `hyper_parameters` that the allow-list does not allow (default: this package only). Imports nothing."""
    allow = allow or ClassAllowList()
    for where, name in import_paths(hyper_parameters):
        if not isinstance(name, str) or not _IDENTIFIER_PATH.match(name):
            raise ClassNotAllowedError(f"{source}: {where} must be a dotted class name, got {str(name)[:100]!r}")
        if not allow.allows(name):
            raise ClassNotAllowedError(
                f"{source}: {where} names {name!r}, which is not allowed: a checkpoint may only name classes of "
                f"the {', '.join(p.rstrip('.') for p in allow.packages)} package; if you trust it, pass "
                f"--allow-class {name}")
