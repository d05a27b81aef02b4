"""The tokenized-data cache: a second build of the same data calls no tokenizer, a changed
source or tokenizer setting builds again, and a killed write leaves no cache file."""

import os
import shutil

import numpy as np
import pytest

from ftjax import data as data_lib
from ftjax.data import cache
from ftjax.data import preference as pref_data
from ftjax.tokenizer import load_tokenizer


@pytest.fixture
def counted_tokenizer(tiny_tokenizer_dir, monkeypatch):
  """The tiny tokenizer with every entry point the data code uses counted."""
  tok = load_tokenizer(tiny_tokenizer_dir)
  calls = {"n": 0}
  for name in ("__call__", "encode", "apply_chat_template"):
    orig = getattr(type(tok), name)

    def counted(self, *a, _orig=orig, **kw):
      calls["n"] += 1
      return _orig(self, *a, **kw)
    monkeypatch.setattr(type(tok), name, counted)
  return tok, calls


def _same_examples(a, b):
  assert len(a) == len(b) and len(a) > 0
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
      assert np.asarray(x[k]).dtype == np.asarray(y[k]).dtype, k


def _batches(it, n=3):
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("kind", ["sft", "pairs"])
def test_second_build_reads_the_cache_and_a_changed_source_does_not(
    kind, counted_tokenizer, chat_files, pref_files, tmp_path):
  tok, calls = counted_tokenizer
  src = pref_files[0] if kind == "pairs" else chat_files[0]
  path = str(tmp_path / "train.jsonl")
  shutil.copy(src, path)
  cfg = {"sources": [{"path": path}], "format": "auto" if kind == "pairs" else "chat",
         "eval_fraction": 0.2, "cache_dir": str(tmp_path / "cache")}
  build = (pref_data.build_preference_dataset if kind == "pairs" else data_lib.build_dataset)
  first = build(cfg, tok, 256, 4, seed=3)
  assert calls["n"] > 0
  assert len(os.listdir(tmp_path / "cache")) == 1

  calls["n"] = 0
  second = build(cfg, tok, 256, 4, seed=3)
  assert calls["n"] == 0  # no tokenization at all on a hit
  _same_examples(first.train.examples, second.train.examples)
  _same_examples(first.eval_examples, second.eval_examples)
  assert first.stats == second.stats and first.eval_stats == second.eval_stats
  for x, y in zip(_batches(first.train), _batches(second.train)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])

  # A changed source (one row dropped) is a miss: tokenized again, a second cache file.
  with open(path) as f:
    rows = f.read().splitlines()
  with open(path, "w") as f:
    f.write("\n".join(rows[1:]) + "\n")
  calls["n"] = 0
  third = build(cfg, tok, 256, 4, seed=3)
  assert calls["n"] > 0
  records = lambda d: d.stats.records + d.eval_stats.records  # noqa: E731
  assert records(third) == records(first) - 1
  assert len(os.listdir(tmp_path / "cache")) == 2
  # So is a changed setting that shapes the examples.
  calls["n"] = 0
  build({**cfg, "loss_on_prompt": True}, tok, 256, 4, seed=3)
  assert calls["n"] > 0


def test_no_cache_dir_and_hub_sources_are_not_cached(counted_tokenizer, chat_files, tmp_path):
  tok, calls = counted_tokenizer
  cfg = {"sources": [{"path": chat_files[0]}], "format": "chat", "cache_dir": ""}
  data_lib.build_dataset(cfg, tok, 256, 4)
  calls["n"] = 0
  data_lib.build_dataset(cfg, tok, 256, 4)
  assert calls["n"] > 0
  assert cache.cache_key({"sources": [{"hub": "some/dataset"}]}, "sft", tok, 256, 0) is None
  assert cache.cache_key({"sources": [{"path": str(tmp_path / "missing.jsonl")}]}, "sft", tok,
                         256, 0) is None


def test_a_killed_write_leaves_no_cache_file(counted_tokenizer, chat_files, tmp_path,
                                             monkeypatch):
  tok, calls = counted_tokenizer
  cfg = {"sources": [{"path": chat_files[0]}], "format": "chat",
         "cache_dir": str(tmp_path / "cache")}
  real_savez = np.savez

  def dies_half_way(f, **arrays):
    f.write(b"PK\x03\x04 half a zip")
    raise KeyboardInterrupt  # as a Ctrl-C in the middle of the write would
  monkeypatch.setattr(cache.np, "savez", dies_half_way)
  with pytest.raises(KeyboardInterrupt):
    data_lib.build_dataset(cfg, tok, 256, 4)
  assert os.listdir(tmp_path / "cache") == []
  monkeypatch.setattr(cache.np, "savez", real_savez)
  data_lib.build_dataset(cfg, tok, 256, 4)
  calls["n"] = 0
  data_lib.build_dataset(cfg, tok, 256, 4)
  assert calls["n"] == 0
  # An unreadable file (not one of ours: cut short by a full disk, say) is rebuilt over.
  (name,) = os.listdir(tmp_path / "cache")
  with open(tmp_path / "cache" / name, "r+b") as f:
    f.truncate(100)
  data_lib.build_dataset(cfg, tok, 256, 4)
  assert calls["n"] > 0
