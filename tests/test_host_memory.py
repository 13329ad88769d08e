"""host_memory.keep: XLA's per-call temporaries reuse the first call's pages instead of faulting in
fresh ones; off by its switch, and it declines once jax's backend has started."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Five calls after a warm-up of a program with a [8192, 2048] float32 intermediate (64 MiB: above
# glibc's largest dynamic mmap threshold, 32 MiB, so without keep() every call maps it afresh):
# prints whether keep() took effect and the minor page faults of the five calls.
CALLS, TEMP_PAGES = 5, 8192 * 2048 * 4 // 4096
SCRIPT = """
import resource
from editmgt_jax import host_memory
kept = host_memory.keep()
import jax, jax.numpy as jnp
f = jax.jit(lambda a, w, v: jnp.sum(jnp.exp(a @ w) @ v))
a = jnp.full((8192, 64), 1e-3, jnp.float32)
w = jnp.full((64, 2048), 1e-3, jnp.float32)
v = jnp.full((2048, 8), 1e-3, jnp.float32)
f(a, w, v).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(%d):
    f(a, w, v).block_until_ready()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0, host_memory.keep())
""" % CALLS


def _run(**env) -> tuple[str, int, str]:
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **env)
    e["XLA_FLAGS"] = " ".join(f for f in e.get("XLA_FLAGS", "").split() if "device_count" not in f)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=e, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    kept, faults, again = out.stdout.split()
    return kept, int(faults), again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_serves_later_calls_without_page_faults():
    kept, faults, again = _run()
    off, off_faults, _ = _run(EDITMGT_KEEP_HOST_MEMORY="off")
    assert (kept, again, off) == ("True", "True", "False")
    # measured: 81,928 pages without (the 64 MiB intermediate fresh on each of the five calls), 0-2
    # with keep(). The bound allows the heap to grow once more (a 16 MiB program once faulted 3,842
    # pages with keep() inside the full suite), not once per call.
    assert off_faults >= 0.9 * CALLS * TEMP_PAGES, off_faults
    assert faults < TEMP_PAGES, faults


def test_keep_declines_once_the_backend_has_started():
    import jax

    from editmgt_jax import host_memory

    jax.devices()                        # this test process's backend is running
    assert host_memory.backend_started()
    if "kept" not in host_memory._state:
        assert host_memory.keep() is False
