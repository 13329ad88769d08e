"""The tiny reference model of ``tests/fixtures/editmgt-tiny-v1`` (random weights, official layouts).

Its configs are the fixture's own ``*_config.json`` files; the sampler settings are those of the
fixture's deterministic pipeline case (4 steps, guidance 6, strength 1.1, lambda 0.3 over all
single-stream blocks).
"""

import json
import os

import ml_collections

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "tests", "fixtures", "editmgt-tiny-v1")


def _read(name: str) -> dict:
    with open(os.path.join(FIXTURE, name)) as fh:
        return json.load(fh)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.resolution = 1024
    c.fixture_dir = FIXTURE
    c.model = ml_collections.ConfigDict()
    c.model.transformer = _read("transformer_config.json")
    c.model.vq = _read("vqvae_config.json")
    c.model.clip = _read("clip_text_config.json")
    c.model.gemma = _read("gemma2_config.json")
    c.sampler = ml_collections.ConfigDict(dict(
        steps=4, hold_threshold=0.3, consolidation_blocks=(2, 3, 4),
    ))
    return c
