"""What happens when things go wrong: bad input gets one line naming the file, field or flag (exit
2 in the command-line tools), and a fault loses nothing that was there before.

Command-line entry points are called in-process (``main(argv)``) wherever that shows the same
behaviour as a subprocess; subprocesses only where the process boundary is the point.
"""

import json
import os
import shutil

import numpy as np
import pytest

import editmgt_jax  # noqa: F401
from editmgt_jax import checkpoints
from editmgt_jax.convert.__main__ import main as convert_main
from editmgt_jax.tools.tiny_release import make_release

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "checkpoints", "editmgt-synthetic-64")


def _one_error_line(err: str) -> str:
    """The single 'error: ...' line of a failed command (and nothing that looks like a traceback)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _tree(path) -> dict:
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(path) for f in fs}


# ----------------------------------------------------------------------------------- 1: conversion
@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_dir):
    return make_release(str(tiny_dir), str(tmp_path_factory.mktemp("rel") / "release"))


def test_conversion_is_atomic_and_overwrite_replaces_only_checkpoints(release, tmp_path, capsys):
    out = tmp_path / "ckpt"
    args = ["--official", release, "--out", str(out), "--components", "vq"]
    assert convert_main(args) == 0
    first = _tree(out)
    # A user's folder is never replaced, even with --overwrite.
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "notes.txt").write_text("mine")
    assert convert_main(["--official", release, "--out", str(notes), "--components", "vq", "--overwrite"]) == 2
    assert "not a model checkpoint" in _one_error_line(capsys.readouterr().err)
    assert (notes / "notes.txt").read_text() == "mine" and (notes / "sub").is_dir()
    # A conversion failing half-way (vq written, transformer weights truncated) leaves --out as it was ...
    broken = tmp_path / "broken"
    shutil.copytree(release, broken)
    st = next((broken / "editmgt").glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:-1000])
    assert convert_main(["--official", str(broken), "--out", str(out), "--components", "vq,transformer",
                         "--overwrite"]) == 2
    assert "safetensors" in _one_error_line(capsys.readouterr().err)
    assert _tree(out) == first
    # ... and where there was nothing, nothing (no partial folder that blocks the rerun).
    fresh = tmp_path / "fresh"
    assert convert_main(["--official", str(broken), "--out", str(fresh), "--components", "vq,transformer"]) == 2
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == ["broken", "ckpt", "notes"]
    assert convert_main(["--official", release, "--out", str(fresh), "--components", "vq"]) == 0
    # --overwrite of a checkpoint of ours replaces it.
    (out / "config.json").write_text((out / "config.json").read_text().replace('"source"', '"was"'))
    assert convert_main(args + ["--overwrite"]) == 0
    assert checkpoints.read_config(out)["source"] == os.path.abspath(release)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


# ------------------------------------------------------------------------ 9: damaged checkpoints
def _subprocess_env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    return env


def test_damaged_model_checkpoints_are_named_in_one_line(tmp_path, capsys):
    import subprocess
    import sys

    from editmgt_jax.editor import Editor
    from infer.edit import main as edit_main

    flags = ["--image", os.path.join(REPO, "examples", "shapes.png"), "--instruction", "paint it cyan",
             "--out", str(tmp_path / "o.png")]
    bad_json = tmp_path / "bad_json"
    shutil.copytree(SHIPPED, bad_json)
    (bad_json / "config.json").write_text('{"format": "editmgt-jax/model",\n')
    assert edit_main(["--checkpoint", str(bad_json)] + flags) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad_json / "config.json") in line and "not valid JSON" in line
    # An emptied index is damage, not "saved for another configuration".
    no_index = tmp_path / "no_index"
    shutil.copytree(SHIPPED, no_index)
    (no_index / "params" / "transformer" / "manifest.ocdbt").write_bytes(b"")
    with pytest.raises(checkpoints.CheckpointError, match=r"transformer: the parameter index .* damaged"):
        Editor.load(no_index)
    # A truncated data file: one line and no 'Event loop is closed' tracebacks from reads still in
    # flight (a subprocess: they print at the process level).
    truncated = tmp_path / "truncated"
    shutil.copytree(SHIPPED, truncated)
    data = truncated / "params" / "transformer" / "ocdbt.process_0" / "d"
    biggest = max(data.iterdir(), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    proc = subprocess.run([sys.executable, "-m", "infer.edit", "--checkpoint", str(truncated)] + flags,
                          cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Event loop is closed" not in proc.stderr
    line = _one_error_line(proc.stderr)
    assert "params/transformer" in line and "damaged, truncated or missing" in line
    assert not (tmp_path / "o.png").exists()
