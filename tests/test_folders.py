"""editmgt_jax.folders: the one check of an output path, and whole folders written atomically."""

import os
import pathlib

import pytest

from editmgt_jax.folders import unwritable, writing_folder


def test_unwritable_names_what_is_in_the_way(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert unwritable(tmp_path / "new" / "deeper", folder=True) is None     # can be made
    assert unwritable(tmp_path, folder=True) is None                         # exists, writable
    assert unwritable(tmp_path / "out.png", folder=False) is None
    assert unwritable(afile, folder=True) == "is a file, not a folder"
    assert unwritable(afile / "sub", folder=True) == f"{afile} is a file, not a folder"
    assert unwritable(afile / "sub" / "o.png", folder=False) == f"{afile} is a file, not a folder"
    assert unwritable(afile, folder=False) is None                           # a file to replace


def test_unwritable_read_only_folder(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:   # root writes into read-only folders: the permission check is what is tested
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if (mode & os.W_OK and os.fspath(p) == str(ro))
                            else real(p, mode))
    try:
        assert unwritable(ro, folder=True) == "folder is not writable"
        assert unwritable(ro / "x" / "y", folder=True) == f"folder {ro} is not writable"
        assert unwritable(ro / "o.png", folder=False) == f"folder {ro} is not writable"
    finally:
        ro.chmod(0o755)


def test_writing_folder_replaces_on_success_and_keeps_the_old_on_error(tmp_path):
    dest = tmp_path / "dest"
    with writing_folder(dest) as tmp:
        pathlib.Path(tmp, "a").write_text("1")
    assert (dest / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with writing_folder(dest) as tmp:
            pathlib.Path(tmp, "b").write_text("2")
            raise RuntimeError("killed half-way")
    assert sorted(os.listdir(dest)) == ["a"]
    # a dead writer's temporary folder is removed by the next writer; nothing else is left beside dest
    (tmp_path / ".dest.tmp-999999999").mkdir()
    with writing_folder(dest) as tmp:
        pathlib.Path(tmp, "c").write_text("3")
    assert sorted(os.listdir(dest)) == ["c"] and sorted(os.listdir(tmp_path)) == ["dest"]
