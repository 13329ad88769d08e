"""Host memory kept between calls (Linux with glibc): later edits reuse the pages of the first.

XLA:CPU takes every call's temporaries and outputs from ``malloc`` and frees them when the call
ends. glibc gives large blocks straight back to the kernel (``munmap``; a worker thread's arena
trims its 64 MiB heaps), so the next call faults in fresh zeroed pages: an ``Editor.edit`` of the
medium benchmark model at 1024 px took 0.41 million minor page faults and 1.2 s of system time per
4-step edit in a fresh process, and 11.7 million per 12-step edit inside the side-by-side harness
(bench/RESULTS.md, "Steady speed").

:func:`keep` sets glibc's ``mallopt``: one arena (``M_ARENA_MAX`` 1: XLA's worker threads allocate
from the main heap instead of arenas that map every large block on its own), no ``mmap`` for large
blocks (``M_MMAP_MAX`` 0) and no trimming (``M_TRIM_THRESHOLD`` at its maximum). After the first
call the same pages serve every later one: 0 page faults per edit in the measurement above, system
time 1.2 -> 0.2 s. The price: the process keeps the largest call's memory resident, as a server
that edits again would need it anyway.

An arena setting only reaches threads that have not allocated yet, so :func:`keep` acts only before
jax's backend starts (the first array, device query or compilation); later it changes nothing and
returns ``False``. ``infer.edit``, ``infer.evaluate`` and ``infer.app`` call it first thing; a
program that embeds the :class:`~editmgt_jax.editor.Editor` calls it before its first jax work.
One switch: ``EDITMGT_KEEP_HOST_MEMORY=off`` (or ``0``, ``false``, ``no``, ``none``, as for the
compilation cache) leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

from editmgt_jax.compile_cache import OFF

ENV_VAR = "EDITMGT_KEEP_HOST_MEMORY"
# glibc <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8

_state: dict = {}


def backend_started() -> bool:
    """Whether jax has started a backend in this process (its threads then have their arenas)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:
        return True
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def keep() -> bool:
    """Keep freed host memory for reuse, as the module says; returns whether it is in effect
    (``False``: switched off, not glibc, or jax's backend already started). Idempotent."""
    if "kept" in _state:
        return _state["kept"]
    if os.environ.get(ENV_VAR, "").strip().lower() in OFF or not sys.platform.startswith("linux"):
        return False
    if backend_started():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt      # glibc; musl and others have none
    except (OSError, AttributeError):
        _state["kept"] = False
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # M_TRIM_THRESHOLD takes an int that glibc reads as size_t: -1 is the largest threshold.
    _state["kept"] = all(mallopt(opt, value) == 1
                         for opt, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
    return _state["kept"]
