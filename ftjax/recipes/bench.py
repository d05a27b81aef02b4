"""Throughput and memory benchmarks of the ftjax decoder on random params, one device.

  python experiments/bench.py --bench=forward,lora_step,full_step --preset=llama-3.2-1b --batch=8 \
      --seq_len=2048 --dtype=bfloat16 --steps=20 --out=/tmp/bench.jsonl

Benches (`--bench`, a comma list or repeated; `--attention` runs each listed implementation):
  forward       jitted `model.apply` -> logits; tokens/s, achieved TFLOP/s and MFU.
  lora_step     the real SFT update step (`train/common.update_step` with the SFT loss, as
  qlora_step    ftjax/train/sft.py runs it): LoRA on all linear layers (--rank, alpha 2*rank)
  full_step     over a dense base, over an NF4 base, or full fine-tuning; adamw, state donated.
                Reports tokens/s, model TFLOP/s and MFU (frozen kernels counted 4 FLOPs per
                param and token: no weight gradients), compile seconds, the compiled step's
                memory (arguments + temporaries) and the device's peak memory where it has one.
                With --peer=hf the same workload runs in transformers + PEFT (bitsandbytes NF4
                for qlora_step, CUDA only) and the ratio is printed.
  generate      `ftjax.generate` (prefill of a --seq_len prompt, then --max_new_tokens greedy
                decode steps); decoded tokens/s (the prefill time is inside the timed call).
  quant_memory  bytes of the linear kernels in float32, bfloat16, NF4 and int4 (each with and
                without double quant): layer 0's kernels are really quantized and the result
                is extrapolated to every layer (all layers have the same shapes).
  multi_lora_decode
                N = 1, 4, 16 LoRA adapters (--rank, all linear layers, random A and B) over one
                base, --batch rows (rounded up to a multiple of N; row i on adapter i mod N):
                greedy decode of --max_new_tokens per row as ONE mixed batch (ftjax/adapters.py,
                each row gathers its adapter) against each adapter's rows run SEPARATELY on an
                ordinary LoRA model (N calls, one compilation). Decoded tokens/s of both, their
                ratio (asked for by name, not part of "every bench").
  aot           compile ahead of time, from abstract shapes, without allocating or running
                anything: the SFT step (--aot_steps=sft,grpo,dpo,decode for the others) per
                --aot_modes (full, lora, qlora = NF4 + double quant, int4 + double quant);
                memory_analysis bytes, FLOPs (checked against the MFU formula below) and
                compile seconds, on one device and per device on --mesh (ftjax/recipes/aot.py);
                --aot_offload=none,optimizer,activations,both adds train.offload's rows (what
                each keeps off the device).
  grpo_step     one GRPO iteration of ftjax/train/grpo.py with LoRA (--rank): the rollout of
                --batch prompts (--seq_len tokens) x --num_generations samples of
                --max_new_tokens each (no early EOS) from the live params, then the update step
                on that batch (dapo loss, chunked logprobs). tokens_per_s is the update's
                (prompt + completion tokens), rollout_tokens_per_s the decoded tokens;
                rollout_median_s, reference_median_s (the reference forward) and
                advantages_median_s (group advantages + the placed step batch) time the loop's
                other phases (scoring needs a task's text: grpo.run's score_seconds). The real
                shape (a GPU): --preset=llama-3.2-1b --batch=8 --num_generations=8 --seq_len=128
                --max_new_tokens=256 --dtype=bfloat16.

FLOPs (2 per multiply-add; embedding gathers, norms, RoPE and softmax are not counted):
  forward per token = 2 * (N_nonembedding + V * D)       linear kernels and the logits matmul
                      + 4 * L * N * H * T                 QK^T and PV over the full T x T square
  which is `cfg.flops_per_token(T) / 3`; a train step is 3x the forward (`cfg.flops_per_token`,
  the PaLM / MaxText count). With frozen kernels (LoRA, QLoRA) the backward computes activation
  gradients (2 per param) but no weight gradients, so a frozen matmul param costs 4 FLOPs per
  token and a trained one 6 (`metrics.train_flops_per_token`). The attention term has no causal
  discount: ftjax passes a boolean mask, so neither the XLA einsums nor cuDNN skip the masked
  half.
MFU = achieved FLOP/s / the chip's dense bf16 peak (`ftjax.metrics.PEAK_FLOPS`), reported only
when the compute dtype is bfloat16 and the device kind is in the table.

Timing: the first call compiles (`compile_s`), `--warmup` untimed calls in all (at least that
one), then `--steps` calls each ended by `jax.block_until_ready`; the median is reported.
Records go to stdout as a table and, with --out, are appended to a JSON-lines file.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import statistics
import time
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import ftjax
from ftjax.config import ModelConfig
from ftjax.metrics import peak_flops
from ftjax.model import AdapterSpec

BENCHES = ("forward", "lora_step", "qlora_step", "full_step", "generate", "quant_memory",
           "grpo_step")
# aot compiles without running, one row per mode: asked for by name, not part of "every bench".
ALL_BENCHES = BENCHES + ("aot", "multi_lora_decode")
MULTI_LORA_N = (1, 4, 16)  # multi_lora_decode: adapters in the batch
STEP_BENCHES = ("lora_step", "qlora_step", "full_step")
PEERS = ("none", "hf")
ATTENTIONS = ("xla", "dot_product")

# Storage formats of quant_memory: name -> QuantConfig (None: a plain float dtype).
QUANT_FORMATS = {
    "nf4_dq": ftjax.QuantConfig(kind="nf4", double_quant=True),
    "nf4": ftjax.QuantConfig(kind="nf4", double_quant=False),
    "int4_dq": ftjax.QuantConfig(kind="int4", double_quant=True),
    "int4": ftjax.QuantConfig(kind="int4", double_quant=False),
}


def default_compute_dtype() -> str:
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token at length T (see the module docstring): matmul weights + attention."""
  weights = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model
  attention = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
  return 2.0 * weights + attention


