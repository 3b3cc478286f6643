"""Benchmarks: speed and memory figures for docs/benchmarks.md.

    python tools/benchmark.py ops      [--device cpu|cuda] ...   voxelization, bev_pool, scatter backends
    python tools/benchmark.py reader   --dataroot DIR ...        our nuScenes reader vs the devkit
    python tools/benchmark.py model    --config FILE ...         inference / training throughput
    python tools/benchmark.py inference [--config FILE] ...      per-stage latency: eager, torch.compile, onnxruntime

Each area prints a table and, with --json FILE, writes its figures as JSON. Run `... AREA --help` for options.
"""
import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

AREAS = {
    "ops": "tools.benchmarks.ops",
    "reader": "tools.benchmarks.reader",
    "model": "tools.benchmarks.model",
    "inference": "tools.benchmarks.inference",
}


def main(argv=None):
    # --help after an area goes to that area's own parser; before it (or alone) it prints this overview.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    parser.add_argument("area", choices=sorted(AREAS))
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(AREAS[args.area])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
