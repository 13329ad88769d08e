"""What the training loop trains, by task: the editor (masked-token transformer) and the VQ tokenizer.

The loop (``editmgt_jax.training.loop``) is the same for both; a :class:`Task` supplies what differs:

- the frozen modules the run uses but does not train (:class:`FrozenEncoders`: the editor's VQ
  tokenizer and release text encoders; none for the VQ task);
- the initial parameters of a fresh run (``init_from``, or the editor's ``code_embedding_init``);
- the compiled steps (``step.make_steps`` with the task's loss and frozen modules) and the step's
  inputs besides the batch (``step_inputs``);
- its own periodic work (the editor's held-out edit evaluation) and its sample grids;
- what its export writes (the editor's conventions record, its VQ tokenizer and text side).

``make_task(config, ...)`` picks the task of ``config.task``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

from editmgt_jax.training import batches
from editmgt_jax.training.frozen import (add_release_text, load_frozen_text, load_frozen_vq, load_init_params,
                                         load_uncond_text)
from editmgt_jax.training.hooks import Hook


@dataclasses.dataclass(frozen=True)
class FrozenModule:
    """A module run inside the step without training: its program and its arrays ``(params, rest)``."""

    program: Any                     # editmgt_jax.training.state.ModelProgram
    arrays: tuple[Any, Any]

    def module(self):
        return self.program.merge(*self.arrays)


@dataclasses.dataclass(frozen=True)
class FrozenEncoders:
    """The frozen modules of an editor run.

    Attributes:
      vq: the VQ tokenizer (images -> ids inside the step when the data is pixels; also the held-out
        evaluation's and the sample grids' tokenizer, and exported with the model). None when the
        data is pre-tokenised and ``editor.vq_checkpoint`` is not set.
      vq_config: the tokenizer's ``VQConfig`` dict (exported with it).
      text: the release's CLIP + Gemma-2 (``editor.text.kind="release"``), run in the step.
      text_checkpoint: the checkpoint ``text`` came from (its components are copied into the export).
      uncond: ``(text_states [1, L, D], pooled [1, P])`` float32, the empty prompt's encoding
        (condition dropout; ``"release"``: computed by ``text``, ``"precomputed"``:
        ``editor.uncond_text``); None when not needed.
    """

    vq: FrozenModule | None = None
    vq_config: Mapping | None = None
    text: FrozenModule | None = None
    text_checkpoint: str | None = None
    uncond: tuple[Any, Any] | None = None

    @classmethod
    def load(cls, config, mesh, rules, compiler_options, *, codebook: int) -> "FrozenEncoders":
        """Load what ``config`` needs (the release text first: a bad checkpoint fails fast); the
        tokenizer must have ``codebook`` codewords (what the transformer predicts)."""
        text = text_checkpoint = uncond = vq = vq_config = None
        if config.editor.text.kind == "release":
            text_prog, text_arrays, uncond, text_checkpoint = load_frozen_text(config, mesh, rules, compiler_options)
            text = FrozenModule(text_prog, text_arrays)
        if not config.data.tokens_dir or config.editor.vq_checkpoint:
            vq_prog, vq_arrays, vq_config = load_frozen_vq(config, mesh, rules, compiler_options)
            vq = FrozenModule(vq_prog, vq_arrays)
            if vq_config["num_vq_embeddings"] != codebook:
                raise ValueError(f"the VQ tokenizer has {vq_config['num_vq_embeddings']} codewords but "
                                 f"the transformer predicts {codebook} (editor.transformer.codebook_size)")
        if config.editor.text.kind == "precomputed":
            uncond = load_uncond_text(config).get("uncond")
        return cls(vq=vq, vq_config=vq_config, text=text, text_checkpoint=text_checkpoint, uncond=uncond)

    def programs(self) -> dict[str, Any]:
        """``name -> ModelProgram`` of the modules the step merges (``step.make_steps``)."""
        return {name: m.program for name, m in (("text", self.text), ("vq", self.vq)) if m is not None}

    def step_arrays(self) -> dict[str, Any]:
        """The step's ``aux["frozen"]``: each module's arrays by name, and ``uncond``."""
        out: dict[str, Any] = {name: m.arrays for name, m in (("text", self.text), ("vq", self.vq))
                               if m is not None}
        if self.uncond is not None:
            out["uncond"] = self.uncond
        return out


@dataclasses.dataclass
class Export:
    """What a task adds to the exported model checkpoint (``checkpoint.export_model``)."""

    conventions: Any = None          # checkpoints.Conventions (editor); None: nothing to compare
    vq_params: Any = None
    vq_config: Mapping | None = None
    tokenizer: Any = None
    metadata: dict = dataclasses.field(default_factory=dict)     # into metadata["training"]
    finish: Any = None               # folder -> None, run after the components are written


class Task(Protocol):
    """What the loop asks of a task. ``program`` is the run's ``TrainProgram``; ``rest`` the trained
    model's non-parameter variables (set by the loop once the state exists)."""

    name: str
    program: Any
    rest: Any

    def initial_params(self) -> Mapping | None:
        """A fresh run's starting parameters (None: the random initialisation)."""

    def step_inputs(self) -> dict:
        """The step's inputs besides the state and the batch (``step.make_steps``'s ``aux``)."""

    def make_steps(self, example_batch, *, rules, gather_fsdp: bool, compiler_options):
        """The compiled train / eval steps (``step.TrainSteps``) for batches like ``example_batch``."""

    def tokens_per_example(self, batch) -> int:
        """Token positions per example (the throughput's unit)."""

    def periodic(self) -> list[Hook]:
        """The task's own periodic hooks, run after the checkpoint and the evaluation loss and before
        the sample grids (``hooks``)."""

    def sampler(self, eval_raw, mesh):
        """The sample grids' maker (``previews.Sampler``)."""

    def export(self) -> Export:
        """The export's parts besides the trained parameters."""


