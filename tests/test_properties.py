"""Property-based tests (hypothesis) of every parser and validator that takes outside input: LiDAR `.pcd.bin`,
radar `.pcd`, camera JPEGs, CAN bus JSON, nuScenes tables, submission JSON and checkpoints.

The property, for each: a generated input (valid, mutated or garbage) either parses to what the devkit (or Pillow)
gives, or raises one of the documented exceptions (FileNotFoundError, ValueError and its subclasses) whose message
names the file or field; never another exception, never a hang (every parser is bounded by the input's size).
The default run tries a modest number of examples per property; `-m slow` runs many more.
"""
from __future__ import annotations

import io
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nuscenes.can_bus.can_bus_api import NuScenesCanBus
from nuscenes.eval.detection.data_classes import DetectionBox
from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud
from PIL import Image

from fusion.checkpoint_allowlist import ClassAllowList, ClassNotAllowedError, check_class_paths
from fusion.checkpoints import atomic_torch_save, load_run
from fusion.datasets.can_bus import CAN_KEYS, CAN_KINDS, can_state_at, scene_can_messages, usable_can_messages
from fusion.datasets.io import RADAR_PCD_FIELDS, RadarFilters, read_jpeg, read_lidar_bin, read_radar_pcd
from fusion.datasets.nuscenes_index import build_index
from fusion.datasets.nuscenes_tables import open_nuscenes
from fusion.evaluation.submission import load_submission
from fusion.evaluation.submission_schema import BOX_FIELDS, SubmissionError, validate_submission

ROOT = Path(__file__).resolve().parents[1]
#: Examples per property: a modest number by default, many under `-m slow`.
EXAMPLES = [pytest.param(25, id="default"), pytest.param(400, id="many", marks=pytest.mark.slow)]
FEW_EXAMPLES = [pytest.param(6, id="default"), pytest.param(60, id="many", marks=pytest.mark.slow)]
DOCUMENTED = (FileNotFoundError, ValueError)

RADAR_SIZES = (4, 4, 4, 1, 2, 4, 4, 4, 4, 4, 1, 1, 1, 1, 1, 1, 1, 1)
RADAR_TYPES = "F F F I I F F F F F I I I I I I I I".split()
RADAR_ITEM = sum(RADAR_SIZES)


def check_property(strategy, check, examples: int) -> None:
    """Run check(value) on `examples` values drawn from `strategy` (no deadline: the machine is shared)."""
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(strategy)
    def run(value):
        check(value)

    run()


def outcome(function, *args, **kwargs):
    """(result, None) or (None, exception) for documented exceptions; anything else propagates (a failure)."""
    try:
        return function(*args, **kwargs), None
    except DOCUMENTED as error:
        return None, error


def devkit_outcome(function, *args, **kwargs):
    """(result, None) or (None, exception): the devkit may fail any way it likes."""
    try:
        return function(*args, **kwargs), None
    except Exception as error:  # noqa: BLE001 - the devkit's failures are not under test
        return None, error


# ----------------------------------------------------------------------------------------------------- LiDAR

def lidar_bytes():
    """Whole clouds of random float32 points, truncated, extended or replaced by garbage."""
    cloud = st.integers(0, 40).flatmap(lambda n: st.binary(min_size=20 * n, max_size=20 * n))
    return st.one_of(
        cloud,
        st.tuples(cloud, st.integers(1, 19)).map(lambda c: c[0][:max(0, len(c[0]) - c[1])]),
        st.tuples(cloud, st.binary(min_size=1, max_size=19)).map(lambda c: c[0] + c[1]),
        st.binary(max_size=300))


@pytest.mark.parametrize("examples", EXAMPLES)
def test_lidar_files_parse_like_the_devkit_or_raise_naming_the_file(tmp_path, examples):
    path = tmp_path / "scan.pcd.bin"

    def check(blob: bytes):
        path.write_bytes(blob)
        ours, error = outcome(read_lidar_bin, path)
        if error is not None:
            assert str(path) in str(error)
            assert blob == b"" or len(blob) % 20  # only empty or partial-point files are refused
            return
        theirs = LidarPointCloud.from_file(str(path)).points
        np.testing.assert_array_equal(ours[:, :4].T.view(np.uint32), theirs.view(np.uint32))

    check_property(lidar_bytes(), check, examples)


