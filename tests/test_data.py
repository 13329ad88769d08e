"""Datasets and the Grain pipeline: builders, round trips, exact resume, host sharding, mixing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import grain
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from editmgt_jax.data import crispedit, pipeline
from editmgt_jax.data.categories import EDIT_CATEGORIES
from editmgt_jax.data.crispedit import CrispEditSchemaError
from editmgt_jax.data.synthetic_edits import SYNTHETIC_VOCAB, generate_example
from editmgt_jax.data.synthetic_edits import builder as synthetic_edits
from editmgt_jax.models.text.word_tokenizer import WordTokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
SYN_RES = 64
SYN_TRAIN, SYN_TEST = 64, 16
SYN_NAME = f"synthetic_edits/{synthetic_edits.config_name(SYN_RES, SYN_TRAIN, SYN_TEST, 0)}"


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory) -> str:
  """64 train + 16 test synthetic examples at 64 px, built once for the module."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  config = synthetic_edits.SyntheticEditsConfig(
      name=SYN_NAME.split("/")[1], resolution=SYN_RES, num_train=SYN_TRAIN, num_test=SYN_TEST, seed=0
  )
  synthetic_edits.SyntheticEdits(
      config=config, data_dir=data_dir, file_format="array_record"
  ).download_and_prepare()
  return data_dir


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def _image(seed: int, height: int = 30, width: int = 40, mode: str = "RGB") -> np.ndarray:
  channels = {"RGB": 3, "RGBA": 4}[mode]
  return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def _write_shard(path, rows: list[dict], row_group_size: int = 3, **overrides) -> None:
  """A parquet shard in the published CrispEdit-2M layout (columns can be overridden)."""
  columns = {
      "input_img": [r["input_img"] for r in rows],
      "output_img": [r["output_img"] for r in rows],
      "instruction": [r["instruction"] for r in rows],
      "type": [r["type"] for r in rows],
  }
  columns.update(overrides)
  pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def _row(seed: int, kind: str, *, src: bytes | None = None, instruction: str | None = None) -> dict:
  return {
      "input_img": {"bytes": _encode(_image(seed)) if src is None else src, "path": f"src_{seed}.png"},
      "output_img": {"bytes": _encode(_image(seed + 1000), "JPEG"), "path": f"tgt_{seed}.jpg"},
      "instruction": f"edit {seed}" if instruction is None else instruction,
      "type": kind,
  }


@pytest.fixture(scope="module")
def crisp_raw(tmp_path_factory):
  """Two valid shards: 7 `add` rows with one broken, one empty and one RGBA row; 5 `style` rows."""
  raw = tmp_path_factory.mktemp("crispedit_raw")
  (raw / "data").mkdir()
  add = [_row(i, "add") for i in range(7)]
  add[2] = _row(2, "add", src=b"\x89PNG\r\n\x1a\n truncated")          # undecodable
  add[4] = _row(4, "add", src=b"")                                      # missing bytes
  add[5] = _row(5, "add", instruction="   ")                            # empty instruction
  add[6] = _row(6, "add", src=_encode(_image(6, mode="RGBA")))          # kept, re-encoded as RGB
  _write_shard(raw / "data" / "add_00000.parquet", add)
  _write_shard(raw / "data" / "style_00000.parquet", [_row(100 + i, "Style") for i in range(5)])
  return raw, add


def _build_crispedit(raw, data_dir, **config) -> crispedit.CrispEdit:
  name = "_".join(f"{k}{v}" for k, v in config.items()).replace(".", "p") or "plain"
  builder = crispedit.CrispEdit(
      config=crispedit.CrispEditConfig(name=name, **config), data_dir=str(data_dir),
      file_format="array_record", num_threads=2,
  )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  return builder


# ------------------------------------------------------------------------------------ synthetic


