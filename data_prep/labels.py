"""The label file, the one owner of its format: `<split>_label.txt` beside `<split>/`, a CSV

    img_name,target
    0a1b2c.jpg,1            (1 = fake, 0 = real)

Reading accepts a BOM, CRLF line ends, blank lines and extra columns; anything else wrong
(a missing header, a target other than 0 or 1, a name listed twice) is a DataLayoutError
naming the file and the line. Every command that reads or writes labels goes through here:
the data readers, the fake makers (editing, Stable Diffusion), the video frame extractor and
the pseudo labels of `experts.cluster_split`.

    labels = read_label_file(label_path(root, "trainset"))     # {img_name: target}
    write_label_file(label_path(out, "trainset"), rows)        # [(img_name, target), ...]
    append_label_rows(path, names, target=1)                   # a resumable writer's new rows
"""
from __future__ import annotations

import csv
from pathlib import Path

from common.errors import DataLayoutError
from common.files import atomic_write

LABEL_HEADER = ("img_name", "target")


def label_path(root, split: str) -> Path:
    """Where the labels of `root/<split>/` are: `root/<split>_label.txt`."""
    return Path(root) / f"{split}_label.txt"


def read_csv_rows(path: Path, header: tuple[str, ...], missing: str) -> list[list[str]]:
    """The rows after the header of a CSV whose first columns are `header` (a BOM, CRLF and
    extra columns are accepted); DataLayoutError naming the file otherwise (`missing`: the
    reason given when the file does not exist)."""
    if not path.is_file():
        raise DataLayoutError(f"{path}: {missing}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:len(header)]] != list(header):
        raise DataLayoutError(f"{path}: first line must be the header '{','.join(header)}'")
    return rows[1:]


def read_label_file(label_file: Path) -> dict[str, int]:
    """img_name -> target, with errors naming the file and the line."""
    label_file = Path(label_file)
    labels: dict[str, int] = {}
    for line_no, row in enumerate(read_csv_rows(label_file, LABEL_HEADER, "missing label file"), start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DataLayoutError(f"{label_file}:{line_no}: expected 'img_name,target', got {row!r}")
        name, target = row[0].strip(), row[1].strip()
        if target not in ("0", "1"):
            raise DataLayoutError(f"{label_file}:{line_no}: target of {name!r} must be 0 or 1, got {target!r}")
        if name in labels:
            raise DataLayoutError(f"{label_file}:{line_no}: {name!r} is listed twice")
        labels[name] = int(target)
    return labels


def write_label_file(path: Path, rows) -> None:
    """The header, then one `img_name,target` row per (name, target), written atomically
    (a reader never sees half a file). A name holding a comma or a quote is quoted."""
    with atomic_write(path, newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(LABEL_HEADER)
        writer.writerows((name, int(target)) for name, target in rows)


def append_label_rows(path: Path, names: list[str], target: int, labelled: set[str]) -> int:
    """Append `<name>,<target>` for each name not yet in `labelled` (which is updated),
    creating the file with its header first if needed; returns how many rows were added.
    For writers that resume: a row is appended right after its image is saved."""
    path = Path(path)
    names = [name for name in names if name not in labelled]
    if not names:
        return 0
    labelled.update(names)
    if not path.exists():
        write_label_file(path, [])
    text = path.read_text(encoding="utf-8")
    separator = "" if text.endswith("\n") else "\n"  # a hand-edited file may lack the last newline
    with open(path, "a", newline="", encoding="utf-8") as f:
        f.write(separator)
        csv.writer(f, lineterminator="\n").writerows((name, int(target)) for name in names)
    return len(names)
