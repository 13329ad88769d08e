"""The training loop: run (or resume) training as configured, one CPU, one GPU or a pod.

The run resumes from the newest complete checkpoint in WORKDIR/checkpoints (state, config and data
position), so re-running after a pre-emption continues exactly where the last checkpoint left off.

The loop is the same for every task: what differs (frozen modules, initial parameters, the compiled
steps, the editor's held-out edits, the export) is the task's (``editmgt_jax.training.tasks``);
the periodic work after a step is a list of hooks, each with its own period
(``editmgt_jax.training.hooks``). :class:`StepRunner` is the one place a train step is run,
:class:`StepRecorder` where its metrics are recorded.

Outputs in WORKDIR:
    checkpoints/<step>/   Orbax checkpoints (editmgt_jax.training.checkpoint)
    metrics.jsonl         one JSON line per step (loss, accuracy, grad norm, LR, ...)
    tensorboard/          TensorBoard event files (train/*, eval/*, throughput)
    samples/step_N.png    sample grids (vq: input | reconstruction; editor: source | target | edit)
    loss.png              loss curve at the end
    curves.png            editor: held-out edit success and changed-token accuracy over steps
                          (``train.edit_eval_every``; editmgt_jax.training.edit_eval)
    model/                an inference checkpoint for ``Editor.load`` (editmgt_jax.checkpoints)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from editmgt_jax.training.batches import example_ids, pipeline_config, prepare_batch
from editmgt_jax.training.frozen import load_init_params
from editmgt_jax.training.metrics_log import MetricWriter, plot_curves, plot_losses, read_losses
from editmgt_jax.training.tokenizers import make_tokenizer


class NonFiniteLossError(RuntimeError):
    """A step produced a non-finite loss or gradient; ``step`` and ``batch`` say which."""

    def __init__(self, step: int, batch_position: int, example_ids, metrics: Mapping, dump: str | None):
        self.step = step
        self.batch_position = batch_position
        self.example_ids = example_ids
        self.metrics = dict(metrics)
        self.dump = dump
        ids = ", ".join(str(int(i)) for i in example_ids[:16]) if example_ids is not None else "n/a"
        super().__init__(
            f"non-finite loss or gradient at step {step} (loss={metrics.get('loss')}, "
            f"grad_norm={metrics.get('grad_norm')}): batch #{batch_position} of the data stream, "
            f"example ids [{ids}{', ...' if example_ids is not None and len(example_ids) > 16 else ''}]"
            + (f"; batch saved to {dump}" if dump else "")
            + ". The state was left at the last finite step (checkpoints are unaffected).")


@dataclasses.dataclass
class TrainResult:
    final_step: int
    losses: dict[int, float]         # step -> loss, for the steps run by this call
    workdir: str
    model_dir: str | None


# Fields that may change when a run resumes: how the optimizer goes on from the saved state.
_RESUMABLE_OPTIM = ("learning_rate", "schedule", "warmup_steps", "decay_steps", "min_lr_ratio", "b1", "b2",
                    "eps", "weight_decay", "grad_clip")


def _flat(doc, prefix: str = "") -> dict[str, Any]:
    if isinstance(doc, Mapping):
        out: dict[str, Any] = {}
        for k, v in doc.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(doc) if isinstance(doc, tuple) else doc}


def _changes(saved: Mapping, now: Mapping, keys) -> list[str]:
    a, b = _flat({k: saved.get(k) for k in keys if k in saved}), _flat({k: now.get(k) for k in keys if k in saved})
    return [f"{name} {a.get(name, '(absent)')!r} -> {b.get(name, '(absent)')!r}"
            for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]


def check_resume_config(saved: Mapping | None, config) -> list[str]:
    """Whether a run may continue from a checkpoint saved with config ``saved``.

    The model (``task``, ``editor`` but its recommended sampler settings, ``vq``) and the optimizer
    state's layout (``optim.grad_accum_steps``) must be the checkpoint's: otherwise
    ``CheckpointConfigError`` names every differing field, checkpoint value -> value now. The
    learning rate, its schedule and the other optimizer hyper-parameters may change: those
    changes are returned (``"optim.learning_rate 0.001 -> 0.0005"``) for the run to say.
    """
    if not saved:
        return []
    from editmgt_jax.training.checkpoint import CheckpointConfigError, config_to_json
    from editmgt_jax.training.fields import EDITOR_DEFAULTS

    now = config_to_json(config)

    def model_part(doc: Mapping) -> dict:
        # The recommended sampler settings shape only the export, not the training: changing them
        # and rerunning a finished run re-exports the model.
        part = {k: doc.get(k) for k in ("task", "editor", "vq") if k in doc}
        if isinstance(part.get("editor"), Mapping):
            # A field a saved config does not name was read with its declared default (checkpoints
            # written before it was declared); a run saved before editor.lora existed resumes: lora
            # off is the same training.
            editor = {**json.loads(json.dumps(EDITOR_DEFAULTS)), **part["editor"]}
            part["editor"] = {k: v for k, v in editor.items() if k != "sampler_defaults"
                              and not (k == "lora" and not (v or {}).get("enabled"))}
        if doc.get("task") == "vq":
            part.pop("editor", None)
        part["optim"] = {"grad_accum_steps": (doc.get("optim") or {}).get("grad_accum_steps")}
        return part

    fixed = _changes(model_part(saved), model_part(now), ("task", "editor", "vq", "optim"))
    if fixed:
        shown = fixed[:6] + ([f"{len(fixed) - 6} more"] if len(fixed) > 6 else [])
        raise CheckpointConfigError(
            f"trained with another config: {'; '.join(shown)} (checkpoint -> now); rerun with the "
            "checkpoint's values or use a new --workdir (the checkpoints are kept)")
    optim = lambda doc: {"optim": {k: v for k, v in (doc.get("optim") or {}).items() if k in _RESUMABLE_OPTIM}}
    return _changes(optim(saved), optim(now), ("optim",))


def train(config, workdir: str, *, compiler_options: Mapping[str, Any] | None = None,
          progress: bool = True) -> TrainResult:
    """Run (or resume) training as configured; returns the losses of the steps run here.

    The data is opened before the workdir is created (a dataset that is not built fails at once and
    leaves nothing behind), and process 0 holds ``WORKDIR/.lock`` for the whole run
    (``editmgt_jax.training.workdir``): a second run into the same workdir stops, naming this one.
    """
    import jax

    from editmgt_jax.data.pipeline import make_dataset
    from editmgt_jax.training.config_checks import TrainConfigError, check_train_config, check_workdir
    from editmgt_jax.training.workdir import WorkdirLock

    check_train_config(config)
    check_workdir(workdir)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    pidx, pcount = jax.process_index(), jax.process_count()
    tokenizer = make_tokenizer(config)
    dataset = make_dataset(pipeline_config(config, config.data.split, pcount), tokenize=tokenizer,
                           shard_index=pidx, shard_count=pcount)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise TrainConfigError(f"--workdir {workdir}: cannot be created ({e.strerror or e})") from None
    lock = WorkdirLock(workdir) if pidx == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        return _train(config, workdir, dataset, tokenizer, compiler_options=compiler_options,
                      progress=progress)
    finally:
        if lock is not None:
            lock.release()


class StepRunner:
    """Runs the compiled train step: the one place the loop invokes it.

    ``__call__(state, raw)`` brings one host batch to the devices, compiles the task's steps on the
    first call and runs one optimizer call, returning the new state and the step's metrics (device
    arrays, fetched one step later by :class:`StepRecorder`)."""

    def __init__(self, config, task, mesh, rules, compiler_options):
        self.config, self.task, self.mesh, self.rules = config, task, mesh, rules
        self.compiler_options = compiler_options
        self.steps = None                   # step.TrainSteps, compiled for the first batch
        self.inputs = None                  # the step's inputs besides state and batch
        self.tokens_per_example = None

    def __call__(self, state, raw):
        from editmgt_jax.training.step import global_batch

        batch = global_batch(prepare_batch(raw, self.config), self.mesh, self.rules)
        if self.steps is None:
            self.inputs = self.task.step_inputs()
            self.steps = self.task.make_steps(batch, rules=self.rules, gather_fsdp=bool(self.config.gather_fsdp),
                                              compiler_options=self.compiler_options)
            self.tokens_per_example = self.task.tokens_per_example(batch)
        return self.steps.train(state, batch, self.inputs)

    def eval(self, params, raw, key):
        """The eval step's metrics on one held-out host batch (after the first train step)."""
        from editmgt_jax.training.step import global_batch

        batch = global_batch(prepare_batch(raw, self.config), self.mesh, self.rules)
        return self.steps.eval(params, batch, self.inputs, key)


