"""Model checkpoints on disk: a config JSON plus one Orbax item per component.

The one owner of the model checkpoint folder (what the converter and the exporter write, what the
editor and the trainer's frozen loaders read)::

    CKPT/config.json            {"format": "editmgt-jax/model", "version": 1,
                                 "components": {name: config dict}, "conventions": {...}, ...metadata}
    CKPT/params/<component>/    Orbax PyTree checkpoint of that component's parameters
    CKPT/vocab.txt              the small text encoder's word tokenizer (optional)
    CKPT/tokenizer/, CKPT/llm_tokenizer/   tokenizer files copied from the release (optional)
    CKPT/README.md              the model card, written with config.json (``card``)

- :mod:`~editmgt_jax.checkpoints.layout`: the names and paths above, ``config.json``, the tokenizer
  folders;
- :mod:`~editmgt_jax.checkpoints.conventions`: the conventions record (mask id, timestep convention,
  micro-conditions, negative prompt, sampler defaults);
- :mod:`~editmgt_jax.checkpoints.io`: atomic writes, saving and restoring component parameters;
- :mod:`~editmgt_jax.checkpoints.index`: a component's stored index (array shapes and dtypes,
  read without reading an array);
- :mod:`~editmgt_jax.checkpoints.card`: the model card (``README.md``);
- :mod:`~editmgt_jax.checkpoints.modules`: components as modules (the one eval_shape -> load -> merge).

Everything public is importable from this package: ``from editmgt_jax.checkpoints import X``.
"""

from editmgt_jax.checkpoints.conventions import (RELEASE_NEGATIVE_PROMPT, RELEASE_SAMPLER, SAMPLER_KEYS,
                                                 SCHEDULER_CONFIG, Conventions, default_mask_token_id,
                                                 legacy_conventions, read_conventions, read_scheduler_mask_id,
                                                 release_conventions)
from editmgt_jax.checkpoints.io import (PART_BYTES, SAVE_CONCURRENT_GB, add_components, check_replaceable,
                                        finish_component_parts, load_component, plan_parts, quiet_orphaned_reads,
                                        save_component, save_component_part, save_model, write_config,
                                        writing_checkpoint)
from editmgt_jax.checkpoints.layout import (CONFIG_FILE, FORMAT, PARAMS_DIR, SMALL_TEXT, TOKENIZER_DIRS, VERSION,
                                            WORD_VOCAB_FILE, CheckpointError, config_path, copy_tokenizer_files,
                                            has_config, is_model_checkpoint, json_default, params_dir,
                                            read_config, release_tokenizer, save_word_tokenizer, word_tokenizer)
from editmgt_jax.checkpoints.modules import (abstract_module, component_classes, component_config, load_module,
                                             load_params, lora_of, merge_params)

__all__ = [
    "CONFIG_FILE", "FORMAT", "PARAMS_DIR", "PART_BYTES", "RELEASE_NEGATIVE_PROMPT", "RELEASE_SAMPLER", "SAMPLER_KEYS",
    "SAVE_CONCURRENT_GB", "SCHEDULER_CONFIG", "SMALL_TEXT", "TOKENIZER_DIRS", "VERSION", "WORD_VOCAB_FILE",
    "CheckpointError", "Conventions", "abstract_module", "add_components", "check_replaceable",
    "component_classes", "component_config", "config_path", "copy_tokenizer_files", "default_mask_token_id",
    "finish_component_parts",
    "has_config", "is_model_checkpoint", "json_default", "legacy_conventions", "load_component",
    "load_module", "load_params", "lora_of", "merge_params", "params_dir", "plan_parts", "quiet_orphaned_reads", "read_config", "read_conventions",
    "read_scheduler_mask_id", "release_conventions", "release_tokenizer", "save_component", "save_component_part",
    "save_model", "save_word_tokenizer", "word_tokenizer", "write_config", "writing_checkpoint",
]