# ----------------------------------------------------------------------------------------------------- radar

def radar_header(width: int) -> list[str]:
    return ["# .PCD v0.7 - Point Cloud Data file format", "VERSION 0.7", "FIELDS " + " ".join(RADAR_PCD_FIELDS),
            "SIZE " + " ".join(map(str, RADAR_SIZES)), "TYPE " + " ".join(RADAR_TYPES),
            "COUNT " + " ".join(["1"] * 18), f"WIDTH {width}", "HEIGHT 1", "VIEWPOINT 0 0 0 1 0 0 0",
            f"POINTS {width}", "DATA binary"]


@st.composite
def radar_files(draw) -> bytes:
    """A nuScenes radar PCD with random records, then (maybe) one mutation of its header or data."""
    width = draw(st.integers(0, 6))
    lines = radar_header(width)
    data = draw(st.binary(min_size=width * RADAR_ITEM, max_size=width * RADAR_ITEM))
    trailing = draw(st.sampled_from([b"", b"\0" * 64]))
    mutation = draw(st.sampled_from(["none", "drop_line", "duplicate_line", "width", "points", "field_name",
                                     "duplicate_field", "swap_fields", "size", "truncate", "garbage"]))
    token = draw(st.one_of(st.integers(-5, 10**15).map(str), st.text("0123456789x- ", max_size=6)))
    i = draw(st.integers(0, len(lines) - 1))
    if mutation == "drop_line":
        lines.pop(i)
    elif mutation == "duplicate_line":
        lines.insert(i, lines[i])
    elif mutation in ("width", "points"):
        lines[6 if mutation == "width" else 9] = f"{mutation.upper()} {token}"
    elif mutation in ("field_name", "duplicate_field", "swap_fields"):
        names = list(RADAR_PCD_FIELDS)
        j = draw(st.integers(0, 17))
        k = draw(st.integers(0, 17))
        if mutation == "field_name":
            names[j] = draw(st.text("abcxyz_", min_size=1, max_size=5))
        elif mutation == "duplicate_field":
            names[j] = names[k]
        else:
            names[j], names[k] = names[k], names[j]
        lines[2] = "FIELDS " + " ".join(names)
    elif mutation == "size":
        sizes = list(RADAR_SIZES)
        sizes[draw(st.integers(0, 17))] = draw(st.sampled_from([0, 1, 2, 3, 8, 16]))
        lines[3] = "SIZE " + " ".join(map(str, sizes))
    blob = ("\n".join(lines) + "\n").encode() + data + trailing
    if mutation == "truncate":
        blob = blob[:draw(st.integers(0, len(blob)))]
    elif mutation == "garbage":
        blob = draw(st.binary(max_size=400))
    return blob


@pytest.mark.parametrize("examples", EXAMPLES)
def test_radar_files_parse_like_the_devkit_or_raise_naming_the_file(tmp_path, examples):
    path = tmp_path / "radar.pcd"

    def check(blob: bytes):
        path.write_bytes(blob)
        ours, error = outcome(read_radar_pcd, path, RadarFilters.default())
        if error is not None:
            assert str(path) in str(error)
            return
        theirs, devkit_error = devkit_outcome(RadarPointCloud.from_file, str(path))
        if devkit_error is None:  # the devkit refuses some files we read (no trailing byte, 0 points)
            np.testing.assert_array_equal(ours.T, theirs.points)

    check_property(radar_files(), check, examples)


# ---------------------------------------------------------------------------------------------------- images

def small_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@st.composite
def image_files(draw) -> bytes:
    blob = small_jpeg(draw(st.integers(0, 3)))
    mutation = draw(st.sampled_from(["none", "truncate", "flip", "garbage", "png"]))
    if mutation == "truncate":
        return blob[:draw(st.integers(0, len(blob) - 1))]
    if mutation == "flip":
        i = draw(st.integers(0, len(blob) - 1))
        return blob[:i] + bytes([blob[i] ^ draw(st.integers(1, 255))]) + blob[i + 1:]
    if mutation == "png":
        buffer = io.BytesIO()
        mode = draw(st.sampled_from(["L", "RGBA", "P", "1", "I;16"]))
        Image.new(mode, (draw(st.integers(1, 30)), draw(st.integers(1, 30)))).save(buffer, format="PNG")
        return buffer.getvalue()
    if mutation == "garbage":
        return draw(st.binary(max_size=300))
    return blob