class StepRecorder:
    """Records each step's metrics one step late (the host does not wait for the device): a row of
    ``metrics.jsonl``, the progress bar, and every ``train.log_every`` steps the mean of the window
    with its throughput as ``train/*`` scalars. A non-finite step stops the run
    (:class:`NonFiniteLossError`, its batch saved)."""

    def __init__(self, config, workdir: str, lead: bool, writer, pbar, runner: StepRunner, num_steps: int):
        self.config, self.workdir, self.lead, self.writer, self.pbar = config, workdir, lead, writer, pbar
        self.runner, self.num_steps = runner, num_steps
        self.losses: dict[int, float] = {}
        self.pending = None
        self.window: list[dict] = []
        self.t_window = time.perf_counter()

    def add(self, step_no: int, metrics, position: int, raw) -> None:
        """Record the previous step, keep this one in flight."""
        self.flush()
        self.pending = (step_no, metrics, position, raw)

    def flush(self) -> None:
        """Record the step still in flight."""
        if self.pending is not None:
            item, self.pending = self.pending, None
            self._finish(*item)

    def exclude_from_throughput(self, seconds: float) -> None:
        self.t_window += seconds

    def _finish(self, step_no: int, metrics, position: int, raw) -> None:
        import jax

        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not m.pop("finite"):
            dump = None
            if self.lead:
                dump = os.path.join(self.workdir, f"nonfinite_batch_step{step_no}.npz")
                np.savez_compressed(dump, **raw)
            self.writer.step(step_no, m)
            raise NonFiniteLossError(step_no, position, example_ids(raw), m, dump)
        self.losses[step_no] = m["loss"]
        self.writer.step(step_no, m)
        self.window.append(m)
        self.pbar.update(1)
        if step_no % int(self.config.train.log_every) == 0 or step_no == self.num_steps:
            now = time.perf_counter()
            window = self.window
            mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            dt = max(now - self.t_window, 1e-9)
            examples = len(window) * int(self.config.train.batch_size)
            mean["examples_per_s"] = examples / dt
            if self.runner.tokens_per_example:
                mean["tokens_per_s"] = examples * self.runner.tokens_per_example / dt
            self.writer.scalars(step_no, "train", mean)
            postfix = {"loss": f"{mean['loss']:.4f}"}
            if "tokens_per_s" in mean:
                postfix["tok/s"] = f"{mean['tokens_per_s']:.3g}"
            else:
                postfix["ex/s"] = f"{mean['examples_per_s']:.3g}"
            self.pbar.set_postfix(postfix)
            self.window, self.t_window = [], now


