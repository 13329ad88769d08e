"""Folders that appear complete or not at all: write into a temporary sibling, rename on success.

A run that fails or is killed half-way leaves the destination as it was (an older dataset stays
readable); temporary folders of writers that are no longer running (``.NAME.tmp-PID``) are removed
by the next writer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: str, prefix: str) -> None:
    """Remove ``parent/<prefix><pid>`` folders whose process is gone."""
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        tail = name[len(prefix):]
        if name.startswith(prefix) and tail.isdigit() and not _pid_alive(int(tail)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def replace_folder(new: str, path: str) -> None:
    """Put folder ``new`` at ``path`` (an existing ``path`` is renamed aside first, then removed)."""
    parent, base = os.path.split(os.path.abspath(path))
    if os.path.exists(path):
        old = os.path.join(parent, f".{base}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)


@contextlib.contextmanager
def writing_folder(path: str | os.PathLike) -> Iterator[str]:
    """Yield an empty temporary sibling folder of ``path``; when the block ends without an error it
    replaces ``path`` (which the caller has checked may be replaced), otherwise it is removed and
    ``path`` is left as it was."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{base}.tmp-"
    remove_stale(parent, prefix)
    tmp = os.path.join(parent, f"{prefix}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
