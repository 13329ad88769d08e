"""This machine's matmul peak, measured one way for every benchmark: an ``n^3`` ``jnp.dot`` of two
random ``[n, n]`` operands (float32 unless asked; accumulation in float32), compiled once."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable


@functools.lru_cache(maxsize=None)
def matmul_call(n: int, dtype=None) -> tuple[Callable[[], object], float]:
    """``(call, flops)``: a zero-argument call of the compiled ``n^3`` dot on fixed operands (returns
    the product, not waited for) and the FLOPs of one call (``2 n^3``). Made once per ``(n, dtype)``
    in a process: a benchmark that measures the peak every round compiles it once, not every round."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype or jnp.float32)
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    b = jax.random.normal(jax.random.key(1), (n, n), dt)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)).lower(a, b).compile()
    return (lambda: dot(a, b)), 2.0 * n ** 3


def matmul_peak(n: int = 2048, dtype=None, calls: int = 5) -> float:
    """FLOP/s of the ``n^3`` dot: the best of ``calls`` timed calls after a warm-up call."""
    call, flops = matmul_call(n, dtype)
    call().block_until_ready()
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        call().block_until_ready()
        best = min(best, time.perf_counter() - t)
    return flops / best
