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


def test_export_is_complete_or_absent(release, tmp_path):
    """What the trainer's export does for a release fine-tune: the text encoders and tokenizers are
    added inside the temporary folder, before it becomes the model; a failure leaves nothing."""
    from editmgt_jax.training.frozen import add_release_text

    src = tmp_path / "release_ckpt"
    assert convert_main(["--official", release, "--out", str(src), "--components", "clip,gemma"]) == 0
    toy = {"toy": {"w": np.ones((2, 3), np.float32)}}
    out = checkpoints.save_model(tmp_path / "model", toy, {"toy": {"width": 3}},
                                 finish=lambda folder: add_release_text(folder, str(src)))
    doc = checkpoints.read_config(out)
    assert set(doc["components"]) == {"toy", "clip", "gemma"}
    assert os.path.isdir(os.path.join(out, "tokenizer")) and os.path.isdir(os.path.join(out, "llm_tokenizer"))

    def broken(folder):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_model(tmp_path / "model2", toy, {"toy": {}}, finish=broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_model(tmp_path / "model", toy, {"toy": {}}, overwrite=True, finish=broken)
    assert checkpoints.read_config(out)["components"].keys() == doc["components"].keys()   # untouched
    assert sorted(os.listdir(tmp_path)) == ["model", "release_ckpt"]


# ------------------------------------------------------------------------ 9: damaged checkpoints
def test_damaged_model_checkpoints_are_named_in_one_line(tmp_path, cli):
    from editmgt_jax.editor import Editor

    bad_json = tmp_path / "bad_json"
    shutil.copytree(SHIPPED, bad_json)
    (bad_json / "config.json").write_text('{"format": "editmgt-jax/model",\n')
    with pytest.raises(checkpoints.CheckpointError) as e:
        Editor.load(bad_json)
    assert str(e.value).startswith(f"{bad_json / 'config.json'}: not valid JSON")
    # An emptied index is damage, not "saved for another configuration".
    no_index = tmp_path / "no_index"
    shutil.copytree(SHIPPED, no_index)
    (no_index / "params" / "transformer" / "manifest.ocdbt").write_bytes(b"")
    with pytest.raises(checkpoints.CheckpointError, match=r"transformer: the parameter index .* damaged"):
        Editor.load(no_index)
    # A truncated data file: one line and no 'Event loop is closed' tracebacks from reads still in
    # flight (the command line: they print at the process level).
    truncated = tmp_path / "truncated"
    shutil.copytree(SHIPPED, truncated)
    data = truncated / "params" / "transformer" / "ocdbt.process_0" / "d"
    biggest = max(data.iterdir(), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    proc = cli("infer.edit", "--checkpoint", truncated, "--image", os.path.join(REPO, "examples", "shapes.png"),
               "--instruction", "paint it cyan", "--out", tmp_path / "o.png")
    assert proc.returncode == 2, proc.stderr
    assert "Event loop is closed" not in proc.stderr
    line = _one_error_line(proc.stderr)
    assert "params/transformer" in line and "damaged, truncated or missing" in line
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------- 5: sampler settings, 12: blocks
def test_sampler_settings_must_be_finite_and_in_range(tmp_path, cli):
    import argparse

    from infer.flags import sampler_overrides
    from editmgt_jax.sampling.config import SamplerSettings

    for field, value, message in [("guidance_scale", -5.0, ">= 0"), ("guidance_scale", float("nan"), "finite"),
                                  ("reference_strength", 0.0, "> 0"), ("hold_threshold", float("inf"), "finite"),
                                  ("steps", 0, "integer >= 1"), ("steps", 2.5, "integer"),
                                  ("temperature_start", -1.0, ">= 0"), ("temperature_end", float("nan"), "finite"),
                                  ("micro_conds", (1.0, 1.0, 0.0, 0.0, float("nan")), "finite"),
                                  ("consolidation_blocks", (-1, 2), ">= 0")]:
        with pytest.raises(ValueError, match=f"{field}=.*{message}"):
            SamplerSettings(**{field: value})
    SamplerSettings(guidance_scale=0.0, temperature_start=0.0, steps=1)   # the lowest allowed values
    # The command-line flags are named.
    for flags, message in [(dict(guidance_scale=-5.0), "--guidance -5.0: must be finite and >= 0"),
                           (dict(guidance_scale=float("nan")), "--guidance nan: must be finite"),
                           (dict(reference_strength=0.0), "--strength 0.0: must be finite and > 0"),
                           (dict(steps=0), "--steps 0: must be an integer >= 1"),
                           (dict(hold_threshold=-0.1), "--hold-threshold -0.1: must be finite and >= 0")]:
        args = argparse.Namespace(**{**dict(steps=None, guidance_scale=None, reference_strength=None,
                                            hold_threshold=None), **flags})
        with pytest.raises(ValueError) as e:
            sampler_overrides(args)
        assert str(e.value).startswith(message), str(e.value)
    assert sampler_overrides(argparse.Namespace(steps=4, guidance_scale=1.0, reference_strength=1.1,
                                                hold_threshold=0.0)) == dict(steps=4, guidance_scale=1.0,
                                                                             reference_strength=1.1, hold_threshold=0.0)
    # ... and the command stops before loading anything, with one line and exit status 2.
    proc = cli("infer.edit", "--image", os.path.join(REPO, "examples", "shapes.png"), "--instruction", "x",
               "--guidance", "-5", "--out", tmp_path / "o.png")
    assert proc.returncode == 2 and "loaded" not in proc.stderr
    assert _one_error_line(proc.stderr) == "error: --guidance -5.0: must be finite and >= 0"
    assert not (tmp_path / "o.png").exists()


@pytest.fixture(scope="module")
def shipped():
    from editmgt_jax.editor import Editor

    return Editor.load(SHIPPED)


def test_consolidation_blocks_out_of_range_states_the_valid_range(shipped):
    from editmgt_jax.sampling.config import parse_blocks
    from editmgt_jax.editor import EditError

    assert parse_blocks("2-4,7") == (2, 3, 4, 7)
    for bad in ("5-2", "a-b", "3-"):
        with pytest.raises(Exception, match="expected block indices"):
            parse_blocks(bad)
    with pytest.raises(EditError) as e:
        shipped.sampler_config(consolidation_blocks=parse_blocks("99-200"))
    assert str(e.value) == ("consolidation_blocks 99-200 out of range: this model's blocks are 0-3 "
                            "(2 dual-stream, then single-stream)")


# ------------------------------------------------------------------ 7: --out checked before the edit
def test_out_is_checked_before_the_edit(tmp_path, cli):
    from editmgt_jax import imageio

    afile = tmp_path / "a_file"
    afile.write_text("x")
    for out, message in [(tmp_path / "noext", "no file extension"), (tmp_path, "is a directory"),
                         (tmp_path / "x.xyz", "cannot write images of type '.xyz'"),
                         (afile / "sub" / "o.png", f"{afile} is a file, not a folder")]:
        with pytest.raises(imageio.ImageError) as e:
            imageio.check_output_path(str(out), "--out")
        assert str(e.value).startswith(f"--out {out}: {message}"), str(e.value)
    imageio.check_output_path(str(afile.with_suffix(".png")), "--out")       # new files, any writable folder
    imageio.check_output_path(str(tmp_path / "new" / "deeper" / "o.jpg"), "--out")
    proc = cli("infer.edit", "--image", os.path.join(REPO, "examples", "shapes.png"),
               "--instruction", "paint it cyan", "--out", tmp_path / "noext")
    assert proc.returncode == 2 and "loaded" not in proc.stderr      # refused before the model loads
    assert f"--out {tmp_path / 'noext'}: no file extension" in _one_error_line(proc.stderr)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


# ------------------------------------------------------------------------------ 8: the pixel limit
def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (no pixel data: the size check comes first)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_images_over_the_pixel_limit_are_refused_by_name(tmp_path):
    import warnings

    from editmgt_jax import imageio

    assert imageio.MAX_PIXELS == 100_000_000
    for side in ((14000, 14000), (10001, 10000), (10000, 10001)):
        p = tmp_path / f"big_{side[0]}x{side[1]}.png"
        p.write_bytes(_png_header(*side))
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # no raw Pillow warning on the way
            with pytest.raises(imageio.ImageError) as e:
                imageio.load_image(p)
        assert str(p) in str(e.value) and "limit is 100 megapixels" in str(e.value)
    # At the limit the size check passes; this file then fails on its (absent) pixel data.
    p = tmp_path / "edge.png"
    p.write_bytes(_png_header(10000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(imageio.ImageError, match="corrupt or truncated"):
            imageio.load_image(p)


# ------------------------------------------------------------- 6: batch inputs checked up front
def test_batch_skips_bad_lines_with_a_report_and_edits_the_rest(tmp_path, cli):
    from PIL import Image

    from infer.edit_batch import read_batch

    shapes = os.path.join(REPO, "examples", "shapes.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    lines = [json.dumps({"image": shapes, "instruction": "paint the orange circle at the top cyan", "out": "a.png"}),
             json.dumps({"image": "broken.png", "instruction": "paint it red", "out": "b.png"}),
             "{not json",
             json.dumps({"image": shapes, "instruction": "  "}),
             json.dumps({"image": shapes, "instruction": "x", "out": "a.png"}),
             json.dumps({"image": shapes, "instruction": "x", "out": "c"}),
             json.dumps({"image": shapes, "instruction": "make the background blue"})]
    batch = tmp_path / "edits.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    out_dir = tmp_path / "res"
    items, skipped = read_batch(str(batch), str(out_dir))
    assert [d["line"] for d in items] == [1, 7] and items[1]["out"] == "00007.png"
    assert [ln.split(": ", 1)[0] for ln in skipped] == [f"{batch}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "broken.png" in skipped[0] and "not valid JSON" in skipped[1] and "empty instruction" in skipped[2]
    assert "line 1's output" in skipped[3] and "no file extension" in skipped[4]
    # The command: the rest is edited, each skipped line is reported, exit status 2.
    proc = cli("infer.edit", "--batch", batch, "--out-dir", out_dir, "--steps", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("skipped ")] == [f"skipped {s}" for s in skipped]
    assert "wrote 2 edit(s)" in proc.stderr and "skipped 5" in proc.stderr
    assert sorted(os.listdir(out_dir)) == ["00007.png", "a.png"]
    assert Image.open(out_dir / "a.png").size == Image.open(shapes).size     # the input's own size
    # Nothing runnable: refused before the model is loaded, nothing written.
    batch.write_text("\n".join(lines[1:4]) + "\n")
    proc = cli("infer.edit", "--batch", batch, "--out-dir", tmp_path / "none")
    assert proc.returncode == 2 and "loaded" not in proc.stderr and not (tmp_path / "none").exists()
    assert "none of its 3 edit(s) can be run" in _one_error_line(proc.stderr)


# ----------------------------------------------- 13: progress over the steps, 14: unread words
def test_progress_bar_only_for_long_sampling_and_same_result(shipped):
    import io

    from editmgt_jax.editor import StepProgress

    kw = dict(size=64, steps=3, seed=1)
    plain = shipped.edit(os.path.join(REPO, "examples", "shapes.png"), "paint the orange circle at the top cyan",
                         **kw)
    for after_s, shown in ((0.0, True), (60.0, False)):
        stream = io.StringIO()
        shipped.progress = StepProgress(after_s=after_s, stream=stream)
        res = shipped.edit(os.path.join(REPO, "examples", "shapes.png"), "paint the orange circle at the top cyan",
                           progress=True, **kw)
        np.testing.assert_array_equal(res.tokens, plain.tokens)     # a host callback: same numbers
        assert shipped.progress.calls == kw["steps"]
        assert ("sampling:" in stream.getvalue()) == shown, stream.getvalue()
        assert ("3/3" in stream.getvalue()) == shown or "2/3" in stream.getvalue()
    shipped.progress = StepProgress()


def test_words_the_model_cannot_read_are_named_once(shipped):
    from editmgt_jax.text_side import InstructionWarning

    shapes = os.path.join(REPO, "examples", "shapes.png")
    with pytest.warns(InstructionWarning) as record:
        shipped.edit(shapes, "paint the zebra circle quokka cyan", size=64, steps=3, seed=1)
        shipped.edit(shapes, "paint the zebra circle quokka cyan", size=64, steps=3, seed=1)
    messages = [str(w.message) for w in record]
    assert messages == ["instruction 0: words outside the model's vocabulary carry no meaning and are read as "
                        "unknown: quokka, zebra"]
    long = " ".join(["paint the circle cyan"] * 7)       # 28 words, the model reads 24
    with pytest.warns(InstructionWarning, match="28 words, the model reads the first 24; dropped: paint the "
                                                "circle cyan"):
        shipped.edit(shapes, long, size=64, steps=3, seed=1)


# -------------------------------------------------------------------------- 15: documented paths
def test_documented_example_paths_exist_and_outputs_do_not_collide():
    import re

    doc = open(os.path.join(REPO, "infer", "edit.py")).read().split('"""')[1]      # the --help text
    for path in re.findall(r"examples/[\w./-]+\.png", doc):
        assert os.path.isfile(os.path.join(REPO, path)), path
    readme = open(os.path.join(REPO, "README.md")).read()
    quick = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    outs = re.findall(r"--out (\S+)", quick)
    assert outs and "edited.png" in outs
    assert len(outs) == len(set(outs)), outs


# ---------------------------------------------------------------------- 16: the tested versions
def test_constraints_pin_every_dependency_within_setup_ranges_and_ci_runs_the_readme_command():
    import configparser
    import re

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in open(os.path.join(REPO, "constraints.txt")):
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    declared = [ln.strip() for ln in (cfg["options"]["install_requires"] + cfg["options.extras_require"]["test"])
                .splitlines() if ln.strip()]
    for text in declared:
        req = Requirement(text)
        assert canonicalize_name(req.name) in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), (text, pins[canonicalize_name(req.name)])
    readme = open(os.path.join(REPO, "README.md")).read()
    test_cmd = re.search(r"Run the tests:\n\n```bash\n(.+)\n```", readme)[1]
    assert "-c constraints.txt" in test_cmd
    ci = [ln for ln in open(os.path.join(REPO, ".ci", "run")).read().splitlines()
          if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [test_cmd]
    commands = re.findall(r"^pip install[^\n&]*", readme, flags=re.M)     # commands, not prose
    assert len(commands) >= 2 and all("-c constraints.txt" in c for c in commands)


# ------------------------------------------------------- 4: one run per workdir, metrics after resume
def test_workdir_lock_names_the_holder_and_dies_with_it(tmp_path):
    import subprocess
    import sys

    from editmgt_jax.training.workdir import WorkdirBusyError, WorkdirLock

    # The module alone (no JAX import): a holder that starts in a fraction of a second.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import importlib.util as u, sys, time; "
         "s = u.spec_from_file_location('w', sys.argv[2]); m = u.module_from_spec(s); s.loader.exec_module(m); "
         "lock = m.WorkdirLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)",
         str(tmp_path), os.path.join(REPO, "editmgt_jax", "training", "workdir.py")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusyError, match=f"is in use by pid {holder.pid} on .*started"):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    with WorkdirLock(str(tmp_path)):            # a killed holder leaves no stale lock
        pass


def test_metrics_rows_after_the_resumed_checkpoint_are_dropped(tmp_path):
    from editmgt_jax.training.workdir import trim_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 8)] + [{"step": 4, "eval_loss": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')   # killed mid-line
    assert trim_metrics(str(path), 5) == 3
    back = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [r["step"] for r in back] == [1, 2, 3, 4, 5, 4]
    assert trim_metrics(str(path), 5) == 0 and trim_metrics(str(tmp_path / "none.jsonl"), 1) == 0


def test_the_build_hint_names_the_config():
    from editmgt_jax.data.pipeline import DatasetSpec
    from editmgt_jax.data.sources import build_command

    assert build_command(DatasetSpec(name="synthetic_edits/small", data_dir="d")) == \
        "python -m train.build_dataset synthetic_edits/small --data-dir d"
    assert build_command(DatasetSpec(name="synthetic_edits/r128_n20000_t1000_s0", data_dir="d")) == (
        "python -m train.build_dataset synthetic_edits --data-dir d --resolution 128 --num-examples 20000 "
        "--num-test 1000 --seed 0")
    assert build_command(DatasetSpec(name="crispedit/holdout")).endswith("--data-dir DIR --manual-dir RAW")


# ------------------------------------------------------------------- 10: train.main's one-line errors
def test_train_main_errors_are_one_line_and_leave_nothing(tmp_path, cli):
    workdir = tmp_path / "wd"
    proc = cli("train.main", "--help")
    assert proc.returncode == 0 and "--workdir" in proc.stdout
    proc = cli("train.main", "--config", "configs/nope.py", "--workdir", workdir)
    assert proc.returncode == 2 and _one_error_line(proc.stderr) == "error: --config configs/nope.py: no such file"
    proc = cli("train.main", "--config", "configs/vq_tiny.py", "--workdir", workdir, "--config.train.num_stepz=5")
    assert proc.returncode == 2
    assert _one_error_line(proc.stderr) == ("error: --config.train.num_stepz=5: the config has no field "
                                            "'num_stepz' (did you mean \"num_steps\"?)")
    proc = cli("train.main", "--config", "configs/vq_tiny.py", "--workdir", workdir,
               f"--config.data.data_dir={tmp_path / 'data'}")
    assert proc.returncode == 2
    assert _one_error_line(proc.stderr) == (
        f"error: dataset 'synthetic_edits/small' is not built in {tmp_path / 'data'}; build it with "
        f"`python -m train.build_dataset synthetic_edits/small --data-dir {tmp_path / 'data'}`")
    assert not workdir.exists()
