"""Training checkpoints: Orbax ``CheckpointManager`` with three named items per step.

    WORKDIR/checkpoints/<step>/state/    TrainState (params, optimizer state, step, RNG), sharded arrays
    WORKDIR/checkpoints/<step>/config/   the run's config as JSON (what the state was trained with)
    WORKDIR/checkpoints/<step>/data/     the data iterator's position (one JSON per process, Grain)

Saves are asynchronous: ``save`` returns once the arrays are copied to host memory (Orbax's
default synchronous device-to-host transfer, so donating the state to the next step is safe) and
writing continues in the background. Orbax writes each step into a temporary
``<step>.orbax-checkpoint-tmp-*`` directory and renames it when every item is complete, so a
process killed mid-save leaves only a temporary directory that ``latest_step`` never reports
(and that the next manager removes).

Restoring takes the target ``TrainState`` of ``jax.ShapeDtypeStruct``s carrying the target
shardings (``TrainProgram.abstract_state``), so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax

from editmgt_jax.training import losses
from editmgt_jax.training.state import TrainState

STATE_FIELDS = ("step", "params", "opt_state", "rng")


class CheckpointDamagedError(RuntimeError):
    """No training checkpoint of a run can be read back."""


class CheckpointConfigError(ValueError):
    """A checkpoint reads back but does not fit the run's config (it is left where it is)."""


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def tree_shapes(tree) -> dict[str, tuple]:
    """``{"params/transformer/.../kernel": shape}`` of a pytree of arrays, shape structs or Orbax
    array metadata (named tuples and dicts spelled alike, as Orbax stores them)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()) or ())
            for path, leaf in leaves}


def shape_differences(saved: Mapping[str, tuple], wanted: Mapping[str, tuple], limit: int = 4) -> str:
    """The differing entries of two ``tree_shapes`` as one short phrase ('' when they agree)."""
    diffs = []
    for name in sorted(set(saved) | set(wanted)):
        a, b = saved.get(name), wanted.get(name)
        if a == b:
            continue
        diffs.append(f"{name} " + ("absent from the checkpoint" if a is None else
                                   "not in the model now" if b is None else f"{a} in the checkpoint, {b} now"))
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"{len(diffs) - limit} more"]
    return "; ".join(diffs)


def _state_tree(state: TrainState) -> dict:
    return {f: getattr(state, f) for f in STATE_FIELDS}


def config_to_json(config) -> dict:
    """A ConfigDict / mapping as plain JSON types."""
    from editmgt_jax import checkpoints

    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=checkpoints.json_default))


class TrainCheckpointer:
    """Keep-N, asynchronous Orbax checkpoints of a training run.

    Args:
      directory: where step folders go (created).
      keep: number of most recent checkpoints kept (older ones are deleted).
      async_save: write in the background (``wait`` / ``close`` block until done).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "config", "data"),
                                             options=options)

    # -------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest complete checkpoint (temporary, unfinished ones are never reported)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: TrainState, config=None, data_iterator=None, *,
             force: bool = False) -> bool:
        """Start saving ``state`` (and ``config``, ``data_iterator``) as checkpoint ``step``.

        The data iterator must be positioned after the last batch consumed by ``state``.
        Returns whether a save was started.
        """
        import grain

        ocp = self._ocp
        items = {"state": ocp.args.StandardSave(_state_tree(state))}
        if config is not None:
            items["config"] = ocp.args.JsonSave(config_to_json(config))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: TrainState, step: int | None = None,
                data_iterator=None) -> tuple[TrainState, dict | None]:
        """Restore checkpoint ``step`` (default: the latest) onto the shardings of ``abstract_state``.

        ``data_iterator`` (if given) is moved to the saved position in place. Returns the state and
        the saved config (or None when the checkpoint has none).
        """
        import grain

        ocp = self._ocp
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
        target = _state_tree(abstract_state)
        items = {"state": ocp.args.StandardRestore(target)}
        saved = self._item_names(step)
        if "config" in saved:
            items["config"] = ocp.args.JsonRestore()
        if data_iterator is not None:
            if "data" not in saved:
                raise FileNotFoundError(f"{self.directory}/{step}: checkpoint has no data iterator "
                                        "state; cannot resume the data stream exactly")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        tree = out["state"]
        state = TrainState(**{f: tree[f] for f in STATE_FIELDS})
        config = out["config"] if "config" in saved else None
        return state, config

    def restore_latest(self, abstract_state: TrainState, data_iterator=None, check_config=None
                       ) -> tuple[int, TrainState, dict | None] | None:
        """Restore the newest checkpoint that reads back completely: ``(step, state, config)``, or
        None when there is no checkpoint.

        A checkpoint that reads back but does not fit the run is never damage: its saved config is
        read first and given to ``check_config(saved)`` (which raises ``CheckpointConfigError`` for
        a config the state cannot continue under), and a state whose arrays do not match
        ``abstract_state`` (names or shapes, from the checkpoint's own metadata) raises
        ``CheckpointConfigError`` naming them. Either way every checkpoint stays where it is.

        Restoring reads every byte, so a damaged newest checkpoint (a truncated or missing file, an
        unreadable index or config) fails here; it is then moved aside to
        ``<directory>/damaged-<step>-<time>/`` (kept for inspection, out of the step numbering so
        the step can be written again) and the next older one is tried. Each skip is logged and
        recorded in ``self.skipped`` as ``(step, reason)``. (With several processes the damaged
        folder is left in place.)
        """
        from editmgt_jax.checkpoints import quiet_orphaned_reads

        quiet_orphaned_reads()          # reads of a damaged checkpoint left in flight print nothing
        self.skipped: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            where = os.path.join(self.directory, str(step))
            try:
                saved = self.read_config(step) if "config" in self._item_names(step) else None
            except Exception as e:  # noqa: BLE001  (an unreadable config is damage)
                self._skip(step, e)
                continue
            if check_config is not None:
                try:
                    check_config(saved)
                except CheckpointConfigError as e:
                    raise CheckpointConfigError(f"{where}: {e}") from None
            try:
                state, config = self.restore(abstract_state, step, data_iterator=data_iterator)
            except Exception as e:  # noqa: BLE001  (any read failure means: not usable)
                mismatch = self._state_mismatch(step, abstract_state)
                if mismatch:
                    raise CheckpointConfigError(
                        f"{where}: the saved state does not fit the model this config builds ({mismatch}); "
                        "rerun with the config it was trained with, or use a new --workdir "
                        "(the checkpoints are kept)") from None
                self._skip(step, e)
                continue
            return step, state, config
        if self.skipped:
            raise CheckpointDamagedError(
                f"{self.directory}: no checkpoint reads back completely (skipped steps "
                f"{', '.join(str(s) for s, _ in self.skipped)}); the damaged ones are kept as damaged-*/")
        return None

    def _state_mismatch(self, step: int, abstract_state: TrainState) -> str:
        """How the saved state's arrays differ from ``abstract_state`` by name and shape, read from
        the checkpoint's metadata ('' when they agree or the metadata itself cannot be read)."""
        ocp = self._ocp
        log = logging.getLogger("absl")
        level = log.level
        log.setLevel(logging.ERROR)           # Orbax warns and returns no tree for an unreadable index
        try:
            with ocp.StandardCheckpointer() as reader:
                meta = reader.metadata(os.path.join(self.directory, str(step), "state"))
            saved = tree_shapes(getattr(meta, "item_metadata", meta) or {})
        except Exception:  # noqa: BLE001  (unreadable metadata is damage, not a mismatch)
            return ""
        finally:
            log.setLevel(level)
        if not saved:                         # an emptied or truncated index: damage
            return ""
        return shape_differences(saved, tree_shapes(_state_tree(abstract_state)))

    def _skip(self, step: int, e: Exception) -> None:
        """Move an unreadable checkpoint aside and record why."""
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        aside = self._move_aside(step)
        self.skipped.append((step, reason))
        logging.warning("checkpoint step %d skipped, it cannot be read back (%s); %s",
                        step, reason, f"moved to {aside}" if aside else "left in place")

    def _move_aside(self, step: int) -> str | None:
        import jax

        if jax.process_count() > 1:   # several processes share the folder: leave it where it is
            return None
        self.manager.wait_until_finished()
        aside = os.path.join(self.directory, f"damaged-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(os.path.join(self.directory, str(step)), aside)
        self.manager.reload()
        return aside

    def _item_names(self, step: int) -> set[str]:
        path = os.path.join(self.directory, str(step))
        return {n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))}

    def read_config(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        ocp = self._ocp
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------------------------------
# Model checkpoints for inference


def export_model(path: str | os.PathLike, config, params: Mapping[str, Any], *,
                 vq_params: Mapping | None = None, vq_config: Mapping | None = None,
                 tokenizer=None, overwrite: bool = False, metadata: Mapping | None = None,
                 finish=None) -> str:
    """Write a model checkpoint (``editmgt_jax.checkpoints`` layout, what ``Editor.load`` reads)
    from trained parameters.

    editor task: components ``transformer`` (+ ``small_text`` when trained) and ``vq`` (from
    ``vq_params``/``vq_config``, the frozen tokenizer the editor was trained on), the word
    tokenizer's ``vocab.txt``, and the one ``conventions`` record (:func:`editor_conventions`: mask
    id, the timestep the sampler must feed, ``"mask_fraction"`` for models trained with that
    convention and ``"step_index"`` (the release's) for ``"release"`` fine-tunes, the
    micro-conditions, the resolution and the recommended sampler settings).
    vq task: component ``vq`` only.

    Atomic: the folder appears complete (tokenizer files and whatever ``finish(folder)`` adds
    included) or not at all, so a run killed while exporting never leaves a half-written model.
    """
    from editmgt_jax import checkpoints
    from editmgt_jax.training import state as state_lib

    params = jax.device_get(params)
    comps: dict[str, Any] = {}
    cfgs: dict[str, Any] = {}
    meta = {"training": {"task": config.task}}
    if config.task == "editor":
        comps["transformer"] = params["transformer"]
        cfgs["transformer"] = state_lib.transformer_config(config).to_dict()
        if params.get("text_encoder") is not None:
            comps["small_text"] = params["text_encoder"]
            cfgs["small_text"] = state_lib.small_text_config(config).to_dict()
        if vq_params is not None:
            comps["vq"] = jax.device_get(vq_params)
            cfgs["vq"] = dict(vq_config)
        meta["training"]["timestep_convention"] = config.editor.timestep_convention
        meta["conventions"] = editor_conventions(config).to_dict()
    else:
        comps["vq"] = params
        cfgs["vq"] = state_lib.vq_config(config).to_dict()
    extra = dict(metadata or {})
    training = {**meta["training"], **dict(extra.pop("training", None) or {})}
    meta.update(extra)
    # the whole training config rides along (the model card summarises it: data, batch, optimizer)
    meta["training"] = {**training, "config": config_to_json(config)}

    def complete(folder: str) -> None:
        if tokenizer is not None:
            checkpoints.save_word_tokenizer(folder, tokenizer)
        if finish is not None:
            finish(folder)

    return checkpoints.save_model(path, comps, cfgs, metadata=meta, overwrite=overwrite, finish=complete)


def editor_conventions(config):
    """The conventions record an editor config exports (``checkpoints.Conventions``): the one
    record the exported model, the trainer's held-out evaluation and its previews are driven by.
    The config's ``editor.sampler_defaults`` are its recommended sampler settings (``negative_prompt``
    there is the record's negative prompt)."""
    from editmgt_jax import checkpoints
    from editmgt_jax.training.step import mask_token_id

    recommended = dict(config.editor.sampler_defaults)
    negative_prompt = str(recommended.pop("negative_prompt", ""))
    try:
        return checkpoints.Conventions(
            mask_token_id=mask_token_id(config),
            timestep_convention=losses.sampler_timestep_convention(config.editor.timestep_convention),
            aesthetic_score=float(config.editor.aesthetic),
            negative_prompt=negative_prompt, resolution=int(config.data.resolution), sampler=recommended,
            source="the training config (editor.transformer / init_from)")
    except checkpoints.CheckpointError as e:
        raise ValueError(f"config.editor.sampler_defaults: {str(e).split('sampler settings: ', 1)[-1]}") from None


def load_vq(path: str | os.PathLike, dtype=None):
    """The ``vq`` component of a model checkpoint as a ``VQModel`` (e.g. a tokenizer exported by a
    ``vq`` training run), for ``python -m train.pretokenize --vq-loader
    editmgt_jax.training.checkpoint:load_vq --vq-checkpoint PATH``."""
    from editmgt_jax import checkpoints

    return checkpoints.load_module(os.path.expanduser(os.fspath(path)), "vq", dtype=dtype)
