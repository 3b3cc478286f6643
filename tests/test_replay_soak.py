"""The replay soak: a long generated drive (tests/soak_drive.py: cheap low-resolution sensors) replayed as fast as
possible with faults injected at random (empty, truncated, corrupt, missing, late, duplicated, out-of-order and
absurdly stamped messages). It must finish, count every injected fault by kind in summary.json, give the frames no
fault touched the same detections as the clean run, and keep its resident memory flat.

The default run replays 12 s of drive; `-m slow` replays 20 minutes and prints the RSS curve."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fusion.datasets.sample_builder import SampleBuilder
from fusion.grid import BEVGrid
from fusion.replay import PlaybackClock, ReplayEngine, SyncPolicy, run_replay

from soak_drive import InputDetector, SoakDrive

#: A frame at T is touched by a fault on a message stamped in [T - BEFORE, T + AFTER] (seconds): its previous
#: sweeps, radar sweeps, CAN interpolation and the sync window all lie inside.
BEFORE_S, AFTER_S = 0.3, 0.15


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def replay(drive: SoakDrive, faults: bool, out: Path, rss_every: int = 0):
    """Replay the drive into `out` as fast as possible; returns (summary, {T: detection digest}, rss curve)."""
    builder = SampleBuilder(grid=BEVGrid(cell_size=3.2), lidar_sweeps=2, radar_sweeps=2, radars=("RADAR_FRONT",),
                            cameras=("CAM_FRONT",), on_missing="mark_missing", lidar_min_distance=0.0)
    engine = ReplayEngine(drive.messages(faults), InputDetector(), builder,
                          policy=SyncPolicy(lidar_sweeps=2, radar_sweeps=2), rate=0.0, scene_name="soak",
                          contributions=False)
    digests_path = out / "digests.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    rss: list[tuple[int, float]] = []
    with open(digests_path, "w") as digests:  # on disk, so that the RSS curve is the replay's own
        def on_frame(frame):
            boxes = frame.boxes
            digests.write(json.dumps([frame.timestamp_us, boxes.center.tolist(), boxes.yaw.tolist(),
                                      boxes.velocity.tolist(), boxes.num_lidar_pts.tolist(),
                                      boxes.num_radar_pts.tolist(), frame.messages]) + "\n")
            if rss_every and frame.index % rss_every == 0:
                rss.append((frame.index, round(resident_mb(), 1)))

        run_replay(engine, out, builder.grid, video="none", png_every=0, on_frame=on_frame, log=lambda _: None)
    summary = json.loads((out / "summary.json").read_text())
    with open(digests_path) as handle:
        frames = {record[0]: record[1:] for record in map(json.loads, handle)}
    return summary, frames, rss


def check_soak(tmp_path: Path, seconds: float, faults_per_second: float, rss_every: int = 0):
    drive = SoakDrive(tmp_path / "pool", seconds, seed=0, faults_per_second=faults_per_second)
    clean_summary, clean_frames, _ = replay(drive, False, tmp_path / "clean")
    summary, frames, rss = replay(drive, True, tmp_path / "faulty", rss_every)
    injected = dict(drive.injected)

    assert clean_summary["completed"] and summary["completed"]
    assert clean_summary["faults"] == {} and clean_summary["frames"]["failed"] == 0
    assert summary["frames"]["failed"] == 0, summary["frame_errors"]
    assert summary["faults"] == injected, (summary["faults"], injected)  # every fault counted, by kind
    for channel, counts in summary["messages"].items():  # and every message accounted for once
        outcomes = sum(v for k, v in counts.items() if k != "received")
        assert outcomes == counts["received"], (channel, counts)

    faulted = sorted(drive.faulted_us)
    good = [t for t in clean_frames if not any(t - BEFORE_S * 1e6 <= f <= t + AFTER_S * 1e6 for f in faulted)]
    assert len(good) >= 0.25 * len(clean_frames)
    for t in good:
        assert frames.get(t) == clean_frames[t], t
    return summary, injected, rss, len(good), len(clean_frames)


def test_short_soak_counts_every_fault_and_keeps_good_frames(tmp_path, single_torch_thread):
    summary, injected, _, good, total = check_soak(tmp_path, seconds=12.0, faults_per_second=1.0)
    assert sum(injected.values()) >= 8 and len(injected) >= 5
    assert summary["stream_seconds"] < 13  # absurd stamps never stretch the stream


@pytest.mark.slow
def test_twenty_minute_soak_memory_stays_flat(tmp_path, capsys, single_torch_thread):
    summary, injected, rss, good, total = check_soak(tmp_path, seconds=20 * 60.0, faults_per_second=0.25,
                                                     rss_every=1000)
    assert set(injected) == {"empty", "truncated", "missing_file", "corrupt", "late", "out_of_order", "duplicate",
                             "bad_timestamp"}
    warm = [mb for index, mb in rss if index >= 2000]
    assert max(warm) - min(warm) < 20.0, rss  # MB: no growth with the drive's length
    with capsys.disabled():
        print(f"\nsoak: {summary['stream_seconds']:.0f} s of drive, {total} frames ({good} untouched by faults) in "
              f"{summary['wall_time_s']:.0f} s; faults {injected}\nRSS MB by frame: {rss}")


def test_absurd_stamp_never_makes_real_time_playback_wait(tmp_path, single_torch_thread):
    """At real time, one message stamped 10^6 s ahead is counted and skipped: the clock never waits more than its
    bound, and no later message is counted out of order."""
    import dataclasses

    drive = SoakDrive(tmp_path / "pool", 3.0, seed=1)
    messages = list(drive.messages(faults=False))
    messages[40] = dataclasses.replace(messages[40], timestamp_us=messages[40].timestamp_us + 10**12)
    slept = []

    class FakeTime:
        t = 0.0

        def now(self):
            return self.t

        def sleep(self, seconds):
            slept.append(seconds)
            self.t += seconds

    fake = FakeTime()
    builder = SampleBuilder(grid=BEVGrid(cell_size=3.2), lidar_sweeps=1, radar_sweeps=1, radars=(), cameras=(),
                            on_missing="mark_missing")
    engine = ReplayEngine(messages, InputDetector(), builder, policy=SyncPolicy(lidar_sweeps=1, radar_sweeps=1),
                          clock=PlaybackClock(1.0, now=fake.now, sleep=fake.sleep, max_wait_s=1.0),
                          contributions=False)
    frames = list(engine.frames())
    summary = engine.summary()
    assert max(slept) <= 1.0 and fake.t < 4.0
    assert summary["faults"] == {"bad_timestamp": 1}
    assert all(counts["out_of_order"] == 0 for counts in summary["messages"].values())
    assert len(frames) == summary["frames"]["triggered"] - int(messages[40].channel == "LIDAR_TOP")


def test_clock_shortens_a_real_pause_and_keeps_pace_after_it():
    class FakeTime:
        t = 0.0

        def now(self):
            return self.t

        def sleep(self, seconds):
            self.t += seconds

    fake = FakeTime()
    clock = PlaybackClock(1.0, now=fake.now, sleep=fake.sleep, max_wait_s=0.5)
    clock.start(0)
    clock.wait_until(100_000)
    assert fake.t == pytest.approx(0.1)
    clock.wait_until(3_600_000_000)  # an hour-long pause in the recording
    assert fake.t == pytest.approx(0.6) and clock.gaps_shortened == 1
    clock.wait_until(3_600_200_000)  # then real time again, from there
    assert fake.t == pytest.approx(0.8) and clock.lag_s(3_600_200_000) == pytest.approx(0.0)