def test_synthetic_examples_are_deterministic_with_exact_masks():
  seen = set()
  tokenizer = WordTokenizer(SYNTHETIC_VOCAB)
  for index in range(28):
    a = generate_example(index, resolution=48, seed=3)
    b = generate_example(index, resolution=48, seed=3)
    for key in ("source_image", "target_image", "edit_mask"):
      np.testing.assert_array_equal(a[key], b[key])
    assert a["instruction"] == b["instruction"]
    assert a["source_image"].shape == (48, 48, 3) and a["source_image"].dtype == np.uint8
    np.testing.assert_array_equal(a["edit_mask"], np.any(a["source_image"] != a["target_image"], -1))
    assert a["edit_mask"].any(), a["instruction"]
    assert tokenizer.unk_id not in tokenizer.encode(a["instruction"]), a["instruction"]
    assert a["category"] == EDIT_CATEGORIES[index % 7]
    seen.add(a["category"])
    # Object edits touch a small region; a whole-image style changes most pixels.
    if a["category"] in ("add", "remove", "color", "replace"):
      assert a["edit_mask"].mean() < 0.5
  assert seen == set(EDIT_CATEGORIES)
  other_seed = generate_example(0, resolution=48, seed=4)
  assert not np.array_equal(other_seed["source_image"], generate_example(0, resolution=48, seed=3)["source_image"])
  test_split = generate_example(0, split="test", resolution=48, seed=3)
  assert not np.array_equal(test_split["source_image"], generate_example(0, resolution=48, seed=3)["source_image"])


def test_synthetic_builder_round_trip(syn_dir):
  builder = tfds.builder(SYN_NAME, data_dir=syn_dir)
  assert builder.info.splits["train"].num_examples == SYN_TRAIN
  assert builder.info.splits["test"].num_examples == SYN_TEST
  source = tfds.data_source(SYN_NAME, split="train", data_dir=syn_dir, download=False)
  expected = {}
  for i in range(SYN_TRAIN):
    ex = generate_example(i, resolution=SYN_RES, seed=0)
    expected[hashlib.sha1(ex["source_image"].tobytes() + ex["instruction"].encode()).hexdigest()] = ex
  found = set()
  for record in source:
    key = hashlib.sha1(record["source_image"].tobytes() + record["instruction"]).hexdigest()
    ex = expected[key]  # every stored record is one generated example, stored losslessly
    found.add(key)
    np.testing.assert_array_equal(record["target_image"], ex["target_image"])
    np.testing.assert_array_equal(record["edit_mask"][..., 0] == 255, ex["edit_mask"])
    np.testing.assert_array_equal(
        record["edit_mask"][..., 0] == 255, np.any(record["source_image"] != record["target_image"], -1)
    )
    assert set(np.unique(record["edit_mask"])) <= {0, 255}
    assert EDIT_CATEGORIES[record["category"]] == ex["category"]
  assert len(found) == SYN_TRAIN


def test_word_tokenizer(tmp_path):
  tok = WordTokenizer(SYNTHETIC_VOCAB, max_length=6)
  out = tok(["Make the RED circle blue!", b"remove the zebra", "a " * 10])
  assert out["ids"].shape == (3, 6) and out["ids"].dtype == np.int32
  assert tok.decode(out["ids"][0]) == "make the red circle blue"
  assert out["mask"][0].tolist() == [True] * 5 + [False]
  assert out["ids"][1, 2] == tok.unk_id and tok.decode(out["ids"][1]) == "remove the <unk>"
  assert out["mask"][2].all() and tok.num_truncated == 1
  tok.save(str(tmp_path / "vocab.txt"))
  again = WordTokenizer.load(str(tmp_path / "vocab.txt"), max_length=6)
  assert again.words == tok.words and again.vocab_size == len(SYNTHETIC_VOCAB) + 2
  np.testing.assert_array_equal(again(["make the red circle blue"])["ids"], out["ids"][:1])
  with pytest.raises(ValueError, match="duplicate"):
    WordTokenizer(["a", "a"])


# ------------------------------------------------------------------------------------ crispedit


