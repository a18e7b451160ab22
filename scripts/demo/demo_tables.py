"""What the recipe demo generators share: a row's split, and the CSV they write."""
from __future__ import annotations

import csv
from pathlib import Path


def split_for(u: float, val_fraction: float, test_fraction: float) -> str:
    """test, val or train for a uniform draw u."""
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def write_rows_csv(path, rows: list[dict]) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