def time_calls(call: Callable[[], object], steps: int, warmup: int) -> tuple[float, list[float]]:
  """(seconds of the first, compiling call, seconds of each of `steps` timed calls)."""
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  compile_s = time.perf_counter() - t0
  for _ in range(max(warmup, 1) - 1):
    jax.block_until_ready(call())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  return compile_s, times


def _init(cfg: ModelConfig, seed: int):
  """Decoder and random params, built by one jitted init straight in cfg.param_dtype on the
  default device, so a bf16 model is never materialised whole in float32."""
  model = ftjax.Decoder(cfg)
  return model, ftjax.init_params(model, jax.random.PRNGKey(seed))


def _tokens(cfg: ModelConfig, batch: int, seq_len: int, seed: int) -> jax.Array:
  return jax.random.randint(jax.random.PRNGKey(seed + 1), (batch, seq_len), 0, cfg.vocab_size,
                            jnp.int32)  # [B, T]


def _throughput(rec: dict, times: list[float], tokens: int, flops: Optional[float]) -> dict:
  """Fill timing, tokens/s, TFLOP/s and MFU fields of a record."""
  med = statistics.median(times)
  rec.update(median_s=med, min_s=min(times), tokens_per_s=tokens / med)
  if flops is not None:
    rec["flops_per_step"] = flops
    rec["tflops_per_s"] = flops / med / 1e12
    peak = peak_flops(rec["device_kind"])
    if peak is not None and rec["compute_dtype"] == "bfloat16":
      rec["peak_flops"] = peak
      rec["mfu"] = flops / med / peak
  return rec


# A timed bench returns (record fields, seconds per timed call, tokens per call, FLOPs per call).
Timed = tuple[dict, list[float], int, Optional[float]]


def bench_forward(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int,
                  seed: int, **_) -> Timed:
  model, params = _init(cfg, seed)
  tokens = _tokens(cfg, batch, seq_len, seed)
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t))  # [B, T] -> [B, T, V] float32
  compile_s, times = time_calls(lambda: fwd(params, tokens), steps, warmup)
  n = batch * seq_len
  rec = {"compile_s": compile_s, "flops_per_token": forward_flops_per_token(cfg, seq_len)}
  return rec, times, n, rec["flops_per_token"] * n


def _adapter_spec(bench: str, rank: int) -> AdapterSpec:
  if bench == "full_step":
    return AdapterSpec()
  quant = ftjax.QuantConfig(kind="nf4", double_quant=True) if bench == "qlora_step" else None
  return AdapterSpec(lora=ftjax.LoraConfig(rank=rank, alpha=2.0 * rank, targets="all-linear"),
                     quant=quant)


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return {"argument_bytes": int(m.argument_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes),
          "step_bytes": int(m.argument_size_in_bytes + m.temp_size_in_bytes)}


