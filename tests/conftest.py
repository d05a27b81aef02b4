"""Shared fixtures: tiny random HF models for every family, saved to temp dirs."""

import atexit
import os
import shutil
import sys
import tempfile

# Eight fake CPU devices for the sharding tests; set before jax is imported anywhere.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# A pmap or pjit collective on the fake devices is a rendezvous of 8 threads; XLA aborts the
# process (SIGABRT, "Termination timeout ... of 40 seconds exceeded") when one arrives 40 s
# after the first. On a 2-core machine running two xdist workers and their subprocesses, a
# starved thread can be that late (CI lost a worker this way in test_ppo's pmap run). 600 s
# keeps a real hang failing, as a hang, in any test that would still end in time.
if "collective_call_terminate_timeout" not in _flags:
  _flags += " --xla_cpu_collective_call_terminate_timeout_seconds=600"
# The suite's XLA compile policy (tests/_site/ftjax_xla_policy.py): small programs at -O0 with
# XLA's loop emitters, large ones at XLA's defaults, in the pytest processes and, through
# tests/_site/sitecustomize.py on PYTHONPATH, in every Python they start.
_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_site")
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
  os.environ["PYTHONPATH"] = os.pathsep.join(
      p for p in (_SITE, os.environ.get("PYTHONPATH", "")) if p)
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent compilation cache per test session, in a fresh temp dir: each distinct program
# is compiled once, then loaded by later tests, the xdist workers and the experiment
# subprocesses (they inherit the environment), which otherwise spend most of their time
# compiling the same steps again. Kept when the caller (or the xdist controller) set one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="ftjax-test-jit-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  _owner = os.getpid()  # forked children must not remove it
  atexit.register(lambda: os.getpid() == _owner and shutil.rmtree(_cache_dir, True))
# The pytest processes use it too: a resume, a second mesh or a recipe's later stage in-process
# loads the steps an earlier run compiled. Writes are not atomic (jax's LRUCache without a size
# limit): a reader racing a writer in another process gets a truncated entry, which fails to
# decompress, and jax warns and compiles instead.

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma")
VOCAB = 320
# `base_dir`'s vocabulary, and a train.seq_len that holds every row of the fixtures' support
# tickets and preference pairs in its tokenizer (the longest is 157 tokens; at vocab 320 it was
# 331, and the [T, T] attention scores of T=352 cost most of those tests' time).
BASE_VOCAB = 1024
BASE_SEQ = 160


def hf_config(family: str, vocab: int = VOCAB):
  """A tiny transformers config; init scale 0.2 spreads the logits so greedy has no near-ties."""
  import transformers as T
  kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=vocab, initializer_range=0.2, bos_token_id=None,
            eos_token_id=None, pad_token_id=None)
  if family == "gpt2":
    return T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=128,
                        initializer_range=0.2, bos_token_id=None, eos_token_id=None)
  if family == "llama":  # llama 3.1-style rope scaling, untied head
    return T.LlamaConfig(**kw, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})
  if family == "mistral":
    return T.MistralConfig(**kw, sliding_window=None)
  if family == "qwen2":
    return T.Qwen2Config(**kw, tie_word_embeddings=True)
  if family == "qwen3":
    return T.Qwen3Config(**kw, head_dim=16)  # decoupled head_dim: 4 * 16 != 32
  if family == "gemma":
    return T.GemmaConfig(**{**kw, "num_key_value_heads": 1}, head_dim=16)
  raise ValueError(family)


