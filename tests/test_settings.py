"""One settings record: every sampler setting is declared once (default, check, flag) in
``SamplerSettings``; the static and traced views, the checkpoint's conventions and the command-line
flags are derived from it."""

import argparse
import dataclasses
import inspect

import numpy as np
import pytest

from editmgt_jax import checkpoints
from infer.flags import add_sampler_flags, sampler_overrides
from editmgt_jax.sampling import schedule
from editmgt_jax.sampling.config import MODEL, Knobs, ModelFacts, SamplerConfig, SamplerSettings


def _parser():
    p = argparse.ArgumentParser()
    add_sampler_flags(p)
    return p


def test_every_tunable_setting_has_one_flag_one_default_and_one_check():
    actions = {}
    for a in _parser()._actions:
        if a.dest != "help":
            actions.setdefault(a.dest, []).append(a)
    fields = SamplerSettings.fields()
    assert len({f.name for f in fields}) == len(fields)
    for f in fields:
        assert f.default is not dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f.name
        assert callable(f.metadata["check"]), f.name
        if f.metadata["kind"] == MODEL:      # facts of the model: from its conventions, never a flag
            assert f.name not in actions and not f.metadata["flags"], f.name
            continue
        assert len(actions.get(f.name, [])) == 1, f.name
        (action,) = actions[f.name]
        assert action.default is None and action.option_strings[0] == f.metadata["flags"][0], f.name
    assert set(actions) == set(SamplerSettings.tunable())
    # every setting a checkpoint may recommend is a field of the record, the facts excepted
    assert set(checkpoints.SAMPLER_KEYS) == {f.name for f in fields} - set(checkpoints.conventions.FACT_KEYS)


def test_the_views_declare_no_defaults_of_their_own():
    def defaulted(cls):
        return {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    assert defaulted(ModelFacts) == set()
    assert defaulted(SamplerConfig) == {"record", "record_logits"}
    assert not hasattr(Knobs, "create")
    params = inspect.signature(schedule.temperature_schedule).parameters.values()
    assert all(p.default is inspect.Parameter.empty for p in params)
    # the release demo's settings are the record's defaults
    d = SamplerSettings()
    assert checkpoints.RELEASE_SAMPLER == dict(steps=d.steps, guidance_scale=d.guidance_scale,
                                               reference_strength=d.reference_strength,
                                               temperature_start=d.temperature_start,
                                               temperature_end=d.temperature_end)


def test_a_flag_reaches_the_knobs_through_the_record():
    """``--hold-threshold`` -> ``sampler_overrides`` -> the conventions' record -> the traced knob."""
    conv = checkpoints.Conventions(mask_token_id=9, sampler={"steps": 3, "consolidation_blocks": [0, 1]})
    over = sampler_overrides(_parser().parse_args(["--hold-threshold", "0.25", "--guidance", "2",
                                                   "--temperature-start", "1", "--composite", "map"]))
    settings = conv.settings(**over)
    cfg, knobs = settings.split()
    assert float(knobs.hold_threshold) == 0.25 and float(knobs.guidance_scale) == 2.0
    np.testing.assert_allclose(knobs.temperatures, [1.0, 0.5, 0.0])
    assert (cfg.steps, cfg.consolidation_blocks, cfg.model.mask_token_id) == (3, (0, 1), 9)
    assert settings.composite == "map" and settings.reference_strength == SamplerSettings().reference_strength
    # None keeps the recommendation; an unknown name or a bad value is named
    assert conv.settings(steps=None).steps == 3
    with pytest.raises(ValueError, match="unknown sampler setting"):
        conv.settings(stpes=4)
    with pytest.raises(ValueError, match="keep_source=1.5"):
        conv.settings(keep_source=1.5)
    # the same check, named by its flag, before anything loads
    with pytest.raises(ValueError, match=r"^--keep-source 1.5: a probability"):
        sampler_overrides(_parser().parse_args(["--keep-source", "1.5"]))


def test_conventions_validate_their_recommendations_with_the_record():
    with pytest.raises(checkpoints.CheckpointError, match="composite='map' needs"):
        checkpoints.Conventions(mask_token_id=9, sampler={"composite": "map"})
    with pytest.raises(checkpoints.CheckpointError, match="steps=0"):
        checkpoints.Conventions(mask_token_id=9, sampler={"steps": 0})
    with pytest.raises(checkpoints.CheckpointError, match="unknown sampler setting"):
        checkpoints.Conventions(mask_token_id=9, sampler={"mask_token_id": 3})


def test_the_shipped_checkpoint_reads_its_one_record():
    from editmgt_jax.editor import DEFAULT_CHECKPOINT

    doc = checkpoints.read_config(DEFAULT_CHECKPOINT)
    conv = checkpoints.read_conventions(doc)
    s = conv.settings()
    assert (s.steps, s.greedy, s.consolidation_blocks, s.timestep_convention) == (1, True, (0, 1, 2, 3),
                                                                                  "mask_fraction")
    # an older checkpoint without the record rebuilds the same settings from its legacy fields
    # (the fields a checkpoint written before the record carried: ``sampler_defaults`` with the
    # timestep convention inside, and ``timestep_convention``)
    legacy = {k: v for k, v in doc.items() if k != "conventions"}
    legacy["sampler_defaults"] = dict(doc["conventions"]["sampler"], timestep_convention=conv.timestep_convention,
                                      micro_conds=[64.0, 64.0, 0.0, 0.0, conv.aesthetic_score], resolution=conv.resolution)
    legacy["timestep_convention"] = conv.timestep_convention
    old = checkpoints.read_conventions(legacy).settings()
    assert old == s
