"""Bad data: found before the first training step, and survived when it turns up mid-run.

Every stage's entry point builds its datasets with `collect_bad_rows=True` (a row with a
missing key, an empty text or a missing image file is left out and recorded, not raised) and
then calls `check_datasets` once, before the first step. That call checks each distinct image
or volume of the train and val rows (headers only by default, `--full_decode_check` decodes
them; the processes share the files and gather the results, so nothing is read twice) and:

- `--on_bad_sample error` (default): raises one BadDataError listing every bad row as
  `FILE row N: reason` (`FILE line N: reason` for a CSV; the first 20 and a count, all of them in
  OUTPUT_DIR/bad_rows.json) with the fix;
- `--on_bad_sample skip`: drops those rows from the datasets, logs it once, writes
  OUTPUT_DIR/dropped_rows.json and logs `data/dropped_rows` to metrics.jsonl.

A file unusable as a whole (not valid JSON/CSV, a missing column) is a DataFileError in both
modes: no row can be dropped to fix it.

Mid-run, a file that stops loading (deleted or overwritten after the check) goes through
`load_item`: under `skip` the sample is replaced by the next readable row, so batch shapes
never change (Stage0's loss all-gathers fixed-size batches), the row is warned about once and
recorded in OUTPUT_DIR/substituted_rows.jsonl; under `error` the ImageLoadError (file and row)
is raised as before.

`validate_file` is the same check for one data file outside training
(`scripts/data/validate_data.py`, the CT recipe's `--validate_csv`), and `check_rows` the same for the
inference and evaluation CLIs, with their own `--on_bad_sample error|skip`: error lists every bad
row and stops before a model loads; skip leaves them out and says so.
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from data_rows import DataFileError, read_rows
from image_loader import ImageLoadError
from volume_loader import check_input

__all__ = ["BadDataError", "BadRow", "DataFileError", "check_datasets", "check_file", "check_paths", "check_rows",
           "load_item", "validate_file"]

logger = logging.getLogger("siglip_med")

ON_BAD_SAMPLE = ("error", "skip")
DROPPED_FILE = "dropped_rows.json"
BAD_FILE = "bad_rows.json"
SUBSTITUTED_FILE = "substituted_rows.jsonl"
MAX_LISTED = 20
# Header checks wait on the file system (a network mount more than anything); a few threads
# overlap those waits. PIL and zlib release the GIL while they decode, so full checks gain too.
CHECK_THREADS = 8
SKIP_FIX = "--on_bad_sample skip"


@dataclass(frozen=True)
class BadRow:
    """One unusable row: the data file, the row (a JSON list's index, or a CSV's "line N" with
    the header as line 1) and why."""
    file: str
    row: int | str
    reason: str

    def __str__(self) -> str:
        return f"{self.file} {where(self.row)}: {self.reason}"


def where(row) -> str:
    """`row N` for a JSON list's index, `line N` as a CSV row carries it."""
    return row if isinstance(row, str) else f"row {row}"


class BadDataError(ValueError):
    """Bad rows found before training under `--on_bad_sample error`; the message lists them."""

    def __init__(self, message: str, rows: list[BadRow]):
        super().__init__(message)
        self.rows = rows


def _order(b: BadRow):
    n = b.row if isinstance(b.row, int) else int(str(b.row).split()[-1]) if str(b.row).split()[-1].isdigit() else 0
    return b.file, n


def merge(rows) -> list[BadRow]:
    """One entry per (file, row), its reasons joined, in file order."""
    by_row: dict[tuple, list[str]] = {}
    for b in rows:
        reasons = by_row.setdefault((b.file, b.row), [])
        if b.reason not in reasons:
            reasons.append(b.reason)
    return sorted((BadRow(f, r, "; ".join(reasons)) for (f, r), reasons in by_row.items()), key=_order)


