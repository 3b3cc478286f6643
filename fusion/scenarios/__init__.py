"""Scenario verdicts over a replay, in the manner of Autoware's driving_log_replayer without ROS: a YAML file names
a drive and the criteria it must meet; the replay's records and summary are judged against them; the verdicts go
to a pass/fail table and a JUnit XML file (`tools/replay.py --scenario FILE`, exit 3 when a criterion fails).

- `fusion.scenarios.spec`: the scenario file and its typed criteria (latency, dropped frames, detection /
  tracking metrics in a time window, an object within range of the ego, no track ID switches of an instance).
- `fusion.scenarios.verdicts`: judging the criteria over a replay's detections.jsonl and summary.
- `fusion.scenarios.report`: the table and the JUnit XML.
"""
from fusion.scenarios.report import format_table, write_junit
from fusion.scenarios.spec import (DETECTION_METRICS, Drive, Latency, MetricThreshold, NoDroppedFrames,
                                   NoIdSwitches, ObjectInRange, Scenario, ScenarioError, Window, load_scenario,
                                   parse_scenario)
from fusion.scenarios.verdicts import Verdict, judge_scenario, read_records, scene_start_us

__all__ = ["DETECTION_METRICS", "Drive", "Latency", "MetricThreshold", "NoDroppedFrames", "NoIdSwitches",
           "ObjectInRange", "Scenario", "ScenarioError", "Verdict", "Window", "format_table", "judge_scenario",
           "load_scenario", "parse_scenario", "read_records", "scene_start_us", "write_junit"]