def bench_step(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int, seed: int,
               bench: str = "lora_step", rank: int = 16, **_) -> Timed:
  """The SFT update step of ftjax/train/sft.py on random params and tokens."""
  from ftjax import metrics, partition
  from ftjax.train import common, sft
  model = ftjax.Decoder(cfg, _adapter_spec(bench, rank))
  params = ftjax.init_params(model, jax.random.PRNGKey(seed))
  kind = "full" if bench == "full_step" else "lora"
  trainable, frozen, _ = common.split_params(params, partition.rules_for(kind))
  del params
  schedule = common.make_schedule(1e-5, 1000, 0, "constant")
  tx = common.make_optimizer("adamw", schedule, weight_decay=0.01)
  state = jax.jit(lambda tr: common.init_state(tr, tx, seed))(trainable)
  tokens = _tokens(cfg, batch, seq_len + 1, seed)
  batch_ = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": jnp.ones((batch, seq_len), jnp.float32)}
  t0 = time.perf_counter()
  compiled = jax.jit(sft.make_step(model, tx, schedule), donate_argnums=0).lower(
      state, frozen, batch_).compile()
  compile_s = time.perf_counter() - t0
  fpt = metrics.train_flops_per_token(cfg, seq_len, trainable, frozen)
  n_trained = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(trainable))
  del trainable
  box = [state]
  del state

  def call():
    box[0], m = compiled(box[0], frozen, batch_)
    return m["loss"]

  first_s, times = time_calls(call, steps, warmup)
  rec = {"compile_s": compile_s, "first_call_s": first_s, "flops_per_token": fpt,
         "trainable_params": n_trained,
         "final_loss": float(call()), **_memory(compiled)}
  if bench != "full_step":
    rec["rank"] = rank
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    rec["peak_bytes"] = int(stats["peak_bytes_in_use"])
  return rec, times, batch * seq_len, fpt * batch * seq_len


def bench_generate(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int,
                   seed: int, max_new_tokens: int = 32, **_) -> Timed:
  model, params = _init(cfg, seed)
  prompt = np.asarray(_tokens(cfg, batch, seq_len, seed))  # [B, T], no padding
  mask = np.ones(prompt.shape, bool)
  rng = jax.random.PRNGKey(seed + 2)
  # eos_id=None: no row stops early, so every call decodes exactly max_new_tokens per row.
  call = lambda: ftjax.generate(model, params, prompt, mask, max_new_tokens=max_new_tokens,
                                rng=rng, temperature=0.0)
  compile_s, times = time_calls(call, steps, warmup)
  rec = {"compile_s": compile_s, "max_new_tokens": max_new_tokens, "prompt_len": seq_len,
         "note": "tokens_per_s counts decoded tokens; each timed call includes the prefill"}
  return rec, times, batch * max_new_tokens, None


