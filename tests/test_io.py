"""Sensor file parsers: LiDAR .pcd.bin, radar .pcd v0.7, JPEG; parity with the devkit and bad input."""
import numpy as np
import pytest
from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud
from PIL import Image

from fusion.datasets.io import (RADAR_PCD_FIELDS, RadarFilters, read_jpeg, read_lidar_bin, read_radar_pcd,
                                scale_intrinsics, write_radar_pcd)

RADAR_SIZES = (4, 4, 4, 1, 2, 4, 4, 4, 4, 4, 1, 1, 1, 1, 1, 1, 1, 1)
RADAR_TYPES = "F F F I I F F F F F I I I I I I I I".split()


def radar_records(n: int, seed: int = 0) -> np.ndarray:
    """n random radar returns with every state value the filters look at."""
    rng = np.random.default_rng(seed)
    formats = {("F", 4): "<f4", ("I", 1): "i1", ("I", 2): "<i2"}
    dtype = np.dtype({"names": list(RADAR_PCD_FIELDS),
                      "formats": [formats[(t, s)] for t, s in zip(RADAR_TYPES, RADAR_SIZES)]})
    records = np.zeros(n, dtype=dtype)
    for name in ("x", "y", "z", "rcs", "vx", "vy", "vx_comp", "vy_comp"):
        records[name] = rng.normal(0, 20, n)
    records["dyn_prop"] = rng.integers(0, 8, n)
    records["id"] = rng.integers(0, 300, n)
    records["ambig_state"] = rng.integers(0, 5, n)
    records["invalid_state"] = rng.choice([0, 0, 0, 1, 4, 8, 17], n)
    for name in ("is_quality_valid", "x_rms", "y_rms", "pdh0", "vx_rms", "vy_rms"):
        records[name] = rng.integers(0, 20, n)
    return records


def write_pcd(path, records, data="binary", width=None, trailing=3726, header_lines=None):
    """A nuScenes-style radar PCD: header, WIDTH records, then `trailing` zero bytes (as real files have)."""
    width = len(records) if width is None else width
    lines = header_lines or [
        "# .PCD v0.7 - Point Cloud Data file format", "VERSION 0.7", "FIELDS " + " ".join(RADAR_PCD_FIELDS),
        "SIZE " + " ".join(map(str, RADAR_SIZES)), "TYPE " + " ".join(RADAR_TYPES), "COUNT " + " ".join(["1"] * 18),
        f"WIDTH {width}", "HEIGHT 1", "VIEWPOINT 0 0 0 1 0 0 0", f"POINTS {width}", f"DATA {data}"]
    with open(path, "wb") as f:
        f.write(("\n".join(lines) + "\n").encode())
        f.write(records.tobytes())
        f.write(b"\0" * trailing)
    return str(path)


# ---------------------------------------------------------------------------------------------------------- LiDAR

def test_lidar_bin_round_trip_and_devkit_parity(tmp_path):
    points = np.random.default_rng(1).normal(0, 30, (1000, 5)).astype(np.float32)
    path = tmp_path / "scan.pcd.bin"
    points.tofile(path)
    loaded = read_lidar_bin(path)
    assert loaded.dtype == np.float32 and loaded.shape == (1000, 5)
    np.testing.assert_array_equal(loaded, points)
    np.testing.assert_array_equal(loaded[:, :4].T, LidarPointCloud.from_file(str(path)).points)


def test_lidar_bin_truncated_names_the_file(tmp_path):
    path = tmp_path / "truncated.pcd.bin"
    np.zeros((10, 5), np.float32).tofile(path)
    with open(path, "ab") as f:
        f.write(b"\0" * 8)                                   # 208 bytes: not a multiple of 20
    with pytest.raises(ValueError, match="truncated.pcd.bin"):
        read_lidar_bin(path)


def test_lidar_bin_missing_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pcd.bin"):
        read_lidar_bin(tmp_path / "nowhere.pcd.bin")


# ---------------------------------------------------------------------------------------------------------- radar

