"""Data sources: local files, the weighted mix, TFDS (mocked), hub names offline."""

import csv
import json

import pytest

from ftjax.data import DataError, load_records, mix, mix_counts, tokenize_records

ROWS = [{"instruction": "Say hi", "input": "", "output": "hello"},
        {"instruction": "Return it", "input": "the blue jacket", "output": "Done."},
        {"instruction": "Where?", "input": "", "output": "Monday"}]


@pytest.fixture
def files(tmp_path):
  out = {}
  out["jsonl"] = tmp_path / "d.jsonl"
  out["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  out["json"] = tmp_path / "d.json"
  out["json"].write_text(json.dumps(ROWS))
  out["json_data"] = tmp_path / "wrapped.json"
  out["json_data"].write_text(json.dumps({"data": ROWS}))
  import pyarrow as pa
  import pyarrow.parquet as pq
  out["parquet"] = tmp_path / "d.parquet"
  pq.write_table(pa.Table.from_pylist(ROWS), out["parquet"])
  out["csv"] = tmp_path / "d.csv"
  with open(out["csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
    w.writeheader()
    w.writerows(ROWS)
  return {k: str(v) for k, v in out.items()}


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_data", "parquet", "csv"])
def test_local_files(files, kind):
  recs = load_records({"path": files[kind]})
  assert len(recs) == 3 and list(recs) == ROWS
  assert recs.where(1) == f"{files[kind]}: row 2"
  assert len(load_records({"path": files[kind], "limit": 2})) == 2


def test_file_errors(tmp_path, files):
  with pytest.raises(DataError, match="no such file"):
    load_records(str(tmp_path / "missing.jsonl"))
  bad = tmp_path / "x.txt"
  bad.write_text("hi")
  with pytest.raises(DataError, match="unknown file type"):
    load_records(str(bad))
  broken = tmp_path / "broken.json"
  broken.write_text('[{"a": 1},\n {"a": }]')
  with pytest.raises(DataError, match=r"broken\.json: line 2: invalid JSON"):
    load_records(str(broken))
  with pytest.raises(DataError, match="exactly one of"):
    load_records({"path": files["csv"], "hub": "x/y"})


def test_mix_counts_rule():
  assert mix_counts([10, 10], [1, 1]) == [10, 10]
  assert mix_counts([10, 30], [3, 1]) == [30, 10]      # 40 items, 3:1
  assert mix_counts([5, 5, 5], [1, 1, 1], total=10) == [4, 3, 3]  # remainders: earlier first
  assert sum(mix_counts([7, 3, 11], [0.2, 0.5, 0.3])) == 21
  with pytest.raises(DataError):
    mix_counts([3, 3], [0, 0])


def test_mix_is_deterministic():
  a, b = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(4)]
  m1 = mix([(a, 1.0), (b, 1.0)], seed=0)
  assert m1 == mix([(a, 1.0), (b, 1.0)], seed=0)
  assert len(m1) == 14
  assert sum(x.startswith("a") for x in m1) == 7 and sum(x.startswith("b") for x in m1) == 7
  assert set(b) <= set(m1)  # the small source is upsampled: every item, some twice
  assert mix([(a, 1.0), (b, 1.0)], seed=1) != m1  # a different subsample of `a`
  assert mix([(a, 1.0)], seed=3) == a  # one source: unchanged


def test_tfds_mock_data(tiny_tokenizer_dir):
  tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed")
  from ftjax.tokenizer import load_tokenizer
  tok = load_tokenizer(tiny_tokenizer_dir)
  with tfds.testing.mock_data(num_examples=4):
    recs = load_records({"tfds": "imdb_reviews", "split": "train"})
    assert len(recs) == 4 and isinstance(recs[0]["text"], str)
    examples, stats = tokenize_records(recs, tok, "text", 32)
  assert stats.examples == 4 and all(e["loss_mask"].all() for e in examples)


def test_hub_offline_fails_in_one_line(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(DataError) as err:
    load_records({"hub": "tatsu-lab/alpaca", "split": "train"})
  msg = str(err.value)
  assert "\n" not in msg and "tatsu-lab/alpaca" in msg and "could not load" in msg
