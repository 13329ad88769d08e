"""One training run per workdir, and a workdir that agrees with its checkpoints after a resume.

- ``WorkdirLock``: an exclusive ``flock`` on ``WORKDIR/.lock`` held for the whole run. A second
  training into the same workdir stops at once with a message naming the process that holds it
  (pid, host, start time, command). The kernel drops the lock when its process dies, however it
  dies, so a killed run never leaves a stale lock behind.
- ``trim_metrics``: on resume from checkpoint step S, rows of ``metrics.jsonl`` after S (written
  between that checkpoint and the kill, and about to be written again) are removed, so every step
  appears once.
- ``export_matches``: whether ``WORKDIR/model`` is the export of a given step, so a run killed
  between its last checkpoint and the export finishes the export when rerun.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time


class WorkdirBusyError(RuntimeError):
    """Another process is training into this workdir."""


class WorkdirLock:
    """``with WorkdirLock(workdir):`` -- raises ``WorkdirBusyError`` when another process holds it."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), ".lock")
        self._fh = None

    def acquire(self) -> None:
        import fcntl

        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise WorkdirBusyError(f"{os.path.dirname(self.path)} is in use by {holder}; wait for it to "
                                   f"finish or stop it, or choose another --workdir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{' '.join(sys.argv)[:200]}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def trim_metrics(path: str, last_step: int) -> int:
    """Drop rows of ``path`` (JSON lines with a ``step``) after ``last_step`` and any partial line.
    Rewritten atomically; returns the number of rows removed."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                dropped += bool(line.strip())
                continue
            if step <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.writelines(kept)
        os.replace(tmp, path)
    return dropped


def export_matches(model_dir: str, step: int, conventions=None) -> bool:
    """Whether ``model_dir`` is a complete model checkpoint exported at training step ``step`` whose
    conventions record (read as ``Editor.load`` reads it, older checkpoints included) is
    ``conventions`` (the config's; a changed recommendation means a new export)."""
    from editmgt_jax import checkpoints

    try:
        doc = checkpoints.read_config(model_dir)
        exported = checkpoints.read_conventions(doc)
    except checkpoints.CheckpointError:
        return False
    if conventions is not None and dataclasses.replace(exported, source="") != dataclasses.replace(
            conventions, source=""):
        return False
    return int((doc.get("training") or {}).get("step", -1)) == int(step)
