"""Writing files so that no reader ever sees half of one.

Every file is written in full to a temp file beside it, `.NAME.PID.tmp`, and only then renamed
onto its name in one step (os.replace): a crash, Ctrl-C, SIGTERM or a full disk leaves the
previous version, if any, whole (`kill -9` may leave the hidden temp file behind, never a half
file under the real name). A write that fails removes its temp file and raises `WriteError`,
one line naming the file and the reason.

    with atomic_write(path) as f:                                   # one file, as a stream
        f.write(text)
    write_files_atomically({weights: data, manifest: json_bytes})   # several: none is renamed
                                                                    # into place before all are written
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from common.errors import WriteError


def temp_path(path: Path) -> Path:
    """Where a write of `path` goes first: hidden, and named after the process, so that two
    processes writing the same file (DataLoader workers caching one crop) never share it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _cannot_write(path: Path, err: OSError) -> WriteError:
    return WriteError(f"{path}: cannot write ({err.strerror or err}); the previous version, if any, is unchanged")


@contextmanager
def atomic_write(path, mode: str = "w", **open_kwargs):
    """`with atomic_write(path) as f: f.write(...)`: the file appears under `path` complete,
    when the block ends without an error, or not at all. `mode` is "w" (text) or "wb";
    `open_kwargs` go to `open`. An OSError while writing or renaming becomes a WriteError."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as err:
        raise _cannot_write(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_and_sync(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the rename makes it the real file


def write_files_atomically(files: dict) -> None:
    """Write several files, `{path: bytes}`: each goes in full to its temp file and to disk
    (fsync) before any is renamed into place, then they are renamed in the dict's order. A
    failed write therefore leaves every one of them as it was. Put the file that names the
    others (a manifest) last, so that it never names a file that is not there yet."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            staged.append((temp_path(path), path))
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_and_sync(staged[-1][0], data)
            except OSError as err:
                raise _cannot_write(path, err) from None
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
