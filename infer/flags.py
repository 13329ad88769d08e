"""The sampler flags of the command-line tools (``infer.edit``, ``infer.evaluate``), generated from
``SamplerSettings``: one flag per tunable field, its attribute the field's name, its help and its
check the field's own. The parsed flags are ``Editor.edit`` keywords as they stand
(:func:`sampler_overrides`).
"""

from __future__ import annotations

import argparse

from editmgt_jax.sampling.config import SamplerSettings, parse_blocks


def _flag_type(parse):
    """``parse`` with its ``ValueError`` shown by argparse as it is."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def add_sampler_flags(group: argparse._ActionsContainer) -> None:
    """Add one flag per tunable ``SamplerSettings`` field to a parser or argument group (every default
    None: the checkpoint's recommendation)."""
    for f in SamplerSettings.fields():
        meta = f.metadata
        if not meta["flags"]:
            continue
        kw = dict(dest=f.name, default=None, help=meta["help"])
        parse = meta["parse"]
        if f.type in (bool, "bool"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=_flag_type(parse) if parse is parse_blocks else parse or str, choices=meta["choices"],
                      metavar=meta["metavar"] or {int: "N", float: "X"}.get(parse))
        group.add_argument(*meta["flags"], **kw)


def sampler_overrides(args) -> dict:
    """The sampler flags that were given, as ``SamplerSettings`` field -> value, each checked by the
    field's own check: ``ValueError`` naming the flag (``--guidance -5.0: must be finite and >= 0``),
    before anything loads."""
    out = {}
    for f in SamplerSettings.fields():
        value = getattr(args, f.name, None)
        if not f.metadata["flags"] or value is None:
            continue
        try:
            out[f.name] = f.metadata["check"](f.name, value)
        except ValueError as e:
            raise ValueError(f"{f.metadata['flags'][0]} {value}: {str(e).split(': ', 1)[-1]}") from None
    return out
