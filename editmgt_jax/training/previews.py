"""Preview grids during training: the current parameters' outputs on a fixed evaluation batch."""

from __future__ import annotations

import numpy as np

from editmgt_jax.training.batches import prepare_batch


def image_grid(columns: list[np.ndarray]) -> np.ndarray:
    """Columns of ``[N, H, W, 3]`` images in [0, 1] (or uint8) -> one ``[N*H, C*W, 3] uint8`` grid."""
    cols = []
    for c in columns:
        c = np.asarray(c)
        if c.dtype != np.uint8:
            c = np.round(np.clip(np.nan_to_num(c.astype(np.float32)), 0, 1) * 255).astype(np.uint8)
        cols.append(np.concatenate(list(c), axis=0))
    return np.concatenate(cols, axis=1)


class Sampler:
    """Periodic sample grids of the current parameters.

    vq: input | reconstruction, on a fixed evaluation batch. editor: source | target | edit of the
    first ``train.num_samples`` held-out items, edited by the program users run (the ``Editor`` of
    the current parameters with the run's exported settings; ``edit_eval.EditEval``), at the
    items' own size.
    """

    def __init__(self, config, program, rest, frozen, eval_raw, mesh, tokenizer=None):
        """``rest``: the trained model's non-parameter variables; ``frozen``: the run's
        ``tasks.FrozenEncoders``."""
        import jax

        self.config = config
        self.program = program
        self.rest = rest
        self.frozen = frozen
        self.raw = {k: v[: int(config.train.num_samples)] for k, v in eval_raw.items()}
        self.mesh = mesh
        self.available = config.task == "vq" or (frozen.vq is not None and config.editor.text.kind == "small")
        self._fn = None
        self._edits = None
        self._tokenizer = tokenizer
        self._jax = jax

    def grid(self, params) -> np.ndarray | None:
        if not self.available:
            return None
        if self.config.task == "vq":
            return self._vq_grid(params)
        if self._edits is None:
            from editmgt_jax.training.edit_eval import EditEval

            self._edits = EditEval(self.config, self.program, self.rest, self.frozen, self._tokenizer,
                                   per_category=1, batch_size=int(self.config.train.num_samples))
            self._edits.items = self._edits.items[: int(self.config.train.num_samples)]
        editor = self._edits.editor(params)
        (items, res), = self._edits.edit_all(editor)[:1]
        return image_grid([np.stack([it["source"] for it in items]), np.stack([it["target"] for it in items]),
                           np.stack(list(res.images[: len(items)]))])

    def _vq_grid(self, params) -> np.ndarray:
        if self._fn is None:
            import jax

            from editmgt_jax.training.step import to_unit_range

            model_prog = self.program.model
            self._fn = jax.jit(lambda params, rest, images: model_prog.merge(params, rest)(
                to_unit_range(images))[0])
        batch = prepare_batch(self.raw, self.config)
        images = batch["image"][: len(self.raw["target"])]
        recon = self._jax.device_get(self._fn(params, self.rest, images))
        return image_grid([images, recon])
