"""Small data sets for the trainer tests: synthetic edits at 32 px, and the same pre-tokenised."""

import os

from editmgt_jax.data.synthetic_edits import builder as synthetic_edits

RES, N_TRAIN, N_TEST = 32, 32, 8
DATA_NAME = f"synthetic_edits/{synthetic_edits.config_name(RES, N_TRAIN, N_TEST, 0)}"
CODEBOOK, FACTOR = 64, 4       # the tiny configs' VQ: 64 codewords, x4 down-sampling


def build_images(root: str) -> str:
    """32 train + 8 test examples at 32 px as TFDS ArrayRecord; returns the TFDS data dir."""
    cfg = synthetic_edits.SyntheticEditsConfig(name=DATA_NAME.split("/")[1], resolution=RES,
                                               num_train=N_TRAIN, num_test=N_TEST, seed=0)
    synthetic_edits.SyntheticEdits(config=cfg, data_dir=root, file_format="array_record").download_and_prepare()
    return root


def build_tokens(data_dir: str, out: str, split: str = "train") -> str:
    """The split pre-tokenised with the average-pooling stand-in tokenizer (8x8 ids of 64 colours)."""
    from editmgt_jax.data.pretokenize import avgpool_encode_fn, pretokenize

    pretokenize(DATA_NAME, out, avgpool_encode_fn(FACTOR, CODEBOOK), split=split, data_dir=data_dir,
                resolution=RES, batch_size=16, progress=False)
    return out


def token_flags(tokens_dir: str) -> list[str]:
    """train.main flags for the tiny editor on pre-tokenised 32 px data."""
    return [f"--config.data.tokens_dir={tokens_dir}", f"--config.data.resolution={RES}",
            f"--config.editor.image_size={RES}", "--config.editor.transformer.num_single_layers=0"]


def subprocess_env(devices: int, cache_dir=None) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
               JAX_PLATFORMS="cpu", PYTHONPATH=repo + os.pathsep + env.get("PYTHONPATH", ""))
    if cache_dir is not None:
        # Runs that compile the same programs share them through the persistent cache.
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env
