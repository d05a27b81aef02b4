"""SFT end to end: the loop, exact resume after a kill, SIGTERM, NaN guard, export, eval."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
import transformers

import ftjax
from configs import sft as sft_config
from ftjax import checkpoint, data as data_lib, export, heldout, losses, metrics as metrics_lib
from ftjax import workdir as wd
from ftjax.tasks import support
from ftjax.train import sft
from tests.conftest import BASE_SEQ

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(base_dir, train, ev, **train_kw):
  c = sft_config.get_config("adapter=lora,smoke")
  c.model.hf_path = base_dir
  c.data.path, c.data.eval_path = train, ev
  c.adapter.dropout = 0.1  # exercises the dropout rng in resume
  c.train.update(seq_len=BASE_SEQ, batch_size=4, grad_accum=2, **train_kw)
  return c


def test_sft_lora_end_to_end_and_exports(sft_lora_run, base_dir, chat_files, tmp_path):
  train, ev = chat_files
  run, out = sft_lora_run
  assert out["step"] == 4 and np.isfinite(out["loss"]) and np.isfinite(out["eval_loss"])
  rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
  assert {"loss", "lr", "grad_norm", "param_norm", "update_norm"} <= set(rows[0])
  assert any("eval_loss" in r for r in rows)
  assert os.listdir(os.path.join(run, "tensorboard"))
  assert json.load(open(os.path.join(run, "config.json")))["adapter"]["kind"] == "lora"

  model, params, tok, _ = wd.load_trained(run)
  tokens = np.random.default_rng(0).integers(6, 320, (2, 10))
  ours = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens))
  # Merged HF export: transformers gives the same logits.
  merged = export.export(run, str(tmp_path / "merged"), "merged")
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
  with torch.no_grad():
    ref = hf_model(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(ref, ours, atol=1e-4)
  assert os.path.exists(os.path.join(merged, "tokenizer.json"))
  # PEFT export on the original base: same logits.
  import peft
  adapter = export.export(run, str(tmp_path / "lora"), "peft")
  pm = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
  with torch.no_grad():
    np.testing.assert_allclose(pm(torch.tensor(tokens)).logits.numpy(), ours, atol=1e-4)
  # eval.py on the workdir and on the merged export agree on the loss.
  m1 = heldout.evaluate(ev, workdir=run, task="support", seq_len=BASE_SEQ,
                    batch_size=4, max_new_tokens=8)
  m2 = heldout.evaluate(ev, model_path=merged, seq_len=BASE_SEQ, batch_size=4, max_new_tokens=8)
  assert abs(m1["eval_loss"] - m2["eval_loss"]) < 1e-4
  assert {"exact_match", "details", "invented", "escalation_ok", "voice"} <= set(m1)


def _final_params(workdir):
  _, params, _, _ = wd.load_trained(workdir)
  return params


def _cmd(config_args, workdir):
  return [sys.executable, os.path.join(ROOT, "experiments", "sft.py"),
          "--config=" + os.path.join(ROOT, "configs", "sft.py") + ":adapter=lora,smoke",
          f"--workdir={workdir}"] + config_args


def _args(base_dir, train, ev, steps, save_every):
  return [f"--config.model.hf_path={base_dir}", f"--config.data.path={train}",
          f"--config.data.eval_path={ev}", "--config.adapter.dropout=0.1",
          f"--config.train.seq_len={BASE_SEQ}", "--config.train.batch_size=4",
          "--config.train.grad_accum=2", f"--config.train.steps={steps}",
          f"--config.train.save_every={save_every}", "--config.train.eval_every=1000",
          "--config.train.log_every=1"]


def _latest(workdir):
  ckpts = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(ckpts) if n.isdigit()] if os.path.isdir(ckpts) else []
  return max(steps, default=0)


def _wait_for_new_checkpoint(proc, workdir, after, timeout=240):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if _latest(workdir) > after:
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.02)
  return False


# (signal, delay after a new checkpoint): kills mid-step or mid-save, not only right after a
# save, and a preemption (SIGTERM) between them; one straight run serves them all.
INTERRUPTIONS = ((signal.SIGKILL, 0.0), (signal.SIGKILL, 0.3), (signal.SIGTERM, 0.1),
                 (signal.SIGKILL, 0.15))


def test_interrupted_run_resumes_exactly(base_dir, chat_files, tmp_path):
  """Kill (or preempt) the same command at several moments; the end result is bitwise equal."""
  train, ev = chat_files
  # 4 interruptions, each after a new checkpoint, reach step ~16 (+ the few steps a delay lets
  # run): 30 steps leave the last run's resume and 10+ steps after it.
  steps, save_every = 30, 4
  args = _args(base_dir, train, ev, steps, save_every)
  straight = str(tmp_path / "straight")
  sft.run(make_config(base_dir, train, ev, steps=steps, save_every=save_every,
                          eval_every=1000, log_every=1), straight)

  interrupted = str(tmp_path / "interrupted")
  for i, (sig, delay) in enumerate(INTERRUPTIONS):
    # A Python of its own, not a worker of the suite's zygote (tests/_site/ftjax_zygote.py),
    # which outlives a SIGKILLed launcher by the moment it takes to notice.
    proc = subprocess.Popen(_cmd(args, interrupted), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FTJAX_TEST_NO_ZYGOTE": "1"})
    before = _latest(interrupted)
    assert _wait_for_new_checkpoint(proc, interrupted, before), proc.stderr.read()[-2000:]
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert _latest(interrupted) < steps, f"interruption {i}: the run finished before the kill"
    if i:
      assert "resumed from step" in err
    if sig == signal.SIGTERM:  # saved, and exited non-zero saying how to resume
      assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
      assert "rerun the same command to resume" in err.strip().splitlines()[-1], err[-2000:]
  # The rest in-process: the same config as the command line's (a drift would be refused).
  out = sft.run(make_config(base_dir, train, ev, steps=steps, save_every=save_every,
                            eval_every=1000, log_every=1), interrupted)
  assert out["step"] == steps
  with open(os.path.join(interrupted, "run.json")) as f:
    runs = json.load(f)["runs"]
  assert len(runs) == len(INTERRUPTIONS) + 1 and runs[-1]["resumed"] is True
  a, b = _final_params(straight), _final_params(interrupted)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x),
                                                                    np.asarray(y)), a, b)
  # metrics.jsonl has every step exactly once, with the same losses as the straight run.
  logged = [r for r in metrics_lib.read_metrics(interrupted) if "loss" in r]
  assert [r["step"] for r in logged] == list(range(1, steps + 1))
  ref = [r["loss"] for r in metrics_lib.read_metrics(straight) if "loss" in r]
  assert [r["loss"] for r in logged] == ref


def test_nan_guard_stops_without_saving(base_dir, chat_files, tmp_path):
  train, ev = chat_files
  config = make_config(base_dir, train, ev, steps=4, save_every=1, log_every=1, eval_every=1000)
  # The config's clip (1.0) and warmup (1 step, lr 0) are kept: the train step is then the
  # session's LoRA run's program (a compile-cache hit); Adam's update is ~lr whatever the clip,
  # so step 2 moves the weights by ~1e30 and a later loss is not finite.
  config.optim.update(lr=1e30)
  with pytest.raises(FloatingPointError, match="step"):
    sft.run(config, str(tmp_path / "nan"))
  ck = checkpoint.Checkpointer(str(tmp_path / "nan"), async_save=False)
  for step in ck.all_steps():  # whatever was saved before the blow-up is finite
    state, _, _ = ck.restore(step)
    checkpoint.assert_finite(state)
  ck.close()


def test_packed_batch_loss_equals_unpacked(base_dir, chat_files):
  model, params = ftjax.load_pretrained(base_dir)
  tok = ftjax.tokenizer.load_tokenizer(base_dir)
  cfg = {"sources": [{"path": chat_files[0], "limit": 12}], "format": "chat"}
  totals = {}

  @jax.jit  # one program per layout; eagerly, every op of the forward compiles on its own
  def loss(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                         mask=batch["segment_ids"] > 0, segment_ids=batch["segment_ids"])
    logps = losses.logprobs_from_logits(logits, batch["targets"])
    return losses.sft_loss(logps, batch["weights"])

  for packing in (True, False):
    data = data_lib.build_dataset({**cfg, "packing": packing}, tok, 700, 12)
    rows = data.train.layout(0)
    batch = data_lib.make_batch(data.train.examples, rows, 700, data.pad_id)
    totals[packing] = [float(x) for x in loss(params, batch)]
    assert len(rows) < 12 if packing else len(rows) == 12
  np.testing.assert_allclose(totals[True], totals[False], rtol=1e-5)


def test_bad_config_and_row_are_one_line(base_dir, chat_files, tmp_path):
  """In-process: the UserError's text is the one line cli.run prints (test_cli runs the scripts
  on bad input, a typo'd key and a bad row among them)."""
  from ftjax.errors import UserError
  train, ev = chat_files
  # A malformed data row: file, row and field in one line.
  bad_file = str(tmp_path / "bad.jsonl")
  rows = support.make_tickets(3, 0)
  del rows[1]["messages"]
  support.write_jsonl(bad_file, rows)
  cases = {"grad_accum": ({"train.grad_accum": 3}, train, ["not divisible"]),
           "kind": ({"adapter.kind": "lorra"}, train, ["adapter.kind"]),
           "row": ({}, bad_file, ["bad.jsonl", "row 2", "messages"])}
  for name, (override, data, needles) in cases.items():
    config = make_config(base_dir, data, ev, steps=2, save_every=1, eval_every=1000)
    for key, value in override.items():
      section, field = key.split(".")
      config[section][field] = value
    w = tmp_path / name
    with pytest.raises(UserError) as e:
      sft.run(config, str(w))
    line = str(e.value)
    assert "\n" not in line and all(n in line for n in needles), (name, line)
    assert not os.path.exists(w / "checkpoints") or not os.listdir(w / "checkpoints"), name