def test_crispedit_builds_and_reports_skipped_rows(crisp_raw, tmp_path):
  raw, add_rows = crisp_raw
  builder = _build_crispedit(raw, tmp_path)
  assert builder.info.splits["train"].num_examples == 12 - 3
  report = crispedit.read_skip_report(builder.data_path)
  assert report["rows_read"] == 12 and report["skipped"] == 3
  assert report["skipped_by_reason"] == {
      "source image undecodable": 1, "source image missing": 1, "empty instruction": 1,
  }
  assert report["skipped_by_file"] == {"add_00000.parquet": report["skipped_by_reason"]}
  assert sorted(r["row"] for r in report["examples"]) == [2, 4, 5]
  assert report["converted_to_rgb"] == 1

  source = builder.as_data_source(
      "train", decoders={"source_image": tfds.decode.SkipDecoding(), "target_image": tfds.decode.SkipDecoding()}
  )
  by_path = {r["source_path"].decode(): r for r in source}
  assert sorted(by_path) == sorted(
      [f"src_{i}.png" for i in (0, 1, 3, 6)] + [f"src_{100 + i}.png" for i in range(5)]
  )
  # Encoded bytes pass through unchanged; the RGBA row was re-encoded as an RGB PNG.
  assert by_path["src_0.png"]["source_image"] == add_rows[0]["input_img"]["bytes"]
  assert by_path["src_0.png"]["target_image"] == add_rows[0]["output_img"]["bytes"]
  with Image.open(io.BytesIO(by_path["src_6.png"]["source_image"])) as im:
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), _image(6, mode="RGBA")[..., :3])
  assert by_path["src_0.png"]["instruction"] == b"edit 0"
  assert EDIT_CATEGORIES[by_path["src_0.png"]["category"]] == "add"
  assert EDIT_CATEGORIES[by_path["src_100.png"]["category"]] == "style"  # 'Style' normalised


def test_crispedit_holdout_is_disjoint_complete_and_stable(crisp_raw, tmp_path):
  raw, _ = crisp_raw
  b1 = _build_crispedit(raw, tmp_path / "a", holdout_fraction=0.4, holdout_seed=1)
  b2 = _build_crispedit(raw, tmp_path / "b", holdout_fraction=0.4, holdout_seed=1)
  paths = lambda b, s: sorted(r["source_path"].decode() for r in b.as_data_source(s))  # noqa: E731
  train, valid = paths(b1, "train"), paths(b1, "validation")
  assert train and valid and not set(train) & set(valid)
  assert len(train) + len(valid) == 9
  assert (train, valid) == (paths(b2, "train"), paths(b2, "validation"))


@pytest.mark.parametrize(
    "column, override, message",
    [
        ("instruction", None, "column 'instruction' is missing"),
        ("input_img", pa.array(["a.png"] * 2), "column 'input_img' has type string"),
        ("output_img", pa.array([{"bytes": "x", "path": "p"}] * 2), "column 'output_img' field 'bytes'"),
        ("type", pa.array([1, 2]), "column 'type' has type int64"),
        ("type", pa.array(["add", "sharpen"]), "row 1 column 'type' has value 'sharpen'"),
    ],
)
def test_crispedit_bad_shard_fails_naming_file_and_column(crisp_raw, tmp_path, cli, column, override, message):
  good_raw, _ = crisp_raw
  raw = tmp_path / "raw"
  (raw / "data").mkdir(parents=True)
  for name in os.listdir(good_raw / "data"):
    (raw / "data" / name).write_bytes((good_raw / "data" / name).read_bytes())
  rows = [_row(i, "color") for i in range(2)]
  bad = raw / "data" / "color_00000.parquet"
  if override is None:
    table = pa.table({k: [r[k] for r in rows] for k in ("input_img", "output_img", "type")})
    pq.write_table(table, bad)
  else:
    _write_shard(bad, rows, **{column: override})
  with pytest.raises(CrispEditSchemaError, match="color_00000.parquet") as info:
    _build_crispedit(raw, tmp_path / "out")
  assert message in str(info.value)
  if column == "instruction":
    # The command line (one process per case is slow: checked on the first) exits 2 on it, before
    # writing anything.
    proc = cli("train.build_dataset", "crispedit", "--data-dir", tmp_path / "cli", "--manual-dir", raw)
    assert proc.returncode == 2 and "color_00000.parquet" in proc.stderr
    assert not list((tmp_path / "cli").rglob("*.array_record*"))


