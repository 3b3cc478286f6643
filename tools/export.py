#!/usr/bin/env python
"""Export a trained FusionDetector to ONNX for onnxruntime (CPU, CUDA or TensorRT execution providers).

    python tools/export.py --checkpoint outputs/main/train/checkpoints/last.ckpt --out outputs/model.onnx
    python tools/export.py --config configs/tiny_cpu.yaml --out /tmp/untrained.onnx     # fresh weights (latency)

The graph is fixed to batch 1 and to the camera set-up the model was trained with (image size and camera count from
the checkpoint's data settings, or --image-size / --cameras); the number of LiDAR and radar points is free.
Sensor availability is an input (`present`), so one file serves every subset of sensors. Voxelization and the
camera BEV pooling are in standard ONNX operators (opset 18, no custom ops; see fusion/deploy/graph.py), the
box decoding runs after the graph in the shared fusion.deploy.inputs.decode. After writing the file the tool runs it
once in onnxruntime on a generated sample and prints the largest difference of the raw head maps from PyTorch's.

Refused (exit 2, one line saying why): temporal fusion, the spconv LiDAR branch (LidarBranch), branch / fuser /
head types the exporter does not know. Exit 0 on success, 2 on bad input, 1 for a bug.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="Lightning checkpoint of a FusionDetector")
    parser.add_argument("--config", action="append", help="YAML config (repeatable) for checkpoints without saved "
                        "settings, or alone for a freshly initialised model")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="camera image size in pixels (default: the model's data settings)")
    parser.add_argument("--cameras", type=int, default=None, help="cameras per sample (default: the data settings')")
    args = parser.parse_args(argv)
    if args.checkpoint is None and not args.config:
        parser.error("give --checkpoint (a trained model) or --config (fresh weights)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from fusion.checkpoints import load_run
    from fusion.deploy.export import data_settings, example_batch, export_onnx, export_spec
    from fusion.deploy.spec import UnsupportedExport, check_exportable
    from fusion.types import CAMERA_NAMES

    config = args.config if args.config is None or len(args.config) > 1 else args.config[0]
    try:
        if args.checkpoint is not None and not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
        torch.manual_seed(0)
        model = load_run(args.checkpoint, config).model.eval()
        check_exportable(model)
        settings = data_settings(args.checkpoint, config)
        image_size = args.image_size or settings.get("image_size")
        cameras = args.cameras or len(settings.get("cameras") or CAMERA_NAMES)
        spec = export_spec(model, tuple(image_size) if image_size else None, cameras,
                           settings.get("lidar_sweeps"), settings.get("radar_sweeps"))
        example = example_batch(spec)
        path = export_onnx(model, spec, example, args.out)
    except (FileNotFoundError, UnsupportedExport, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from fusion.deploy.runtime import OnnxDetector

    onnx_output, _ = OnnxDetector(path).run(example)
    with torch.no_grad():
        torch_output, _ = model(example)
    difference = max(float((getattr(onnx_output, name) - getattr(torch_output, name)).abs().max())
                     for name in ("heatmap", "offset", "height", "size", "rotation", "velocity"))
    print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB): modalities {', '.join(spec.modalities)}; "
          f"inputs {', '.join(spec.inputs)}; images {spec.image_size}; opset {spec.opset}")
    print(f"check on a generated sample: largest |onnxruntime - PyTorch| of the head maps {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
