#!/usr/bin/env python
"""Check that an exported ONNX model gives the same detections in onnxruntime (CPU) as the PyTorch model.

    python tools/onnx_parity.py --onnx outputs/model.onnx --checkpoint outputs/main/train/checkpoints/last.ckpt \
        --dataroot data/synthetic --version v1.0-synth --split synth_val [--max-samples N]

Every sample of the split (through the model's inference transforms, batch 1) is run with all sensors and with each
sensor missing, by PyTorch and by onnxruntime, and the boxes are matched one to one: the same class, centres within
1 cm, scores within 1e-3 (a box whose score is within 1e-3 of the decoding threshold may be in one list only). Prints
one line per sensor subset. Exit 0 when every sample passes, 1 when one does not, 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", required=True, help="file written by tools/export.py")
    parser.add_argument("--checkpoint", help="the checkpoint it was exported from")
    parser.add_argument("--config", action="append", help="YAML config (repeatable) for checkpoints without saved "
                        "settings, or alone for a freshly initialised model (seeded like tools/export.py)")
    parser.add_argument("--dataroot", required=True, help="nuScenes-format dataroot")
    parser.add_argument("--version", required=True, help="table folder, e.g. v1.0-synth")
    parser.add_argument("--split", required=True, help="split to check, e.g. synth_val")
    parser.add_argument("--max-samples", type=int, default=None, help="check only the first N samples")
    parser.add_argument("--score-threshold", type=float, default=None, help="decoding threshold (default: model's)")
    args = parser.parse_args(argv)
    if args.checkpoint is None and not args.config:
        parser.error("give --checkpoint or --config (the model the ONNX file was exported from)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from fusion.checkpoints import load_run
    from fusion.datasets.collate import collate_samples
    from fusion.deploy.parity import check_parity
    from fusion.deploy.runtime import OnnxDetector

    config = args.config if args.config is None or len(args.config) > 1 else args.config[0]
    try:
        if not (Path(args.dataroot) / args.version).is_dir():
            raise FileNotFoundError(f"--dataroot {args.dataroot} has no table folder {args.version!r}")
        detector = OnnxDetector(args.onnx)
        torch.manual_seed(0)
        run = load_run(args.checkpoint, config, dataroot=args.dataroot, version=args.version, split=args.split,
                       num_workers=0, cache_dir=None)
        if list(run.model.modalities) != list(detector.modalities) or run.model.grid != detector.grid:
            raise ValueError(f"{args.onnx} was exported from another model (modalities {list(detector.modalities)}, "
                             f"grid {detector.grid}) than {args.checkpoint or config}")
        dataset = run.data.make_dataset(args.split, train=False)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    count = len(dataset) if args.max_samples is None else min(args.max_samples, len(dataset))
    batches = (collate_samples([dataset[i]]) for i in range(count))
    records = check_parity(run.model.eval(), detector, batches, args.score_threshold)
    failed = 0
    print(f"{'sensors':<10} {'samples':>7} {'boxes':>7} {'matched':>7} {'unmatched':>9} {'borderline':>10} "
          f"{'centre err m':>12} {'score err':>9} {'map diff':>9}")
    for subset in dict.fromkeys(r.subset for r in records):
        chosen = [r for r in records if r.subset == subset]
        failed += sum(not r.boxes.ok for r in chosen)
        print(f"{subset:<10} {len(chosen):>7} {sum(r.boxes.reference for r in chosen):>7} "
              f"{sum(r.boxes.matched for r in chosen):>7} {sum(r.boxes.unmatched for r in chosen):>9} "
              f"{sum(r.boxes.borderline for r in chosen):>10} "
              f"{max(r.boxes.max_centre_error_m for r in chosen):>12.2e} "
              f"{max(r.boxes.max_score_error for r in chosen):>9.2e} {max(r.max_map_difference for r in chosen):>9.2e}")
    if failed:
        bad = [f"{r.token} ({r.subset})" for r in records if not r.boxes.ok][:5]
        print(f"parity FAILED on {failed} of {len(records)} checks, e.g. {', '.join(bad)}")
        return 1
    print(f"parity OK: {len(records)} checks ({count} samples x {len(records) // max(count, 1)} sensor subsets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
