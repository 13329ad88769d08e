"""A persistent XLA compilation cache shared by the Editor, ``infer.edit``, ``infer.evaluate`` and
``train.main``: a program compiled once (an edit at a given image shape, batch and sampler
settings; a train step) is read back from disk by the next process instead of compiled again.

One switch, ``EDITMGT_COMPILATION_CACHE``:

* unset: the cache lives in ``$XDG_CACHE_HOME/editmgt-jax/xla`` (``~/.cache/editmgt-jax/xla``);
* a folder: the cache lives there;
* ``off`` (or ``0``, ``false``, ``no``, ``none``): no persistent cache.

A cache folder set by the caller through ``jax.config`` (``jax_compilation_cache_dir``) is left as
it is. Entries are keyed by the program, the jax/jaxlib version, the device and the compile flags,
so a stale entry is never used; programs that compile in under :data:`MIN_COMPILE_SECS` are not
stored (single eager ops, small helpers). The folder can be deleted at any time.
"""

from __future__ import annotations

import os

ENV_VAR = "EDITMGT_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")
MIN_COMPILE_SECS = 0.2


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "editmgt-jax", "xla")


def cache_dir() -> str | None:
    """The folder the switch names (``None``: off)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in OFF:
        return None
    return os.path.abspath(os.path.expanduser(value)) if value else default_dir()


def enable() -> str | None:
    """Turn the cache on as :data:`ENV_VAR` says (idempotent); returns the folder in use, or
    ``None`` when off. A folder that cannot be created turns the cache off with one warning line
    (compiling still works)."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    path = cache_dir()
    if path is None:
        return current or None
    if current:
        return current   # the caller's own choice
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        import warnings

        warnings.warn(f"{ENV_VAR}: cannot use {path} ({e.strerror}); compiling without a cache", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        # jax decides whether to use the cache at its first compile; if that happened before the
        # cache was set, let it decide again.
        from jax._src import compilation_cache as cc

        if getattr(cc, "_cache_checked", False) and not getattr(cc, "_cache_used", True):
            cc.reset_cache()
    except Exception:  # noqa: BLE001 - private API; without it the cache starts with the next process
        pass
    return path