class _TaskBase:
    name = ""

    def __init__(self, config, program, tokenizer, frozen: FrozenEncoders):
        self.config = config
        self.program = program
        self.tokenizer = tokenizer
        self.frozen = frozen
        self.rest = None

    def step_inputs(self) -> dict:
        return {"rest": self.rest, "frozen": self.frozen.step_arrays()}

    def make_steps(self, example_batch, *, rules, gather_fsdp: bool, compiler_options):
        from editmgt_jax.training.step import loss_from_config, make_steps

        return make_steps(self.program, loss_from_config(self.config), self.frozen.programs(), example_batch,
                          self.step_inputs(), rules=rules, gather_fsdp=gather_fsdp,
                          compiler_options=compiler_options)

    def tokens_per_example(self, batch) -> int:
        return batches.tokens_per_example(self.config, batch, self.frozen.programs())

    def periodic(self) -> list[Hook]:
        return []

    def sampler(self, eval_raw, mesh):
        from editmgt_jax.training.previews import Sampler

        return Sampler(self.config, self.program, self.rest, self.frozen, eval_raw, mesh, self.tokenizer)


class VQTask(_TaskBase):
    """The VQ tokenizer: reconstruction, codebook and commitment losses on images; no frozen modules."""

    name = "vq"

    def initial_params(self) -> Mapping | None:
        return load_init_params(self.config, self.program) if self.config.init_from else None

    def export(self) -> Export:
        return Export(tokenizer=self.tokenizer, metadata={"timestep_convention": None})


class EditorTask(_TaskBase):
    """The editor: masked-token prediction of the target given the source and the instruction, over
    the frozen encoders; a held-out edit evaluation with the program users run."""

    name = "editor"
    _evaluator = None

    def initial_params(self) -> Mapping | None:
        if self.config.init_from:
            init = load_init_params(self.config, self.program)
            if init is not None:
                return init
        from editmgt_jax.training.code_init import initial_params

        vq = self.frozen.vq
        return initial_params(self.config, self.program, vq.program if vq else None, vq.arrays if vq else None)

    def periodic(self) -> list[Hook]:
        return [Hook("edit_eval", int(self.config.train.edit_eval_every), self._edit_eval, at_end=True,
                     single_process=True)]

    def _edit_eval(self, run, step_no: int, state) -> None:
        """Held-out edits with the program users run (``edit_eval.EditEval``): ``edit_eval/*`` scalars
        and ``eval_*`` metric rows; its time is not training throughput."""
        import time

        from absl import logging

        if self._evaluator is None:
            from editmgt_jax.training.edit_eval import EditEval

            self._evaluator = EditEval(self.config, self.program, self.rest, self.frozen, self.tokenizer,
                                       per_category=int(self.config.train.edit_eval_per_category))
        t_eval = time.perf_counter()
        ev = self._evaluator(state.params)
        run.writer.scalars(step_no, "edit_eval", ev)
        if run.lead:
            run.writer.step(step_no, {f"eval_{k}": v for k, v in ev.items()})
            logging.info("step %d held-out clean success %.3f (inside %.3f, kept outside %.3f), "
                         "leak %.1f dB, map AUROC %.3f (%.0f s)", step_no, ev["clean_success"],
                         ev["inside_success"], ev["kept_outside"], ev["leak_psnr_src"], ev["map_auroc"],
                         time.perf_counter() - t_eval)
        run.exclude_from_throughput(time.perf_counter() - t_eval)

    def export(self) -> Export:
        from editmgt_jax.training.checkpoint import editor_conventions

        f = self.frozen
        text_checkpoint = f.text_checkpoint
        meta: dict = {"timestep_convention": self.config.editor.timestep_convention}
        if text_checkpoint is not None:
            meta.update(text_kind="release", text_checkpoint=text_checkpoint)
        return Export(conventions=editor_conventions(self.config),
                      vq_params=f.vq.arrays[0] if f.vq is not None else None, vq_config=f.vq_config,
                      tokenizer=self.tokenizer if text_checkpoint is None else None, metadata=meta,
                      finish=None if text_checkpoint is None else
                      (lambda folder: add_release_text(folder, text_checkpoint)))


def make_task(config, program, mesh, rules, tokenizer, compiler_options=None) -> Task:
    """The task of ``config.task``, its frozen modules loaded."""
    if config.task == "vq":
        return VQTask(config, program, tokenizer, FrozenEncoders())
    if config.task != "editor":
        raise ValueError(f"config.task={config.task!r}: choose 'editor' or 'vq'")
    # Under LoRA the output layer is frozen: it is with the model's other variables (``rest``).
    weights = program.model.abstract_params if program.lora is None else program.model.abstract_rest
    codebook = weights["transformer"]["mlm_layer"]["conv2"]["kernel"].shape[-1]
    frozen = FrozenEncoders.load(config, mesh, rules, compiler_options, codebook=codebook)
    return EditorTask(config, program, tokenizer, frozen)


__all__ = ["EditorTask", "Export", "FrozenEncoders", "FrozenModule", "Task", "VQTask", "make_task"]