def test_crispedit_cli_empty_input_and_all_rows_bad_are_one_report(tmp_path, cli):
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = cli("train.build_dataset", "crispedit", "--data-dir", tmp_path / "a", "--manual-dir", empty)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count("\n") == 1 and f"--manual-dir {empty} holds no parquet shards" in proc.stderr
  # Every row unusable: the per-reason report is written and printed, not lost in TFDS's error.
  raw = tmp_path / "raw"
  (raw / "data").mkdir(parents=True)
  rows = [_row(i, "add", src=b"\x89PNG\r\n\x1a\n truncated") for i in range(3)]
  rows.append(_row(3, "add", instruction=" "))
  _write_shard(raw / "data" / "add_00000.parquet", rows)
  out = tmp_path / "b"
  proc = cli("train.build_dataset", "crispedit", "--data-dir", out, "--manual-dir", raw)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert "all 4 rows read were skipped" in proc.stderr
  assert "3 x source image undecodable" in proc.stderr and "1 x empty instruction" in proc.stderr
  report = json.loads((out / "crispedit" / "default" / "skipped_rows.json").read_text())
  assert report["skipped"] == 4 and report["skipped_by_reason"]["empty instruction"] == 1
  assert not list(out.rglob("*.array_record*"))


# ------------------------------------------------------------------------------------ pipeline


def _config(syn_dir, **kwargs) -> pipeline.PipelineConfig:
  base = dict(
      datasets=(pipeline.DatasetSpec(name=SYN_NAME, data_dir=syn_dir),),
      batch_size=8, resolution=32, seed=7, with_ids=True,
  )
  base.update(kwargs)
  return pipeline.from_config(base)


def test_pipeline_serves_batches(syn_dir):
  tok = WordTokenizer(SYNTHETIC_VOCAB, max_length=16)
  it = iter(pipeline.make_dataset(_config(syn_dir), tokenize=tok, shard_index=0, shard_count=1))
  batch = next(it)
  assert batch["source"].shape == (8, 32, 32, 3) and batch["source"].dtype == np.uint8
  assert batch["target"].shape == (8, 32, 32, 3)
  assert batch["edit_mask"].shape == (8, 32, 32) and batch["edit_mask"].dtype == bool
  assert batch["category"].dtype == np.int32 and batch["category"].max() < 7
  assert batch["instruction_ids"].shape == (8, 16) and "instruction" not in batch
  np.testing.assert_array_equal(batch["original_size"], np.full((8, 2), SYN_RES))
  assert batch["edit_mask"].any(axis=(1, 2)).all()
  # The mask still marks changed pixels after the (shared) resize: where it is False, the source
  # and target were identical before resizing, so they are almost equal after it.
  src, tgt = batch["source"].astype(int), batch["target"].astype(int)
  assert np.abs(src - tgt)[~batch["edit_mask"]].mean() < np.abs(src - tgt)[batch["edit_mask"]].mean()

  floats = next(iter(pipeline.make_dataset(
      _config(syn_dir, image_dtype="float32"), shard_index=0, shard_count=1)))
  assert floats["source"].dtype == np.float32 and 0 <= floats["source"].min() <= floats["source"].max() <= 1
  np.testing.assert_array_equal(floats["source"], batch["source"] / np.float32(255))
  assert "instruction_ids" not in floats and "instruction" not in floats


