"""Datasets and the input pipeline.

`categories` (the seven edit categories), `crispedit` and `synthetic_edits` (TFDS builders; the
builder classes live in `crispedit` and `synthetic_edits.builder`), `pipeline` (Grain batches from
built datasets; `sources` and `transforms` behind it) and `pretokenize`. Importing this package imports none of them: TFDS is loaded only
where a builder is needed (`train.build_dataset`, `sources.tfds_source`).
"""
