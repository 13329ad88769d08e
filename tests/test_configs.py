"""The shipped configs build the models they describe, with the released parameter counts."""

from flax import nnx

from configs import editmgt_1024, tiny
from editmgt_jax.models.layers import param_count
from editmgt_jax.models.transformer import EditTransformer, TransformerConfig
from editmgt_jax.models.vq import VQConfig, VQModel
from editmgt_jax.sampling.config import SamplerSettings


def _count(model_cls, cfg) -> int:
    return param_count(nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0))))[1])


def test_released_config_parameter_counts():
    c = editmgt_1024.get_config()
    tcfg = TransformerConfig.from_official(c.model.transformer)
    assert _count(EditTransformer, tcfg) == 1_009_306_624
    assert _count(VQModel, VQConfig.from_official(c.model.vq)) == 146_244_675
    s = SamplerSettings(**c.sampler)
    assert max(s.consolidation_blocks) < tcfg.num_blocks
    assert s.consolidation_blocks[0] == tcfg.num_layers + 14  # single-stream block 14


def test_tiny_config_matches_fixture():
    c = tiny.get_config()
    tcfg = TransformerConfig.from_official(c.model.transformer)
    assert (tcfg.num_layers, tcfg.num_single_layers, tcfg.inner_dim) == (2, 3, 32)
    s = SamplerSettings(**c.sampler)
    assert all(tcfg.num_layers <= b < tcfg.num_blocks for b in s.consolidation_blocks)
