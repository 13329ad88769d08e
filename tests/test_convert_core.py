"""The conversion machinery on a small module: layouts, error reporting, checkpoint round trip."""

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from editmgt_jax import checkpoints
from editmgt_jax.convert import core
from editmgt_jax.convert.core import ConversionError, Rule, TensorSource, convert_tensors
from editmgt_jax.models.layers import Conv2d, Linear, RMSNorm


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Linear(4, 6, rngs=rngs), Linear(6, 4, rngs=rngs)])
        self.conv = Conv2d(4, 5, 3, rngs=rngs)
        self.norm = RMSNorm(5, rngs=rngs)

    def __call__(self, x):  # x [B, H, W, 4]
        return self.norm(self.conv(self.blocks[1](self.blocks[0](x))))


RULES = [
    Rule(r"blocks\.(\d+)\.weight", r"blocks/\1/kernel", core.linear),
    Rule(r"blocks\.(\d+)\.bias", r"blocks/\1/bias"),
    Rule(r"conv\.weight", "conv/kernel", core.conv),
    Rule(r"conv\.bias", "conv/bias"),
    Rule(r"norm\.weight", "norm/scale"),
    Rule(r"position_ids", None),
]


def official(rng):
    return {
        "blocks.0.weight": rng.normal(size=(6, 4)).astype(np.float32),
        "blocks.0.bias": rng.normal(size=(6,)).astype(np.float32),
        "blocks.1.weight": rng.normal(size=(4, 6)).astype(np.float32),
        "blocks.1.bias": rng.normal(size=(4,)).astype(np.float32),
        "conv.weight": rng.normal(size=(5, 4, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=(5,)).astype(np.float32),
        "norm.weight": rng.normal(size=(5,)).astype(np.float32),
        "position_ids": np.arange(7, dtype=np.int64),
    }


def torch_forward(sd, x):
    """The official computation written directly in numpy (NCHW conv, [out, in] linears)."""
    h = x @ sd["blocks.0.weight"].T + sd["blocks.0.bias"]
    h = h @ sd["blocks.1.weight"].T + sd["blocks.1.bias"]
    hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros(h.shape[:3] + (5,), np.float64)
    for dy in range(3):
        for dx in range(3):
            out += hp[:, dy:dy + h.shape[1], dx:dx + h.shape[2]] @ sd["conv.weight"][:, :, dy, dx].T
    out += sd["conv.bias"]
    return out / np.sqrt(np.mean(out**2, -1, keepdims=True) + 1e-6) * sd["norm.weight"]


def abstract():
    return nnx.split(nnx.eval_shape(lambda: Toy(nnx.Rngs(0))))[1].to_pure_dict()


def test_convert_matches_official_computation(tmp_path):
    sd = official(np.random.default_rng(0))
    save_file(sd, str(tmp_path / "w.safetensors"))
    params = convert_tensors(TensorSource([tmp_path / "w.safetensors"]), RULES, abstract())
    model = nnx.eval_shape(lambda: Toy(nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    x = np.random.default_rng(1).normal(size=(2, 5, 6, 4)).astype(np.float32)
    np.testing.assert_allclose(nnx.merge(graphdef, state)(x), torch_forward(sd, x), rtol=1e-4, atol=1e-4)


def test_sharded_folder_with_index(tmp_path):
    sd = official(np.random.default_rng(0))
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:4]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[4:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    import json
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f"model-0000{1 if i < 4 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}}))
    src = TensorSource.from_dir(tmp_path)
    assert len(src) == len(sd)
    convert_tensors(src, RULES, abstract())


def test_errors_name_every_problem(tmp_path):
    sd = official(np.random.default_rng(0))
    sd["blocks.1.wieght"] = sd.pop("blocks.1.weight")  # renamed
    sd["conv.weight"] = sd["conv.weight"][:, :, :2]     # reshaped
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError) as e:
        convert_tensors(TensorSource([tmp_path / "bad.safetensors"]), RULES, abstract(), component="toy")
    msg = str(e.value)
    assert "blocks.1.wieght" in msg and "not mapped" in msg
    assert "blocks/1/kernel" in msg and "missing" in msg
    assert "conv.weight" in msg and "wrong shape" in msg
    assert msg.startswith("toy:")


def test_unreadable_file_is_named(tmp_path):
    p = tmp_path / "broken.safetensors"
    p.write_bytes(b"not a safetensors file")
    with pytest.raises(ConversionError, match="broken.safetensors"):
        TensorSource([p])
    with pytest.raises(ConversionError, match="no \\*.safetensors"):
        TensorSource.from_dir(_empty(tmp_path))
    with pytest.raises(ConversionError, match="not a directory"):
        TensorSource.from_dir(tmp_path / "nowhere")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_model_checkpoint_round_trip_and_config_mismatch(tmp_path):
    sd = official(np.random.default_rng(0))
    save_file(sd, str(tmp_path / "w.safetensors"))
    params = convert_tensors(TensorSource([tmp_path / "w.safetensors"]), RULES, abstract())
    path = checkpoints.save_model(tmp_path / "ckpt", {"toy": params}, {"toy": {"width": 4}})
    assert checkpoints.read_config(path)["components"]["toy"] == {"width": 4}
    back = checkpoints.load_component(path, "toy", abstract())
    for a, b in zip(sorted(core.flatten_abstract(params).items()), sorted(core.flatten_abstract(back).items())):
        np.testing.assert_array_equal(a[1], b[1])
    wrong = abstract()
    import jax
    wrong["conv"]["kernel"] = jax.ShapeDtypeStruct((3, 3, 4, 7), np.float32)
    with pytest.raises(checkpoints.CheckpointError, match="conv/kernel"):
        checkpoints.load_component(path, "toy", wrong)
    with pytest.raises(checkpoints.CheckpointError, match="already exists"):
        checkpoints.save_model(path, {"toy": params}, {"toy": {}})
    with pytest.raises(checkpoints.CheckpointError, match="no config.json"):
        checkpoints.read_config(tmp_path)
