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
import sys

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


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_arg(argv) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_flags(argv):
    """absl flag parsing with one-line errors (exit status 2) for a missing config file, a config
    override naming no field, and any other flag error."""
    path = _config_arg(argv)
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
        _fail(f"--config {path}: no such file")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        # A --config.FIELD=VALUE override of a field the config lacks, or a value of the wrong type.
        import re

        raw = " ".join(str(e).replace("\\'", "'").replace("\\n", " ").split())
        field = (re.findall(r"'(\w+)'", raw) or [""])[0]
        flag = next((a for a in argv[1:] if a.startswith("--config.") and field and field in a),
                    "a --config.FIELD override")
        if isinstance(e, (KeyError, AttributeError)) and field:
            hint = re.search(r'[Dd]id you mean "\w+"', raw)
            _fail(f"{flag}: the config has no field {field!r}" + (f" ({hint[0].lower()}?)" if hint else ""))
        _fail(f"{flag}: {raw.strip(chr(39))}")


def main(argv):
    import logging as py_logging

    py_logging.getLogger("absl").addFilter(_QuietOrbax())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = _CONFIG.value
    except Exception as e:  # noqa: BLE001  (the config file itself failed to load)
        cause = e.__cause__ or e.__context__ or e
        _fail(f"--config {_config_arg(sys.argv)}: cannot be loaded ({type(cause).__name__}: {cause})")
    if config is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    _init_distributed()
    from editmgt_jax import checkpoints, compile_cache

    compile_cache.enable()   # EDITMGT_COMPILATION_CACHE=off: none
    from editmgt_jax.training.checkpoint import CheckpointConfigError, CheckpointDamagedError
    from editmgt_jax.training.config_checks import TrainConfigError
    from editmgt_jax.training.loop import train
    from editmgt_jax.training.workdir import WorkdirBusyError

    try:
        result = train(config, _WORKDIR.value)
    except (FileNotFoundError, WorkdirBusyError, CheckpointDamagedError, CheckpointConfigError,
            TrainConfigError, checkpoints.CheckpointError) as e:
        _fail(str(e))
    import jax

    if jax.process_index() == 0:
        last = result.losses.get(result.final_step)
        print(f"done: step {result.final_step}" + (f", loss {last:.4f}" if last is not None else "")
              + (f", model in {result.model_dir}" if result.model_dir else ""))


if __name__ == "__main__":
    if any(a in ("--help", "-h", "--helpshort", "-?") for a in sys.argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True)   # absl exits 1 after help; asking is not an error
        sys.exit(0)
    app.run(main, flags_parser=parse_flags)