@pytest.mark.parametrize("examples", EXAMPLES)
def test_images_decode_like_pillow_or_raise_naming_the_file(tmp_path, examples):
    path = tmp_path / "image.jpg"

    def check(blob: bytes):
        path.write_bytes(blob)
        ours, error = outcome(read_jpeg, path)
        if error is not None:
            assert str(path) in str(error)
            return
        array, factor = ours
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3 and factor == 1
        with Image.open(path) as image:
            np.testing.assert_array_equal(array, np.asarray(image.convert("RGB")))

    check_property(image_files(), check, examples)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(path)  # 144 MP of zeros: a few kB on disk
    with pytest.raises(ValueError, match="bomb.png"):
        read_jpeg(path)


# ------------------------------------------------------------------------------------------------------- CAN

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5))
json_values = st.recursive(json_scalars, lambda children: st.one_of(st.lists(children, max_size=4),
                                                                    st.dictionaries(st.text(max_size=4), children,
                                                                                    max_size=3)), max_leaves=8)


@st.composite
def can_messages(draw, kind: str):
    """Messages of one CAN type: mostly well formed, some with a broken utime or value."""
    messages = []
    for i in range(draw(st.integers(0, 12))):
        message = {"utime": 1_000_000 + 20_000 * i}
        for key in CAN_KEYS[kind]:
            message[key] = [0.5, -0.1, 0.2] if key in ("vel", "accel", "rotation_rate", "linear_accel") else 3.0
        if draw(st.integers(0, 3)) == 0:
            key = draw(st.sampled_from(["utime", *CAN_KEYS[kind]]))
            message[key] = draw(json_values)
        messages.append(message)
    return messages


@pytest.mark.parametrize("examples", EXAMPLES)
def test_can_messages_bad_records_are_dropped_one_by_one(examples):
    def check(case):
        per_kind, timestamp = case
        dropped = {}
        usable = {}
        for kind, messages in per_kind.items():
            counter = Counter()
            usable[kind] = usable_can_messages(kind, messages, counter)
            dropped[kind] = sum(counter.values())
            assert len(usable[kind]) + dropped[kind] == len(messages)  # every record kept or counted
        state = can_state_at(usable, timestamp)
        if state.valid:
            assert all(math.isfinite(v) for v in (state.speed, state.yaw_rate, *state.acceleration))
        else:
            assert state.reason
        raw = can_state_at(per_kind, timestamp)  # never raises, even on unfiltered records
        assert not raw.valid or all(math.isfinite(v) for v in (raw.speed, raw.yaw_rate, *raw.acceleration))

    strategy = st.tuples(st.fixed_dictionaries({kind: can_messages(kind) for kind in CAN_KINDS}),
                         st.integers(900_000, 1_300_000))
    check_property(strategy, check, examples)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_can_files_one_unreadable_file_costs_only_its_type(tmp_path, examples):
    folder = tmp_path / "can_bus"
    folder.mkdir()
    files = st.one_of(can_messages("pose").map(json.dumps), st.text(max_size=30),
                      json_values.map(json.dumps), st.just(""))

    def check(contents):
        for path in folder.iterdir():
            path.unlink()
        for kind, text in zip(CAN_KINDS, contents):
            if text is not None:
                (folder / f"scene-0001_{kind}.json").write_text(text)
        can_bus = NuScenesCanBus(dataroot=str(tmp_path))
        counter = Counter()
        result = scene_can_messages(can_bus, "scene-0001", dropped=counter)
        assert isinstance(result, (dict, str))
        if isinstance(result, dict):
            for kind, messages in result.items():
                assert all(isinstance(m, dict) and isinstance(m.get("utime"), int) for m in messages)

    check_property(st.tuples(*[st.one_of(st.none(), files) for _ in CAN_KINDS]), check, examples)


