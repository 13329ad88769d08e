"""The persistent compilation cache: one switch (EDITMGT_COMPILATION_CACHE), one folder, and a second
process that reads the program back instead of compiling it."""

import os
import subprocess
import sys

import pytest

from editmgt_jax import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process: turn the cache on as the environment says, compile one program, print the
# folder in use and how many programs came from the cache.
CHILD = """
import jax, jax.numpy as jnp
from jax import monitoring
from editmgt_jax import compile_cache
hits = []
monitoring.register_event_listener(lambda e, **kw: hits.append(e) if e == '/jax/compilation_cache/cache_hits' else None)
jnp.zeros(3).block_until_ready()          # a compile before the switch: the cache still comes on
path = compile_cache.enable()
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)   # store even a fast compile
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 17.0)
f(jnp.ones((64, 64))).block_until_ready()
print(path, len(hits))
"""


def _child(env_value):
    env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV_VAR}
    if env_value is not None:
        env[compile_cache.ENV_VAR] = env_value
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True)
    path, hits = out.stdout.split()
    return path, int(hits)


def test_switch_and_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    assert compile_cache.cache_dir() == str(tmp_path / "editmgt-jax" / "xla")
    for off in ("off", "OFF", "0", "false", "none"):
        monkeypatch.setenv(compile_cache.ENV_VAR, off)
        assert compile_cache.cache_dir() is None
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "elsewhere"))
    assert compile_cache.cache_dir() == str(tmp_path / "elsewhere")


@pytest.mark.parametrize("value", ["folder", "off"])
def test_second_process_reads_the_program_back(tmp_path, value):
    folder = tmp_path / "xla"
    env_value = str(folder) if value == "folder" else "off"
    first = _child(env_value)
    second = _child(env_value)
    if value == "off":
        assert first == second == ("None", 0) and not folder.exists()
        return
    assert first[0] == second[0] == str(folder)
    assert first[1] == 0 and second[1] >= 1     # compiled once, read back by the next process
    assert any(folder.iterdir())