@pytest.mark.parametrize("filters", ["default", "none"])
def test_radar_pcd_matches_devkit_exactly(tmp_path, filters):
    path = write_pcd(tmp_path / "radar.pcd", radar_records(300))
    ours = read_radar_pcd(path, RadarFilters.parse(filters))
    if filters == "none":
        RadarPointCloud.disable_filters()
    try:
        theirs = RadarPointCloud.from_file(path).points
    finally:
        RadarPointCloud.default_filters()
    assert ours.dtype == np.float64 and ours.shape[1] == 18
    assert 0 < len(ours) <= 300
    np.testing.assert_array_equal(ours.T, theirs)


def test_radar_custom_filters_match_devkit(tmp_path):
    path = write_pcd(tmp_path / "radar.pcd", radar_records(300, seed=3))
    filters = RadarFilters(invalid_states=(0, 4), dynprop_states=(0, 2, 6), ambig_states=(3, 4))
    theirs = RadarPointCloud.from_file(path, invalid_states=[0, 4], dynprop_states=[0, 2, 6], ambig_states=[3, 4])
    np.testing.assert_array_equal(read_radar_pcd(path, filters).T, theirs.points)


def test_radar_filters_match_devkit_on_odd_state_values(tmp_path):
    """Float-typed state fields with non-integer, negative or large values filter exactly as the devkit's `in`."""
    records = radar_records(200, seed=9)
    formats = [("F", 4) if name in ("dyn_prop", "invalid_state", "ambig_state") else (t, s)
               for name, t, s in zip(RADAR_PCD_FIELDS, RADAR_TYPES, RADAR_SIZES)]
    dtype = np.dtype({"names": list(RADAR_PCD_FIELDS),
                      "formats": [{("F", 4): "<f4", ("I", 1): "i1", ("I", 2): "<i2"}[f] for f in formats]})
    odd = np.zeros(200, dtype=dtype)
    for name in RADAR_PCD_FIELDS:
        odd[name] = records[name]
    rng = np.random.default_rng(2)
    for name in ("dyn_prop", "invalid_state", "ambig_state"):
        odd[name] = rng.choice([0, 0.5, 2, 3, 3.0, -1, 300, 6, 17], 200)
    lines = ["# .PCD v0.7", "VERSION 0.7", "FIELDS " + " ".join(RADAR_PCD_FIELDS),
             "SIZE " + " ".join(str(s) for _, s in formats), "TYPE " + " ".join(t for t, _ in formats),
             "COUNT " + " ".join(["1"] * 18), "WIDTH 200", "HEIGHT 1", "VIEWPOINT 0 0 0 1 0 0 0", "POINTS 200",
             "DATA binary"]
    path = write_pcd(tmp_path / "odd.pcd", odd, header_lines=lines)
    filters = RadarFilters(invalid_states=(0, 17), dynprop_states=(0, 2, 3, 6), ambig_states=(3,))
    theirs = RadarPointCloud.from_file(path, invalid_states=[0, 17], dynprop_states=[0, 2, 3, 6], ambig_states=[3])
    ours = read_radar_pcd(path, filters)
    assert len(ours) > 0
    np.testing.assert_array_equal(ours.T, theirs.points)


def test_radar_without_trailing_bytes_parses(tmp_path):
    records = radar_records(50)
    exact = read_radar_pcd(write_pcd(tmp_path / "exact.pcd", records, trailing=0))
    padded = read_radar_pcd(write_pcd(tmp_path / "padded.pcd", records, trailing=4000))
    assert exact.shape == (50, 18)
    np.testing.assert_array_equal(exact, padded)


def test_radar_nan_first_point_is_an_empty_cloud_like_the_devkit(tmp_path):
    records = radar_records(5)
    records["x"][0] = np.nan
    path = write_pcd(tmp_path / "empty.pcd", records)
    assert read_radar_pcd(path).shape == (0, 18)
    assert RadarPointCloud.from_file(path).points.shape[1] == 0


def test_radar_too_short_for_width_names_the_file(tmp_path):
    path = write_pcd(tmp_path / "short.pcd", radar_records(10), width=20, trailing=0)
    with pytest.raises(ValueError, match="short.pcd"):
        read_radar_pcd(path)


