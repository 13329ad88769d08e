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
from editmgt_jax.assets import DEFAULT_MODEL
from editmgt_jax.convert.__main__ import main as convert_main
from editmgt_jax.tools.tiny_release import make_release

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = DEFAULT_MODEL


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
        # What the bar is given (when the terminal redraws it is tqdm's choice): every step, in order.
        positions = shipped.progress.positions
        if shown:
            assert positions[-1] == kw["steps"] and positions == sorted(positions), positions
        else:
            assert positions == [] and stream.getvalue() == ""
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
    # CI runs exactly the README's test command, last; before it only installs what the browser
    # test needs (Debian's chromium, gradio + selenium), and runs no test.
    assert ci[-1] == test_cmd
    assert not any("pytest" in ln for ln in ci[:-1])
    commands = re.findall(r"^pip install[^\n&]*", readme, flags=re.M)     # commands, not prose
    pinned = [c for c in commands if "[demo]" not in c]   # gradio pins its own pillow (README, demo)
    assert len(pinned) >= 2 and all("-c constraints.txt" in c for c in pinned)
    # The header's pointer to the README leads to the paragraph on moving to newer versions.
    header = "".join(ln.lstrip("# ") for ln in open(os.path.join(REPO, "constraints.txt")) if ln.startswith("#"))
    section = re.search(r'README\.md, section "([^"]+)"', header)[1]
    assert f"\n## {section}\n" in readme
    body = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    assert "Run the tests" in body and "pip freeze" in body


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


# ------------------------------------------------ resume after a config change: the checkpoints stay
@pytest.fixture(scope="module")
def tokens_dir(train_data):
    return train_data["tokens_dir"]


def _tiny_editor_run(tokens_dir, workdir):
    """The tiny editor on pre-tokenised data, as ``--config.FIELD=VALUE`` flags and as the config
    they make, with checkpoints at steps 1 and 2 of a run that stopped there (written directly: what
    a run leaves, without compiling its step) and its metrics.jsonl."""
    import train_fixtures
    from configs import editor_tiny
    from editmgt_jax.data.pipeline import make_dataset
    from editmgt_jax.parallel import make_mesh
    from editmgt_jax.training.batches import pipeline_config
    from editmgt_jax.training.checkpoint import TrainCheckpointer
    from editmgt_jax.training.state import TrainProgram, mesh_shape_from_config
    from editmgt_jax.training.tokenizers import make_tokenizer

    overrides = {"data.tokens_dir": tokens_dir, "data.name": train_fixtures.DATA_NAME,
                 "data.resolution": train_fixtures.RES, "editor.image_size": train_fixtures.RES,
                 "editor.transformer.num_single_layers": 0, "train.batch_size": 8, "train.num_steps": 2,
                 "train.checkpoint_every": 1, "train.export": False, "train.loss_plot": False}
    c = editor_tiny.get_config()
    c.update_from_flattened_dict(overrides)
    program = TrainProgram.create(c, make_mesh(mesh_shape_from_config(c)), check_replication=False)
    state, _ = program.init_state(0, compiler_options={"xla_backend_optimization_level": 0})
    it = iter(make_dataset(pipeline_config(c, c.data.split, 1), tokenize=make_tokenizer(c)))
    ck = TrainCheckpointer(os.path.join(workdir, "checkpoints"))
    for step in (1, 2):
        next(it)
        ck.save(step, state, c, it)
    ck.close()
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps({"step": s, "loss": 4.0}) + "\n" for s in (1, 2)))
    flags = ["--config", "configs/editor_tiny.py", "--workdir", str(workdir)]
    return c, flags + [f"--config.{k}={v}" for k, v in overrides.items()]


