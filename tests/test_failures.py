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
