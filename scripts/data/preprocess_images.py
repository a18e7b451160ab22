"""Decode a data set's images once, at the vision tower's input size, into the pre-resized cache.

Training reads the cache without a flag: it lives in `.image_cache/<size>-<filter>/` beside the
data file (see image_cache.py). Give the model whose image processor training will use, or a size:

    python scripts/data/preprocess_images.py --data data/train.json data/val.json --image_root data/images \\
        --model StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli --num_workers 8
    python scripts/data/preprocess_images.py --data knee.csv --size 384 384        # bicubic, as SigLIP
    python scripts/data/preprocess_images.py --data train.json --model runs/stage0/best_model --check

A model trained with Stage0's --pad_to_square (its image processor records it) gets a cache of
padded images, `.image_cache/<size>-<filter>-padsquare/`; for a model that does not record it yet
(google/medsiglip-448 before Stage0 --pad_to_square), pass --pad_to_square.

Running it again rebuilds only entries whose source changed (size or modification time) or that
are missing. Rows may be Stage0 JSON/CSV or Stage1/Stage2 JSON files; only the image column is
read. CT volumes (.npz) are left out. With --cache_dir DIR, point training at the same place with
SIGLIP_MED_IMAGE_CACHE=DIR.

Bad rows (a missing or unreadable image, an empty image column) do not stop it: each is listed
on standard error as `FILE row N: reason` (a CSV's as `FILE line N`), every good row is cached,
and the exit status is 1 (0 when every row was cached). A file unusable as a whole (not valid
JSON/CSV, no image column) is refused in one `error:` line before anything is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import cli
import preflight
from image_cache import RESAMPLE, ENV_VAR, ImageCache, Target, build_cache, cache_folder, target_from_processor
from data_rows import DataFileError, read_rows

logger = logging.getLogger("siglip_med")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="data files (JSON list or CSV) whose images to cache; one cache per file's folder")
    p.add_argument("--image_root", default="", help="folder relative image paths are under (CSV: its folder)")
    p.add_argument("--image_key", "--img_path_column", dest="image_key", default=None,
                   help="the image column (default: 'image' in JSON, 'img_path' in CSV)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", default=None, metavar="PATH",
                   help="a model folder or hub id: its image processor gives the size and filter")
    g.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="resize to H x W")
    g.add_argument("--shortest_edge", type=int, default=None, metavar="N",
                   help="resize the shorter side to N, keeping the aspect (processors with {shortest_edge: N})")
    p.add_argument("--resample", choices=sorted(RESAMPLE), default="bicubic",
                   help="with --size / --shortest_edge: the PIL filter")
    p.add_argument("--pad_to_square", action="store_true",
                   help="zero-pad each image to a square before the resize, for training with Stage0's "
                        "--pad_to_square (a --model trained with it records it: then no flag is needed)")
    p.add_argument("--cache_dir", default=None,
                   help=f"cache root instead of .image_cache beside the data file (then set {ENV_VAR}=DIR "
                        "for training)")
    p.add_argument("--num_workers", type=int, default=4, help="decoding processes (0: this process)")
    p.add_argument("--check", action="store_true", help="only report fresh/stale/missing; exit 1 unless all fresh")
    args = p.parse_args(argv)
    if args.num_workers < 0:
        p.error("--num_workers must be >= 0")
    if (args.size and min(args.size) < 1) or (args.shortest_edge is not None and args.shortest_edge < 1):
        p.error("--size H W and --shortest_edge N must be positive")
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        p.error(f"--cache_dir {args.cache_dir}: a file, not a folder; pass a folder for the cache")
    return p, args


def model_target(parser, path) -> Target:
    from transformers import AutoImageProcessor
    try:
        preflight.require_model(path, "--model")
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    folder = Path(path)
    if (folder / "towers.json").is_file():  # a Stage0 towers folder keeps its processor with the image tower
        folder = folder / "image_tower"
    try:
        processor = AutoImageProcessor.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        parser.error(f"--model {path}: no image processor to read the size from ({e}); pass --size H W instead")
    target = target_from_processor(processor)
    if target is None:
        parser.error(f"--model {path}: its {type(processor).__name__} (size {processor.size}) resizes in a way the "
                     "cache does not store (only {height, width} or {shortest_edge}); nothing to cache")
    return target


def _where(row) -> str:
    return row if isinstance(row, str) else f"row {row}"


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(message)s", stream=sys.stderr, level=logging.INFO, force=True)
    if args.model:
        target = model_target(parser, args.model)
        if args.pad_to_square:  # e.g. google/medsiglip-448 before its first --pad_to_square run
            target = dataclasses.replace(target, pad_to_square=True)
    elif args.size:
        target = Target(height=args.size[0], width=args.size[1], resample=RESAMPLE[args.resample],
                        pad_to_square=args.pad_to_square)
    else:
        target = Target(shortest_edge=args.shortest_edge, resample=RESAMPLE[args.resample],
                        pad_to_square=args.pad_to_square)
    # Every file's rows first: a file unusable as a whole is refused before anything is written.
    by_folder: dict[Path, list] = {}
    bad: list[str] = []
    for data in args.data:
        key = args.image_key or ("img_path" if str(data).lower().endswith(".csv") else "image")
        problems: list[dict] = []
        try:
            rows = read_rows(data, args.image_root, (key,), image_key=key, problems=problems)
        except (FileNotFoundError, DataFileError) as e:
            parser.error(str(e))
        bad += [f"{p['file']} {_where(p['row'])}: {p['reason']}" for p in problems]
        folder = cache_folder(data, target, args.cache_dir)
        if folder is None:  # the variable says off; building needs a place
            folder = cache_folder(data, target, Path(data).resolve().parent / ".image_cache")
        by_folder.setdefault(folder, []).extend((r["image_path"], r["row"], str(data)) for r in rows)
    if not any(by_folder.values()):  # nothing to cache: the list is the whole answer
        print("\n".join(bad), file=sys.stderr)
        print(f"error: no row of {', '.join(map(str, args.data))} names an existing image ({len(bad)} bad rows, "
              "listed above); fix the rows or --image_root", file=sys.stderr)
        raise SystemExit(1)

    failed = 0
    for folder, jobs in by_folder.items():
        if args.check:
            cache = ImageCache.load(folder, target) or ImageCache(folder, target)
            paths = list(dict.fromkeys(p for p, _, _ in jobs if not p.lower().endswith(".npz")))
            counts = cache.status(paths)
            print(f"{folder}: {counts['fresh']} fresh, {counts['stale']} stale, {counts['missing']} missing "
                  f"of {len(paths)} images")
            failed += counts["stale"] + counts["missing"]
            continue
        try:
            stats = build_cache(jobs, folder, target, num_workers=args.num_workers)
        except PermissionError as e:
            parser.error(f"cannot write the cache in {folder} ({e}); pass --cache_dir DIR on a writable disk and "
                         f"set {ENV_VAR}=DIR for training")
        # build_cache decodes each image once; every row naming a failed image is listed.
        reasons = stats["failed_paths"]
        bad += [f"{source} {_where(row)}: {reasons[os.path.abspath(path)]}" for path, row, source in jobs
                if os.path.abspath(path) in reasons]
        failed += len(reasons)
        print(f"{folder}: built {stats['built']}, already fresh {stats['fresh']}, undecodable {len(reasons)}"
              + (f", CT volumes skipped {stats['volumes']}" if stats["volumes"] else "")
              + f" ({stats['bytes'] / 2**20:.1f} MiB written)")
    for line in bad:
        print(line, file=sys.stderr)
    if bad:
        print(f"{len(bad)} bad rows (listed above) were not cached; fix or remove them, or train with "
              "--on_bad_sample skip to leave them out", file=sys.stderr)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
