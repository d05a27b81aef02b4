"""Config validation and the messages that name the fix (issue 17, items 6, 7, 12 and 14):
bad train / optim / model keys are one line naming the key and its allowed values, before
anything is written; DPO pairs left identical by truncation are counted or refused; Ctrl-C while
the model loads is one line, exit 130."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from configs import dpo as dpo_config, grpo as grpo_config, ppo as ppo_config
from configs import reward as reward_config, sft as sft_config
from ftjax.errors import UserError
from ftjax.train import common, sft
from tests.test_sft import _cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
       "JAX_PLATFORMS": "cpu"}

CONFIGS = {"sft": sft_config, "dpo": dpo_config, "reward": reward_config, "grpo": grpo_config,
           "ppo": ppo_config}

# (section, key, bad value, what the one line must also name: the allowed values)
BAD_KEYS = [
    ("train", "save_every", 0, ">= 1"), ("train", "log_every", 0, ">= 1"),
    ("train", "eval_every", 0, ">= 1"), ("train", "grad_accum", 0, ">= 1"),
    ("train", "batch_size", 0, ">= 1"), ("train", "steps", 0, ">= 1"),
    ("train", "steps", -5, ">= 1"), ("train", "seq_len", 0, ">= 1"), ("train", "keep", 0, ">= 1"),
    ("train", "eval_batches", -1, ">= 0"), ("train", "early_stop_patience", -1, ">= 0"),
    ("train", "logprob_chunk", -1, ">= 0"),
    ("optim", "name", "sgdd", "adamw, adam, lion, sgd, adafactor"),
    ("optim", "schedule", "cosin", "cosine, linear, constant"),
    ("optim", "lr", 0.0, "> 0"), ("optim", "lr", -1e-4, "> 0"),
    ("optim", "lr", float("nan"), "> 0"),
    ("optim", "warmup_steps", -1, ">= 0"), ("optim", "min_lr_ratio", -0.5, "[0, 1]"),
    ("model", "dtype", "float8", "float32, bfloat16, float16"),
    ("model", "compute_dtype", "int8", "float32, bfloat16, float16"),
    ("model", "attention", "flash", "xla"),
]


def test_validate_refuses_bad_keys_in_one_line():
  for mod in CONFIGS.values():
    common.validate(mod.get_config("smoke"))  # the shipped configs pass
    common.validate(mod.get_config())
  for section, key, value, allowed in BAD_KEYS:
    for name in ("sft", "grpo"):
      c = CONFIGS[name].get_config("smoke")
      c[section][key] = value
      with pytest.raises(UserError) as e:
        common.validate(c)
      msg = str(e.value)
      assert "\n" not in msg and f"config.{section}.{key}={value!r}" in msg, (name, msg)
      assert allowed in msg, (name, msg)
  c = dpo_config.get_config("smoke")
  c.data.max_prompt_length = -3
  with pytest.raises(UserError, match=r"config\.data\.max_prompt_length=-3: expected an integer "
                     ">= 0"):
    common.validate(c)
  # The builders name the same allowed values when called directly.
  with pytest.raises(UserError, match="sgdd.*adamw, adam"):
    common.make_optimizer("sgdd", common.make_schedule(1e-3, 10))
  with pytest.raises(UserError, match="cosin.*cosine, linear, constant"):
    common.make_schedule(1e-3, 10, kind="cosin")


def _script(name, *args):
  return [sys.executable, os.path.join(ROOT, "experiments", name), *args]


def _dpo(workdir, base_dir, data, *extra):
  return _script("dpo.py", "--config=" + os.path.join(ROOT, "configs", "dpo.py") + ":smoke",
                 f"--workdir={workdir}", f"--config.model.hf_path={base_dir}",
                 f"--config.data.path={data}", "--config.train.seq_len=64",
                 "--config.train.batch_size=2", "--config.train.steps=2",
                 "--config.train.log_every=1", "--config.train.save_every=2",
                 "--config.train.eval_every=2", *extra)


def _sft(workdir, base_dir, data, *extra):
  return _cmd([f"--config.model.hf_path={base_dir}", f"--config.data.path={data}",
               "--config.train.seq_len=64", "--config.train.steps=2", *extra], workdir)


LONG_PROMPT = ("I ordered the blue jacket on Monday and it has not arrived yet. Where is my "
               "order? ") * 4
# Responses that share their first tokens: a prompt that takes all but one position leaves both
# sides the same single response token.
GOOD = [{"prompt": f"Ticket {i}. {LONG_PROMPT}", "chosen": " Sure, your order shipped on Monday.",
         "rejected": " Sure, I have no idea where your order is."} for i in range(6)]
# A shared response prefix longer than what the default prompt budget leaves: identical anyway.
SHARED = " Sure, " + "your order shipped and it is on its way to you, " * 4
SAME = [{"prompt": f"Ticket {i}. {LONG_PROMPT}", "chosen": SHARED + "Monday.",
         "rejected": SHARED + "Friday."} for i in range(2)]


def _write(path, rows):
  with open(path, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_bad_keys_messages_and_identical_pairs_from_the_cli(base_dir, tmp_path):
  """One batch of subprocesses: two bad config keys and generate's --max_new_tokens=0 (one line,
  no workdir); the fix named for TRL prompt/completion rows in chat format, an empty model dir
  and a corrupt config.json; DPO on long prompts: identical pairs counted in a warning (and the
  run learns), or refused when all of them are (the old whole-prompt truncation)."""
  from ftjax.data import preference as pref
  from ftjax.tokenizer import load_tokenizer
  pairs = _write(tmp_path / "long.jsonl", GOOD + SAME)
  # The premise, checked on the same tokenizer: the prompts overflow seq_len=64, the old
  # truncation (the prompt takes all it can) leaves every pair identical, the default two.
  tok = load_tokenizer(base_dir)
  rows = GOOD + SAME
  full = [pref.tokenize_preference(r, tok, "pairs") for r in rows]
  assert min(e["prompt_len"] for e in full) > 64
  ex, _ = pref.tokenize_preference_records(rows, tok, "pairs", 64, max_prompt_length=64)
  assert pref.count_identical(ex) == len(rows)
  ex, _ = pref.tokenize_preference_records(rows, tok, "pairs", 64)
  assert pref.count_identical(ex) == len(SAME)

  pc = _write(tmp_path / "pc.jsonl", [{"prompt": "Where is my order?", "completion": " Shipped."}])
  empty = tmp_path / "empty_model"
  empty.mkdir()
  corrupt = tmp_path / "corrupt_model"
  shutil.copytree(base_dir, corrupt)
  (corrupt / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
  chat = _write(tmp_path / "chat.jsonl", [{"messages": [
      {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
  w = lambda name: str(tmp_path / name)  # noqa: E731
  # name -> (command, what the one error line must name); each must leave no workdir
  refused = {
      "save_every": (_sft(w("save_every"), base_dir, chat, "--config.train.save_every=0"),
                     ["config.train.save_every=0", ">= 1"]),
      "lr": (_dpo(w("lr"), base_dir, pairs, "--config.optim.lr=0"), ["config.optim.lr=0.0", "> 0"]),
      "max_new_tokens": (_script("generate.py", f"--model={base_dir}", "--prompt=hi",
                                 "--max_new_tokens=0"), ["max_new_tokens"]),
      "all_identical": (_dpo(w("all_identical"), base_dir, pairs,
                             "--config.data.max_prompt_length=64"),
                        ["long.jsonl", f"all {len(rows)} preference pairs", "identical",
                         "data.max_prompt_length"]),
  }
  procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=ENV) for name, (cmd, _) in refused.items()}
  trained = subprocess.run(_dpo(w("some_identical"), base_dir, pairs), capture_output=True,
                           text=True, timeout=600, env=ENV)
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, (name, err[-3000:])
    assert "Traceback" not in err, (name, err[-3000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, (name, err[-3000:])
    for needle in refused[name][1]:
      assert needle in lines[0], (name, lines[0])
    assert "cannot load a tokenizer" not in lines[0], (name, lines[0])
    assert not os.path.exists(w(name)), (name, os.listdir(w(name)))
  # What sft.py refuses in the library (its data and model loading): sft.run with the config
  # _sft's flags give; the UserError's text is the one line cli.run prints.
  in_process = {
      "pc_rows": ((base_dir, pc), [
          "pc.jsonl: row 1", "field 'messages' is missing", "'prompt' and 'completion'",
          "--config.data.format=prompt_completion"]),
      "empty_dir": ((str(empty), chat), [str(empty), "empty"]),
      "corrupt_config": ((str(corrupt), chat), [str(corrupt / "config.json"), "invalid JSON"]),
  }
  for name, ((model_dir, data), needles) in in_process.items():
    c = sft_config.get_config("adapter=lora,smoke")
    c.model.hf_path, c.data.path = model_dir, data
    c.train.update(seq_len=64, steps=2)
    with pytest.raises(UserError) as e:
      sft.run(c, w(name))
    line = str(e.value)
    assert "\n" not in line, (name, line)
    for needle in needles:
      assert needle in line, (name, line)
    assert "cannot load a tokenizer" not in line, (name, line)
    assert not os.path.exists(w(name)), (name, os.listdir(w(name)))
  # Some pairs identical: a warning with the count; the others train (non-zero gradients).
  assert trained.returncode == 0, trained.stderr[-3000:]
  warn = [ln for ln in trained.stderr.splitlines() if "identical chosen and rejected" in ln]
  assert len(warn) == 1 and f"{len(SAME)} of {len(rows)} train pairs" in warn[0], warn
  with open(os.path.join(w("some_identical"), "metrics.jsonl")) as f:
    steps = [json.loads(ln) for ln in f if '"grad_norm"' in ln]
  assert steps and all(s["grad_norm"] > 0 for s in steps), steps


def test_ctrl_c_during_model_load_is_one_line(base_dir, chat_files, tmp_path):
  """SIGINT while the model loads (before the loop's signal handler): one line, exit 130, no
  KeyboardInterrupt traceback, nothing written. The model's config.json is a FIFO, so the run
  is provably inside the load (blocked reading it) when the signal comes."""
  model = tmp_path / "model"
  shutil.copytree(base_dir, model, ignore=shutil.ignore_patterns("config.json"))
  fifo = str(model / "config.json")
  os.mkfifo(fifo)
  w = str(tmp_path / "run")
  # A shell that started the tests in the background ignores SIGINT, and so would the child.
  proc = subprocess.Popen(
      _cmd([f"--config.model.hf_path={model}", f"--config.model.tokenizer={base_dir}",
            f"--config.data.path={chat_files[0]}"], w),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  fd, t0 = None, time.time()
  try:
    while fd is None:  # opening the write end succeeds once the run opens the read end
      try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
      except OSError as e:
        if e.errno != errno.ENXIO:
          raise
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < 300, "the run never opened config.json"
        time.sleep(0.05)
    time.sleep(0.2)  # now blocked reading it
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
  finally:
    if fd is not None:
      os.close(fd)
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert "interrupted by SIGINT" in last and "nothing to resume" in last, last
  assert not os.path.exists(w)
