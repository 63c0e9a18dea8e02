"""Scratch folders owned by a process, and the removal of those whose owner died.

Artifacts and benchmark datasets are built in a hidden folder beside their final place and renamed
into it when complete, so a killed process leaves no half-written result, only its scratch folder.
The folder's name carries the owner's pid; the next build removes the folders of dead owners.
Torch-free.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_owned_dir(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new folder ``parent/{prefix}{pid}-XXXX`` of this process."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def remove_stale_dirs(parent: str | os.PathLike[str], prefix: str) -> list[Path]:
    """Remove the ``parent/{prefix}{pid}-*`` folders whose process is gone (and those without a pid,
    left by older versions); returns what was removed. One named with this process's own pid is
    stale too: a build removes its folder when it fails, so such a folder is a previous boot's
    whose pid was reused (containers restart with small pids)."""
    removed = []
    for path in Path(parent).glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        stale = not pid.isdigit() or int(pid) == os.getpid() or not pid_alive(int(pid))
        if stale and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