def bench_grpo_step(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int,
                    seed: int, max_new_tokens: int = 32, rank: int = 16, num_generations: int = 8,
                    **_) -> Timed:
  """One GRPO iteration of ftjax/train/grpo.py with LoRA: the rollout (`batch` prompts of
  `seq_len` tokens, G samples of `max_new_tokens` each, no early EOS, from the live params) and
  the update step on it. tokens_per_s counts the update's prompt + completion tokens;
  rollout_tokens_per_s the decoded completion tokens."""
  from ftjax import losses, lora, metrics, partition, rollout
  from ftjax.train import common, grpo
  model = ftjax.Decoder(cfg, _adapter_spec("lora_step", rank))
  params = ftjax.init_params(model, jax.random.PRNGKey(seed))
  trainable, frozen, _ = common.split_params(params, partition.rules_for("lora"))
  del params
  schedule = common.make_schedule(1e-5, 1000, 0, "constant")
  tx = common.make_optimizer("adamw", schedule)
  state = jax.jit(lambda tr: common.init_state(tr, tx, seed))(trainable)
  n_trained = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(trainable))
  prompts = np.asarray(_tokens(cfg, batch, seq_len, seed)).tolist()
  g, m = int(num_generations), int(max_new_tokens)
  box, last = [state], []
  del state

  def do_rollout():
    policy = partition.merge(box[0]["params"], frozen)  # the live params: no copy, no merge
    last[:] = [rollout.rollout(model, policy, prompts, n_samples=g, max_new_tokens=m,
                               rng=jax.random.PRNGKey(seed + 2), temperature=1.0,
                               eos_ids=(), prompt_len=seq_len)]
    return last[0]["logprobs"]

  roll_first, roll_times = time_calls(do_rollout, steps, warmup)
  # The loop's other phases on this rollout (grpo.run's timers): the reference forward (the
  # adapters switched off, beta != 0), then the group advantages of G rewards per prompt and
  # the step batch placed on the device. Scoring is the task's reward functions on decoded
  # text: no tokenizer here (random tokens), so it is timed by the loop only.
  ref_lp = rollout.make_logprob_fn(lora.disable(model), chunk=256)
  _, ref_times = time_calls(lambda: ref_lp(partition.merge(box[0]["params"], frozen), last[0]),
                            steps, warmup)
  rewards = np.random.default_rng(seed).normal(size=batch * g).astype(np.float32)

  def place():
    adv, _ = losses.grpo_advantages(jnp.asarray(rewards), g, "group")
    return jax.device_put(grpo.step_batch(last[0], np.asarray(adv)))

  _, adv_times = time_calls(place, steps, warmup)
  step_batch = place()
  settings = grpo.GRPOSettings(loss_type="dapo", max_completion_length=m)
  t0 = time.perf_counter()
  compiled = jax.jit(grpo.make_step(model, tx, schedule, settings, chunk=256),
                     donate_argnums=0).lower(box[0], frozen, step_batch).compile()
  compile_s = time.perf_counter() - t0

  def call():
    box[0], out = compiled(box[0], frozen, step_batch)
    return out["loss"]

  first_s, times = time_calls(call, steps, warmup)
  n = batch * g
  fpt = metrics.train_flops_per_token(cfg, seq_len + m, trainable, frozen)
  rec = {"compile_s": compile_s, "first_call_s": first_s, "rollout_first_call_s": roll_first,
         "num_generations": g, "max_new_tokens": m, "prompt_len": seq_len, "completions": n,
         "trainable_params": n_trained, "rank": rank,
         "rollout_median_s": statistics.median(roll_times),
         "reference_median_s": statistics.median(ref_times),
         "advantages_median_s": statistics.median(adv_times),
         "rollout_tokens_per_s": n * m / statistics.median(roll_times), **_memory(compiled)}
  return rec, times, n * (seq_len + m), fpt * n * (seq_len + m)


def _nbytes(q: dict) -> int:
  return round(ftjax.quant.bytes_per_param(q, 1))  # bytes per 1 param: the total bytes


def bench_quant_memory(cfg: ModelConfig, seed: int, **_) -> dict:
  """Bytes of the quantizable (all-linear) kernels per storage format, from shapes and layer 0."""
  model = ftjax.Decoder(cfg.replace(scan_layers=False))  # per-layer `layer_{i}` shapes
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  flat = traverse_util.flatten_dict(nn.meta.unbox(shapes)["params"], sep="/")
  pattern = re.compile(AdapterSpec().quant_targets)  # what load_pretrained(quant=...) quantizes
  linear = {p: s.shape for p, s in flat.items()
            if p.endswith("/kernel") and pattern.search(p[:-len("/kernel")])}
  n_linear = sum(math.prod(s) for s in linear.values())
  n_other = sum(math.prod(s.shape) for s in flat.values()) - n_linear
  layers = {}
  for path, shape in linear.items():
    layer, rest = path.split("/", 1)
    layers.setdefault(layer, {})[rest] = shape
  layer0 = layers["layer_0"]
  if any(kernels != layer0 for kernels in layers.values()):
    raise ValueError(f"quant_memory: preset layers differ in kernel shapes; cannot extrapolate "
                     f"layer_0 to all {len(layers)} layers")
  n_layer0 = sum(math.prod(s) for s in layer0.values())

  per_layer = {name: 0 for name in QUANT_FORMATS}
  for shape in layer0.values():
    # The [in, out] kernel as load_pretrained quantizes it (bitsandbytes' blocks along `in`).
    # Storage bytes depend only on the shapes and dtypes quantize returns, so trace it
    # (eval_shape) rather than compile and run it once per kernel size and format.
    w = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    for name, qcfg in QUANT_FORMATS.items():
      per_layer[name] += _nbytes(jax.eval_shape(functools.partial(ftjax.quant.quantize,
                                                                  cfg=qcfg), w))
  linear_bytes = {"float32": 4 * n_linear, "bfloat16": 2 * n_linear}
  linear_bytes.update({name: b * len(layers) for name, b in per_layer.items()})
  bytes_per_param = {name: b / n_linear for name, b in linear_bytes.items()}
  # A QLoRA-style model keeps embeddings, norms and the head in bf16 beside 4-bit kernels.
  model_bytes = {name: b + n_other * (4 if name == "float32" else 2)
                 for name, b in linear_bytes.items()}
  return {
      "linear_params": n_linear, "other_params": n_other, "n_layers_quantized": 1,
      "layer_params": n_layer0, "linear_bytes": linear_bytes, "bytes_per_param": bytes_per_param,
      "model_bytes": model_bytes, "block_size": QUANT_FORMATS["nf4"].block_size,
      "note": (f"layer_0's {len(layer0)} linear kernels ({n_layer0:,} params) quantized, "
               f"extrapolated x{len(layers)} layers; model_bytes keeps the other {n_other:,} "
               "params in bfloat16 (float32 for the float32 column)")}