# ------------------------------------------------------------------------------------------------ tables

@st.composite
def table_mutations(draw):
    table = draw(st.sampled_from(["sample_data", "sample", "scene", "calibrated_sensor", "ego_pose", "log", "map",
                                  "sample_annotation"]))
    kind = draw(st.sampled_from(["drop_key", "retype", "garbage", "empty", "absolute_filename", "dotdot_filename",
                                 "delete_map_png"]))
    return table, kind, draw(st.integers(0, 10**6)), draw(json_values)


@pytest.mark.parametrize("examples", FEW_EXAMPLES)
def test_nuscenes_tables_load_or_raise_naming_the_folder(tiny_dataroot, tmp_path, examples):
    source = Path(tiny_dataroot.dataroot)
    version = tiny_dataroot.version

    def check(case):
        table, kind, pick, value = case
        root = tmp_path / "root"
        if root.exists():
            shutil.rmtree(root)
        root.mkdir()
        for item in source.iterdir():  # sensor folders linked, tables and maps copied
            if item.name in (version, "maps"):
                shutil.copytree(item, root / item.name)
            elif item.is_dir():
                (root / item.name).symlink_to(item)
        path = root / version / f"{table}.json"
        rows = json.loads(path.read_text())
        row = rows[pick % len(rows)] if rows else {}
        if kind == "drop_key" and row:
            row.pop(sorted(row)[pick % len(row)])
        elif kind == "retype" and row:
            row[sorted(row)[pick % len(row)]] = value
        elif kind == "absolute_filename" and "filename" in row:
            row["filename"] = "/etc/hostname"
        elif kind == "dotdot_filename" and "filename" in row:
            row["filename"] = "../" + row["filename"]
        elif kind == "delete_map_png":
            for png in (root / "maps").glob("*.png"):
                png.unlink()
        text = json.dumps(rows)
        if kind == "garbage":
            text = text[:pick % max(1, len(text))]
        elif kind == "empty":
            text = ""
        path.write_text(text)
        nusc, error = outcome(open_nuscenes, root, version)
        if error is not None:
            assert str(root) in str(error)
            return
        index, error = outcome(build_index, str(root), version, tiny_dataroot.train_split)
        if error is not None:
            assert str(root) in str(error)

    check_property(table_mutations(), check, examples)


# -------------------------------------------------------------------------------------------- submissions

TOKENS = ["token-a", "token-b"]


def good_box(token: str) -> dict:
    return {"sample_token": token, "translation": [1.0, 2.0, 0.5], "size": [1.9, 4.5, 1.6],
            "rotation": [1.0, 0.0, 0.0, 0.0], "velocity": [0.0, 0.0], "detection_name": "car",
            "detection_score": 0.5, "attribute_name": "vehicle.parked"}


@st.composite
def submissions(draw):
    submission = {"meta": {"use_camera": True, "use_lidar": True, "use_radar": True, "use_map": False,
                           "use_external": False},
                  "results": {token: [good_box(token) for _ in range(draw(st.integers(0, 2)))] for token in TOKENS}}
    where = draw(st.sampled_from(["box", "box", "box", "meta", "results", "top"]))
    value = draw(st.one_of(json_values, st.integers(-10**400, 10**400), st.sampled_from(
        [10**400, -10**400, float("nan"), float("inf"), [], {}, ["car"], {"car": 1}, "", True])))
    if where == "box":
        boxes = submission["results"][TOKENS[0]] or [good_box(TOKENS[0])]
        submission["results"][TOKENS[0]] = boxes
        field = draw(st.sampled_from(list(BOX_FIELDS)))
        if draw(st.booleans()) and isinstance(boxes[0][field], list):
            boxes[0][field][draw(st.integers(0, len(boxes[0][field]) - 1))] = value
        else:
            boxes[0][field] = value
    elif where == "meta":
        submission["meta"][draw(st.sampled_from(list(submission["meta"])))] = value
    elif where == "results":
        submission["results"][TOKENS[1]] = value
    else:
        submission = value if draw(st.booleans()) else {**submission, "results": value}
    return submission


