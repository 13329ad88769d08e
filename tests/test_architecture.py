"""The dependency direction of the library, checked on fresh interpreters (what each import loads)."""

import json
import os
import pathlib
import subprocess
import sys

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