def test_crop_policies_on_non_square_images(crisp_raw, tmp_path):
  raw, _ = crisp_raw
  builder = _build_crispedit(raw, tmp_path)
  spec = pipeline.DatasetSpec(name=f"crispedit/{builder.builder_config.name}", data_dir=str(tmp_path))
  batches = {}
  for crop in pipeline.CROP_POLICIES:
    cfg = pipeline.PipelineConfig(datasets=(spec,), batch_size=9, resolution=16, crop=crop,
                                  shuffle=False, num_epochs=1, with_ids=True)
    batches[crop] = next(iter(pipeline.make_dataset(cfg, shard_index=0, shard_count=1)))
  center = batches["center"]
  assert center["source"].shape == (9, 16, 16, 3) and "edit_mask" not in center
  np.testing.assert_array_equal(center["original_size"], np.tile([30, 40], (9, 1)))
  # 40x30 -> 21x16; the centre crop starts at column (21 - 16) / 2, rounded.
  np.testing.assert_array_equal(center["crop_top_left"], np.tile([0, 2], (9, 1)))
  lefts = batches["random"]["crop_top_left"][:, 1]
  assert len(set(lefts.tolist())) > 1 and set(lefts.tolist()) <= set(range(6))
  # 'independent' draws the target's crop apart from the source's ('random' shares one draw).
  assert not np.array_equal(batches["independent"]["crop_top_left"], batches["random"]["crop_top_left"])


def _orbax_save(directory, step, iterator):
  with ocp.CheckpointManager(directory, item_names=("data_iter",)) as mngr:
    mngr.save(step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
    mngr.wait_until_finished()


def _orbax_restore(directory, step, iterator):
  with ocp.CheckpointManager(directory, item_names=("data_iter",)) as mngr:
    return mngr.restore(step, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(iterator)))["data_iter"]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].dtype == y[k].dtype
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


_RESUME_K, _RESUME_N = 13, 7


def _resume_config(syn_dir) -> pipeline.PipelineConfig:
  # Random crops and 20 batches of an 8-batch epoch: resuming at 13 crosses an epoch edge.
  return _config(syn_dir, crop="independent", resolution=24)


def _save_at_k(cfg, tok, ckpt) -> list[dict]:
  """Runs `_RESUME_K` batches, saves the iterator to `ckpt`; returns the `_RESUME_N` batches after it."""
  it = iter(pipeline.make_dataset(cfg, tokenize=tok, shard_index=0, shard_count=1))
  for _ in range(_RESUME_K):
    next(it)
  _orbax_save(ckpt, _RESUME_K, it)
  return [next(it) for _ in range(_RESUME_N)]


def test_exact_resume_with_orbax(syn_dir, tmp_path):
  cfg, tok = _resume_config(syn_dir), WordTokenizer(SYNTHETIC_VOCAB)
  expected = _save_at_k(cfg, tok, tmp_path / "ckpt")

  fresh = iter(pipeline.make_dataset(cfg, tokenize=tok, shard_index=0, shard_count=1))
  restored = _orbax_restore(tmp_path / "ckpt", _RESUME_K, fresh)
  _assert_same_batches([next(restored) for _ in range(_RESUME_N)], expected)


@pytest.mark.multiprocess
def test_resume_into_worker_processes(syn_dir, tmp_path):
  # The state is a batch index, not a worker layout: a state saved without workers restores into
  # two worker processes, which produce the very same stream.
  cfg, tok = _resume_config(syn_dir), WordTokenizer(SYNTHETIC_VOCAB)
  expected = _save_at_k(cfg, tok, tmp_path / "ckpt")

  with_workers = pipeline.make_dataset(
      pipeline.PipelineConfig(**{**cfg.__dict__, "worker_count": 2}), tokenize=tok,
      shard_index=0, shard_count=1)
  restored = _orbax_restore(tmp_path / "ckpt", _RESUME_K, iter(with_workers))
  _assert_same_batches([next(restored) for _ in range(_RESUME_N)], expected)
  restored.close()


