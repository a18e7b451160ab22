"""Draw a training run's loss, learning rate and validation metrics from its metrics.jsonl.

    python scripts/plot_run.py runs/stage2                 # writes runs/stage2/training_curves.png
    python scripts/plot_run.py runs/stage2 --output curves.png

Works on a run in progress (it reads what has been logged so far) and on one that stopped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/plot_run.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli


def main(argv=None) -> Path:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a training run's --output_dir (holding metrics.jsonl)")
    p.add_argument("--output", default=None, help="the PNG to write (default: RUN_DIR/training_curves.png)")
    args = p.parse_args(argv)
    from plots import training_curves
    path = training_curves(args.run_dir, args.output)
    print(path)
    return path


if __name__ == "__main__":
    cli.run(main)