def format_bad_rows(rows: list[BadRow], *, header: str, footer: str, limit: int | None = MAX_LISTED) -> str:
    shown = rows if limit is None else rows[:limit]
    lines = [header] + [f"  {b}" for b in shown]
    if len(rows) > len(shown):
        lines.append(f"  ... and {len(rows) - len(shown)} more")
    return "\n".join(lines + [footer])


# ---------------------------------------------------------------- checking files

def check_paths(paths, full: bool = False, *, verified=frozenset(), progress: bool = False) -> dict[str, str]:
    """{path: reason} for each of `paths` that would fail to load (`volume_loader.check_input`).
    `verified`: paths known to load, not checked again (a fresh image-cache entry was decoded
    from exactly this file: same size and modification time, and training reads the entry)."""
    paths = [p for p in paths if p not in verified]

    def one(path):
        try:
            check_input(path, full)
        except ImageLoadError as e:
            return path, str(e)
        except Exception as e:  # whatever else a decoder raises on a damaged file
            return path, f"Cannot load image '{path}': {type(e).__name__}: {e}"
        return path, None

    from tqdm.auto import tqdm
    with ThreadPoolExecutor(max_workers=max(1, min(CHECK_THREADS, len(paths)))) as pool:
        results = list(tqdm(pool.map(one, paths), total=len(paths), desc="checking images", unit="file",
                            disable=not progress or len(paths) < 2000))
    return {p: reason for p, reason in results if reason}


def _source(ds) -> str:
    return str(getattr(ds, "source", None) or getattr(ds, "json_path", "?"))


def _verified(ds) -> set[str]:
    cache = getattr(ds, "image_cache", None)
    if cache is None:
        return set()
    return {r["image_path"] for r in ds.rows if cache.is_fresh(r["image_path"])}


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _report(rows: list[BadRow], names: dict, mode: str, full: bool) -> dict:
    return {"on_bad_sample": mode, "check": "full decode" if full else "headers", "count": len(rows),
            "rows": [{**asdict(b), "split": names.get((b.file, b.row))} for b in rows]}


# ---------------------------------------------------------------- before training