def _lora_tree(cfg: ModelConfig, rank: int, seed: int):
  """(LoRA model on all linear layers, alpha 2 * rank; its random params)."""
  spec = AdapterSpec(lora=ftjax.LoraConfig(rank=rank, alpha=2.0 * rank))
  model = ftjax.Decoder(cfg, spec)
  params = ftjax.init_params(model, jax.random.PRNGKey(seed))
  return model, params


def bench_multi_lora_decode(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int,
                            seed: int, max_new_tokens: int = 32, rank: int = 16,
                            n_adapters: int = 4, **_) -> Timed:
  from ftjax import lora
  from ftjax.lora import MultiLoraConfig
  n = int(n_adapters)
  b = -(-batch // n) * n
  single, params = _lora_tree(cfg, rank, seed)
  base = lora.base_params(params)
  flat = traverse_util.flatten_dict(lora.adapter_params(params))
  keys = jax.random.split(jax.random.PRNGKey(seed + 3), n)
  per_adapter = []  # n adapter trees: A as initialised per seed, B random (not zero)
  for i in range(n):
    ks = jax.random.split(keys[i], len(flat))
    per_adapter.append({k: 0.02 * jax.random.normal(kk, v.shape, v.dtype)
                        for (k, v), kk in zip(sorted(flat.items()), ks)})
  sites = sorted({k[:-1] for k in flat})
  stacked = {}
  for site in sites:
    axis = 1 if lora.is_stacked(site) else 0  # [L, N, ...] under the scan
    for leaf, multi in (("lora_a", "multi_lora_a"), ("lora_b", "multi_lora_b")):
      stacked[site + (multi,)] = jnp.stack([t[site + (leaf,)] for t in per_adapter], axis)
  mcfg = MultiLoraConfig(names=tuple(f"a{i}" for i in range(n)),
                         configs=(single.spec.lora,) * n, rank=rank,
                         targets="(" + "|".join("/".join(s) + "$" for s in sites) + ")")
  multi = ftjax.Decoder(cfg, AdapterSpec(multi=mcfg))
  multi_params = lora.with_adapter(base, traverse_util.unflatten_dict(stacked))
  prompt = np.asarray(_tokens(cfg, b, seq_len, seed))
  mask = np.ones(prompt.shape, bool)
  rows = np.arange(b, dtype=np.int32) % n
  gen = functools.partial(ftjax.generate, max_new_tokens=max_new_tokens, temperature=0.0)
  mixed = lambda: gen(multi, multi_params, prompt, mask, adapter_rows=rows)
  one_params = [lora.with_adapter(base, traverse_util.unflatten_dict(t)) for t in per_adapter]

  def separate():
    return [gen(single, one_params[i], prompt[rows == i], mask[rows == i]) for i in range(n)]

  compile_s, times = time_calls(mixed, steps, warmup)
  sep_compile_s, sep_times = time_calls(separate, steps, warmup)
  decoded = b * max_new_tokens
  sep_med = statistics.median(sep_times)
  rec = {"compile_s": compile_s, "n_adapters": n, "rows": b, "rank": rank,
         "max_new_tokens": max_new_tokens, "prompt_len": seq_len,
         "separate_median_s": sep_med, "separate_min_s": min(sep_times),
         "separate_max_s": max(sep_times), "max_s": max(times),
         "separate_tokens_per_s": decoded / sep_med,
         "separate_compile_s": sep_compile_s,
         "note": "tokens_per_s counts decoded tokens of the mixed batch (prefill included); "
                 "separate_*: each adapter's rows in its own call, the N calls summed"}
  return rec, times, decoded, None


TIMED = {"forward": bench_forward, "generate": bench_generate, "grpo_step": bench_grpo_step,
         "multi_lora_decode": bench_multi_lora_decode,
         **{b: bench_step for b in STEP_BENCHES}}


def _split(values: Sequence[str] | str) -> list[str]:
  values = [values] if isinstance(values, str) else values
  return [v.strip() for s in values for v in s.split(",") if v.strip()]


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.3g} {unit}"
    n /= 1024


