"""Metrics: JSONL + TensorBoard writer, resume truncation, throughput/MFU math, progress bar."""

import glob
import io
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ftjax
from ftjax.metrics import (METRICS_FILE, MetricsWriter, ProgressBar, Throughput, peak_flops,
                           read_metrics)
from tests.conftest import BASE_SEQ


def test_writer_jsonl_and_tensorboard(tmp_path):
  wd = str(tmp_path)
  with MetricsWriter(wd) as w:
    w.write(1, {"loss": jnp.float32(2.5), "lr": np.float64(1e-3), "tokens": 128})
    w.write(2, {"loss": jnp.asarray([1.25]), "eval_loss": float("nan")})
  rows = read_metrics(wd)
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["loss"] == 2.5 and rows[0]["lr"] == 1e-3 and rows[0]["tokens"] == 128.0
  assert all(type(v) is float for k, v in rows[0].items() if k != "step")
  assert rows[1]["loss"] == 1.25 and np.isnan(rows[1]["eval_loss"])
  assert rows[0]["time"] <= rows[1]["time"]
  events = glob.glob(os.path.join(wd, "tensorboard", "events.out.tfevents.*"))
  assert len(events) == 1
  scalars = {(tag, step): v for tag, step, v in _read_tb_scalars(events[0])}
  assert scalars[("loss", 1)] == 2.5 and scalars[("loss", 2)] == 1.25
  assert scalars[("lr", 1)] == pytest.approx(1e-3)


def _read_tb_scalars(path):
  """(tag, step, value) from a TFRecord event file: u64 length, u32 crc, data, u32 crc."""
  from tensorboardX.proto import event_pb2
  data = open(path, "rb").read()
  i = 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    i += 12 + n + 4
    for v in event.summary.value:
      yield v.tag, event.step, v.simple_value


def test_writer_rejects_non_scalars(tmp_path):
  with MetricsWriter(str(tmp_path), use_tensorboard=False) as w:
    with pytest.raises(ValueError, match="metric 'logits' must be a scalar"):
      w.write(0, {"logits": jnp.ones(3)})


def test_resume_drops_steps_after_checkpoint(tmp_path):
  wd = str(tmp_path)
  with MetricsWriter(wd, use_tensorboard=False) as w:
    for s in range(1, 6):
      w.write(s, {"loss": 1.0 / s})
  with open(os.path.join(wd, METRICS_FILE), "a") as f:
    f.write('{"step": 6, "lo')  # killed mid-line
  assert [r["step"] for r in read_metrics(wd)] == [1, 2, 3, 4, 5]
  with MetricsWriter(wd, use_tensorboard=False, resume_step=3) as w:  # checkpoint was at 3
    w.write(4, {"loss": 0.2})
  assert [r["step"] for r in read_metrics(wd)] == [1, 2, 3, 4]
  assert read_metrics(str(tmp_path / "none")) == []


class FakeClock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


class FakeCfg:
  def flops_per_token(self, seq_len):
    return 100.0 + seq_len


def test_throughput_math():
  clock = FakeClock()
  tp = Throughput(FakeCfg(), seq_len=0, window=2, peak_flops_per_device=1000.0, num_devices=2,
                  clock=clock)
  assert tp.flops_per_token == 100.0
  assert tp.update(10) == {}  # starts the clock (compile step)
  clock.t = 1.0
  assert tp.update(10) == {"tokens_per_sec": 10.0, "mfu": 10.0 * 100.0 / 2000.0}
  clock.t = 3.0
  assert tp.update(30)["tokens_per_sec"] == pytest.approx(40.0 / 3.0)
  clock.t = 4.0
  # Window of 2 steps: (30 + 30) tokens over t = 1 -> 4.
  assert tp.update(30) == pytest.approx({"tokens_per_sec": 20.0, "mfu": 1.0})


def test_throughput_with_model_config():
  cfg = ftjax.get_preset("tiny")
  tp = Throughput(cfg, seq_len=128, peak_flops_per_device=1e12, num_devices=1,
                  clock=FakeClock())
  assert tp.flops_per_token == cfg.flops_per_token(128) > 0
  with pytest.raises(ValueError, match="seq_len"):
    Throughput(cfg)


def test_peak_flops_table():
  assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert peak_flops("NVIDIA H200") == 989e12
  assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert peak_flops("TPU v4") == 275e12
  assert peak_flops("TPU v5 lite") == 197e12
  assert peak_flops("TPU v5p") == 459e12
  assert peak_flops("TPU v5") == 459e12
  assert peak_flops("TPU v6 lite") == 918e12  # v6e (Trillium)
  assert peak_flops("TPU v6e") == 918e12
  assert peak_flops("cpu") is None
  assert peak_flops() is None  # tests run on CPU
  clock = FakeClock()
  tp = Throughput(flops_per_token=1.0, clock=clock)  # CPU: no MFU
  tp.update(1)
  clock.t = 1.0
  assert tp.update(5) == {"tokens_per_sec": 5.0}


