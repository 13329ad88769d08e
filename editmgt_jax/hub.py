"""Models by hub id: the official release (or any repository in its layout) is downloaded with
``huggingface_hub.snapshot_download``, converted once into a cache folder, and loaded from there.

    Editor.from_pretrained("WeiChow/EditMGT")              # or Editor.load("hf:WeiChow/EditMGT")
    python -m infer.edit --checkpoint hf:WeiChow/EditMGT --image photo.jpg --instruction "..."

- Download: only the files the converter reads (each component folder's ``*.json``,
  ``*.safetensors``, tokenizer files; never the ``*.bin`` copies), into the hub cache
  (``HF_HOME`` / ``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``). With ``HF_HUB_OFFLINE=1``
  nothing is fetched: the revision is resolved from the cache's ``refs/`` and its snapshot used.
- Conversion: once per repository and commit into ``CACHE/<org>--<name>/<commit>`` (``CACHE``:
  ``$EDITMGT_JAX_CACHE``, else ``$XDG_CACHE_HOME/editmgt-jax``, else ``~/.cache/editmgt-jax``;
  ``-bfloat16`` is appended for a bf16 conversion), atomically: a later load of the same commit
  reads the converted folder and converts nothing; a new commit of the release converts again.
- A repository that already holds a model checkpoint of ours (``config.json`` of format
  ``editmgt-jax/model`` at its root) is loaded from the snapshot as it is.

Every failure is a ``CheckpointError`` whose message names the repository (``hf:ORG/NAME``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import numpy as np

from editmgt_jax.checkpoints.layout import FORMAT, CheckpointError, is_model_checkpoint

PREFIX = "hf:"
DEFAULT_REPO = "WeiChow/EditMGT"

# What the converter reads from a release (editmgt_jax.convert: component folders, tokenizers,
# scheduler) and what a checkpoint of ours holds; nothing else is downloaded.
_RELEASE_DIRS = ("vqvae", "editmgt", "transformer", "text_encoder", "llm_encoder", "tokenizer", "llm_tokenizer",
                 "scheduler")
RELEASE_PATTERNS = tuple(f"{d}/*.{ext}" for d in _RELEASE_DIRS
                         for ext in ("json", "safetensors", "txt", "model")) + ("model_index.json",)
CHECKPOINT_PATTERNS = ("config.json", "README.md", "vocab.txt", "params/*", "tokenizer/*", "llm_tokenizer/*")


def is_hub_spec(spec) -> bool:
    """Whether ``spec`` names a hub repository (``hf:ORG/NAME[@REVISION]``)."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``hf:ORG/NAME[@REVISION]`` -> ``(repo_id, revision)``; ``CheckpointError`` when malformed."""
    body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    repo, _, revision = body.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo):
        raise CheckpointError(f"{spec}: expected a hub repository as hf:ORG/NAME or hf:ORG/NAME@REVISION")
    return repo, (revision or None)


def cache_root() -> str:
    """Where converted releases are kept (see the module doc)."""
    if os.environ.get("EDITMGT_JAX_CACHE"):
        return os.path.abspath(os.environ["EDITMGT_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "editmgt-jax")


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError("loading by hub id needs huggingface_hub (pip install huggingface_hub)") from None
    return huggingface_hub


def snapshot(repo_id: str, revision: str | None = None, *, cache_dir: str | None = None) -> str:
    """The local snapshot folder of ``repo_id`` at ``revision`` (default: the main branch), downloaded
    into the hub cache when missing (offline: from the cache only)."""
    hub = _hub()
    from huggingface_hub import errors

    where = f"{PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    try:
        return hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                     allow_patterns=list(RELEASE_PATTERNS + CHECKPOINT_PATTERNS),
                                     library_name="editmgt-jax")
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{where}: no such repository on the hub (or it is private: log in with "
                              f"`hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{where}: the repository has no revision {revision!r}") from None
    except errors.GatedRepoError:
        raise CheckpointError(f"{where}: the repository is gated; accept its terms on the hub and log in") from None
    except errors.LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        raise CheckpointError(
            f"{where}: not in the local hub cache ({cache_dir or hub.constants.HF_HUB_CACHE}) and "
            + ("HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached")
            + "; download it once with network access") from None
    except errors.IncompleteSnapshotError as e:
        raise CheckpointError(f"{where}: the cached snapshot is incomplete ({str(e).split('. ')[0]}); "
                              f"download it again with network access") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: {first}") from None


def converted_path(repo_id: str, commit: str, *, dtype=np.float32, root: str | None = None) -> str:
    """The cache folder of ``repo_id`` at ``commit`` converted in ``dtype``."""
    name = np.dtype(dtype).name
    leaf = commit if name == "float32" else f"{commit}-{name}"
    return os.path.join(root or cache_root(), repo_id.replace("/", "--"), leaf)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def checkpoint_folder(repo_id: str, revision: str | None = None, *, cache_dir: str | None = None,
                      convert_root: str | None = None, dtype=np.float32,
                      log: Callable[[str], None] = _log) -> str:
    """A model checkpoint folder for ``repo_id`` at ``revision``: the snapshot itself when it is one
    of ours, else the release converted once into the cache (``converted_path``)."""
    snap = snapshot(repo_id, revision, cache_dir=cache_dir)
    if is_model_checkpoint(snap):
        return snap
    if os.path.isfile(os.path.join(snap, "config.json")):
        raise CheckpointError(f"{PREFIX}{repo_id}: config.json at the root is not of format {FORMAT!r} and the "
                              f"repository is not in the release layout")
    commit = os.path.basename(os.path.normpath(snap))
    out = converted_path(repo_id, commit, dtype=dtype, root=convert_root)
    if is_model_checkpoint(out):
        return out
    from editmgt_jax.convert import ConversionError, convert_release

    log(f"[hub] converting {PREFIX}{repo_id} (commit {commit[:12]}) into {out}; this happens once")
    try:
        convert_release(snap, out, dtype=dtype, overwrite=os.path.exists(out), log=log)
    except ConversionError as e:
        raise CheckpointError(f"{PREFIX}{repo_id}: {e}") from None
    # where it came from, in config.json and the model card
    from editmgt_jax.checkpoints.card import write_model_card
    from editmgt_jax.checkpoints.layout import dump_config, read_config

    doc = read_config(out)
    doc["hub"] = {"repo_id": repo_id, "commit": commit}
    dump_config(out, doc)
    write_model_card(out, doc)
    return out


def resolve(spec, *, dtype=np.float32, log: Callable[[str], None] = _log):
    """``hf:ORG/NAME[@REVISION]`` -> its local model checkpoint folder (``checkpoint_folder``);
    anything else is returned unchanged."""
    if not is_hub_spec(spec):
        return spec
    repo, revision = parse_spec(spec)
    return checkpoint_folder(repo, revision, dtype=dtype, log=log)
