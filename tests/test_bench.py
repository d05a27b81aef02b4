"""The benches (ftjax/recipes/bench.py, experiments/bench.py): each once on the tiny preset (CPU),
the FLOP count, the CLI."""

import json
import os
import subprocess
import sys

import pytest

import ftjax
from ftjax.recipes import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_forward_flops_is_a_third_of_train_flops():
  cfg = ftjax.get_preset("llama-3.2-1b")
  assert bench.forward_flops_per_token(cfg, 2048) * 3 == pytest.approx(cfg.flops_per_token(2048))
  tiny = ftjax.get_preset("tiny")  # counted by hand from its shapes (norm scales included)
  d, f, v, lay, n, kv, h, t = 64, 128, 256, 2, 4, 2, 16, 32
  linear = lay * (d * n * h + 2 * d * kv * h + n * h * d + 3 * d * f)
  expected = 2 * (linear + lay * 2 * d + d + v * d) + 4 * lay * n * h * t
  assert bench.forward_flops_per_token(tiny, t) == expected


def test_peak_flops_table_is_the_package_one():
  from ftjax import metrics
  assert bench.peak_flops is metrics.peak_flops  # one table (test_metrics checks its values)
  assert bench.peak_flops("TPU v6 lite") == 918e12


def test_run_every_bench(tmp_path, capsys):
  out = str(tmp_path / "bench.jsonl")
  records = bench.run(bench.BENCHES, preset="tiny", batch=2, seq_len=32, attention="xla",
                      steps=2, warmup=1, max_new_tokens=4, out=out, rank=4)
  by_bench = {r["bench"]: r for r in records}
  assert list(by_bench) == list(bench.BENCHES) and len(records) == len(bench.BENCHES)
  for name in ("forward", "generate") + bench.STEP_BENCHES:
    r = by_bench[name]
    assert r["tokens_per_s"] > 0 and r["median_s"] > 0 and r["attention"] == "xla"
    assert r["device_kind"] == "cpu" and r["compute_dtype"] == "float32"
    assert "mfu" not in r  # no peak for a CPU
  assert by_bench["forward"]["tflops_per_s"] > 0
  tiny = ftjax.get_preset("tiny")
  full = by_bench["full_step"]
  assert full["flops_per_token"] == tiny.flops_per_token(32)  # everything trained: 6N
  lora = by_bench["lora_step"]
  # LoRA r=4 on every linear kernel of the tiny preset, counted by hand: A [in, 4] + B [4, out].
  d, f, n, kv, h, lay = 64, 128, 4, 2, 16, 2
  kernels = [(d, n * h), (d, kv * h), (d, kv * h), (n * h, d), (d, f), (d, f), (f, d)]
  n_lora = lay * sum(4 * (i + o) for i, o in kernels)
  assert lora["trainable_params"] == n_lora
  n_matmul = tiny.num_params(include_embeddings=False) + tiny.vocab_size * tiny.d_model
  attention = 4 * lay * n * h * 32
  assert lora["flops_per_token"] == 6 * n_lora + 4 * n_matmul + 3 * attention
  for r in (full, lora, by_bench["qlora_step"]):
    assert r["compile_s"] > 0 and r["step_bytes"] > 0 and r["final_loss"] > 0
  grpo = by_bench["grpo_step"]  # 2 prompts x G=8 completions of 4 tokens
  assert grpo["completions"] == 16 and grpo["num_generations"] == 8
  assert grpo["rollout_tokens_per_s"] == pytest.approx(16 * 4 / grpo["rollout_median_s"])
  assert grpo["tokens_per_s"] == pytest.approx(16 * (32 + 4) / grpo["median_s"])
  assert grpo["trainable_params"] == n_lora and grpo["step_bytes"] > 0
  assert grpo["reference_median_s"] > 0 and grpo["advantages_median_s"] > 0
  # Fewer bytes with a 4-bit base: the kernels are a fraction of the tiny model's params.
  assert by_bench["qlora_step"]["argument_bytes"] < lora["argument_bytes"]
  q = by_bench["quant_memory"]
  bpp = q["bytes_per_param"]
  assert bpp["bfloat16"] == 2.0 and bpp["float32"] == 4.0
  assert 0.5 < bpp["nf4_dq"] <= 0.53 and bpp["nf4_dq"] < bpp["nf4"] < bpp["bfloat16"]
  assert 0.5 < bpp["int4_dq"] <= 0.53
  assert q["linear_params"] + q["other_params"] == ftjax.get_preset("tiny").num_params()
  table = capsys.readouterr().out
  assert "quant_memory" in table and "lora_step" in table and "step memory" in table
  with open(out) as f:
    lines = [json.loads(line) for line in f]
  assert [r["bench"] for r in lines] == list(bench.BENCHES)


def test_run_rejects_unknown_bench():
  with pytest.raises(ValueError, match="backward"):
    bench.run("forward,backward")


def test_cli(tmp_path):
  out = str(tmp_path / "cli.jsonl")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "bench.py"), "--bench=forward",
         "--preset=tiny", "--batch=2", "--seq_len=32", "--steps=2", "--warmup=1",
         "--attention=dot_product", f"--out={out}"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  assert "forward      dot_product" in res.stdout
  with open(out) as f:
    (rec,) = [json.loads(line) for line in f]
  assert rec["bench"] == "forward" and rec["tokens_per_s"] > 0


def test_peer_hf_on_cpu():
  """--peer=hf runs the same LoRA step in transformers + PEFT (torch CPU here) beside ftjax's."""
  # test_run_every_bench's shapes: ftjax's two steps are the session compile cache's.
  records = bench.run("lora_step,qlora_step", preset="tiny", batch=2, seq_len=32,
                      attention="xla", steps=2, warmup=1, rank=4, peer="hf", verbose=False)
  lora, qlora = records
  assert lora["peer"] == "hf-peft" and lora["peer_tokens_per_s"] > 0
  assert lora["ratio"] == pytest.approx(lora["tokens_per_s"] / lora["peer_tokens_per_s"])
  assert "ratio" not in qlora and "CUDA" in qlora["peer_skipped"]


def test_run_rejects_unknown_peer():
  with pytest.raises(ValueError, match="peer"):
    bench.run("lora_step", peer="nemo")
