"""The nuScenes detection submission schema, checked types first: every value's type is checked before its value
is looked at, so no input (a class name that is a list, a 400-digit translation, a nested structure 10^5 deep)
can raise anything but `SubmissionError`, whose problems name the sample token and field.

Bounds: numbers are JSON numbers (int or float, never bool) with |value| <= MAX_ABS_VALUE (meters, m/s): nuScenes
maps span a few km, so anything larger is a broken file, not a detection. Scores lie in [0, 1], sizes are >= 0,
rotations are unit quaternions (w, x, y, z) within QUATERNION_NORM_TOLERANCE.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from fusion.types import CLASS_ATTRIBUTES, DETECTION_CLASSES

MAX_BOXES_PER_SAMPLE = 500
#: Allowed |norm - 1| of a submitted rotation quaternion.
QUATERNION_NORM_TOLERANCE = 1e-3
#: Largest |value| of a translation, size or velocity component (meters, m/s).
MAX_ABS_VALUE = 1e6
META_KEYS = ("use_camera", "use_lidar", "use_radar", "use_map", "use_external")
BOX_FIELDS = ("sample_token", "translation", "size", "rotation", "velocity", "detection_name", "detection_score",
              "attribute_name")
VECTOR_FIELDS: dict[str, int] = {"translation": 3, "size": 3, "rotation": 4, "velocity": 2}


class SubmissionError(ValueError):
    """A submission that does not follow the nuScenes format; `problems` lists each one (token and field named)."""

    def __init__(self, source: str, problems: list[str], limit: int = 20, kind: str = "detection"):
        self.source = source
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(f"{source}: invalid nuScenes {kind} submission ({len(problems)} problem(s)):\n"
                         f"{shown}{more}")


def show(value: Any, limit: int = 80) -> str:
    """A short, always-computable description of any JSON value (no repr of huge ints or deep nesting)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"<{value.bit_length()}-bit integer>"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, (list, tuple)):
        if len(value) <= 8 and all(isinstance(v, (int, float, str, bool)) or v is None for v in value):
            return "[" + ", ".join(show(v, 20) for v in value) + "]"
        return f"<list of {len(value)}>"
    if isinstance(value, dict):
        return f"<object with {len(value)} key(s)>"
    return f"<{type(value).__name__}>"


