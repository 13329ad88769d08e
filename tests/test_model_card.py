"""Model cards: every written checkpoint carries README.md saying what it is, how it was made, its
measured quality and its conventions, from what its config.json records."""

import json
import os
import shutil

import numpy as np
import pytest

from editmgt_jax import checkpoints
from editmgt_jax.assets import DEFAULT_MODEL
from editmgt_jax.checkpoints.card import CARD_FILE, evaluation_from_report, main as card_main
from editmgt_jax.tools.tiny_release import make_release

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(REPO, "examples", "results", "default-model-report.json")


def _card(path) -> str:
    with open(os.path.join(path, CARD_FILE)) as fh:
        return fh.read()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from editmgt_jax.convert import convert_release

    tmp = tmp_path_factory.mktemp("card")
    release = make_release(os.path.join(REPO, "tests", "fixtures", "editmgt-tiny-v2"), str(tmp / "release"))
    return convert_release(release, str(tmp / "ckpt"), log=lambda m: None)


def test_a_converted_checkpoint_has_a_card(converted):
    doc = checkpoints.read_config(converted)
    card = _card(converted)
    assert "## How it was made" in card and "Converted without PyTorch" in card
    assert os.path.abspath(doc["source"]) in card and "stored as float32" in card
    # the conventions the converter read from the release (this fixture's mask id is 111, not 95)
    conv = checkpoints.read_conventions(doc)
    assert conv.mask_token_id == 111 and "| mask token id | 111 (" in card
    assert "| timestep fed to the transformer | `step_index` |" in card
    # parameter counts are those of the stored arrays
    for name in doc["components"]:
        n = sum(int(np.prod(np.shape(x))) for x in
                __import__("jax").tree_util.tree_leaves(checkpoints.load_component(converted, name)))
        assert f"| `{name}` |" in card and f"| {n:,} |" in card, name
    assert "Not measured" in card


def test_a_trained_export_card_says_how_it_was_trained(tmp_path):
    cfg = {"transformer": {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1, "num_single_layers": 1,
                           "codebook_size": 16, "vocab_size": 17, "joint_attention_dim": 16}}
    meta = {"training": {"task": "editor", "step": 1234, "timestep_convention": "mask_fraction",
                         "config": {"data": {"name": "synthetic_edits/default", "split": "train", "resolution": 64},
                                    "train": {"batch_size": 16}, "init_from": "runs/first/model",
                                    "optim": {"learning_rate": 0.001, "schedule": "cosine", "warmup_steps": 50,
                                              "weight_decay": 0.01}},
                         "evaluation": {"metrics": {"eval_edit_success": 0.4857}, "on": "the held-out split"}},
            "timestep_convention": "mask_fraction"}
    params = {"transformer": {"w": np.zeros((3, 5), np.float32), "b": np.zeros((5,), np.float32)}}
    path = checkpoints.save_model(tmp_path / "m", params, cfg, metadata=meta)
    card = _card(path)
    assert "task `editor`, 1,234 steps" in card
    assert "`synthetic_edits/default` split `train` at 64 px" in card and "batch 16" in card
    assert "learning rate 0.001 (cosine, 50 warm-up steps" in card and "`runs/first/model`" in card
    assert "| held-out edit success (sampled) | 0.4857 |" in card
    assert "| `transformer` |" in card and "| 20 |" in card          # 3*5 + 5 parameters
    assert "| mask token id | 16 (" in card                          # vocab_size - 1


def test_an_evaluation_report_becomes_the_card_s_quality(tmp_path):
    ckpt = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, ckpt)
    assert card_main([str(ckpt), "--evaluation", REPORT]) == 0
    with open(REPORT) as fh:
        base = json.load(fh)["runs"]["base"]["metrics"]
    ev = checkpoints.read_config(ckpt)["evaluation"]
    assert ev["metrics"]["edit_success"] == base["edit_success"]["mean"]
    card = _card(ckpt)
    assert f"| edit success | {base['edit_success']['mean']:.4g} |" in card
    assert "350 edits of `synthetic_edits/default:test`" in card
    with pytest.raises(ValueError, match="no run 'missing'"):
        evaluation_from_report(json.load(open(REPORT)), run="missing")


def test_card_cli_names_a_bad_report(tmp_path, capsys):
    ckpt = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, ckpt)
    before = (ckpt / "config.json").read_bytes()
    bad = tmp_path / "report.json"
    bad.write_text("{not json")
    assert card_main([str(ckpt), "--evaluation", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --evaluation ") and str(bad) in err[0]
    assert (ckpt / "config.json").read_bytes() == before        # nothing changed


def test_the_default_model_has_a_card_with_its_measured_quality():
    card = _card(DEFAULT_MODEL)
    doc = checkpoints.read_config(DEFAULT_MODEL)
    # the shipped model's evaluation (README, Evaluation: 1000 held-out edits with its own settings)
    assert doc["evaluation"]["metrics"]["clean_success"] == pytest.approx(0.171, abs=1e-4)
    assert "| clean_success | 0.171 |" in card and "## Conventions" in card
    assert f"{doc['training']['step']:,} steps" in card