def check_datasets(accelerator, args, **datasets) -> list[BadRow]:
    """Check the rows of every dataset (train=..., val=...; None is skipped) before training, as
    the module docstring says; returns the bad rows (dropped under skip). Every process calls it
    and gets the same answer."""
    from accelerate.utils import gather_object

    from training.watch import log_metrics

    mode = getattr(args, "on_bad_sample", "error") or "error"
    if mode not in ON_BAD_SAMPLE:
        raise ValueError(f"--on_bad_sample {mode!r}: choose one of {', '.join(ON_BAD_SAMPLE)}")
    full = bool(getattr(args, "full_decode_check", False))
    out = Path(args.output_dir)
    named = {k: d for k, d in datasets.items() if d is not None}
    t0 = time.time()

    found: dict[str, list[tuple[int | None, BadRow]]] = {name: [] for name in named}
    for name, ds in named.items():  # rows left out while reading: a key, a text or a file missing
        found[name] += [(None, BadRow(p["file"], p["row"], p["reason"])) for p in getattr(ds, "bad_rows", None) or []]
    # Each distinct file once; process r checks every P-th one and all processes gather the results.
    paths = sorted({r["image_path"] for ds in named.values() for r in ds.rows})
    verified = set().union(*(_verified(ds) for ds in named.values()))
    mine = paths[accelerator.process_index::accelerator.num_processes]
    failed = dict(gather_object(list(check_paths(mine, full, verified=verified,
                                                 progress=accelerator.is_local_main_process).items())))
    for name, ds in named.items():
        src = _source(ds)
        found[name] += [(k, BadRow(src, r["row"], failed[r["image_path"]])) for k, r in enumerate(ds.rows)
                        if r["image_path"] in failed]
    bad = merge(b for rows in found.values() for _, b in rows)
    names = {(b.file, b.row): name for name, rows in found.items() for _, b in rows}
    left_out = {(b.file, b.row) for rows in found.values() for k, b in rows if k is None}
    logger.info("data check (%s): %d files of %d rows in %.1f s; %d bad rows", "full decode" if full else "headers",
                len(paths), sum(len(ds) for ds in named.values()) + len(left_out), time.time() - t0, len(bad))

    for ds in named.values():
        ds.on_bad_sample = mode
        ds.substitutions_file = str(out / SUBSTITUTED_FILE) if mode == "skip" else None
    for name, ds in named.items():  # in either mode: skipping would leave nothing to train or validate on
        if found[name] and len({k for k, _ in found[name] if k is not None}) == len(ds.rows):
            raise BadDataError(f"every row of {_source(ds)} ({name}) is bad ({len(found[name])} rows; the first: "
                               f"{found[name][0][1]}); fix the data file", bad)
        if not ds.rows:
            raise BadDataError(f"{_source(ds)} ({name}) has no rows; fix the data file", bad)
    if bad and mode == "error":
        if not accelerator.is_main_process:  # the same list; one process prints it
            raise BadDataError(f"{len(bad)} bad rows in the data; the main process lists them", bad)
        _write_json(out / BAD_FILE, _report(bad, names, mode, full))
        listed = f" (all of them in {out / BAD_FILE})" if len(bad) > MAX_LISTED else ""
        raise BadDataError(format_bad_rows(
            bad, header=f"{len(bad)} bad rows in the data, found before the first training step{listed}:",
            footer=f"Fix or remove these rows, or pass {SKIP_FIX} to train without them (they are then listed in "
                   f"{out / DROPPED_FILE})."), bad)
    if mode != "skip":
        return bad
    for name, ds in named.items():
        drop = {k for k, _ in found[name] if k is not None}
        if drop:
            ds.drop_rows(drop)
    if accelerator.is_main_process:
        _write_json(out / DROPPED_FILE, _report(bad, names, mode, full))
    log_metrics(accelerator, {"data/dropped_rows": len(bad)}, step=0)
    if bad:
        logger.warning(format_bad_rows(bad, header=f"{SKIP_FIX}: {len(bad)} bad rows are left out of training "
                                                   f"(all listed in {out / DROPPED_FILE}):", footer="").rstrip())
    return bad


# ---------------------------------------------------------------- during training

def load_item(ds, i: int, make):
    """`make(i)`, the dataset's sample i. A row whose file fails to load raises under
    `on_bad_sample == "error"`; under "skip" the next readable row (i+1, i+2, ..., wrapping)
    takes its place: deterministic, and the batch keeps its size."""
    try:
        return make(i)
    except ImageLoadError as e:
        if getattr(ds, "on_bad_sample", "error") != "skip":
            raise
        error = e
    n = len(ds)
    for step in range(1, n):
        j = (i + step) % n
        try:
            item = make(j)
        except ImageLoadError as e:
            _note(ds, j, e, None)
            continue
        _note(ds, i, error, j)
        return item
    raise ImageLoadError(f"no row of {_source(ds)} loads any more (the last error: {error}); the files changed "
                         "after the check before training. Fix the data and resume", row=ds.rows[i]["row"],
                         source=_source(ds))


def _note(ds, k: int, error: Exception, replacement: int | None) -> None:
    """Warn once per row (in this process) and append the row to OUTPUT_DIR/substituted_rows.jsonl.
    Every process and DataLoader worker appends its own lines: one short O_APPEND write each."""
    seen = ds.__dict__.setdefault("_reported_rows", set())
    if k in seen:
        return
    seen.add(k)
    row = ds.rows[k]["row"]
    instead = ds.rows[replacement]["row"] if replacement is not None else None
    entry = BadRow(_source(ds), row, str(error))
    path = getattr(ds, "substitutions_file", None)
    logger.warning("%s %s (%s%s).", entry, f"Using the sample of {where(instead)} in its place" if instead is not None
                   else "It is unreadable too", SKIP_FIX, f"; recorded in {path}" if path else "")
    if path:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps({**asdict(entry), "replaced_by": instead, "pid": os.getpid()}) + "\n")
        except OSError as e:  # the record must never be what stops the run
            logger.warning("could not record the substitution in %s (%s)", path, e)