def format_table(records: list[dict]) -> str:
  """One compact row per record."""
  head = (f"{'bench':<12} {'attention':<11} {'median_ms':>10} {'compile_s':>9} {'tokens/s':>12} "
          f"{'TFLOP/s':>9} {'MFU':>6}  note")
  rows = [head, "-" * len(head)]
  for r in records:
    if r["bench"] == "quant_memory":
      bpp = r["bytes_per_param"]
      lb = r["linear_bytes"]
      note = (f"B/param nf4_dq {bpp['nf4_dq']:.4f} nf4 {bpp['nf4']:.4f} int4_dq "
              f"{bpp['int4_dq']:.4f} int4 {bpp['int4']:.4f} bf16 {bpp['bfloat16']:.1f}; linear "
              f"kernels bf16 {_human(lb['bfloat16'])} -> nf4_dq {_human(lb['nf4_dq'])} "
              "(layer_0 quantized, extrapolated)")
      rows.append(f"{r['bench']:<12} {'-':<11} {'-':>10} {'-':>9} {'-':>12} {'-':>9} {'-':>6}  "
                  + note)
      continue
    med = r["median_s"] * 1e3
    note = f"decoded {r['max_new_tokens']} tok/seq" if r["bench"] == "generate" else ""
    if r["bench"] == "multi_lora_decode":
      note = (f"N={r['n_adapters']} adapters, {r['rows']} rows; separate "
              f"{r['separate_tokens_per_s']:,.0f} tok/s; mixed/separate "
              f"{r['tokens_per_s'] / r['separate_tokens_per_s']:.2f}x")
    if r["bench"] == "grpo_step":
      note = (f"update tok/s; rollout {r['rollout_tokens_per_s']:,.0f} decoded tok/s "
              f"({r['completions']} x {r['max_new_tokens']} tok in {r['rollout_median_s']:.2f}s)"
              f"; reference {r['reference_median_s'] * 1e3:.1f} ms, advantages + placement "
              f"{r['advantages_median_s'] * 1e3:.1f} ms")
    if r["bench"] in STEP_BENCHES:
      note = f"step memory {_human(r['step_bytes'])}" if "step_bytes" in r else ""
      if "peak_bytes" in r:
        note += f", device peak {_human(r['peak_bytes'])}"
      if "peer_tokens_per_s" in r:
        note += (f"; hf-peft {r['peer_tokens_per_s']:,.0f} tok/s"
                 + (f" {_human(r['peer_peak_bytes'])}" if "peer_peak_bytes" in r else "")
                 + f", ratio {r['ratio']:.2f}x")
      elif "peer_skipped" in r:
        note += f"; hf-peft skipped: {r['peer_skipped']}"
    rows.append(f"{r['bench']:<12} {r['attention']:<11} {med:>10.3f} {r['compile_s']:>9.2f} "
                f"{r['tokens_per_s']:>12,.0f} {_fmt(r.get('tflops_per_s'), '9.3f'):>9} "
                f"{_fmt(r.get('mfu'), '6.1%'):>6}  {note}".rstrip())
  return "\n".join(rows)


