"""Generate a synthetic nuScenes-format dataroot (the project's embedded default data).

    python tools/make_synthetic.py --out data/synth                      # the default: 10 scenes x 13 s
    python tools/make_synthetic.py --out /tmp/tiny --tiny                # 2 scenes x 3 s, small images
    python tools/make_synthetic.py --out DIR --scenes 4 --seed 7 --scene-seconds 20 --image-size 800x450

The output loads with `NuScenes('v1.0-synth', DIR)` (splits `synth_train` / `synth_val` in splits.json),
`NuScenesCanBus(DIR)` and the project's reader. Same options and seed -> byte-identical files.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusion.datasets.synthetic import SyntheticConfig, generate_dataroot  # noqa: E402


def _image_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size must look like 640x360, got {text!r}") from None
    return w, h


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output dataroot folder (absent or empty)")
    parser.add_argument("--tiny", action="store_true", help="start from the tiny test preset instead of the default")
    parser.add_argument("--scenes", type=int, help="number of scenes (default 10; tiny 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", help="table folder name (default v1.0-synth)")
    parser.add_argument("--scene-seconds", type=float, help="scene length in seconds (default 13; tiny 3)")
    parser.add_argument("--image-size", type=_image_size, help="WIDTHxHEIGHT (default 640x360; tiny 320x180)")
    parser.add_argument("--lidar-azimuth-steps", type=int, help="LiDAR rays per beam and turn (default 720)")
    parser.add_argument("--density", type=float, help="object density factor (default 1.0)")
    parser.add_argument("--val-fraction", type=float, help="share of scenes in synth_val (default 0.2)")
    parser.add_argument("--no-can-scenes", type=str,
                        help="comma-separated 0-based scene indices written without CAN bus files (default: 2)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default: CPU count)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing generated dataroot in --out")
    args = parser.parse_args(argv)

    config = SyntheticConfig.tiny() if args.tiny else SyntheticConfig()
    changes = {"seed": args.seed, "workers": args.workers}
    for arg, field in (("scenes", "scenes"), ("version", "version"), ("scene_seconds", "scene_seconds"),
                       ("lidar_azimuth_steps", "lidar_azimuth_steps"), ("density", "object_density"),
                       ("val_fraction", "val_fraction")):
        if getattr(args, arg) is not None:
            changes[field] = getattr(args, arg)
    if args.image_size is not None:
        changes["image_width"], changes["image_height"] = args.image_size
    if args.no_can_scenes is not None:
        try:
            changes["no_can_scenes"] = tuple(int(v) for v in args.no_can_scenes.split(",") if v.strip())
        except ValueError:
            parser.error(f"--no-can-scenes must be comma-separated integers, got {args.no_can_scenes!r}")
    try:
        config = dataclasses.replace(config, **changes)
    except ValueError as err:
        parser.error(str(err))

    start = time.time()
    info = generate_dataroot(args.out, config, overwrite=args.overwrite,
                             progress=lambda name: print(f"  {name} done ({time.time() - start:.1f} s)", flush=True))
    print(f"wrote {info.dataroot} (version {info.version}): {len(info.scene_names)} scenes, {info.num_samples} "
          f"keyframes, {info.num_annotations} annotations in {time.time() - start:.1f} s; "
          f"{info.train_split}={len(info.train_scenes)} scenes, {info.val_split}={len(info.val_scenes)} scenes, "
          f"without CAN bus: {', '.join(info.scenes_without_can) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