def test_a_rerun_with_another_model_config_names_the_fields_and_keeps_the_checkpoints(tokens_dir, tmp_path, cli,
                                                                                    capsys):
    from editmgt_jax.training.loop import train

    wd = tmp_path / "run"
    config, flags = _tiny_editor_run(tokens_dir, wd)
    before = _tree(wd)
    proc = cli("train.main", *flags, "--config.editor.transformer.num_layers=2",
               "--config.editor.text.width=48", "--config.train.num_steps=4")
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert line.startswith(f"error: {wd / 'checkpoints' / '2'}: trained with another config: "), line
    assert ("editor.text.width 32 -> 48; editor.transformer.num_layers 1 -> 2 (checkpoint -> now)" in line
            and "(the checkpoints are kept)" in line), line
    assert "damaged" not in proc.stderr
    after = _tree(wd)
    after.pop(".lock")                   # the workdir lock the run held
    assert after == before               # nothing moved aside, metrics.jsonl as it was
    # The learning rate and its schedule may change on resume: said, and the run goes on from step 2.
    config.optim.update(learning_rate=0.0005, schedule="cosine", decay_steps=100)
    capsys.readouterr()
    assert train(config, str(wd), progress=False).final_step == 2
    assert ("resuming from step 2 with a changed optimizer setting: optim.decay_steps 0 -> 100; "
            "optim.learning_rate 0.001 -> 0.0005; optim.schedule 'warmup_constant' -> 'cosine' "
            "(checkpoint -> now)") in capsys.readouterr().err
    assert sorted(os.listdir(wd / "checkpoints")) == ["1", "2"]