def test_epochs_reshuffle_and_cover_everything(syn_dir):
  ds = pipeline.make_map_dataset(_config(syn_dir, num_epochs=2), shard_index=0, shard_count=1)
  assert len(ds) == 2 * SYN_TRAIN // 8
  order = np.concatenate([ds[i]["index"] for i in range(len(ds))])
  first, second = order[:SYN_TRAIN], order[SYN_TRAIN:]
  assert sorted(first) == sorted(second) == list(range(SYN_TRAIN))
  assert not np.array_equal(first, second)


_SHARD_SCRIPT = textwrap.dedent("""
    import json, sys
    from editmgt_jax.data import pipeline
    cfg = pipeline.PipelineConfig(
        datasets=(pipeline.DatasetSpec(name={name!r}, data_dir={data_dir!r}),),
        batch_size=8, resolution=16, seed=11, num_epochs=1, with_ids=True)
    ds = pipeline.make_dataset(cfg, shard_index=int(sys.argv[1]), shard_count=2)
    print(json.dumps([int(i) for b in ds for i in b["index"]]))
""")


@pytest.mark.multiprocess
def test_two_hosts_cover_an_epoch_exactly_once(syn_dir):
  # Host 1 runs in a subprocess while host 0 runs here: two processes, one epoch, 2 x 32 examples.
  script = _SHARD_SCRIPT.format(name=SYN_NAME, data_dir=syn_dir)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.Popen([sys.executable, "-c", script, "1"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, cwd=REPO, text=True)
  namespace = {}
  exec(compile(script.replace("int(sys.argv[1])", "0").replace("print(", "result = ("), "host0", "exec"),
       namespace)
  out, err = proc.communicate(timeout=180)
  assert proc.returncode == 0, err[-2000:]
  seen = [namespace["result"], out.strip().splitlines()[-1]]
  seen = [json.loads(s) for s in seen]
  assert len(seen[0]) == len(seen[1]) == SYN_TRAIN // 2
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(SYN_TRAIN))


def test_sharding_checks(syn_dir):
  # 16 test examples over 3 hosts: equal shares of 5, disjoint; 17 hosts is an error naming the data.
  shares = []
  for host in range(3):
    ds = pipeline.make_map_dataset(
        _config(syn_dir, datasets=(pipeline.DatasetSpec(name=SYN_NAME, split="test", data_dir=syn_dir),),
                batch_size=5, num_epochs=1), shard_index=host, shard_count=3)
    shares.append(set(ds[0]["index"].tolist()))
  assert all(len(s) == 5 for s in shares) and len(set.union(*shares)) == 15
  spec = pipeline.DatasetSpec(name=SYN_NAME, split="test", data_dir=syn_dir)
  with pytest.raises(ValueError, match=r"has 16 examples, fewer than the 17 hosts"):
    pipeline.make_map_dataset(_config(syn_dir, datasets=(spec,)), shard_index=0, shard_count=17)
  with pytest.raises(ValueError, match="outside"):
    pipeline.make_map_dataset(_config(syn_dir), shard_index=2, shard_count=2)
  with pytest.raises(FileNotFoundError, match="python -m train.build_dataset synthetic_edits"):
    pipeline.make_map_dataset(
        _config(syn_dir, datasets=(pipeline.DatasetSpec(name="synthetic_edits/small", data_dir=syn_dir),)),
        shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match="unknown field"):
    pipeline.from_config({"datasets": [{"name": SYN_NAME}], "batchsize": 3})


def test_mixing_respects_weights(syn_dir):
  cfg = _config(syn_dir, datasets=(
      pipeline.DatasetSpec(name=SYN_NAME, split="train", data_dir=syn_dir, weight=3.0),
      pipeline.DatasetSpec(name=SYN_NAME, split="test", data_dir=syn_dir, weight=1.0),
  ))
  ds = pipeline.make_map_dataset(cfg, shard_index=0, shard_count=1)
  batches = [ds[i] for i in range(20)]
  ids = np.concatenate([b["dataset_id"] for b in batches])
  assert abs(ids.mean() - 0.25) < 0.03
  # The mixture keeps going past the smaller dataset's end, each dataset in its own epochs.
  test_indices = np.concatenate([b["index"][b["dataset_id"] == 1] for b in batches])
  assert set(test_indices[:SYN_TEST].tolist()) == set(range(SYN_TEST))