# ---------------------------------------------------------------- one file, outside training

def check_file(path, image_root, keys, *, image_key: str, full: bool = False, required_columns=(),
               split_column=None, split=None) -> tuple[list[dict], list[BadRow]]:
    """Check every row of a JSON or CSV data file (of one split, given `split_column`) as training
    would: (the good rows, as data_rows.read_rows returns them; the bad rows). Raises
    DataFileError for a file unusable as a whole, FileNotFoundError for a missing one."""
    if str(path).lower().endswith(".csv") and required_columns:
        from data_rows import csv_columns
        columns = csv_columns(path)
        missing = [c for c in required_columns if c not in columns]
        if missing:
            raise DataFileError(path, f"no column {missing} (columns: {columns})")
    problems: list[dict] = []
    rows = read_rows(path, image_root, keys, image_key=image_key, split_column=split_column, split=split,
                     problems=problems)
    if split_column and not str(path).lower().endswith(".csv"):
        # A JSON list's rows are checked before the split is selected: keep other splits' problems out.
        from data_rows import load_table
        table = load_table(path)[0]
        problems = [p for p in problems if isinstance(table[p["row"]], dict)
                    and str(table[p["row"]].get(split_column, "")).strip() == split]
    failed = check_paths(sorted({r["image_path"] for r in rows}), full, progress=True)
    bad = merge([BadRow(**p) for p in problems]
                + [BadRow(str(path), r["row"], failed[r["image_path"]]) for r in rows if r["image_path"] in failed])
    return [r for r in rows if r["image_path"] not in failed], bad


def validate_file(path, image_root, keys, *, image_key: str, full: bool = False,
                  required_columns=()) -> tuple[int, list[BadRow]]:
    """Check every row of a JSON or CSV data file as training would: (rows in the file, bad rows).
    Raises DataFileError for a file unusable as a whole, FileNotFoundError for a missing one."""
    rows, bad = check_file(path, image_root, keys, image_key=image_key, full=full, required_columns=required_columns)
    return len(rows) + len(bad), bad


def position(row) -> int:
    """A row's place in its file: a JSON list's index, or a CSV's line number."""
    return row if isinstance(row, int) else int(str(row).split()[-1])


def check_rows(path, image_root, keys, *, image_key: str, on_bad_sample: str = "error", split_column=None,
               split=None, what: str = "") -> tuple[list[dict], list[BadRow]]:
    """The rows an inference or evaluation CLI reads, checked before its model loads: (good rows,
    bad rows). `error` raises one BadDataError listing every bad row; `skip` logs them and leaves
    them out. `what` ends the sentences: where the left-out rows go (" (written with an empty
    prediction)")."""
    rows, bad = check_file(path, image_root, keys, image_key=image_key, split_column=split_column, split=split)
    if bad and on_bad_sample != "skip":
        if len(bad) == 1:
            raise BadDataError(f"{str(bad[0]).rstrip('.')}. Fix the row, or pass {SKIP_FIX} to leave it out{what}.",
                               bad)
        raise BadDataError(format_bad_rows(bad, header=f"{len(bad)} bad rows in {path}:", limit=None,
                                           footer=f"Fix or remove these rows, or pass {SKIP_FIX} to leave them "
                                                  f"out{what}."), bad)
    if bad:
        logger.warning(format_bad_rows(bad, header=f"{SKIP_FIX}: {len(bad)} bad rows of {path} are left out{what}:",
                                       footer="", limit=None).rstrip())
    if not rows and not bad:
        raise DataFileError(path, "no rows" + (f" with {split_column} == {split!r}" if split_column else ""))
    if not rows:
        raise BadDataError(f"{path}: every row is bad ({len(bad)}; the first: {bad[0]}); fix the data file", bad)
    return rows, bad