def is_number(value: Any) -> bool:
    """A JSON number (int or float, not bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def bounded_number(value: Any, bound: float = MAX_ABS_VALUE) -> bool:
    """A finite number with |value| <= bound (checked without converting a huge int to float)."""
    if not is_number(value):
        return False
    if isinstance(value, int):
        return -bound <= value <= bound
    return math.isfinite(value) and abs(value) <= bound


def vector_problem(name: str, value: Any) -> str | None:
    """The problem of a box vector field (translation, size, rotation, velocity), types first; None when valid."""
    length = VECTOR_FIELDS[name]
    if not isinstance(value, list) or len(value) != length:
        return f"must be a list of {length} numbers, got {show(value)}"
    if not all(is_number(v) for v in value):
        return f"must hold numbers only, got {show(value)}"
    if not all(bounded_number(v) for v in value):
        return f"has non-finite or out-of-bound values (finite, within +-{MAX_ABS_VALUE:g}), got {show(value)}"
    numbers = [float(v) for v in value]
    if name == "size" and min(numbers) < 0:
        return f"negative size {numbers}"
    if name == "rotation":
        norm = math.sqrt(sum(v * v for v in numbers))
        if abs(norm - 1.0) > QUATERNION_NORM_TOLERANCE:
            return f"quaternion {numbers} has norm {norm:.6g}, not 1"
    return None


def common_box_problems(where: str, token: str, box: dict, fields: Sequence[str],
                        string_fields: Sequence[str]) -> list[str]:
    """The problems every submission format shares (detection and tracking): missing `fields`, `string_fields` that
    are not strings, a sample_token that differs from its results key, and the vector fields, types first."""
    problems = [f"{where}: missing field {name!r}" for name in fields if name not in box]
    for field in string_fields:
        if field in box and not isinstance(box[field], str):
            problems.append(f"{where}.{field}: must be a string, got {show(box[field])}")
    if isinstance(box.get("sample_token"), str) and box["sample_token"] != token:
        problems.append(f"{where}.sample_token: {show(box['sample_token'])} differs from its results key "
                        f"{show(token)}")
    for name in VECTOR_FIELDS:
        if name in box:
            problem = vector_problem(name, box[name])
            if problem:
                problems.append(f"{where}.{name}: {problem}")
    return problems


def box_problems(where: str, token: str, box: Any) -> list[str]:
    """Problems of one submission box at `where` (e.g. "results['abc'][3]"), types first."""
    if not isinstance(box, dict):
        return [f"{where}: must be an object, got {show(box)}"]
    problems = common_box_problems(where, token, box, BOX_FIELDS,
                                   ("sample_token", "detection_name", "attribute_name"))
    name = box.get("detection_name")
    known_class = isinstance(name, str) and name in CLASS_ATTRIBUTES
    if isinstance(name, str) and not known_class:
        problems.append(f"{where}.detection_name: unknown class {show(name)}; expected one of "
                        f"{list(DETECTION_CLASSES)}")
    if "detection_score" in box:
        score = box["detection_score"]
        if not bounded_number(score, 1.0) or score < 0:
            problems.append(f"{where}.detection_score: must be a finite number in [0, 1], got {show(score)}")
    attribute = box.get("attribute_name")
    if known_class and isinstance(attribute, str):
        allowed = CLASS_ATTRIBUTES[name]
        if attribute not in allowed and not (attribute == "" and not allowed):
            expected = list(allowed) if allowed else ['""']
            problems.append(f"{where}.attribute_name: {show(attribute)} is not valid for {name}; expected one of "
                            f"{expected}")
    return problems


def _meta_problems(submission: dict) -> list[str]:
    meta = submission.get("meta")
    if meta is None:
        return [f"missing 'meta' (an object with {list(META_KEYS)})"]
    if not isinstance(meta, dict):
        return [f"meta: must be an object, got {show(meta)}"]
    problems = []
    for key in META_KEYS:
        if key not in meta:
            problems.append(f"meta: missing {key!r}")
        elif not isinstance(meta[key], bool):
            problems.append(f"meta.{key}: must be true or false, got {show(meta[key])}")
    return problems


def validate_submission(submission: Any, sample_tokens: Sequence[str], source: str = "submission",
                        box_problems: Callable[[str, str, Any], list[str]] = box_problems,
                        kind: str = "detection") -> None:
    """Check a submission against the nuScenes detection format for a split; raise SubmissionError listing every
    problem (missing or unknown sample tokens, missing meta or fields, wrong types, bad class or attribute names,
    non-finite or out-of-bound numbers, non-unit quaternions, negative sizes, scores outside [0, 1], more than 500
    boxes). Never raises anything else, whatever `submission` holds. box_problems(where, token, box) checks one box
    (default: the detection format's; fusion.tracking.submission passes the tracking format's); kind names the
    format in the error."""
    if not isinstance(submission, dict):
        raise SubmissionError(source, [f"top level must be an object with 'meta' and 'results', got "
                                       f"{show(submission)}"], kind=kind)
    problems = _meta_problems(submission)
    results = submission.get("results")
    if not isinstance(results, dict):
        problems.append("missing 'results' (an object: sample token -> list of boxes)" if results is None
                        else f"results: must be an object, got {show(results)}")
        raise SubmissionError(source, problems, kind=kind)
    bad_keys = [key for key in results if not isinstance(key, str)]
    if bad_keys:
        problems.append(f"results: sample tokens must be strings, got {show(bad_keys[0])}")
    split = set(sample_tokens)
    missing = [t for t in sample_tokens if t not in results]
    if missing:
        problems.append(f"results: {len(missing)} sample(s) of the split missing (every sample needs an entry, "
                        f"possibly an empty list), e.g. {missing[:3]}")
    unknown = [t for t in results if isinstance(t, str) and t not in split]
    if unknown:
        problems.append(f"results: {len(unknown)} unknown sample token(s) not in the split, e.g. "
                        f"{[show(t) for t in unknown[:3]]}")
    for token, boxes in results.items():
        if not isinstance(token, str):
            continue
        if not isinstance(boxes, list):
            problems.append(f"results[{show(token)}]: must be a list of boxes, got {show(boxes)}")
            continue
        if len(boxes) > MAX_BOXES_PER_SAMPLE:
            problems.append(f"results[{show(token)}]: {len(boxes)} boxes, at most {MAX_BOXES_PER_SAMPLE} allowed")
        for i, box in enumerate(boxes):
            problems.extend(box_problems(f"results[{show(token)}][{i}]", token, box))
    if problems:
        raise SubmissionError(source, problems, kind=kind)
