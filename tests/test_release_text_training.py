"""Training with the release's text side (``editor.text.kind = "release"``): the frozen CLIP and
Gemma-2 encoders of a converted checkpoint run inside the jitted step.

The tiny fixture model is converted once (transformer, VQ, CLIP, Gemma-2 and tokenizers). The step's
in-step encodings must be what ``Editor`` computes for the same prompts (``ReleaseTextSide``), on one
device and on a (data, fsdp, tensor) = (2, 2, 2) mesh; the encoders never change and are not in the
optimizer state; condition dropout substitutes the empty prompt's encoding.

XLA programs are compiled with ``xla_backend_optimization_level=0`` (tiny models: compilation
dominates).
"""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import editor_tiny, tiny
from editmgt_jax import checkpoints
from editmgt_jax.parallel import DEFAULT_RULES, make_mesh
from editmgt_jax.training.state import TrainProgram, param_paths
from editmgt_jax.training.step import global_batch, loss_from_config, make_steps

FAST = {"xla_backend_optimization_level": 0}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["make the sky pink", "remove the cat", "turn the car red", "add a hat",
           "change the background to a photo of a tree", "make it dark", "put a star on the shirt",
           "replace the dog with a blue circle"]
B, GRID = len(PROMPTS), 4          # 4x4 ids -> the tiny transformer's 2x2 grid (2x down-sampling)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """The tiny fixture converted like an official release: transformer, vq, clip, gemma, tokenizers."""
    from editmgt_jax.convert import convert_release
    from editmgt_jax.tools.tiny_release import make_release

    root = tmp_path_factory.mktemp("release")
    rel = make_release(os.path.join(REPO, "tests", "fixtures", "editmgt-tiny-v1"), str(root / "rel"))
    return convert_release(rel, str(root / "ckpt"), log=lambda _: None)


def editor_config(ckpt: str, kind: str = "release", cond_dropout: float = 0.5, **text):
    """The tiny release's transformer cut to one block of each kind (randomly initialised: the
    weights do not matter here and a smaller program compiles faster); the text side from
    ``init_from`` unless ``text`` says otherwise."""
    from editmgt_jax.models.transformer import TransformerConfig

    c = editor_tiny.get_config()
    tcfg = TransformerConfig.from_official(tiny.get_config().model.transformer).to_dict()
    tcfg.update(num_layers=1, num_single_layers=1)
    c.editor.transformer = tcfg
    c.editor.text = {"kind": kind, **text}
    c.editor.cond_dropout = cond_dropout
    c.editor.timestep_convention = "release"
    c.editor.image_size = 64
    c.init_from = ckpt
    c.optim.update(learning_rate=1e-3, schedule="constant", warmup_steps=0)
    return c


@pytest.fixture(scope="module")
def editor_text(ckpt):
    """What inference computes: the Editor's text side of the checkpoint."""
    from editmgt_jax.checkpoints import load_module
    from editmgt_jax.text_side import make_text_side

    doc = checkpoints.read_config(ckpt)
    modules = {n: load_module(ckpt, n, doc["components"][n]) for n in ("clip", "gemma")}
    return make_text_side(ckpt, doc, modules)


@pytest.fixture(scope="module")
def batches(ckpt, editor_text) -> dict:
    """The same edits with host-tokenised instructions (release) and Editor-encoded states
    (precomputed), plus the Editor's encoding of the empty prompt."""
    from editmgt_jax.training.batches import prepare_batch
    from editmgt_jax.training.tokenizers import ReleaseInstructionTokenizer

    rng = np.random.RandomState(0)
    raw = dict(source_ids=rng.randint(0, 64, (B, GRID, GRID)).astype(np.int32),
               target_ids=rng.randint(0, 64, (B, GRID, GRID)).astype(np.int32),
               index=np.arange(B, dtype=np.int64), dataset_id=np.zeros(B, np.int32))
    tok = ReleaseInstructionTokenizer(ckpt)
    raw.update({f"instruction_{k}": v for k, v in tok(PROMPTS).items()})
    release = prepare_batch(raw, editor_config(ckpt))
    states, pooled = editor_text.encode(PROMPTS)
    pre = {k: v for k, v in release.items() if k not in ("clip_ids", "gemma_ids")}
    pre.update(text_states=states, pooled=pooled)
    return {"release": release, "precomputed": pre,
            "empty": editor_text.encode([""], allow_empty=True)}