def run(benches: Sequence[str] | str = BENCHES, preset: str = "tiny", batch: int = 4,
        seq_len: int = 128, attention: Sequence[str] | str = ATTENTIONS,
        dtype: str = "float32", compute_dtype: Optional[str] = None, steps: int = 10,
        warmup: int = 2, max_new_tokens: int = 32, remat: bool = False, seed: int = 0,
        out: Optional[str] = None, verbose: bool = True, rank: int = 16, peer: str = "none",
        num_generations: int = 8, aot: Optional[dict] = None) -> list[dict]:
  """Run each bench (timed ones once per attention implementation); returns the records.

  Prints the table when `verbose`; appends one JSON line per record to `out` when given.
  With `peer="hf"`, each step bench record also holds the transformers + PEFT figures of the
  same workload (`peer_*` fields) and `ratio` = ftjax tokens/s / peer tokens/s.
  """
  benches, attention = _split(benches), _split(attention)
  for b in benches:
    if b not in ALL_BENCHES:
      raise ValueError(f"--bench={b!r}: expected some of {', '.join(ALL_BENCHES)}")
  for a in attention:
    if a not in ATTENTIONS:
      raise ValueError(f"--attention={a!r}: expected some of {', '.join(ATTENTIONS)}")
  if peer not in PEERS:
    raise ValueError(f"--peer={peer!r}: expected one of {', '.join(PEERS)}")
  if peer == "hf":
    from ftjax.recipes import bench_peer
    why = bench_peer.available()
    if why:
      raise ValueError(why)
  if batch < 1 or seq_len < 2 or steps < 1 or max_new_tokens < 1:
    raise ValueError(f"bench: need batch >= 1, seq_len >= 2, steps >= 1, max_new_tokens >= 1; "
                     f"got {batch}, {seq_len}, {steps}, {max_new_tokens}")
  compute_dtype_given = compute_dtype is not None
  compute_dtype = compute_dtype or default_compute_dtype()
  base = ftjax.get_preset(preset).replace(param_dtype=dtype, dtype=compute_dtype, remat=remat)
  device = jax.devices()[0]
  common = {"preset": preset, "batch": batch, "seq_len": seq_len, "param_dtype": dtype,
            "compute_dtype": compute_dtype, "device_kind": device.device_kind,
            "platform": device.platform, "n_params": base.num_params(), "jax": jax.__version__}
  kw = dict(batch=batch, seq_len=seq_len, steps=steps, warmup=warmup, seed=seed,
            max_new_tokens=max_new_tokens, rank=rank, num_generations=num_generations)
  records = []
  for b in benches:
    if b == "aot":  # compiled, never run: its own table (ftjax/recipes/aot.py)
      from ftjax.recipes import aot as aot_lib
      for r in aot_lib.run(preset, batch=batch, seq_len=seq_len, dtype=dtype,
                           compute_dtype=compute_dtype if compute_dtype_given else dtype,
                           remat="full" if remat else "none", rank=rank,
                           num_generations=num_generations, max_new_tokens=max_new_tokens,
                           verbose=verbose, out=out, **(aot or {})):
        records.append({"bench": b, **r})
      continue
    if b == "quant_memory":  # shapes only: independent of attention and dtypes
      records.append({"bench": b, "attention": None, **common, **bench_quant_memory(base, seed)})
      continue
    ns = MULTI_LORA_N if b == "multi_lora_decode" else (None,)  # one record per N adapters
    for a, n in ((a, n) for a in attention for n in ns):
      cfg = base.replace(attention=a)
      rec, times, n_tokens, flops = TIMED[b](cfg, bench=b, n_adapters=n, **kw)
      rec = {"bench": b, "attention": a, **common, "steps": steps, "warmup": max(warmup, 1),
             **rec}
      rec = _throughput(rec, times, n_tokens, flops)
      if peer == "hf" and b in STEP_BENCHES:
        rec.update(bench_peer.peer_step(cfg, b, batch, seq_len, steps, warmup, rank, remat,
                                        seed))
        if "peer_tokens_per_s" in rec:
          rec["ratio"] = rec["tokens_per_s"] / rec["peer_tokens_per_s"]
      records.append(rec)
  if verbose and any(r["bench"] != "aot" for r in records):
    records_ = records
    records = [r for r in records if r["bench"] != "aot"]
    print(f"preset={preset} ({base.num_params():,} params) B={batch} T={seq_len} "
          f"params={dtype} compute={compute_dtype} device={device.device_kind} "
          f"({device.platform}, 1 device)")
    print(format_table(records))
    records = records_
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as f:
      for r in records:
        if r["bench"] != "aot":  # aot.run wrote its records as it went
          f.write(json.dumps({"time": time.time(), **r}) + "\n")
  return records

