"""What an install of the package holds and needs.

- A bare install (``pip install editmgt-jax``, no extras) edits: the editor, ``infer.edit`` and the
  converter run in a process where every package that only the extras bring (TFDS, Grain,
  ArrayRecord, gradio, ...) cannot be imported.
- A non-editable install carries the default model as package data and edits with it, from a
  folder that is not the source tree.
"""

import configparser
import json
import os
import pathlib
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from editmgt_jax.assets import DEFAULT_MODEL

REPO = pathlib.Path(__file__).parent.parent


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _closure(requirements: list[str]) -> set[str]:
    """Canonical names of the installed distributions ``requirements`` pull in, transitively
    (environment markers evaluated, requested extras followed)."""
    seen: dict[str, set[str]] = {}
    stack = [Requirement(r) for r in requirements]
    while stack:
        req = stack.pop()
        name = canonicalize_name(req.name)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        extras = set(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = seen.get(name, set()) | extras
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is not None:
                if not any(sub.marker.evaluate({"extra": e}) for e in seen[name] | {""}):
                    continue
                sub.marker = None
            stack.append(sub)
    return set(seen)


def _modules_of(dists: set[str]) -> set[str]:
    """Top-level import names provided by the distributions ``dists`` (canonical names)."""
    out = set()
    for module, owners in metadata.packages_distributions().items():
        if any(canonicalize_name(o) in dists for o in owners):
            out.add(module)
    return out


def extras_only_modules() -> set[str]:
    """Modules that only the extras bring: what a bare install does not have."""
    cfg = _setup_cfg()
    base = _closure(_lines(cfg["options"]["install_requires"]))
    extras = sum((_lines(v) for v in cfg["options.extras_require"].values()), [])
    only = _closure(extras) - base
    return _modules_of(only) - _modules_of(base)


def test_python_and_extras_are_declared():
    cfg = _setup_cfg()
    assert cfg["options"]["python_requires"].strip() == ">=3.11"
    base = {canonicalize_name(Requirement(r).name) for r in _lines(cfg["options"]["install_requires"])}
    extras = {k: {canonicalize_name(Requirement(r).name) for r in _lines(v)}
              for k, v in cfg["options.extras_require"].items()}
    assert not base & {"tensorflow-datasets", "grain", "array-record", "gradio", "tensorboardx"}
    assert {"tensorflow-datasets", "grain", "array-record"} <= extras["train"]
    assert extras["demo"] == {"gradio"}
    # the README's test command installs only [test]: it must bring what training and data building need
    assert extras["train"] | extras["data"] <= extras["test"]
    # every package the tested set installs is pinned
    pinned = {canonicalize_name(ln.split("==")[0]) for ln in _lines((REPO / "constraints.txt").read_text())}
    tested = _lines(cfg["options"]["install_requires"]) + _lines(cfg["options.extras_require"]["test"])
    assert _closure(tested) <= pinned


_BLOCKER = """
import importlib.abc, sys
BLOCKED = set(%r)
BEFORE = set(sys.modules)   # what the interpreter itself loaded at startup
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (only the extras install it)", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def run_bare(code: str, tmp_path, blocked=None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter at the repository root in which the extras' packages
    cannot be imported."""
    blocked = extras_only_modules() if blocked is None else blocked
    script = tmp_path / "bare.py"
    script.write_text(_BLOCKER % (sorted(blocked),) + code)
    return subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)


def test_the_extras_hold_the_training_and_demo_packages():
    blocked = extras_only_modules()
    assert {"tensorflow_datasets", "grain", "array_record", "gradio", "tensorboardX", "ml_collections"} <= blocked
    # what inference needs is in the bare install
    assert not blocked & {"jax", "flax", "orbax", "numpy", "PIL", "safetensors", "tokenizers", "huggingface_hub"}


@pytest.mark.slow
def test_a_bare_install_edits_and_converts(tmp_path):
    out = tmp_path / "edited.png"
    code = f"""
import runpy, sys
from PIL import Image
from editmgt_jax.editor import Editor
sys.argv = ["infer.edit", "--image", "examples/shapes.png", "--instruction", "paint the orange circle cyan",
            "--out", {str(out)!r}]
try:
    runpy.run_module("infer.edit", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
assert Image.open({str(out)!r}).size == Image.open("examples/shapes.png").size
from editmgt_jax.tools.tiny_release import make_release
from editmgt_jax.convert import convert_release
make_release("tests/fixtures/editmgt-tiny-v1", {str(tmp_path / 'release')!r})
convert_release({str(tmp_path / 'release')!r}, {str(tmp_path / 'ckpt')!r}, log=lambda m: None)
Editor.load({str(tmp_path / 'ckpt')!r})
import json
print(json.dumps(sorted(m for m in set(sys.modules) - BEFORE if '.' not in m)))
"""
    proc = run_bare(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "editmgt_jax" in loaded and not loaded & extras_only_modules()


def test_the_blocker_blocks(tmp_path):
    """The bare-install process really lacks the extras (a training import fails there)."""
    proc = run_bare("import editmgt_jax.data.pipeline\n", tmp_path)
    assert proc.returncode != 0 and "only the extras install it" in proc.stderr


def _install_copy(tmp_path) -> pathlib.Path:
    """``pip install --target`` of a copy of the source tree (what ``pip install .`` puts in
    site-packages), built offline without build isolation; returns the target folder."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("editmgt_jax", "train", "infer", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(src)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return site


@pytest.mark.slow
def test_a_non_editable_install_has_the_default_model(tmp_path):
    site = _install_copy(tmp_path)
    model = site / "editmgt_jax" / "assets" / os.path.basename(DEFAULT_MODEL)
    shipped = sorted(p.relative_to(DEFAULT_MODEL) for p in pathlib.Path(DEFAULT_MODEL).rglob("*") if p.is_file())
    installed = sorted(p.relative_to(model) for p in model.rglob("*") if p.is_file())
    assert shipped and installed == shipped
    work = tmp_path / "elsewhere"     # not the source tree: nothing can come from the repository
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import editmgt_jax, sys\nfrom editmgt_jax.editor import Editor\n"
            f"assert editmgt_jax.__file__.startswith({str(site)!r}), editmgt_jax.__file__\n"
            f"assert Editor.DEFAULT_CHECKPOINT.startswith({str(site)!r})\n"
            "ed = Editor.load()\nprint(ed.path, ed.default_size)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == [str(model), "64"]
    out = work / "edited.png"
    proc = subprocess.run([sys.executable, "-m", "infer.edit", "--image", str(REPO / "examples" / "shapes.png"),
                           "--instruction", "paint the orange circle at the top cyan", "--out", str(out)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    assert Image.open(out).size == Image.open(REPO / "examples" / "shapes.png").size
