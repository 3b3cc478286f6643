"""Reporting scenario verdicts: a pass/fail table for the terminal and a JUnit XML file that CI systems show
(one testsuite per scenario, one testcase per criterion, a <failure> for each failed one)."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Sequence

from fusion.scenarios.spec import Scenario
from fusion.scenarios.verdicts import Verdict


def format_table(scenario: Scenario, verdicts: Sequence[Verdict], scene: str | None = None) -> str:
    """The verdicts as an aligned text table, with a last line saying whether the scenario passed. scene: the
    scene replayed (default: the scenario's)."""
    rows = [("result", "criterion", "measured", "expected")]
    rows += [("PASS" if v.passed else "FAIL", v.name, v.measured, v.expected) for v in verdicts]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    failed = sum(not v.passed for v in verdicts)
    verdict = "PASSED" if not failed else f"FAILED ({failed} of {len(verdicts)} criteria)"
    return f"scenario: {scenario.name} ({scene or scenario.drive.scene})\n" + "\n".join(lines) + f"\nscenario {verdict}"


def write_junit(scenario: Scenario, verdicts: Sequence[Verdict], path: str | os.PathLike,
                seconds: float = 0.0, scene: str | None = None) -> Path:
    """Write the verdicts as JUnit XML (testsuites > testsuite > testcase, <failure> for failed criteria);
    `seconds`: the replay's wall time, reported as the suite's time; scene: the scene replayed (default: the
    scenario's)."""
    failures = sum(not v.passed for v in verdicts)
    suites = ElementTree.Element("testsuites", name="fusion scenarios", tests=str(len(verdicts)),
                                 failures=str(failures), errors="0", time=f"{seconds:.3f}")
    suite = ElementTree.SubElement(suites, "testsuite", name=scenario.name, tests=str(len(verdicts)),
                                   failures=str(failures), errors="0", skipped="0", time=f"{seconds:.3f}")
    properties = ElementTree.SubElement(suite, "properties")
    for key, value in (("scene", scene or scenario.drive.scene), ("dataroot", scenario.drive.dataroot),
                       ("version", scenario.drive.version), ("scenario_file", scenario.source)):
        ElementTree.SubElement(properties, "property", name=key, value=str(value))
    for verdict in verdicts:
        case = ElementTree.SubElement(suite, "testcase", name=verdict.name, classname=f"scenario.{verdict.kind}",
                                      time="0")
        text = f"measured {verdict.measured}; expected {verdict.expected}" + \
            (f" ({verdict.detail})" if verdict.detail else "")
        if verdict.passed:
            ElementTree.SubElement(case, "system-out").text = text
        else:
            failure = ElementTree.SubElement(case, "failure", message=text, type="ScenarioCriterionFailed")
            failure.text = text
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ElementTree.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)
    return path