def test_progress_bar():
  out = io.StringIO()
  with ProgressBar(10, initial=2, file=out, mininterval=0) as bar:
    bar.update(3, {"loss": jnp.float32(1.5), "lr": 3e-4, "tokens_per_sec": 12345.0,
                   "mfu": 0.42, "ignored": jnp.ones(3)})
    assert bar.bar.n == 3
    bar.update(5)
    assert bar.bar.n == 5
    post = bar.bar.postfix
  assert "loss=1.5" in post and "lr=3.00e-04" in post and "tok/s=12.3k" in post
  assert "mfu=42.0%" in post
  assert "5/10" in out.getvalue()
  json.dumps(post)


def test_resume_drops_replayed_steps_from_tensorboard(tmp_path):
  """After a resume from step 3, steps 4-5 of the killed run are gone from every event file."""
  wd = str(tmp_path)
  with MetricsWriter(wd) as w:
    for s in range(1, 6):
      w.write(s, {"loss": 1.0 / s})
  with MetricsWriter(wd, resume_step=3) as w:
    for s in range(4, 7):
      w.write(s, {"loss": 10.0 + s})
  events = sorted(glob.glob(os.path.join(wd, "tensorboard", "events.out.tfevents.*")))
  seen = [(step, v) for path in events for tag, step, v in _read_tb_scalars(path)]
  assert sorted(s for s, _ in seen) == [1, 2, 3, 4, 5, 6]
  assert dict(seen) == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3, 4: 14.0, 5: 15.0, 6: 16.0})


def _matmul_weights(params):
  """Dense matmul weights of a params tree, counted from the arrays (not from the config)."""
  from flax import traverse_util
  flat = traverse_util.flatten_dict(params)
  return sum(v.size for k, v in flat.items() if k[-1] in ("kernel", "lm_head", "score"))


def test_sft_throughput_counts_frozen_base_and_last_partial_interval(
    base_dir, chat_files, monkeypatch, tmp_path):
  from configs import sft as sft_config
  from ftjax.train import sft
  from ftjax import metrics as metrics_lib
  calls = {"tokens": []}

  class Recorder(metrics_lib.Throughput):
    def __init__(self, *a, **kw):
      super().__init__(*a, **kw)
      calls["flops"] = self.flops_per_token

    def update(self, tokens):
      calls["tokens"].append(tokens)
      return super().update(tokens)

  monkeypatch.setattr(metrics_lib, "Throughput", Recorder)
  c = sft_config.get_config("adapter=lora,smoke")
  c.model.hf_path = base_dir
  c.data.path, c.data.eval_path = chat_files
  c.train.update(seq_len=BASE_SEQ, batch_size=2, grad_accum=1, steps=3, log_every=2, eval_every=100,
                 save_every=100)
  sft.run(c, str(tmp_path / "run"))
  per_step = 2 * BASE_SEQ
  assert calls["tokens"] == [2 * per_step, per_step]  # step 3 is a one-step interval

  model, params = ftjax.load_pretrained(base_dir)
  cfg = model.cfg
  n = _matmul_weights(params)  # untied llama: the kernels and lm_head
  lora_model, lora_params = ftjax.load_pretrained(
      base_dir, lora=ftjax.LoraConfig(rank=c.adapter.rank, targets=c.adapter.targets))
  n_lora = sum(x.size for x in jax.tree_util.tree_leaves(ftjax.lora.adapter_params(lora_params)))
  attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * BASE_SEQ
  # Frozen base: 4N (forward + activation gradients), trained LoRA: 6N. Norms are not
  # matmuls, hence the tolerance.
  assert calls["flops"] == pytest.approx(4 * n + 6 * n_lora + attn, rel=5e-3)


def test_train_flops_full_fine_tuning_is_6n():
  cfg = ftjax.get_preset("tiny")
  params = ftjax.model.init_params(ftjax.model.Decoder(cfg), jax.random.PRNGKey(0))
  full = metrics_lib_train_flops(cfg, 128, params)
  assert full == pytest.approx(cfg.flops_per_token(128), rel=1e-9)


def metrics_lib_train_flops(cfg, seq_len, trainable, frozen=None):
  from ftjax.metrics import train_flops_per_token
  return train_flops_per_token(cfg, seq_len, trainable, frozen)
