"""Atomic file writes for the run folder and checkpoints, and the clean-up of what a kill leaves.

A write goes to a temporary file `.<name>.stars_fast-tmp-<random>` in the target's folder, is fsynced
and then os.replace'd over the target: readers see the old file or the new one, never half of one. A
process killed mid-write leaves the temporary file behind; `remove_stale_temp_files` deletes them, and
only them: the infix is this package's, so other programs' temporary files in a shared folder stay.
"""
from __future__ import annotations

import glob
import os
import tempfile
from typing import BinaryIO, Callable, List

TEMP_INFIX = ".stars_fast-tmp-"


def _creation_mode() -> int:
    """0666 & ~umask: the mode open() gives a new file (mkstemp's would be 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temporary file beside `path`, fsync, and rename it onto `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}{TEMP_INFIX}")
    try:
        os.fchmod(fd, _creation_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def remove_stale_temp_files(folder: str) -> List[str]:
    """Delete the temporary files of interrupted atomic writes in `folder`; returns their paths."""
    stale = glob.glob(os.path.join(glob.escape(folder), f".*{TEMP_INFIX}*"))
    for path in stale:
        os.unlink(path)
    return stale
