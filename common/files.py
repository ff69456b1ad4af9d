"""Writing a file so that no reader ever sees half of it."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path, mode: str = "w", **open_kwargs):
    """`with atomic_write(path) as f: f.write(...)`: writes a temp file beside `path` and, when
    the block ends without an error, moves it onto `path` in one step (os.replace). A crash,
    a full disk or an interruption therefore leaves the previous file, if any, intact, and
    the temp file is removed. `mode` is "w" (text) or "wb"; `open_kwargs` go to `open`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