@dataclasses.dataclass
class RunContext:
    """What the periodic hooks see of the run (``hooks.Run``)."""

    config: Any
    workdir: str
    lead: bool
    process_count: int
    num_steps: int
    writer: Any
    recorder: StepRecorder

    def exclude_from_throughput(self, seconds: float) -> None:
        self.recorder.exclude_from_throughput(seconds)


def _train(config, workdir: str, dataset, tokenizer, *, compiler_options: Mapping[str, Any] | None,
           progress: bool) -> TrainResult:
    import jax
    from tqdm import tqdm

    from editmgt_jax.data.pipeline import make_dataset
    from editmgt_jax.parallel import make_mesh
    from editmgt_jax.training.checkpoint import TrainCheckpointer, export_model
    from editmgt_jax.training.hooks import checkpoint_hook, eval_hook, samples_hook
    from editmgt_jax.training.state import TrainProgram, mesh_shape_from_config, rules_from_config
    from editmgt_jax.training.tasks import make_task
    from editmgt_jax.training.workdir import export_matches, trim_metrics

    pidx, pcount = jax.process_index(), jax.process_count()
    lead = pidx == 0
    mesh = make_mesh(mesh_shape_from_config(config))
    rules = rules_from_config(config)
    program = TrainProgram.create(config, mesh, rules)
    if lead:
        logging.info("mesh %s, %.2f%% of parameter bytes replicated", dict(mesh.shape),
                     100 * program.model.replicated_fraction())
    task = make_task(config, program, mesh, rules, tokenizer, compiler_options)   # loads its frozen modules

    it = iter(dataset)
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"),
                             keep=int(config.train.keep_checkpoints),
                             async_save=bool(config.train.async_checkpoints))
    # The newest checkpoint that reads back completely (a damaged one is moved aside and named).
    said: list[str] = []

    def check_config(saved) -> None:    # per checkpoint tried: a changed optimizer setting is said
        said[:] = check_resume_config(saved, config)

    restored = ckpt.restore_latest(program.abstract_state, data_iterator=it, check_config=check_config)
    if restored is not None:
        start, state, saved_config = restored
        rest = program.model.init(int(config.seed), compiler_options)[1] if jax.tree.leaves(
            program.model.abstract_rest) else {}
        if program.lora is not None:   # the checkpoint holds the adapters; the frozen model is init_from
            rest = load_init_params(config, program)
        if lead:
            for skipped, why in ckpt.skipped:
                print(f"checkpoint step {skipped} skipped: it cannot be read back ({why}); "
                      f"resuming from step {start}", file=sys.stderr, flush=True)
            if said:
                print(f"resuming from step {start} with a changed optimizer setting: {'; '.join(said)} "
                      "(checkpoint -> now)", file=sys.stderr, flush=True)
            logging.info("resumed from %s/%d", ckpt.directory, start)
            # Steps after the checkpoint are run again: their old rows would appear twice.
            trim_metrics(os.path.join(workdir, "metrics.jsonl"), start)
    else:
        start = 0
        state, rest = program.init_state(int(config.seed), params=task.initial_params(),
                                         compiler_options=compiler_options)
    task.rest = rest

    num_steps = int(config.train.num_steps)
    writer = MetricWriter(workdir, lead)
    pbar = tqdm(total=num_steps, initial=start, disable=not (progress and lead), unit="step",
                dynamic_ncols=True)
    run_step = StepRunner(config, task, mesh, rules, compiler_options)
    recorder = StepRecorder(config, workdir, lead, writer, pbar, run_step, num_steps)
    run = RunContext(config, workdir, lead, pcount, num_steps, writer, recorder)

    def eval_dataset():
        return make_dataset(pipeline_config(config, config.data.eval_split, pcount), tokenize=tokenizer,
                            shard_index=pidx, shard_count=pcount)

    def eval_batches():
        e_it = iter(eval_dataset())
        for _ in range(int(config.train.eval_batches)):
            yield next(e_it)

    hooks = [checkpoint_hook(config, ckpt, it),
             eval_hook(config, eval_batches, run_step.eval),
             *task.periodic(),
             samples_hook(config, lambda: task.sampler(next(iter(eval_dataset())), mesh))]
    try:
        for step in range(start, num_steps):
            position = int(it.get_state().get("next_index", step)) if hasattr(it, "get_state") else step
            raw = next(it)
            state, metrics = run_step(state, raw)
            step_no = step + 1
            recorder.add(step_no, metrics, position, raw)
            for hook in hooks:
                if hook.due(step_no, num_steps, pcount):
                    recorder.flush()
                    hook.run(run, step_no, state)
        recorder.flush()
    finally:
        pbar.close()
        ckpt.close()
        writer.close()
        it.close() if hasattr(it, "close") else None

    model_dir = None
    final_step = max(start, num_steps)
    if lead and config.train.loss_plot:
        plot_losses(read_losses(workdir), os.path.join(workdir, "loss.png"),
                    f"{config.task} training loss")
        curves = {name: read_losses(workdir, key) for name, key in (
            ("held-out clean success", "eval_clean_success"),
            ("held-out inside-only success", "eval_inside_success"),
            ("held-out edit-region map AUROC", "eval_map_auroc"),
            ("held-out changed-token accuracy (edited)", "eval_changed_token_accuracy"),
            ("held-out changed-token accuracy (masked, one step)", "eval_changed_accuracy"))}
        if any(curves.values()):
            plot_curves(curves, os.path.join(workdir, "curves.png"), f"{config.task}: learning curves")
    # Export after new steps, and whenever the final state has no matching export (a run killed
    # between its last checkpoint and the export finishes the export when rerun).
    export = task.export()
    if config.train.export and (num_steps > start or not export_matches(os.path.join(workdir, "model"),
                                                                        final_step, export.conventions)):
        params = program.model.all_params(state.params, task.rest)   # LoRA: the model with its adapters
        vq_params = export.vq_params
        if pcount > 1:
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
            vq_params = (multihost_utils.process_allgather(vq_params, tiled=True)
                         if vq_params is not None else None)
        if lead:
            training_meta = {"task": config.task, "step": final_step, **export.metadata}
            from editmgt_jax.training.metrics_log import latest_evaluation

            last_eval = latest_evaluation(workdir)   # the model card's measured quality
            if last_eval is not None:
                training_meta["evaluation"] = {"metrics": last_eval["metrics"],
                                               "on": f"the held-out split during training, step {last_eval['step']}"}
            lora_meta = {} if program.lora is None else {"lora": program.lora.to_dict()}
            model_dir = export_model(os.path.join(workdir, "model"), config, params,
                                     vq_params=vq_params, vq_config=export.vq_config, tokenizer=export.tokenizer,
                                     overwrite=True, metadata={"training": training_meta, **lora_meta},
                                     finish=export.finish)
    return TrainResult(final_step=final_step, losses=recorder.losses, workdir=workdir, model_dir=model_dir)