KEY = jax.random.key_data(jax.random.key(3))


def _flat(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): np.asarray(v) for p, v in flat}


@pytest.fixture(scope="module")
def params0(ckpt):
    """One random draw of the transformer's parameters, shared by every run (drawn with numpy:
    cheaper than compiling the initialiser)."""
    c = editor_config(ckpt)
    program = TrainProgram.create(c, make_mesh((1, 1, 1), jax.devices()[:1]))
    rng = np.random.RandomState(1)

    def draw(path, a):
        x = rng.normal(0.0, 0.1, a.shape).astype(np.float32)
        return x + 1 if str(getattr(path[-1], "key", "")) == "scale" else x

    return jax.tree_util.tree_map_with_path(draw, program.model.abstract_params)


@pytest.fixture(scope="module")
def release_run(ckpt, batches, params0):
    """shape -> the release-text trainer's pieces on that mesh (built once per shape)."""
    from editmgt_jax.training.frozen import load_frozen_text

    runs = {}

    def get(shape):
        if shape not in runs:
            c = editor_config(ckpt)
            mesh = make_mesh(shape, jax.devices()[: int(np.prod(shape))])
            program = TrainProgram.create(c, mesh)
            state, rest = program.init_state(0, params=params0, compiler_options=FAST)
            text_prog, text_arrays, uncond, path = load_frozen_text(c, mesh, DEFAULT_RULES, FAST)
            aux = {"rest": rest, "frozen": {"text": text_arrays, "uncond": uncond}}
            steps = make_steps(program, loss_from_config(c), {"text": text_prog}, batches["release"],
                               aux, compiler_options=FAST)
            runs[shape] = dict(config=c, mesh=mesh, program=program, init=params0, state=state, aux=aux,
                               text_prog=text_prog, steps=steps, path=path)
        return runs[shape]

    return get


@pytest.fixture(scope="module")
def reference(ckpt, batches, params0):
    """Loss and gradients with the Editor's text states fed as precomputed inputs (one device)."""
    c = editor_config(ckpt, kind="precomputed")
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    program = TrainProgram.create(c, mesh)
    state, rest = program.init_state(0, params=params0, compiler_options=FAST)
    aux = {"rest": rest, "frozen": {"uncond": batches["empty"]}}
    steps = make_steps(program, loss_from_config(c), {}, batches["precomputed"], aux, compiler_options=FAST)
    (loss, metrics), grads = steps.grads(state.params, global_batch(batches["precomputed"], mesh), aux, KEY)
    return {"loss": float(loss), "metrics": jax.device_get(metrics), "grads": _flat(grads),
            "steps": steps, "state": state, "aux": aux, "mesh": mesh}


def _assert_same(got_loss, got_grads, ref, what):
    assert got_loss == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), what
    assert sorted(got_grads) == sorted(ref["grads"]), what
    scale = max(float(np.max(np.abs(g))) for g in ref["grads"].values())
    for k, g in ref["grads"].items():
        np.testing.assert_allclose(got_grads[k], g, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{what}: {k}")


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)])
def test_in_step_encoders_give_the_editors_loss_and_gradients(batches, reference, release_run, shape):
    """One step with the encoders in the step = the same step fed ReleaseTextSide.encode's states,
    with condition dropout active (some examples dropped, some not), on one device and on a mesh."""
    run = release_run(shape)
    aux, text_prog = run["aux"], run["text_prog"]
    (loss, metrics), grads = run["steps"].grads(run["state"].params,
                                                global_batch(batches["release"], run["mesh"]), aux, KEY)
    dropped = float(metrics["cond_dropped"])
    assert 0 < dropped < 1 and dropped == float(reference["metrics"]["cond_dropped"])
    _assert_same(float(loss), _flat(grads), reference, f"mesh {shape}")
    if shape != (1, 1, 1):
        # the frozen encoders are laid out by the same logical-axis rules as the transformer
        q = aux["frozen"]["text"][0]["gemma"]["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
        assert q.sharding.spec == text_prog.param_shardings["gemma"]["model"]["layers"][0][
            "self_attn"]["q_proj"]["kernel"].spec == P("fsdp", "tensor")
        assert len({str(s.index) for s in q.addressable_shards}) == 4


def test_frozen_encoders_do_not_train_and_have_no_optimizer_state(batches, release_run):
    run = release_run((1, 1, 1))
    program, aux, mesh = run["program"], run["aux"], run["mesh"]
    state, _ = program.init_state(0, params=run["init"], compiler_options=FAST)   # donated below
    assert set(state.params) == {"transformer"}
    opt_paths = param_paths(state.opt_state)
    assert opt_paths and not [p for p in opt_paths if "clip" in p or "gemma" in p]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    n_opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state))
    assert n_opt - 2 * n_params < 16          # AdamW moments of the transformer + counters only
    frozen_before = _flat(aux["frozen"])
    params_before = _flat(state.params)
    state, metrics = run["steps"].train(state, global_batch(batches["release"], mesh), aux)
    assert bool(metrics["finite"]) and float(metrics["grad_norm"]) > 0
    frozen_after = _flat(aux["frozen"])
    assert sorted(frozen_after) == sorted(frozen_before)
    for k, v in frozen_before.items():
        np.testing.assert_array_equal(frozen_after[k], v, err_msg=k)
    moved = [k for k, v in _flat(state.params).items() if not np.array_equal(v, params_before[k])]
    assert len(moved) > len(params_before) // 2           # the transformer did train