def test_config_dict_is_accepted(syn_dir):
  import ml_collections  # pylint: disable=g-import-not-at-top

  cd = ml_collections.ConfigDict({
      "datasets": [{"name": SYN_NAME, "data_dir": syn_dir}], "batch_size": 4, "resolution": 16,
  })
  batch = pipeline.make_map_dataset(cd, shard_index=0, shard_count=1)[0]
  assert batch["source"].shape == (4, 16, 16, 3)


# ------------------------------------------------------------------------------------ pre-tokenised


def test_pretokenize_round_trip(syn_dir, tmp_path):
  from editmgt_jax.data import pretokenize  # pylint: disable=g-import-not-at-top

  encode = pretokenize.avgpool_encode_fn(factor=8)
  meta = pretokenize.pretokenize(
      SYN_NAME, str(tmp_path / "tok"), encode, data_dir=syn_dir, resolution=32, batch_size=16,
      num_shards=2, limit=40, progress=False,
  )
  assert meta["num_examples"] == 40 and meta["grid"] == [4, 4]
  spec = pipeline.DatasetSpec(tokens_dir=str(tmp_path / "tok"))
  cfg = pipeline.PipelineConfig(datasets=(spec,), batch_size=8, shuffle=False, num_epochs=1, with_ids=True)
  tok = WordTokenizer(SYNTHETIC_VOCAB)
  batches = list(pipeline.make_dataset(cfg, tokenize=tok, shard_index=0, shard_count=1))
  assert len(batches) == 5 and batches[0]["source_ids"].shape == (8, 4, 4)
  assert batches[0]["source_ids"].dtype == np.int32 and "source" not in batches[0]
  # The ids are those of the pipeline's own centre crops, for the same records.
  images = pipeline.make_map_dataset(
      pipeline.PipelineConfig(datasets=(pipeline.DatasetSpec(name=SYN_NAME, data_dir=syn_dir),),
                              batch_size=8, resolution=32, shuffle=False, num_epochs=1, with_ids=True),
      tokenize=tok, shard_index=0, shard_count=1)
  for i in (0, 4):
    np.testing.assert_array_equal(batches[i]["index"], images[i]["index"])
    np.testing.assert_array_equal(batches[i]["source_ids"], encode(images[i]["source"] / np.float32(255)))
    np.testing.assert_array_equal(batches[i]["target_ids"], encode(images[i]["target"] / np.float32(255)))
    np.testing.assert_array_equal(batches[i]["instruction_ids"], images[i]["instruction_ids"])
    np.testing.assert_array_equal(batches[i]["category"], images[i]["category"])


def test_pretokenize_plugs_in_the_vq_model():
  vq = pytest.importorskip("editmgt_jax.models.vq")
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from editmgt_jax.data import pretokenize  # pylint: disable=g-import-not-at-top

  cfg = vq.VQConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                    num_vq_embeddings=16, norm_num_groups=4)
  # Random weights set from NumPy: an eager NNX init compiles every initialiser one by one.
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: vq.VQModel(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  model = nnx.merge(graphdef, jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(a.dtype), abstract))
  encode = pretokenize.vq_encode_fn(model)
  pixels = np.random.default_rng(1).random((2, 8, 8, 3), dtype=np.float32)
  ids = encode(pixels)
  assert ids.shape == (2, 4, 4) and ids.dtype == np.int32
  assert 0 <= ids.min() and ids.max() < 16 and len(np.unique(ids)) > 1
  np.testing.assert_array_equal(encode(pixels[::-1])[::-1], ids)  # per-image, order independent