def test_a_checkpoint_whose_arrays_do_not_fit_is_not_called_damaged(tmp_path):
    """Without the config check (a config that says the same but builds another model): the
    arrays' names and shapes are read from the checkpoint's metadata and named; nothing moves."""
    from configs import vq_tiny
    from editmgt_jax.parallel import make_mesh
    from editmgt_jax.training.checkpoint import CheckpointConfigError, TrainCheckpointer
    from editmgt_jax.training.state import TrainProgram

    def program(width):
        c = vq_tiny.get_config()
        c.vq.model.update(block_out_channels=(width, width), norm_num_groups=4, latent_channels=4,
                          num_vq_embeddings=16)
        return c, TrainProgram.create(c, make_mesh((1, 1, 1), jax.devices()[:1]), check_replication=False)

    import jax

    c, small = program(8)
    state, _ = small.init_state(0, compiler_options={"xla_backend_optimization_level": 0})
    ck = TrainCheckpointer(tmp_path / "ck")
    ck.save(3, state, c)
    ck.close()
    ck = TrainCheckpointer(tmp_path / "ck")
    assert ck._state_mismatch(3, small.abstract_state) == ""          # the same model: nothing differs
    with pytest.raises(CheckpointConfigError) as e:
        ck.restore_latest(program(16)[1].abstract_state)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'ck' / '3'}: the saved state does not fit the model this config builds (")
    assert "in the checkpoint," in msg and "more" in msg and "(the checkpoints are kept)" in msg
    assert "\n" not in msg and sorted(os.listdir(tmp_path / "ck")) == ["3"]
    assert ck.restore_latest(small.abstract_state)[0] == 3 and ck.skipped == []
    ck.close()


# ------------------------------------------------------------- no edit replaces a source image
def test_no_edit_replaces_a_source_image_or_writes_outside_the_out_dir(tmp_path, cli):
    from infer import edit_cli
    from infer.edit_batch import read_batch
    from infer.edit import build_parser

    shapes = os.path.join(REPO, "examples", "shapes.png")
    for name in ("photo.png", "b.png", "d.png", "x_heatmap.png"):
        shutil.copy(shapes, tmp_path / name)
    before = _tree(tmp_path)
    photo = tmp_path / "photo.png"
    proc = cli("infer.edit", "--image", photo, "--instruction", "paint it cyan", "--out", photo)
    assert proc.returncode == 2 and "loaded" not in proc.stderr           # refused before the model loads
    assert _one_error_line(proc.stderr) == (f"error: --out {photo}: would write {photo}, which is the --image "
                                            "file; choose another --out (source images are never replaced)")
    for argv, message in [(["--out", str(tmp_path / "sub" / ".." / "photo.png")], "which is the --image file"),
                          (["--out", str(tmp_path / "x.png"), "--save-heatmap", "--image", str(tmp_path / "x_heatmap.png")],
                           f"would write {tmp_path / 'x_heatmap.png'}, which is the --image file"),
                          (["--out", str(tmp_path / "b.png"), "--mask", str(tmp_path / "b.png")],
                           "which is the --mask file")]:
        args = build_parser().parse_args(["--image", str(photo), "--instruction", "x"] + argv)
        with pytest.raises(ValueError, match=message):
            edit_cli.check_flags(args)
    # Batch: an out outside --out-dir (relative or absolute) or equal to any line's input is skipped.
    lines = [{"image": "photo.png", "instruction": "x", "out": "../photo.png"},
             {"image": shapes, "instruction": "x", "out": str(tmp_path / "abs.png")},
             {"image": shapes, "instruction": "x", "out": "b.png"},          # line 4's source
             {"image": "b.png", "instruction": "x", "out": "new.png"},
             {"image": "d.png", "instruction": "x", "out": "d.png"},          # its own source
             {"image": shapes, "instruction": "x", "out": "sub/../fine.png"},
             {"image": shapes, "instruction": "x", "out": "x.png"}]           # x_heatmap.png is line 8's
    lines.append({"image": "x_heatmap.png", "instruction": "x", "out": "y.png"})
    batch = tmp_path / "edits.jsonl"
    batch.write_text("".join(json.dumps(d) + "\n" for d in lines))
    items, skipped = read_batch(str(batch), str(tmp_path), heatmap=True)
    assert [d["line"] for d in items] == [4, 6, 8]
    assert [s.split(": ", 1)[0] for s in skipped] == [f"{batch}:{n}" for n in (1, 2, 3, 5, 7)]
    assert "must be a name inside the output folder" in skipped[0] and "must be a name inside" in skipped[1]
    assert "source image of line 4" in skipped[2] and "source image of line 5" in skipped[3]
    assert f"would write {tmp_path / 'x_heatmap.png'}, the source image of line 8" in skipped[4]
    assert read_batch(str(batch), str(tmp_path), heatmap=False)[0][-2]["line"] == 7   # no heatmap, no clash
    # The command: nothing runnable, nothing written, every source as it was.
    batch.write_text("".join(json.dumps(lines[i]) + "\n" for i in (0, 1, 4)))
    proc = cli("infer.edit", "--batch", batch, "--out-dir", tmp_path)
    assert proc.returncode == 2 and "loaded" not in proc.stderr, proc.stderr
    assert "none of its 3 edit(s) can be run" in _one_error_line(proc.stderr)
    after = _tree(tmp_path)
    after.pop("edits.jsonl")
    assert after == before


# ----------------------------------------------- pre-tokenising and rebuilding data are atomic
@pytest.fixture(scope="module")
def images_dir(train_data):
    return train_data["data_dir"]


def test_pretokenize_replaces_its_output_only_when_complete(images_dir, tmp_path, cli):
    import signal
    import subprocess
    import sys

    import train_fixtures
    from editmgt_jax.data.pipeline import DatasetSpec
    from editmgt_jax.data.pretokenize import avgpool_encode_fn, pretokenize
    from editmgt_jax.data.sources import token_source

    out = tmp_path / "tokens"
    train_fixtures.build_tokens(images_dir, str(out))
    before = _tree(out)
    # A failed run (crops the encoder cannot take) leaves the old records, nothing beside them.
    with pytest.raises(ValueError, match="not a multiple of 16"):
        pretokenize(train_fixtures.DATA_NAME, str(out), avgpool_encode_fn(16), data_dir=images_dir,
                    resolution=30, batch_size=8, progress=False)
    assert _tree(out) == before and sorted(os.listdir(tmp_path)) == ["tokens"]
    # Killed (SIGKILL) while writing its records: the old dataset is untouched and still reads.
    script = ("import sys, time\n"
              "from editmgt_jax.data.pretokenize import avgpool_encode_fn, pretokenize\n"
              "enc = avgpool_encode_fn(4, 64); calls = []\n"
              "def slow(pixels):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 2:\n"
              "        print('writing', flush=True); time.sleep(60)\n"
              "    return enc(pixels)\n"
              f"pretokenize({train_fixtures.DATA_NAME!r}, sys.argv[1], slow, data_dir=sys.argv[2], resolution=32,"
              " batch_size=8, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(out), images_dir], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env=train_fixtures.subprocess_env(1))
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert _tree(out) == before
    assert len(token_source(DatasetSpec(tokens_dir=str(out)))[0]) == train_fixtures.N_TRAIN
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tokens.tmp-")]     # what the kill left ...
    proc = cli("train.pretokenize", "--dataset", train_fixtures.DATA_NAME, "--data-dir", images_dir,
               "--out", out, "--resolution", 32, "--encoder", "avgpool", "--downsample", 8, "--batch-size", 8)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["tokens"]                              # ... the next run removes
    assert json.loads((out / "metadata.json").read_text())["grid"] == [4, 4]
    # A folder that is not a pre-tokenised dataset is never replaced.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"--out {mine}: exists and is not a pre-tokenised dataset"):
        pretokenize(train_fixtures.DATA_NAME, str(mine), avgpool_encode_fn(4, 64), data_dir=images_dir,
                    resolution=32, batch_size=8, progress=False)
    assert (mine / "notes.txt").read_text() == "mine"


def test_build_dataset_overwrite_killed_keeps_the_old_dataset(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import train_fixtures
    from editmgt_jax.data.synthetic_edits import builder as se

    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "train.build_dataset", "synthetic_edits", "--data-dir", str(data),
           "--resolution", "32", "--num-examples", "400", "--num-test", "4"]
    env = train_fixtures.subprocess_env(1)
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, env=env).returncode == 0
    version = data / "synthetic_edits" / se.config_name(32, 400, 4, 0) / "1.0.0"
    before = _tree(version)
    # Killed (SIGKILL) as soon as the rebuild is under way: the old dataset is untouched.
    proc = subprocess.Popen(cmd + ["--overwrite"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if any(p.startswith(".build-tmp-") for p in os.listdir(data)) or not version.is_dir():
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL            # killed mid-build, not finished
    finally:
        proc.kill()
    assert _tree(version) == before
    # The next --overwrite completes, replaces it and leaves nothing temporary behind.
    proc = subprocess.run(cmd + ["--overwrite"], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not [p for p in os.listdir(data) if p.startswith(".")]
    assert _tree(version).keys() == before.keys()


def test_reads_left_in_flight_by_a_failed_restore_print_nothing(tmp_path):
    """What a failed read of a damaged checkpoint leaves behind fails with 'Event loop is closed' on
    three paths (a callback from the reading threads, a thread of its own, asyncio's report of an
    exception never retrieved); none of them prints once reading has begun, other errors still do."""
    import subprocess
    import sys

    script = '''
import asyncio, gc, threading
from editmgt_jax.checkpoints import quiet_orphaned_reads
quiet_orphaned_reads()
def closed():
    raise RuntimeError("Event loop is closed")
t = threading.Thread(target=closed); t.start(); t.join()
class Late:
    def __del__(self):
        closed()
Late(); gc.collect()
async def read():
    closed()
loop = asyncio.new_event_loop()
task = loop.create_task(read())
loop.run_until_complete(asyncio.sleep(0.01))
loop.close(); del task; gc.collect()
t = threading.Thread(target=lambda: 1 / 0); t.start(); t.join()
print("done", flush=True)
'''
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr
    assert "Event loop is closed" not in proc.stderr, proc.stderr
    assert "ZeroDivisionError" in proc.stderr                       # any other error still prints


# ------------------------------------------------- train.main: values no run can use are one line
def test_train_values_no_run_can_use_are_one_line_before_anything_is_made(tmp_path, cli):
    from configs import vq_tiny
    from editmgt_jax.training.config_checks import TrainConfigError, check_train_config, check_workdir

    for field, value, message in [
            ("train.batch_size", 0, "--config.train.batch_size=0: must be an integer >= 1"),
            ("train.checkpoint_every", 0, "--config.train.checkpoint_every=0: must be an integer >= 1"),
            ("train.num_steps", -5, "--config.train.num_steps=-5: must be an integer >= 1 (the optimizer steps"),
            ("train.eval_every", -1, "--config.train.eval_every=-1: must be an integer >= 0 (0 = off)"),
            ("data.resolution", 0, "--config.data.resolution=0: must be an integer >= 1"),
            ("optim.learning_rate", float("nan"), "--config.optim.learning_rate=nan: must be a finite number >= 0"),
            ("optim.schedule", "cosine", "--config.optim.schedule='cosine' needs decay_steps (0) > warmup_steps (20)"),
            ("optim.schedule", "linear", "--config.optim.schedule='linear': use 'constant'")]:
        c = vq_tiny.get_config()
        c.update_from_flattened_dict({field: value})
        with pytest.raises(TrainConfigError) as e:
            check_train_config(c)
        assert str(e.value).startswith(message), str(e.value)
    check_train_config(vq_tiny.get_config())
    afile = tmp_path / "afile"
    afile.write_text("x")
    for workdir, message in [(afile, f"--workdir {afile}: is a file, not a folder"),
                             (afile / "run", f"--workdir {afile / 'run'}: {afile} is a file, not a folder")]:
        with pytest.raises(TrainConfigError) as e:
            check_workdir(str(workdir))
        assert str(e.value) == message
    # The command: one line, exit status 2, before the data is opened or the workdir made.
    wd = tmp_path / "wd"
    proc = cli("train.main", "--config", "configs/vq_tiny.py", "--workdir", wd, "--config.train.checkpoint_every=0")
    assert proc.returncode == 2
    assert _one_error_line(proc.stderr) == "error: --config.train.checkpoint_every=0: must be an integer >= 1"
    proc = cli("train.main", "--config", "configs/vq_tiny.py", "--workdir", afile)
    assert proc.returncode == 2 and _one_error_line(proc.stderr) == f"error: --workdir {afile}: is a file, not a folder"
    assert sorted(os.listdir(tmp_path)) == ["afile"] and afile.read_text() == "x"


# ------------------------------------------- evaluation and data commands: bad flags are one line
def test_evaluate_build_dataset_and_pretokenize_flags_are_one_line(tmp_path, capsys):
    from infer.evaluate import main as evaluate_main
    from train.build_dataset import main as build_main
    from train.pretokenize import main as pretokenize_main

    afile = tmp_path / "afile"
    afile.write_text("x")
    notackpt = tmp_path / "notackpt"
    notackpt.mkdir()
    (notackpt / "readme.txt").write_text("x")
    cases = [
        (evaluate_main, ["--data", "synthetic_edits:d", "--out", str(afile)], f"--out {afile}: is a file, not a folder"),
        (evaluate_main, ["--data", "synthetic_edits:d", "--out", str(tmp_path / "r"), "--seed", "-1"],
         "--seed -1: must be >= 0"),
        (build_main, ["synthetic_edits", "--data-dir", str(tmp_path / "d"), "--num-examples", "0"],
         "--num-examples 0: must be >= 1"),
        (build_main, ["synthetic_edits", "--data-dir", str(tmp_path / "d"), "--resolution", "7"],
         "--resolution 7: must be >= 16 (the smallest images the synthetic shapes are drawn at)"),
        (build_main, ["synthetic_edits", "--data-dir", str(afile)], f"--data-dir {afile}: is a file, not a folder"),
        (build_main, ["synthetic_edits", "--data-dir", str(tmp_path / "d"), "--manual-dir", "x"],
         "--manual-dir and --holdout-fraction apply to crispedit only."),
        (pretokenize_main, ["--dataset", "synthetic_edits/small", "--out", str(tmp_path / "t"), "--vq-loader",
                            "editmgt_jax.training.checkpoint:load_vq", "--vq-checkpoint", str(notackpt)],
         f"--vq-checkpoint {notackpt}: cannot be loaded by --vq-loader editmgt_jax.training.checkpoint:load_vq ("),
        (pretokenize_main, ["--dataset", "synthetic_edits/small", "--out", str(tmp_path / "t"), "--vq-loader",
                            "editmgt_jax.training.checkpoint:load_vq", "--vq-checkpoint", str(tmp_path / "none")],
         f"--vq-checkpoint {tmp_path / 'none'}: no such file or folder"),
        (pretokenize_main, ["--dataset", "synthetic_edits/small", "--out", str(tmp_path / "t"), "--vq-loader",
                            "no_such_module:load", "--vq-checkpoint", str(notackpt)],
         "--vq-loader 'no_such_module:load': cannot import it"),
        (pretokenize_main, ["--dataset", "synthetic_edits/small", "--out", str(afile), "--encoder", "avgpool"],
         f"--out {afile}: is a file, not a folder"),
        (pretokenize_main, ["--dataset", "synthetic_edits/small", "--out", str(tmp_path / "t"), "--encoder", "avgpool",
                            "--batch-size", "0"], "--batch-size 0: must be >= 1")]
    for main, argv, message in cases:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {message}"), (argv, line)
    assert sorted(os.listdir(tmp_path)) == ["afile", "notackpt"]          # nothing made


# --------------------------------------------------------------------- tools: one line, exit 2
def test_check_reference_names_a_checkpoint_of_another_configuration_and_tiny_release_a_file(
        release, tmp_path, capsys):
    from editmgt_jax.tools.check_reference import main as check_main
    from editmgt_jax.tools.tiny_release import main as tiny_main

    v1 = tmp_path / "v1-ckpt"
    assert convert_main(["--official", release, "--out", str(v1), "--components", "transformer"]) == 0
    capsys.readouterr()
    v2 = os.path.join(REPO, "tests", "fixtures", "editmgt-tiny-v2")
    assert check_main([v2, "--checkpoint", str(v1), "--cases", "a"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --checkpoint {v1}: this checkpoint is not the fixture's configuration ("), line
    assert "transformer.joint_attention_dim: fixture 48, checkpoint 40" in line and "more)" in line
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in [(afile, f"{afile}: is a file, not a folder"),
                         (afile / "rel", f"{afile / 'rel'}: {afile} is a file, not a folder")]:
        assert tiny_main([v2, str(out)]) == 2
        assert _one_error_line(capsys.readouterr().err) == f"error: {message}"
    assert afile.read_text() == "x"


# ------------------------------------------------------- editing: the API's inputs, size and memory
def test_edit_arguments_are_one_clear_edit_error_before_anything_compiles(shipped):
    from editmgt_jax.edit_inputs import EditError

    shapes = os.path.join(REPO, "examples", "shapes.png")
    pixels = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(shapes).convert("RGB"))
    compiled = set(shipped._programs)
    for args, kw, message in [
            ((shapes, None), {}, "instructions: expected a string or a list of strings, got NoneType"),
            ((shapes, [None]), {}, "instruction 0: expected a string, got NoneType"),
            ((shapes, "x"), dict(seed="x"), "seed='x': expected an integer, got str"),
            ((shapes, "x"), dict(seed=2**40), f"seed={2**40}: must be in [0, 4294967295]"),
            ((shapes, "x"), dict(size="64"), "size='64': expected an integer, got str"),
            ((shapes, "x"), dict(size=50), "size=50: must be a positive multiple of 8"),
            ((pixels.astype(np.float32), "x"), {}, f"image 0: float array with values in [{pixels.min():g}, "
                                                   f"{pixels.max():g}]; float images must be in [0, 1]"),
            ((np.full((64, 64, 3), np.nan, np.float32), "x"), {}, "image 0: float array with NaN"),
            ((np.full((64, 64, 3), 300, np.int16), "x"), {}, "image 0: int16 array with values in [300, 300]"),
            ((shapes, "paint it \udcff cyan"), {}, "instruction 0: not UTF-8 text"),
            ((np.zeros((1, 1, 3), np.uint8), "x"), {}, "image 0: 1x1 pixels is too small to edit"),
            ((np.zeros((10, 20000, 3), np.uint8), "x"), {}, "image 0: 20000x10 pixels is too narrow for size 64")]:
        with pytest.raises(EditError) as e:
            shipped.edit(*args, steps=1, **kw)
        assert str(e.value).startswith(message), str(e.value)
    # Float images in [0, 1] are read as before.
    np.testing.assert_array_equal(shipped.load_rgb(pixels.astype(np.float32) / 255), pixels)
    assert set(shipped._programs) == compiled                      # nothing was compiled for any of them


def test_an_edit_that_cannot_fit_in_memory_is_refused_with_the_size_that_fits(shipped, cli, tmp_path):
    import jax

    from editmgt_jax.edit_inputs import EditError, check_edit_memory, edit_memory_bytes

    tr, vq = shipped.tr_cfg, shipped.vq_cfg
    cpu = jax.devices()[0]
    # The estimate grows with the pixels: the logits over the codebook dominate this model.
    small, large = edit_memory_bytes(tr, vq, (64, 64), 1), edit_memory_bytes(tr, vq, (4096, 4096), 1)
    assert large > 2 * 4096 * 4096 // 16 * tr.codebook_size * 4           # two rows of logits at least
    assert small < 200 << 20
    budget = edit_memory_bytes(tr, vq, (1024, 1024), 1)
    with pytest.raises(EditError) as e:
        check_edit_memory(tr, vq, [(128, 128)], 4096, 4, "fit", devices=1, device=cpu, available=budget)
    assert str(e.value).startswith(f"size=4096: this edit needs about {large / 2**30:.1f} GiB, more than the "
                                   f"{budget / 2**30:.1f} GiB free on cpu; the largest size that fits is 1024")
    check_edit_memory(tr, vq, [(128, 128)], 1024, 4, "fit", devices=1, device=cpu, available=budget)
    with pytest.raises(EditError, match="the largest size that fits is 1020"):      # 1024 less one token
        check_edit_memory(tr, vq, [(128, 128)], 2048, 4, "fit", devices=1, device=cpu, available=budget - 1)
    # The command: one line and exit status 2 instead of an out-of-memory traceback, nothing written.
    proc = cli("infer.edit", "--image", os.path.join(REPO, "examples", "shapes.png"), "--instruction", "x",
               "--size", "40000", "--out", tmp_path / "o.png")
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert line.startswith("error: size=40000: this edit needs about ") and "the largest size that fits is " in line
    assert not (tmp_path / "o.png").exists()


def test_edit_command_flags_that_would_be_ignored_or_overflow_are_one_line(tmp_path, capsys):
    from infer import edit_cli
    from infer.edit import build_parser, main

    shapes = os.path.join(REPO, "examples", "shapes.png")
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"image": shapes, "instruction": "x"}) + "\n")
    for argv, message in [
            (["--batch", str(batch), "--image", shapes, "--out", "o.png"],
             "--batch edits the images its lines name; --image, --out would be ignored"),
            (["--image", shapes, "--instruction", "x", "--out-dir", str(tmp_path / "d")],
             "--out-dir is for --batch; one edit is written to --out")]:
        assert main(argv) == 2
        assert _one_error_line(capsys.readouterr().err).startswith(f"error: {message}")
    args = build_parser().parse_args(["--image", shapes, "--instruction", "x", "--out", str(tmp_path / "o.png"),
                                      "--seed", "99999999999999999999"])
    with pytest.raises(ValueError, match=r"^--seed 99999999999999999999: must be in \[0, 4294967295\]$"):
        edit_cli.check_flags(args)
    assert sorted(os.listdir(tmp_path)) == ["b.jsonl"]


def test_a_checkpoint_whose_defaults_cannot_be_used_is_named(tmp_path):
    from editmgt_jax.editor import Editor

    def copy_with(name, edit):
        d = tmp_path / name
        shutil.copytree(SHIPPED, d)
        doc = json.loads((d / "config.json").read_text())
        edit(doc)
        (d / "config.json").write_text(json.dumps(doc))
        return d

    def resolution(doc):
        doc["conventions"]["resolution"] = 62
    def steps(doc):
        doc["conventions"]["sampler"]["steps"] = 0
    res, stp = copy_with("res", resolution), copy_with("steps", steps)
    for d, message in [(res, f"{res / 'config.json'}: resolution 62 (the checkpoint's working size) is not a "
                             "positive multiple of this model's 8 pixels per token"),
                       (stp, f"{stp}: config.json conventions: the recommended sampler settings: steps=0")]:
        with pytest.raises(checkpoints.CheckpointError) as e:
            Editor.load(d)
        assert str(e.value).startswith(message), str(e.value)
    vocab = tmp_path / "vocab"
    shutil.copytree(SHIPPED, vocab)
    (vocab / "vocab.txt").write_bytes((vocab / "vocab.txt").read_bytes().replace(b"circle", b"circ\xffe"))
    with pytest.raises(checkpoints.CheckpointError, match=rf"^{vocab / 'vocab.txt'}: not UTF-8 text \(byte 0xff"):
        Editor.load(vocab)