@pytest.mark.parametrize("examples", EXAMPLES)
def test_submissions_validate_or_raise_submission_error_naming_the_field(examples):
    def check(submission):
        try:
            validate_submission(submission, TOKENS, source="generated.json")
        except SubmissionError as error:
            assert "generated.json" in str(error) and error.problems
            return
        for token, boxes in submission["results"].items():  # valid: the devkit reads every box
            for box in boxes:
                assert DetectionBox.deserialize(box).detection_name == box["detection_name"]

    check_property(submissions(), check, examples)


def test_type_confusion_and_huge_numbers_name_the_sample_and_field(tmp_path):
    box = good_box(TOKENS[0])
    box["detection_name"] = ["car"]
    other = good_box(TOKENS[1])
    other["translation"] = [10**400, 0, 0]
    submission = {"meta": {k: False for k in ("use_camera", "use_lidar", "use_radar", "use_map", "use_external")},
                  "results": {TOKENS[0]: [box], TOKENS[1]: [other]}}
    with pytest.raises(SubmissionError) as caught:
        validate_submission(submission, TOKENS)
    text = str(caught.value)
    assert "results['token-a'][0].detection_name: must be a string" in text
    assert "results['token-b'][0].translation" in text and "1329-bit integer" in text  # shown, never converted
    path = tmp_path / "huge.json"
    path.write_text('{"meta": {}, "results": {"a": [' + "1" * 5000 + "]}}")
    with pytest.raises(ValueError, match="huge.json"):
        load_submission(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="huge.json"):
        load_submission(path)


# -------------------------------------------------------------------------------------------- checkpoints

class_names = st.one_of(st.sampled_from(["fusion.branches.lidar.LidarPillarBranch", "os.system", "builtins.eval",
                                         "subprocess.Popen", "LidarPillarBranch", "fusion", "torch.nn.Linear",
                                         "fusion.fuser.DeformableFuser"]),
                        st.text(max_size=12), json_values)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_class_paths_outside_the_allow_list_are_refused(examples):
    def check(case):
        names, extra = case
        hyper_parameters = {"branches": [{"class_path": n, "init_args": {}} for n in names],
                            "head": {"class_path": names[0] if names else "fusion.heads.centerpoint.CenterHead"}}
        allow = ClassAllowList.with_names(extra)
        try:
            check_class_paths(hyper_parameters, allow, "generated.ckpt")
        except ClassNotAllowedError as error:
            assert "generated.ckpt" in str(error)
            return
        assert all(isinstance(n, str) and (n.startswith("fusion.") or n in extra) for n in names)

    extras = st.lists(st.sampled_from(["torch.nn.Linear", "os.system"]), max_size=1)
    check_property(st.tuples(st.lists(class_names, max_size=3), extras), check, examples)


@pytest.mark.parametrize("examples", FEW_EXAMPLES)
def test_checkpoint_files_load_or_raise_naming_the_file(tmp_path, examples):
    """Random bytes, truncated checkpoints and checkpoints whose hyper-parameters are replaced piece by piece."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())["model"]
    path = tmp_path / "generated.ckpt"

    def check(case):
        kind, value, cut = case
        hyper_parameters = json.loads(json.dumps(config))
        if kind == "bytes":
            path.write_bytes(value if isinstance(value, bytes) else b"")
        else:
            if kind == "hparam":
                hyper_parameters[sorted(hyper_parameters)[cut % len(hyper_parameters)]] = value
            elif kind == "class_path":
                hyper_parameters["branches"][cut % 4]["class_path"] = value
            atomic_torch_save({"state_dict": {}, "hyper_parameters": hyper_parameters}, path)
            if kind == "truncated":
                blob = path.read_bytes()
                path.write_bytes(blob[:cut % len(blob)])
        run, error = outcome(load_run, path)
        if error is not None:
            assert str(path) in str(error)

    strategy = st.tuples(st.sampled_from(["bytes", "hparam", "class_path", "truncated"]),
                         st.one_of(json_values, st.binary(max_size=64)), st.integers(0, 10**6))
    check_property(strategy, check, examples)