def make_hf_model(family: str, out_dir: str, seed: int = 0, vocab: int = VOCAB):
  """Build, perturb (norms and biases off their defaults) and save a tiny HF model."""
  import torch
  import transformers as T
  torch.manual_seed(seed)
  model = T.AutoModelForCausalLM.from_config(hf_config(family, vocab)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "ln_" in name or name.endswith("bias"):
        p.add_(torch.randn_like(p) * 0.1)
  model.save_pretrained(out_dir)
  return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
  """family -> (directory, torch model), built once per session."""
  out = {}
  for fam in FAMILIES:
    d = str(tmp_path_factory.mktemp(f"hf_{fam}"))
    out[fam] = (d, make_hf_model(fam, d))
  return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
  from ftjax.tokenizer import train_bpe_tokenizer
  d = str(tmp_path_factory.mktemp("tok"))
  texts = ["Where is my order? Your order #1234 shipped on Monday.",
           "I want to return the blue jacket.", "hello world, this is a tiny corpus."] * 20
  train_bpe_tokenizer(texts, VOCAB, d)
  return d


@pytest.fixture
def no_compile_cache():
  """For tests that time compilation: compile for real, not load from the session cache."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_enable_compilation_cache", was)
  compilation_cache.reset_cache()


def batch_with_padding(rng: np.random.Generator, b=3, t=12, side="right"):
  tokens = rng.integers(6, VOCAB, (b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  lengths = [t, t - 4, t - 7][:b]
  for i, n in enumerate(lengths):
    if side == "right":
      mask[i, n:] = False
    else:
      mask[i, :t - n] = False
  tokens[~mask] = 0
  return tokens, mask


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
  """A tiny llama (hf_models' llama, with vocab BASE_VOCAB) and a tokenizer of that vocab
  trained on support tickets."""
  import ftjax
  from ftjax.tasks import support
  d = str(tmp_path_factory.mktemp("base"))
  make_hf_model("llama", d, vocab=BASE_VOCAB)
  texts = [" ".join(m["content"] for m in t["messages"]) for t in support.make_tickets(300, 5)]
  ftjax.tokenizer.train_bpe_tokenizer(texts, BASE_VOCAB, d)
  return d


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory):
  from ftjax.tasks import support
  d = tmp_path_factory.mktemp("chat")
  train, ev = str(d / "train.jsonl"), str(d / "eval.jsonl")
  support.write_jsonl(train, support.make_tickets(48, 0))
  support.write_jsonl(ev, support.make_tickets(8, 1))
  return train, ev


@pytest.fixture(scope="session")
def pref_files(tmp_path_factory):
  from ftjax.tasks import support
  d = tmp_path_factory.mktemp("prefs")
  train, ev = str(d / "prefs_train.jsonl"), str(d / "prefs_eval.jsonl")
  support.write_jsonl(train, support.make_preference_pairs(96, 0))
  support.write_jsonl(ev, support.make_preference_pairs(24, 1))
  return train, ev


@pytest.fixture(scope="session")
def sft_lora_run(base_dir, chat_files, tmp_path_factory):
  """(workdir, its result) of test_sft's 4-step LoRA run, evaluated and saved at steps 2 and 4:
  trained once per session (per xdist worker), read (not written) by the tests that check its
  files and exports (test_sft, test_model_card)."""
  from ftjax.train import sft
  from tests.test_sft import make_config
  train, ev = chat_files
  w = str(tmp_path_factory.mktemp("sft_lora") / "run")
  out = sft.run(make_config(base_dir, train, ev, steps=4, eval_every=2, save_every=2), w)
  return w, out


# The files with the longest tests (a CI run's --durations), heaviest first. Under `-n 2` each
# worker takes one whole file at a time from the front of this order (xdist's loadfile, without
# its reordering by test count), so the long files start early and the short ones fill the end,
# and a file's module fixtures (trained runs, exports) are built once, not once per worker.
# Files not named keep their collection order after these.
SLOW_FILES = ("test_repro", "test_demo", "test_safety_erosion", "test_sft", "test_sharding",
              "test_sweep", "test_ppo", "test_beta_study", "test_grpo", "test_bench",
              "test_preference", "test_demo_rl",
              "test_workdir_safety", "test_provenance", "test_grpo_sharding", "test_validation",
              "test_export_guards", "test_lora", "test_rollout", "test_quant", "test_cli",
              "test_generate_cli", "test_grpo_tasks", "test_prm", "test_multi_adapter",
              "test_label", "test_second_adapter")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  key = lambda item: rank.get(item.path.stem, len(SLOW_FILES))
  items[:] = sorted(items, key=key)  # stable: collection order within a file and after


def pytest_configure(config):
  if _SITE not in sys.path:
    sys.path.insert(0, _SITE)
  import ftjax_xla_policy
  ftjax_xla_policy.install()
  # `-n 2` alone means xdist's `load`, which spreads a file's tests over both workers, so each
  # builds the file's module fixtures (measured on 5 fixture-heavy files: 341 CPU-s under load,
  # 309 under loadfile). An explicit --dist other than load is kept.
  if getattr(config.option, "dist", "no") == "load":
    config.option.dist = "loadfile"
    config.option.loadscopereorder = False  # keep SLOW_FILES' order, not the count of tests
  if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
    _start_zygote()  # a process that runs tests (not xdist's controller)


def _start_zygote():
  """A warm Python that the scripts this process starts run in (tests/_site/ftjax_zygote.py):
  about 3 CPU-s of imports less per script run. Only with the policy's sitecustomize on
  PYTHONPATH, and not with FTJAX_TEST_NO_ZYGOTE=1."""
  import subprocess
  if _SITE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    return
  if os.environ.get("FTJAX_TEST_NO_ZYGOTE") or os.environ.get("FTJAX_TEST_ZYGOTE"):
    return
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  d = tempfile.mkdtemp(prefix="ftjax-zygote-")
  address = os.path.join(d, "sock")
  # The PYTHONPATH the tests give their scripts (the repository first): a launcher whose
  # sys.path differs starts the ordinary way.
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
  log = os.environ.get("FTJAX_TEST_ZYGOTE_LOG")
  proc = subprocess.Popen([sys.executable, os.path.join(_SITE, "ftjax_zygote.py"), address,
                           str(os.getpid())], env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL,
                          stderr=open(log, "a") if log else subprocess.DEVNULL)
  os.environ["FTJAX_TEST_ZYGOTE"] = address
  owner = os.getpid()

  def stop():
    if os.getpid() != owner:
      return
    proc.kill()
    proc.wait()
    shutil.rmtree(d, True)
  atexit.register(stop)


def xla_defaults():
  """A context in which every program compiles with XLA's default options (-O3, fusion
  emitters), not the suite's policy: for a claim about the programs users get, or for a run of
  many steps, whose execution pays for the longer compile. jax's `optimization_level`, which the
  policy reads and XLA's CPU compiler ignores, is part of jit's cache key, so no program
  compiled under the policy is reused. In-process only: the Pythons a test starts keep the
  policy."""
  from jax._src import config as jax_config
  return jax_config.optimization_level("O3")


@pytest.fixture
def xla_default_compiler():
  """`xla_defaults()` for the whole test (bitwise equality with optax's schedule)."""
  with xla_defaults():
    yield