def test_condition_dropout_uses_the_empty_prompts_encoding(ckpt, batches, reference, release_run):
    """The trainer's unconditional text is the Editor's encoding of "" (what the sampler's
    negative prompt gives), and the loss depends on it: the release run's loss (test above) equals
    the reference's only because the dropped examples got exactly that encoding."""
    run = release_run((2, 2, 2))
    uncond = run["aux"]["frozen"]["uncond"]
    assert run["path"] == os.path.abspath(ckpt)
    empty_states, empty_pooled = batches["empty"]
    assert uncond[0].shape == empty_states.shape == (1, 256, 40)
    assert uncond[1].shape == empty_pooled.shape == (1, 24)
    np.testing.assert_allclose(uncond[0], empty_states, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(uncond[1], empty_pooled, rtol=1e-5, atol=1e-5)
    # the empty prompt's encoding is not the encoding of a real instruction
    assert np.max(np.abs(empty_pooled - batches["precomputed"]["pooled"][:1])) > 1e-2
    # ... and it is what dropped examples see: another unconditional text changes the loss
    ref = reference
    other = (np.zeros_like(empty_states), np.zeros_like(empty_pooled))
    (loss, _), _ = ref["steps"].grads(ref["state"].params, global_batch(batches["precomputed"], ref["mesh"]),
                                      {"rest": ref["aux"]["rest"], "frozen": {"uncond": other}}, KEY)
    assert abs(float(loss) - ref["loss"]) > 1e-4


def test_missing_text_checkpoint_names_the_field(ckpt, tmp_path):
    from editmgt_jax.convert import convert_release
    from editmgt_jax.tools.tiny_release import make_release
    from editmgt_jax.training.frozen import load_frozen_text
    from editmgt_jax.training.tokenizers import make_tokenizer

    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    c = editor_config(ckpt, checkpoint="")
    c.init_from = ""
    with pytest.raises(ValueError, match=r"editor\.text\.checkpoint \(default: init_from\)"):
        load_frozen_text(c, mesh, DEFAULT_RULES, FAST)
    with pytest.raises(ValueError, match=r"editor\.text\.checkpoint"):
        make_tokenizer(c)
    # a checkpoint without the text encoders, named through the field that pointed at it
    rel = make_release(os.path.join(REPO, "tests", "fixtures", "editmgt-tiny-v1"), str(tmp_path / "rel"))
    bare = convert_release(rel, str(tmp_path / "bare"), components=["transformer"], log=lambda _: None)
    c = editor_config(bare)
    with pytest.raises(checkpoints.CheckpointError, match=r"init_from=.*'clip' / 'gemma' component"):
        load_frozen_text(c, mesh, DEFAULT_RULES, FAST)
    c = editor_config(ckpt, checkpoint=bare)
    with pytest.raises(checkpoints.CheckpointError, match=r"editor\.text\.checkpoint=.*'clip' / 'gemma'"):
        make_tokenizer(c)
    c = editor_config(ckpt, checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(checkpoints.CheckpointError, match=r"editor\.text\.checkpoint=.*no config\.json"):
        load_frozen_text(c, mesh, DEFAULT_RULES, FAST)