@pytest.mark.parametrize("kind", ["ascii", "binary_compressed"])
def test_radar_unsupported_data_kind_names_the_file(tmp_path, kind):
    path = write_pcd(tmp_path / f"{kind}.pcd", radar_records(5), data=kind)
    with pytest.raises(ValueError, match=f"unsupported.*{kind}.*{kind}.pcd"):
        read_radar_pcd(path)


@pytest.mark.parametrize("case", ["no_fields", "count", "height", "size", "garbage"])
def test_radar_bad_header_names_the_file(tmp_path, case):
    lines = ["# .PCD v0.7", "VERSION 0.7", "FIELDS " + " ".join(RADAR_PCD_FIELDS),
             "SIZE " + " ".join(map(str, RADAR_SIZES)), "TYPE " + " ".join(RADAR_TYPES),
             "COUNT " + " ".join(["1"] * 18), "WIDTH 5", "HEIGHT 1", "POINTS 5", "DATA binary"]
    if case == "no_fields":
        lines.pop(2)
    elif case == "count":
        lines[5] = "COUNT " + " ".join(["2"] + ["1"] * 17)
    elif case == "height":
        lines[7] = "HEIGHT 2"
    elif case == "size":
        lines[3] = "SIZE " + " ".join(["3"] + list(map(str, RADAR_SIZES[1:])))
    path = tmp_path / f"{case}.pcd"
    if case == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        write_pcd(path, radar_records(5), header_lines=lines)
    with pytest.raises(ValueError, match=f"{case}.pcd"):
        read_radar_pcd(path)


def test_write_radar_pcd_round_trips_through_the_devkit(tmp_path):
    records = radar_records(40, seed=5)
    points = np.stack([records[name].astype(np.float64) for name in RADAR_PCD_FIELDS], axis=1)
    path = tmp_path / "written.pcd"
    write_radar_pcd(path, points, trailing_bytes=100)
    np.testing.assert_array_equal(read_radar_pcd(path), points)
    np.testing.assert_array_equal(read_radar_pcd(path, RadarFilters()).T, RadarPointCloud.from_file(str(path)).points)


def test_radar_filters_parse():
    assert RadarFilters.parse("default") == RadarFilters()
    assert RadarFilters.parse(None) == RadarFilters.parse("none") == RadarFilters(None, None, None)
    assert RadarFilters.parse({"dynprop_states": [0, 2, 6]}).dynprop_states == (0, 2, 6)
    with pytest.raises(ValueError, match="radar_filters"):
        RadarFilters.parse("moving")


# ---------------------------------------------------------------------------------------------------------- JPEG

def test_jpeg_full_and_draft_decode(tmp_path):
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 255, (45, 80, 3)), np.ones((20, 20, 1))).astype(np.uint8)   # 900 x 1600
    path = tmp_path / "cam.jpg"
    Image.fromarray(image).save(path, quality=95)
    full, factor = read_jpeg(path)
    assert full.shape == (900, 1600, 3) and full.dtype == np.uint8 and factor == 1
    assert np.abs(full[10::20, 10::20].astype(int) - image[10::20, 10::20]).mean() < 4   # block centres
    small, factor = read_jpeg(path, decode_size=(350, 190))     # smallest DCT scale still >= 350 x 190: 1/4
    assert small.shape == (225, 400, 3) and factor == 4
    # pixel (i, j) of the 1/4 image averages source pixels [4i, 4i + 4): the 20-px blocks become 5-px blocks
    assert np.abs(small[2::5, 2::5].astype(int) - image[10::20, 10::20]).mean() < 6


def test_scale_intrinsics_follows_pixel_centres():
    k = np.array([[1000.0, 0, 800], [0, 1000.0, 450], [0, 0, 1]])
    point = np.array([0.3, -0.2, 5.0])
    u, v, w = k @ point
    scaled = scale_intrinsics(k, 0.25)
    u2, v2, w2 = scaled @ point
    assert np.isclose(u2 / w2, (u / w + 0.5) * 0.25 - 0.5) and np.isclose(v2 / w2, (v / w + 0.5) * 0.25 - 0.5)


def test_corrupt_jpeg_names_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not a jpeg at all" * 10)
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match=path.name):
            read_jpeg(path)
    with pytest.raises(FileNotFoundError, match="absent.jpg"):
        read_jpeg(tmp_path / "absent.jpg")
