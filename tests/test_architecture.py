"""The dependency direction of the library, checked on fresh interpreters (what each import loads)
and on its source (the import graph, read with ``ast``)."""

import ast
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
                      "editmgt_jax.convert", "tensorflow_datasets", "train", "infer")


def test_the_library_never_imports_the_entry_points(loaded_by_stage):
    loaded = loaded_by_stage["library"]
    assert "editmgt_jax.training.loop" in loaded and "editmgt_jax.evaluation.runner" in loaded
    assert not _under(loaded, "train", "infer")


# ------------------------------------------------------------------ the import graph, from the source
def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, package: str, known: set[str]) -> set[str]:
    """Library modules a module imports, at module level or inside functions (``if TYPE_CHECKING``
    blocks excepted: they never run)."""
    out: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in known else base)
    return out & known


def import_graph() -> dict[str, set[str]]:
    """``module -> library modules it imports`` for every module of ``editmgt_jax``."""
    paths = {}
    for path in sorted((REPO / "editmgt_jax").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _imports(ast.parse(path.read_text()), package, set(paths)) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_the_library():
    graph = import_graph()
    assert "editmgt_jax.checkpoints.modules" in graph and graph["editmgt_jax.checkpoints.modules"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_checkpoint_layer_builds_models_from_the_model_registry():
    graph = import_graph()
    below = {m for m in graph if m.startswith(("editmgt_jax.checkpoints", "editmgt_jax.models"))}
    for m in below:
        assert not {d for d in graph[m] if d.startswith("editmgt_jax.convert")}, m
    assert "editmgt_jax.models.registry" in graph["editmgt_jax.checkpoints.modules"]
    assert "editmgt_jax.models.registry" in graph["editmgt_jax.convert.registry"]


def test_command_line_code_lives_in_the_entry_points():
    """Argument parsing is the entry points' (``infer/``, ``train/``) and the library's own
    ``python -m`` programs' (``__main__`` modules, ``editmgt_jax/tools``, and a module run as a
    program, such as ``editmgt_jax.checkpoints.card``, inside the ``main`` its
    ``if __name__ == "__main__"`` calls): no other library function parses or takes flags."""
    def imports_argparse(node):
        return any(isinstance(n, (ast.Import, ast.ImportFrom)) and (
            "argparse" in {a.name for a in n.names} or getattr(n, "module", None) == "argparse")
            for n in ast.walk(node))

    for path in sorted((REPO / "editmgt_jax").rglob("*.py")):
        rel = path.relative_to(REPO)
        if path.name == "__main__.py" or rel.parts[1] == "tools":
            continue
        tree = ast.parse(path.read_text())
        is_program = any(isinstance(n, ast.If) and "__name__" in ast.unparse(n.test) for n in tree.body)
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        rest = [n for n in tree.body if not (is_program and n in mains)]
        assert not any(imports_argparse(n) for n in rest), rel


def test_the_library_never_imports_the_config_files():
    """``configs/`` builds on the library (``configs/common.py`` takes the editor's declared fields
    from ``editmgt_jax.training.fields``), never the reverse: no library module imports ``configs``,
    at module level or inside a function."""
    for path in sorted((REPO / "editmgt_jax").rglob("*.py")):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
            n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not {m for m in names if m == "configs" or m.startswith("configs.")}, path.relative_to(REPO)
