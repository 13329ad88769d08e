"""Train the EditMGT editor or its VQ tokenizer: one CPU, one GPU or a pod, same code and config.

    python -m train.main --config configs/editor_tiny.py --workdir runs/editor_tiny \\
        [--config.FIELD=VALUE ...]

    # multi-host: one process per host (on TPU pods and SLURM, --distributed finds the arguments)
    python -m train.main --config ... --workdir ... --coordinator_address=HOST:PORT \\
        --num_processes=N --process_id=I

The task ('editor' or 'vq') comes from the config. The editor's text side is
``editor.text.kind``: "small" (a small encoder trained jointly), "precomputed" (text states in the
batch) or "release" (the frozen CLIP + Gemma-2 encoders of ``editor.text.checkpoint``, default
``init_from``, run inside the step on instructions tokenised by the checkpoint's tokenizers; see
configs/editor_release_finetune.py). The editor trains with the timestep convention
``editor.timestep_convention`` (default "mask_fraction": the transformer's timestep is the fraction
of masked target tokens; see editmgt_jax.training.losses), recorded in the exported model. The run
resumes from the newest complete checkpoint in WORKDIR/checkpoints (state, config and data
position), so re-running the same command after a pre-emption continues exactly where the last
checkpoint left off.

Outputs in WORKDIR: see editmgt_jax.training.loop (checkpoints/, metrics.jsonl, tensorboard/,
samples/, loss.png, model/).
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-host runs (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with auto-detected arguments "
                                 "(TPU pods, SLURM, ...).")


def _init_distributed() -> None:
    import jax

    if _COORDINATOR.value or _NUM_PROCESSES.value:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            # CPU hosts exchange collectives over gloo (the default CPU client has none across processes).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


class _QuietOrbax:
    """Drop Orbax's per-save INFO chatter from the console (warnings and errors still show)."""

    def filter(self, record) -> bool:
        import logging as py_logging

        return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def main(argv):
    import logging as py_logging

    py_logging.getLogger("absl").addFilter(_QuietOrbax())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    _init_distributed()
    from editmgt_jax.training.loop import train

    result = train(_CONFIG.value, _WORKDIR.value)
    import jax

    if jax.process_index() == 0:
        last = result.losses.get(result.final_step)
        print(f"done: step {result.final_step}" + (f", loss {last:.4f}" if last is not None else "")
              + (f", model in {result.model_dir}" if result.model_dir else ""))


if __name__ == "__main__":
    app.run(main)
