"""Throughput and memory benchmarks of the ftjax decoder on random params, one device.

  python experiments/bench.py --bench=forward,lora_step,full_step --preset=llama-3.2-1b --batch=8 \
      --seq_len=2048 --dtype=bfloat16 --steps=20 --out=/tmp/bench.jsonl

The benches, their FLOP counts and timing: ftjax/recipes/bench.py (also what --help prints).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

# This checkout's ftjax, whichever one pip installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax.recipes import bench  # noqa: E402

__doc__ = bench.__doc__  # absl's --help and usage errors print the main module's docstring


def define_flags():
  """Flags of the command line; defined only when run as a script, so that they never clash in a
  process that imports several of these scripts' packages."""
  flags.DEFINE_multi_string("bench", ["forward,lora_step,full_step,generate,quant_memory"],
                            f"Benches, a comma list or repeated: {', '.join(bench.ALL_BENCHES)}.")
  flags.DEFINE_string("preset", "tiny", "Model preset (ftjax.PRESETS).")
  flags.DEFINE_integer("batch", 4, "Batch size B.")
  flags.DEFINE_integer("seq_len", 128, "Sequence length T (the prompt length for generate).")
  flags.DEFINE_list("attention", list(bench.ATTENTIONS), "Attention implementations to run, "
                    "each.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Param dtype.")
  flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                    "Compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU).")
  flags.DEFINE_integer("steps", 10, "Timed calls per bench.")
  flags.DEFINE_integer("warmup", 2, "Untimed calls before timing (at least 1: it compiles).")
  flags.DEFINE_integer("max_new_tokens", 32, "Decoded tokens per sequence for generate.")
  flags.DEFINE_bool("remat", False, "Rematerialise each block in the train steps.")
  flags.DEFINE_integer("num_generations", 8, "grpo_step: completions per prompt G (--batch "
                       "counts prompts, --seq_len is the prompt length, --max_new_tokens the "
                       "completion length).")
  flags.DEFINE_integer("rank", 16, "LoRA rank of lora_step and qlora_step (alpha = 2 * rank).")
  flags.DEFINE_enum("peer", "none", list(bench.PEERS), "hf: the same step in transformers + "
                    "PEFT.")
  flags.DEFINE_list("aot_modes", ["full", "lora", "qlora", "int4"], "aot: adapter modes.")
  flags.DEFINE_list("aot_steps", ["sft"], "aot: steps to compile (sft, grpo, dpo, decode).")
  flags.DEFINE_string("mesh", "", "aot: also compile on this mesh (e.g. fsdp=8) for per-device "
                      "bytes (fake CPU devices: XLA_FLAGS="
                      "--xla_force_host_platform_device_count=8).")
  flags.DEFINE_list("aot_mesh_modes", [], "aot: modes compiled on --mesh (default: --aot_modes).")
  flags.DEFINE_list("aot_offload", ["none"], "aot: train.offload modes compiled for each step "
                    "(none, optimizer, activations, both).")
  flags.DEFINE_bool("aot_temps", False, "aot: list the largest temporary buffers (XLA dump).")
  flags.DEFINE_bool("aot_flops", True, "aot: measure FLOPs (two extra 1- and 2-layer compiles).")
  flags.DEFINE_integer("logprob_chunk", 256, "aot: positions per LM-head chunk (0: all).")
  flags.DEFINE_integer("seed", 0, "Seed of the random params and tokens.")
  flags.DEFINE_string("out", None, "JSON-lines file to append one record per row to.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  F = flags.FLAGS
  bench.run(F.bench, F.preset, F.batch, F.seq_len, F.attention, F.dtype, F.compute_dtype,
            F.steps, F.warmup, F.max_new_tokens, F.remat, F.seed, F.out, rank=F.rank,
            peer=F.peer, num_generations=F.num_generations,
            aot=dict(modes=F.aot_modes, kinds=F.aot_steps, mesh=F.mesh,
                     mesh_modes=F.aot_mesh_modes, temps=F.aot_temps, count_flops=F.aot_flops,
                     chunk=F.logprob_chunk, offloads=F.aot_offload))


if __name__ == "__main__":
  define_flags()
  try:
    app.run(main)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
