"""Offline editing fakes: add `per_real` manipulated copies of every real image of a split.

    python -m data_prep.make_fakes DATA_ROOT --out OUT [--split trainset] [--per-real 1]
                                [--seed 0] [--ops self_blend,splice,...]

OUT becomes a complete data root of its own:

    OUT/<split>/              the original images (hard links) + the fakes, <stem>_aug<k>.jpg
    OUT/<split>_masks/        one PNG per fake: where it was edited (0..255)
    OUT/<split>_label.txt     the original rows followed by the fake rows (target 1)
    OUT/<other entries>       every other split / file of DATA_ROOT, hard-linked unchanged

OUT/<split>, its masks and its label file must not exist yet (no stale fakes can linger).
Hard links cost no space; where they are impossible (another file system) files are copied.
Do not edit files under OUT in place: a hard-linked file is the same file as the original.

Fakes are JPEGs at a random quality of 75-95 (the demo data set's setting). Each real gets
its own random stream seeded from (seed, its position among the reals), so the output is
deterministic and one broken file does not change the fakes made from the others.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.cli import CommandLine, entry_point
from common.errors import OutputExistsError, UsageError
from data_prep.images import JPEG_QUALITY_RANGE, ImageDecodeError, decode_image, encode_jpeg
from data_prep.labels import label_path, read_label_file, write_label_file
from data_prep.manipulations import DEFAULT_OPS, MANIPULATIONS, apply_manipulation, check_names


def add_editing_fakes(data_root, out, split="trainset", per_real=1, seed=0, ops=None) -> dict:
    """Write OUT as described in the module docstring; returns a summary dict."""
    data_root, out = Path(data_root), Path(out)
    if out.resolve() == data_root.resolve():
        raise UsageError(f"{out}: output folder must differ from the data root")
    if per_real < 1:
        raise UsageError(f"per_real must be at least 1, got {per_real}")
    ops = check_names(list(DEFAULT_OPS) if ops is None else ops)
    rows = list(read_label_file(label_path(data_root, split)).items())
    for stale in (out / split, out / f"{split}_masks", label_path(out, split)):
        # Refuse rather than mix: leftovers of an earlier run would be unlabelled images.
        if stale.exists():
            raise OutputExistsError(f"{stale}: already exists; delete it or choose another --out")

    _link_other_entries(data_root, out, split)
    kept_rows, missing = _link_split_images(rows, data_root / split, out / split)
    fake_rows, summary = _make_fakes(kept_rows, data_root / split, out, split, per_real, seed, ops)
    write_label_file(label_path(out, split), kept_rows + fake_rows)
    summary.update(split=split, original_rows=len(kept_rows), missing=missing, out=str(out))
    return summary


# ---------------------------------------------------------------- copying the data root

def _link_or_copy(src, dst) -> None:
    src, dst = Path(src), Path(dst)
    if dst.exists():
        if os.path.samefile(src, dst):
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # other file system, or links not supported
        shutil.copy2(src, dst)


def _link_other_entries(data_root: Path, out: Path, split: str) -> None:
    """Everything in data_root except the split that gets the fakes goes to out unchanged."""
    out.mkdir(parents=True, exist_ok=True)
    own = {split, label_path(out, split).name, f"{split}_masks"}
    for entry in sorted(data_root.iterdir()):
        if entry.name in own or entry.resolve() == out.resolve():
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name, copy_function=_link_or_copy, dirs_exist_ok=True)
        else:
            _link_or_copy(entry, out / entry.name)


def _link_split_images(rows, source_dir: Path, out_dir: Path):
    """Link every labelled image into out_dir; rows whose file is missing are dropped."""
    kept, missing = [], 0
    for name, target in rows:
        source = source_dir / name
        if not source.is_file():
            _warn(f"warning: skipping {source}: file not found")
            missing += 1
            continue
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(source, out_dir / name)
        kept.append((name, target))
    return kept, missing


# ---------------------------------------------------------------- making the fakes

def _make_fakes(rows, source_dir: Path, out: Path, split: str, per_real: int, seed: int, ops):
    reals = [name for name, target in rows if target == 0]
    taken = {name for name, _ in rows}
    fake_rows, op_counts, broken = [], Counter(), 0
    for index, name in enumerate(tqdm(reals, desc=f"editing fakes {split}", unit="img")):
        try:
            image = decode_image(source_dir / name)
        except ImageDecodeError as exc:
            _warn(f"warning: skipping {exc}")
            broken += 1
            continue
        for k in range(per_real):
            rng = np.random.default_rng([seed, index, k])
            op = ops[int(rng.integers(len(ops)))]
            donor = _random_donor(reals, index, source_dir, rng) if op == "splice" else None
            fake, mask = apply_manipulation(op, image, rng, donor=donor)
            fake_name = _fake_name(name, k, taken)
            _write_fake(out, split, fake_name, fake, mask, rng)
            fake_rows.append((fake_name, 1))
            op_counts[op] += 1
    return fake_rows, {"reals": len(reals) - broken, "broken": broken,
                       "fakes": len(fake_rows), "ops": dict(sorted(op_counts.items()))}


def _random_donor(reals, index, source_dir: Path, rng) -> np.ndarray | None:
    """Another real image; None (splice then mirrors the image itself) if there is none usable."""
    if len(reals) < 2:
        return None
    other = int(rng.integers(len(reals) - 1))
    other += other >= index  # skip the image itself
    try:
        return decode_image(source_dir / reals[other])
    except ImageDecodeError:
        return None  # already reported when that file's own turn comes


def _fake_name(name: str, k: int, taken: set) -> str:
    path = PurePosixPath(name)
    candidate, extra = path.with_name(f"{path.stem}_aug{k}.jpg"), 0
    while str(candidate) in taken:  # never overwrite an original that happens to share the name
        extra += 1
        candidate = path.with_name(f"{path.stem}_aug{k}_{extra}.jpg")
    taken.add(str(candidate))
    return str(candidate)


def _write_fake(out: Path, split: str, fake_name: str, fake, mask, rng) -> None:
    image_path = out / split / fake_name
    mask_path = (out / f"{split}_masks" / fake_name).with_suffix(".png")
    for path in (image_path, mask_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    quality = int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))
    image_path.write_bytes(encode_jpeg(fake, quality))
    Image.fromarray(np.rint(mask * 255).astype(np.uint8)).save(mask_path, format="PNG")


def _warn(message: str) -> None:
    tqdm.write(message, file=sys.stderr)  # keeps the progress bar intact


# ---------------------------------------------------------------- command line

@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m data_prep.make_fakes", __doc__, config=False)
    parser.add_argument("data_root")
    parser.add_argument("--out", required=True, help="output data root (created)")
    parser.add_argument("--split", default="trainset")
    parser.add_argument("--per-real", type=int, default=1, help="fakes made from each real")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", default="",
                        help=f"comma list of {','.join(MANIPULATIONS)}; default {','.join(DEFAULT_OPS)}")
    args = parser.parse_args(argv)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()] or None
    summary = add_editing_fakes(args.data_root, args.out, args.split, args.per_real, args.seed, ops)
    print(f"{summary['out']}: {args.split}: {summary['original_rows']} original rows, "
          f"{summary['fakes']} fakes from {summary['reals']} reals "
          f"({summary['broken']} broken, {summary['missing']} missing); ops {summary['ops']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
