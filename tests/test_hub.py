"""Loading by hub id (editmgt_jax.hub): a local hub cache laid out as huggingface_hub writes it
(``models--ORG--NAME/{blobs,refs,snapshots}``, snapshot files as symlinks into ``blobs/``), made from
the tiny fixture release, read with ``HF_HUB_OFFLINE=1``: converted once into the cache folder,
then loaded from there; what the converter makes of it equals a direct conversion of the release."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from editmgt_jax import checkpoints, hub
from editmgt_jax.checkpoints.layout import CheckpointError
from editmgt_jax.tools.tiny_release import make_release

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(release: str, hub_cache: str, repo_id: str, commit: str = COMMIT) -> str:
    """Write ``release`` into ``hub_cache`` as the hub client stores a download of ``repo_id`` at
    ``commit`` (branch ``main``): content-addressed blobs, relative symlinks in the snapshot."""
    storage = os.path.join(hub_cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(storage, "snapshots", commit)
    os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    for root, _, files in os.walk(release):
        for f in files:
            src = os.path.join(root, f)
            rel = os.path.relpath(src, release)
            data = open(src, "rb").read()
            blob = os.path.join(storage, "blobs", hashlib.sha256(data).hexdigest())
            with open(blob, "wb") as fh:
                fh.write(data)
            dst = os.path.join(snap, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(dst)), dst)
    with open(os.path.join(storage, "refs", "main"), "w") as fh:
        fh.write(commit)
    return snap


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    release = make_release(os.path.join(REPO, "tests", "fixtures", "editmgt-tiny-v1"), str(tmp / "release"))
    hf_home = tmp / "hf"
    snap = lay_out_hub_cache(release, str(hf_home / "hub"), "WeiChow/EditMGT")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
           "EDITMGT_JAX_CACHE": str(tmp / "converted"), "PYTHONPATH": REPO}
    return {"tmp": tmp, "release": release, "snapshot": snap, "env": env}


def _run(env, *args, code=None):
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_specs():
    assert hub.parse_spec("hf:WeiChow/EditMGT") == ("WeiChow/EditMGT", None)
    assert hub.parse_spec("hf:WeiChow/EditMGT@v1") == ("WeiChow/EditMGT", "v1")
    assert hub.parse_spec("WeiChow/EditMGT") == ("WeiChow/EditMGT", None)
    for bad in ("hf:EditMGT", "hf:a/b/c", "hf:/x", "hf:a b/c"):
        with pytest.raises(CheckpointError, match="expected a hub repository"):
            hub.parse_spec(bad)
    assert hub.is_hub_spec("hf:a/b") and not hub.is_hub_spec("ckpt/a") and not hub.is_hub_spec(None)
    assert hub.converted_path("A/B", COMMIT, root="/c") == f"/c/A--B/{COMMIT}"


def test_from_pretrained_offline_converts_once_and_matches_a_direct_conversion(hub_env):
    env = hub_env["env"]
    code = ("import json, os, time\nfrom editmgt_jax import hub\nfrom editmgt_jax.editor import Editor\n"
            "t = time.time()\ned = Editor.from_pretrained('WeiChow/EditMGT')\nfirst = time.time() - t\n"
            "mtime = os.path.getmtime(os.path.join(ed.path, 'config.json'))\n"
            "t = time.time()\nagain = Editor.load('hf:WeiChow/EditMGT')\nsecond = time.time() - t\n"
            "print(json.dumps({'path': ed.path, 'again': again.path, 'first': first, 'second': second,"
            " 'same_mtime': mtime == os.path.getmtime(os.path.join(again.path, 'config.json')),"
            " 'doc': ed.doc}))")
    proc = _run(env, code=code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    conv = os.path.join(env["EDITMGT_JAX_CACHE"], "WeiChow--EditMGT", COMMIT)
    assert out["path"] == out["again"] == conv
    assert out["same_mtime"]                                   # the second load converted nothing
    assert proc.stderr.count("[hub] converting hf:WeiChow/EditMGT") == 1
    assert out["doc"]["hub"] == {"repo_id": "WeiChow/EditMGT", "commit": COMMIT}
    assert os.path.realpath(out["doc"]["source"]) == os.path.realpath(hub_env["snapshot"])
    assert "`hf:WeiChow/EditMGT`" in open(os.path.join(conv, "README.md")).read()   # the model card
    # the same weights as converting the release folder directly
    from editmgt_jax.convert import convert_release

    direct = convert_release(hub_env["release"], str(hub_env["tmp"] / "direct"), log=lambda m: None)
    ref_doc = checkpoints.read_config(direct)
    assert set(out["doc"]["components"]) == set(ref_doc["components"])
    assert out["doc"]["conventions"] == ref_doc["conventions"]
    for name in ref_doc["components"]:
        a = checkpoints.load_component(conv, name)
        b = checkpoints.load_component(direct, name)
        import jax

        la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
        assert [p for p, _ in la] == [p for p, _ in lb]
        for (p, x), (_, y) in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{name} {p}")


def test_infer_edit_takes_a_hub_id_offline(hub_env):
    out = hub_env["tmp"] / "edited.png"
    proc = _run(hub_env["env"], "infer.edit", "--checkpoint", "hf:WeiChow/EditMGT", "--image",
                os.path.join(REPO, "examples", "shapes.png"), "--instruction", "make the circle red",
                "--size", "64", "--steps", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    assert Image.open(out).size == Image.open(os.path.join(REPO, "examples", "shapes.png")).size


def test_a_repository_missing_from_the_offline_cache_is_one_line(hub_env):
    proc = _run(hub_env["env"], "infer.edit", "--checkpoint", "hf:Someone/Missing", "--image",
                os.path.join(REPO, "examples", "shapes.png"), "--instruction", "make it red",
                "--out", str(hub_env["tmp"] / "never.png"))
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: hf:Someone/Missing: not in the local hub cache"), err
    assert "HF_HUB_OFFLINE is set" in err[0]
    assert not (hub_env["tmp"] / "never.png").exists()


def test_a_snapshot_that_is_not_a_release_is_named(tmp_path, monkeypatch):
    bad = tmp_path / "release"
    (bad / "scheduler").mkdir(parents=True)
    (bad / "scheduler" / "scheduler_config.json").write_text("{}")
    lay_out_hub_cache(str(bad), str(tmp_path / "hub"), "Org/NotARelease")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"^hf:Org/NotARelease: .*vqvae"):
        hub.checkpoint_folder("Org/NotARelease", cache_dir=str(tmp_path / "hub"),
                              convert_root=str(tmp_path / "conv"), log=lambda m: None)
    assert not (tmp_path / "conv" / "Org--NotARelease" / COMMIT).exists()
