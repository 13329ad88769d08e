"""The dependency direction of the library, checked on fresh interpreters (what each import loads)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).parent.parent


def _loaded_after(code: str) -> set[str]:
    """Top-level and `editmgt_jax.*` module names in `sys.modules` after running `code` in a fresh
    interpreter from the repository root."""
    probe = (code + "\nimport json, sys\n"
             "print(json.dumps(sorted(m for m in sys.modules if '.' not in m or m.startswith('editmgt_jax.'))))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_loading_the_default_model_does_not_import_tfds():
    loaded = _loaded_after("from editmgt_jax.editor import Editor\neditor = Editor.load()\n"
                           "assert editor.text is not None")
    assert "editmgt_jax.models.text.word_tokenizer" in loaded  # the default model's text side ran
    assert "tensorflow_datasets" not in loaded
    assert not {m for m in loaded if m.startswith("editmgt_jax.data")}


def _modules(package: str) -> list[str]:
    """Every module of `package` (a dotted name under the repository root), `__main__` excluded."""
    root = REPO / package.replace(".", "/")
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


# Import stages, lowest layer first. Each stage's modules are imported on top of the earlier ones, so
# the modules loaded after stage k are the union of what stages 1..k pull in; every stage forbids at
# least what the later ones do, so one interpreter checks them all.
_STAGES = {
    "models": _modules("editmgt_jax.models"),
    "sampling": _modules("editmgt_jax.sampling"),
    "editor": ["editmgt_jax.editor"],
    "library": _modules("editmgt_jax"),
}


@pytest.fixture(scope="module")
def loaded_by_stage() -> dict[str, set[str]]:
    code = ("import importlib, json, sys\nout = {}\n"
            "for stage, modules in %r.items():\n"
            "    for m in modules:\n        importlib.import_module(m)\n"
            "    out[stage] = sorted(n for n in sys.modules if '.' not in n or n.startswith('editmgt_jax.'))\n"
            "print(json.dumps(out))" % (_STAGES,))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {k: set(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def _under(loaded: set[str], *packages: str) -> set[str]:
    return {m for m in loaded if any(m == p or m.startswith(p + ".") for p in packages)}


def test_models_import_neither_sampling_training_nor_data(loaded_by_stage):
    loaded = loaded_by_stage["models"]
    assert "editmgt_jax.models.transformer" in loaded
    assert not _under(loaded, "editmgt_jax.sampling", "editmgt_jax.training", "editmgt_jax.data",
                      "editmgt_jax.evaluation", "editmgt_jax.editor", "tensorflow_datasets", "train", "infer")


def test_sampling_imports_neither_training_nor_data(loaded_by_stage):
    loaded = loaded_by_stage["sampling"]
    assert "editmgt_jax.sampling.region_hold" in loaded
    assert not _under(loaded, "editmgt_jax.training", "editmgt_jax.data", "editmgt_jax.evaluation",
                      "editmgt_jax.editor", "tensorflow_datasets", "train", "infer")


def test_the_editor_imports_neither_training_data_nor_tfds(loaded_by_stage):
    loaded = loaded_by_stage["editor"]
    assert "editmgt_jax.editor" in loaded
    assert not _under(loaded, "editmgt_jax.training", "editmgt_jax.data", "editmgt_jax.evaluation",
                      "tensorflow_datasets", "train", "infer")


def test_the_library_never_imports_the_entry_points(loaded_by_stage):
    loaded = loaded_by_stage["library"]
    assert "editmgt_jax.training.loop" in loaded and "editmgt_jax.evaluation.runner" in loaded
    assert not _under(loaded, "train", "infer")
