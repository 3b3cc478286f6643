#!/usr/bin/env python
"""Why velocity and heading are wrong: motion diagnostics of a submission (tools/evaluate.py writes one).

    python tools/diagnose.py --dataroot data/synthetic --version v1.0-synth --split synth_val \
        --results outputs/main/eval/results_nusc.json [--json out.json]

Prints, over predictions matched to ground truth like the devkit's TP errors (same class, within 2 m): the mean true
and predicted speed of the matched objects, the share of moving objects (> 1 m/s) predicted as moving, their
velocity error, and the share of headings right (< 0.3 rad) and flipped front/back (> pi - 0.3 rad).
Exit status: 0, or 2 for a bad argument or submission (the message names the file / field).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataroot", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--split", required=True)
    parser.add_argument("--results", required=True, help="a nuScenes detection submission JSON")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    from fusion.evaluation import (SubmissionError, ground_truth_submission, load_nuscenes, load_submission,
                                   split_sample_tokens, validate_submission)
    from fusion.evaluation.motion import motion_diagnostics
    try:
        if not Path(args.results).is_file():
            raise FileNotFoundError(f"--results {args.results}: file not found")
        nusc = load_nuscenes(args.dataroot, args.version)
        submission = load_submission(args.results)
        validate_submission(submission, split_sample_tokens(nusc, args.split), source=str(args.results))
        truth = ground_truth_submission(nusc, args.split)
    except (SubmissionError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    figures = motion_diagnostics(submission["results"], truth["results"]).as_dict()
    for name, value in figures.items():
        print(f"{name:26s} {value:.3f}" if isinstance(value, float) else f"{name:26s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
