"""Writing to the file system: whether a path can be written, and folders that appear complete or not
at all (write into a temporary sibling, rename on success).

:func:`unwritable` is the one check of an output path the entry points run before any work.
:func:`writing_folder` is the one writer of whole folders: model checkpoints
(``checkpoints.io.writing_checkpoint``), the official-layout export, pre-tokenised data and rebuilt
datasets. A run that fails or is killed half-way leaves the destination as it was (an older
checkpoint or dataset stays readable); temporary folders of writers that are no longer running
(``.NAME.tmp-PID``) are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator


def unwritable(path: str | os.PathLike, *, folder: bool) -> str | None:
    """Why ``path`` cannot be written, or ``None`` when it can: with ``folder``, a folder that exists
    and is writable or can be created; otherwise a file in such a folder. The reason is worded to
    follow ``"FLAG PATH: "`` in an error message."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if folder and os.path.exists(path):
        if not os.path.isdir(path):
            return "is a file, not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else "folder is not writable"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"folder {parent} is not writable"
    return None


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
