"""FSDP memory of the compiled medium train step: parameters gathered per block vs for the whole step.

    python -m bench.fsdp_memory [--devices 8] [--batch 8] [--modes step,block] [--no-record]

Compiles the real train step (``editmgt_jax.training.step``) of the medium configuration of
``bench.train`` (83.1M-parameter transformer, small text encoder, 32x32 ids) on a mesh of
``--devices`` host CPU devices, all on the ``fsdp`` axis, once per ``gather_fsdp`` mode, and prints
the per-device figures of ``compiled.memory_analysis()``: arguments (the sharded train state and
batch), outputs, temporaries (everything live inside the step: gathered parameters, activations,
gradients) and their sum, next to the model's parameter bytes, their share per device and the
largest block's (what one gathered block costs). ``step`` gathers every parameter at the start of
the step; ``block`` gathers each transformer block right before it runs and again in the backward
pass, which recomputes the block. Nothing is run, so the numbers are the compiler's, independent of
load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys


def measure(mode, batch: int) -> dict:
    import jax

    from bench.train import _batch, _config
    from editmgt_jax.parallel import make_mesh
    from editmgt_jax.training.state import TrainProgram
    from editmgt_jax.training.step import BLOCK_LISTS, global_batch, loss_from_config, make_steps

    config, shape = _config("medium")
    mesh = make_mesh({"fsdp": len(jax.devices())})
    program = TrainProgram.create(config, mesh)
    state, rest = program.init_state(0)
    aux = {"rest": rest, "frozen": {}}
    host = _batch(config, shape, batch)
    steps = make_steps(program, loss_from_config(config), {}, host, aux, gather_fsdp=mode)
    data = global_batch(host, mesh)
    compiled = steps.train.lower(state, data, aux).compile()
    m = compiled.memory_analysis()
    def nbytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    abstract = program.model.abstract_params
    params = nbytes(abstract)
    blocks = [b for name in BLOCK_LISTS for b in abstract["transformer"][name].values()]
    mib = 1 / 2 ** 20
    return dict(mode=str(mode), devices=len(jax.devices()), batch=batch, params_mib=params * mib,
                shard_mib=params / len(jax.devices()) * mib, block_mib=max(map(nbytes, blocks)) * mib,
                argument_mib=m.argument_size_in_bytes * mib, output_mib=m.output_size_in_bytes * mib,
                alias_mib=m.alias_size_in_bytes * mib, temp_mib=m.temp_size_in_bytes * mib,
                total_mib=(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                           + m.temp_size_in_bytes) * mib)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fsdp_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--modes", default="step,block")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rows = []
    for mode in args.modes.split(","):
        rows.append(measure(mode, args.batch))
        print(json.dumps(rows[-1]), flush=True)
    head = ("| gather_fsdp | devices | batch | model params (MiB) | params / devices | largest block "
            "| arguments | outputs | aliased | temporaries | total per device (MiB) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    table = head + "\n".join(
        f"| {r['mode']} | {r['devices']} | {r['batch']} | {r['params_mib']:.0f} | {r['shard_mib']:.0f} "
        f"| {r['block_mib']:.0f} | {r['argument_mib']:.0f} "
        f"| {r['output_mib']:.0f} | {r['alias_mib']:.0f} | {r['temp_mib']:.0f} | {r['total_mib']:.0f} |"
        for r in rows) + "\n"
    print(table)
    if not args.no_record:
        from bench.results import append_to_section
        import jax
        command = "python -m bench.fsdp_memory " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        text = (f"\n`{command}` ({datetime.date.today().isoformat()}; jax {jax.__version__}, "
                f"{args.devices} host CPU devices on the fsdp axis; compiler figures, no run, so "
                f"independent of the load average, {load})\n\n" + table)
        append_to_section("## FSDP memory", text, intro=__doc__.split("\n\n", 2)[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
