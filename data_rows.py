"""The data files every stage reads (a JSON list of objects, or a CSV with a header) as rows, each
row checked up front, with its image path resolved: a bad row fails before training starts,
naming the file, the row (a CSV's line) and what is wrong, or is collected (`problems`) for
`--on_bad_sample skip`. `load_table` is the one parser of data files."""
from __future__ import annotations

import json
import pathlib

from image_loader import ImageLoadError, resolve_image_path


class DataFileError(ValueError):
    """A data file that cannot be used at all (not valid JSON or CSV, a column missing, no rows):
    no row can be dropped to fix it. The message starts with the file's path."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def _row_problem(problems, path, row, reason) -> None:
    """Record one bad row when collecting (`problems` is a list), else raise it at once."""
    if problems is None:
        where = f"{row}" if isinstance(row, str) else f"row {row}"
        raise ValueError(f"{path} {where}: {reason}")
    problems.append({"file": str(path), "row": row, "reason": reason})


def _resolve_or_record(problems, image, image_root, row, source):
    if problems is None:
        return resolve_image_path(image, image_root, row=row, source=source)
    try:
        return resolve_image_path(image, image_root)
    except ImageLoadError as e:
        _row_problem(problems, source, row, str(e))
        return None


def load_table(path) -> tuple[list, list[str] | None]:
    """A data file as parsed, nothing checked yet: a CSV's rows (dicts) and header, or a JSON
    document and None. The one parser of data files: the readers below check its rows, the
    CLIs count them before any model loads. DataFileError when the file cannot be parsed."""
    import csv
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix.lower() == ".csv":
        try:
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                return list(reader), reader.fieldnames or []
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataFileError(path, f"not a readable CSV ({e})") from e
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFileError(path, f"not valid JSON ({e})") from e


def read_json_rows(json_path, image_root, keys, *, image_key="image", problems: list | None = None) -> list[dict]:
    """Load a data file (a JSON list of objects) and check every row up front, so a bad row
    fails before training starts with the file, the row index and what is wrong. Each row
    comes back with `image_path` (resolved, existing) and `row` (its index) added.

    `problems`: a list to collect the bad rows in (dicts: file, row, reason; those rows are left
    out) instead of raising at the first one. A file that is unusable as a whole (not JSON, not a
    list) raises DataFileError either way."""
    json_path = pathlib.Path(json_path)
    rows, _ = load_table(json_path)
    if not isinstance(rows, list) or not rows:
        raise DataFileError(json_path, f"expected a non-empty JSON list of objects with keys {list(keys)}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            _row_problem(problems, json_path, i, f"expected an object, got {type(row).__name__}")
            continue
        missing = [k for k in keys if not isinstance(row.get(k), (str, int, float)) or not str(row[k]).strip()]
        if missing:
            _row_problem(problems, json_path, i, f"missing or empty {missing} (has {sorted(row)})")
            if image_key in missing:
                continue
        path = _resolve_or_record(problems, row[image_key], image_root, i, str(json_path))
        if path is not None and not missing:
            out.append({**row, "image_path": str(path), "row": i})
    return out


def csv_columns(path) -> list[str]:
    """A CSV's header (empty for a file that cannot be read: reading the rows reports why)."""
    import csv
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return csv.DictReader(f).fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def read_csv_rows(csv_path, image_root, keys, *, image_key, split_column=None, split=None,
                  problems: list | None = None) -> list[dict]:
    """read_json_rows for a CSV with a header: every row checked up front, errors name the
    file's line (the header is line 1). `split_column`/`split` keep the rows of one split."""
    csv_path = pathlib.Path(csv_path)
    rows, columns = load_table(csv_path)
    wanted = list(keys) + ([split_column] if split_column else [])
    missing = [k for k in wanted if k not in columns]
    if missing:
        raise DataFileError(csv_path, f"no column {missing} (columns: {columns}); name the columns with "
                                      "--img_path_column / --findings_column / --split_column")
    out = []
    for i, row in enumerate(rows):
        line = i + 2
        if split_column and str(row[split_column]).strip() != split:
            continue
        empty = [k for k in keys if not str(row.get(k) or "").strip()]
        if empty:
            _row_problem(problems, csv_path, f"line {line}", f"empty {', '.join(empty)}")
            if image_key in empty:
                continue
        # Relative paths: under --image_root, else next to the CSV.
        path = _resolve_or_record(problems, row[image_key].strip(), image_root or csv_path.parent,
                                  f"line {line}", str(csv_path))
        if path is not None and not empty:
            out.append({**row, "image_path": str(path), "row": f"line {line}", "line": line})
    if not out and not problems:
        raise DataFileError(csv_path, "no rows" + (f" with {split_column} == {split!r}" if split_column else ""))
    return out


def read_rows(path, image_root, keys, *, image_key="image", split_column=None, split=None,
              problems: list | None = None) -> list[dict]:
    """Rows of a JSON list or a CSV file (by suffix), each checked, with `image_path` resolved;
    `problems` as in read_json_rows."""
    if str(path).lower().endswith(".csv"):
        return read_csv_rows(path, image_root, keys, image_key=image_key, split_column=split_column, split=split,
                             problems=problems)
    rows = read_json_rows(path, image_root, keys, image_key=image_key, problems=problems)
    if split_column:
        rows = [r for r in rows if str(r.get(split_column, "")).strip() == split]
        if not rows and not problems:
            raise DataFileError(path, f"no rows with {split_column} == {split!r}")
    return rows