@pytest.mark.parametrize("adapter,quant", [("none", "none"), ("prefix", "none"),
                                           ("prompt", "none"), ("lora", "nf4"),
                                           ("dora", "int4")])
def test_every_adapter_kind_trains_and_restores(base_dir, chat_files, tmp_path, adapter, quant):
  train, ev = chat_files
  config = sft_config.get_config(f"adapter={adapter},quant={quant},smoke")
  config.model.hf_path = base_dir
  config.data.path, config.data.eval_path = train, ev
  config.train.update(seq_len=BASE_SEQ, steps=2, save_every=1, eval_every=2)
  out = sft.run(config, str(tmp_path / "run"))
  assert np.isfinite(out["loss"]) and np.isfinite(out["eval_loss"])
  model, params, _, _ = wd.load_trained(str(tmp_path / "run"))
  assert (model.spec.quant is not None) == (quant != "none")
  # A frozen base stays out of the checkpoint; a full fine-tune saves everything.
  ck = checkpoint.Checkpointer(str(tmp_path / "run"), async_save=False)
  state, _, extra = ck.restore()
  ck.close()
  saved = jax.tree_util.tree_leaves(state["params"])
  assert ("embed" in state["params"]) == (adapter == "none")
  assert sum(x.size for x in saved) > 0 and extra["base"]["fingerprint"]


def test_changed_base_is_refused_on_resume(base_dir, chat_files, tmp_path):
  train, ev = chat_files
  base = str(tmp_path / "base")
  shutil.copytree(base_dir, base)
  config = make_config(base, train, ev, steps=2, save_every=1, eval_every=1000)
  sft.run(config, str(tmp_path / "run"))
  model, params = ftjax.load_pretrained(base)
  params["final_norm"]["scale"] = params["final_norm"]["scale"] * 1.5
  ftjax.save_pretrained(model, params, base)
  config.train.steps = 4
  with pytest.raises(ValueError, match="changed"):
    sft.run(config, str(tmp_path / "run"))


def test_early_stopping(base_dir, chat_files, tmp_path):
  train, ev = chat_files
  config = make_config(base_dir, train, ev, steps=40, save_every=1000, eval_every=1,
                       early_stop_patience=1)
  # lr 0 is refused; updates of 1e-30 vanish in float32 sums, so the eval loss cannot improve
  # after the first eval.
  config.optim.update(lr=1e-30, warmup_steps=0)
  out = sft.run(config, str(tmp_path / "run"))
  assert out["step"] == 2
