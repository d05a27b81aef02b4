"""AI feedback (RLAIF): preference pairs labelled by a judge instead of people.

`label` samples k replies per prompt from a policy, scores every reply with a judge, and keeps
the best and the worst reply of each prompt as a TRL preference row

  {"prompt": ..., "chosen": ..., "rejected": ..., "chosen_score": s1, "rejected_score": s2}

(the prompt a message list or a string as the input row had it; chosen / rejected one assistant
turn for a message-list prompt, else strings), which experiments/dpo.py and TRL's DPOTrainer
read as they are. A provenance record (judge, rubric and its sha256, policy, seed, sampling,
counts) is written beside the rows, `<out>.provenance.json`.

Judges (`judge` spec):
  reward_model:PATH   an experiments/reward.py workdir or an HF *ForSequenceClassification dir
  <task reward>       a rule scorer: any reward `config.grpo.rewards` names (`support_scorer`,
                      `answer_match:answer`, ...), given the row's other columns
  llm:PATH            an LLM judge (HF dir or training workdir). It reads the rubric (a
                      "constitution": a text file of principles), the conversation and the
                      reply, then is asked for a verdict; the score is read from its own
                      next-token log-probs of the verdict strings ("1".."10": the expected
                      score; "yes"/"no": P(yes)), normalised over them. Where they hold less
                      than `min_score_mass` of its probability the judge gave no verdict: a
                      one-line error naming the row.
A prompt whose replies all score the same gives no pair (counted as `ties`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import heads, hf, rewards, rollout, workdir as wd
from ftjax.data import prompts as prompt_data
from ftjax.errors import UserError
from ftjax.tokenizer import load_tokenizer

SCALES = {"10": [str(i) for i in range(1, 11)], "yesno": ["yes", "no"]}
QUESTION = {"10": "Rate the assistant's reply against the principles, from 1 (worst) to 10 "
                  "(best). Answer with the number only.",
            "yesno": "Does the assistant's reply follow every principle? Answer yes or no."}


def load_model(path: str):
  """(model, params, tokenizer) of an HF model directory or an ftjax training workdir."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    model, params, tok, _ = wd.load_trained(path)
    return model, params, tok
  model, params = hf.load_pretrained(path)
  return model, params, load_tokenizer(hf.resolve(path))


def load_prompt_rows(path: str) -> list[dict]:
  """Rows with a `prompt` (string or messages), or chat rows (`messages`, whose prompt is every
  turn before the last assistant turn); the other columns go to rule judges."""
  from ftjax.data import sources
  records = sources.load_records({"path": path})
  rows = []
  for i in range(len(records)):
    r = dict(sources.to_python(records[i]))
    if "prompt" not in r and isinstance(r.get("messages"), list):
      msgs = r.pop("messages")
      last = max((j for j, m in enumerate(msgs) if isinstance(m, dict)
                  and m.get("role") == "assistant"), default=len(msgs))
      r["prompt"] = msgs[:last]
    rows.append(r)
  return prompt_data.check_rows(rows, path, [records.row(i) for i in range(len(records))])


class LLMJudge:
  """Scores from an LLM's next-token log-probs of the verdict strings (see the module doc)."""

  def __init__(self, path: str, rubric: str, scale: str = "10", min_score_mass: float = 0.5,
               batch_size: int = 8):
    if scale not in SCALES:
      raise UserError(f"--judge_scale={scale!r}: expected one of {', '.join(SCALES)}")
    self.model, self.params, self.tok = load_model(path)
    self.rubric, self.scale, self.min_mass = rubric, scale, float(min_score_mass)
    self.batch_size = int(batch_size)
    self.chat = bool(getattr(self.tok, "chat_template", None))
    # A plain-text judge prompt ends in "Answer:", so the verdict comes after a space.
    self.verdicts = [v if self.chat else " " + v for v in SCALES[scale]]
    self.verdict_ids = [self.tok(v, add_special_tokens=False)["input_ids"] for v in self.verdicts]
    for v, ids in zip(self.verdicts, self.verdict_ids):
      if not ids:
        raise UserError(f"judge {path}: the verdict {v!r} has no tokens in its tokenizer")
    self.paths = _verdict_paths(self.verdict_ids)
    self.path_of = [_path_of(self.paths, ids) for ids in self.verdict_ids]  # [V]
    self._fn = jax.jit(functools.partial(_path_logprobs, self.model))
    self.__name__ = f"llm({os.path.basename(os.path.normpath(path))})"

  def prompt_ids(self, prompt, reply: str) -> list[int]:
    """The judge's prompt: rubric, conversation, reply and question, ending where the verdict
    starts (the chat template's generation prompt, or "Answer:")."""
    convo = (prompt if isinstance(prompt, str) else
             "\n".join(f"{m['role']}: {m['content']}" for m in prompt))
    text = (f"Principles:\n{self.rubric.strip()}\n\nConversation:\n{convo}\n\n"
            f"Assistant's reply:\n{reply}\n\n{QUESTION[self.scale]}")
    if self.chat:
      return prompt_data.encode(self.tok, [{"role": "user", "content": text}])
    return prompt_data.encode(self.tok, text + "\nAnswer:")

  def verdict_logprobs(self, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """float64 [N, V]: log p(verdict v | prompt i), each verdict's tokens summed.

    One forward per verdict *path* (`_verdict_paths`) reads the full next-token distribution
    at each of its positions, so every verdict along it comes from that forward: "1".."9" and
    "10" = "1" "0" take one forward, not ten."""
    pad = rollout.pad_id(self.tok)
    rows = [(i, q) for i in range(len(prompt_ids)) for q in range(len(self.paths))]
    out = np.zeros((len(prompt_ids), len(self.verdicts)), np.float64)
    m = max(len(x) for x in self.paths) + 1  # the path, then one masked filler token
    for s in range(0, len(rows), self.batch_size):
      chunk = rows[s:s + self.batch_size]
      tokens, mask = rollout.left_pad([prompt_ids[i] for i, _ in chunk], pad,
                                      rows=self.batch_size)  # [B, P]
      comp = np.full((self.batch_size, m), pad, np.int32)
      cmask = np.zeros((self.batch_size, m), bool)
      for r, (_, q) in enumerate(chunk):
        ids = self.paths[q]
        comp[r, :len(ids)], cmask[r, :len(ids)] = ids, True
      lp = np.asarray(self._fn(self.params, {"prompt_tokens": tokens, "prompt_mask": mask,
                                             "completion_tokens": comp,
                                             "completion_mask": cmask}), np.float64)  # [B, M, V]
      for r, (i, q) in enumerate(chunk):
        for v, ids in enumerate(self.verdict_ids):
          if self.path_of[v] == q:
            out[i, v] = lp[r, np.arange(len(ids)), ids].sum()
    return out

  def scores(self, prompts: list, replies: list[str], where: list[str]) -> np.ndarray:
    lp = self.verdict_logprobs([self.prompt_ids(p, r) for p, r in zip(prompts, replies)])
    mass = np.exp(lp).sum(-1)  # [N]
    for i in np.flatnonzero(mass < self.min_mass):
      shown = ", ".join(repr(v.strip()) for v in self.verdicts[:3])
      raise UserError(f"{where[i]}: the judge gave no verdict: p={mass[i]:.3g} on its score "
                      f"tokens ({shown}, ...) < --min_score_mass={self.min_mass:g}; check "
                      "--rubric and --judge")
    p = np.exp(lp - lp.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)  # [N, V], over the verdicts
    if self.scale == "yesno":
      return p[:, 0]
    return p @ np.arange(1, len(self.verdicts) + 1, dtype=np.float64)


class RewardJudge:
  """A rule scorer or a reward model: a reward function with TRL's signature."""

  def __init__(self, spec: str):
    from ftjax import tasks
    self.fn = rewards.from_spec(spec, tasks.named_rewards())
    self.__name__ = rewards.name_of(self.fn)

  def scores(self, prompts: list, replies: list[str], where: list[str],
             columns: Optional[dict] = None) -> np.ndarray:
    completions = [r if isinstance(p, str) else [{"role": "assistant", "content": r}]
                   for p, r in zip(prompts, replies)]
    total, _, _ = rewards.score([self.fn], None, prompts, completions, columns or {})
    for i in np.flatnonzero(~np.isfinite(total)):
      raise UserError(f"{where[i]}: the judge {self.__name__} gave no score (None or NaN)")
    return total.astype(np.float64)


def _verdict_paths(verdict_ids: list[list[int]]) -> list[list[int]]:
  """The fewest token paths along which every verdict can be read: a verdict's last token comes
  from the whole next-token distribution, so it needs only its other tokens on a path (the
  maximal ones of them). "1".."9" plus "10" = "1" "0" need one path, ["1"]."""
  contexts = [list(v[:-1]) for v in verdict_ids]
  paths = []
  for a in contexts:
    if a not in paths and not any(len(b) > len(a) and b[:len(a)] == a for b in contexts):
      paths.append(a)
  return paths


def _path_of(paths: list[list[int]], ids: list[int]) -> int:
  """The first path that holds all but the last of `ids`."""
  return next(q for q, p in enumerate(paths) if p[:len(ids) - 1] == list(ids[:-1]))


def _path_logprobs(model, params, batch):
  """float32 [N, M, V]: log-softmax of the next token at each completion position (the one
  forward of `rollout.completion_logprobs`, with the whole distribution kept)."""
  p = batch["prompt_tokens"].shape[1]
  tokens = jnp.concatenate([batch["prompt_tokens"], batch["completion_tokens"]], axis=1)
  mask = jnp.concatenate([batch["prompt_mask"], batch["completion_mask"]], axis=1)
  hidden = model.apply({"params": params}, tokens, mask=mask, return_hidden=True)
  logits = heads.lm_logits(params, hidden[:, p - 1:-1], model.cfg)  # [N, M, V]
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def make_judge(spec: str, rubric_path: str = "", scale: str = "10",
               min_score_mass: float = 0.5, batch_size: int = 8):
  """(judge, rubric text) from a `--judge` spec (see the module docstring)."""
  if spec.startswith("llm:"):
    if not rubric_path:
      raise UserError("--judge=llm:PATH needs --rubric=FILE (the principles it judges by)")
    try:
      with open(rubric_path) as f:
        rubric = f.read()
    except OSError as e:
      raise UserError(f"--rubric={rubric_path}: {e.strerror}") from None
    if not rubric.strip():
      raise UserError(f"--rubric={rubric_path}: the file is empty")
    return LLMJudge(spec[4:], rubric, scale, min_score_mass, batch_size), rubric
  return RewardJudge(spec), ""


def _turn(prompt, reply: str):
  return reply if isinstance(prompt, str) else [{"role": "assistant", "content": reply}]


def label(policy: str, data: str, out: str, judge: str, *, k: int = 4, rubric: str = "",
          judge_scale: str = "10", min_score_mass: float = 0.5, max_new_tokens: int = 64,
          temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
          max_prompts: int = 0) -> dict:
  """Sample, judge, pair and write (see the module docstring). Returns the provenance record."""
  if k < 2:
    raise UserError(f"--k={k}: a pair needs at least 2 replies per prompt")
  if os.path.isdir(out) or not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise UserError(f"--out={out}: expected a file in an existing directory")
  rows = load_prompt_rows(data)[:max_prompts or None]
  # The judge reads as many replies at once as one sampling batch writes.
  scorer, rubric_text = make_judge(judge, rubric, judge_scale, min_score_mass,
                                   batch_size * k)
  model, params, tok = load_model(policy)
  eos, pad = rollout.eos_ids(tok, model), rollout.pad_id(tok)
  prompts, replies, where, columns = [], [], [], {}
  rng = jax.random.PRNGKey(seed)
  for s in range(0, len(rows), batch_size):
    chunk = rows[s:s + batch_size]
    ids = [prompt_data.encode(tok, r["prompt"]) for r in chunk]
    ro = rollout.rollout(model, params, ids, n_samples=k, max_new_tokens=max_new_tokens,
                         rng=jax.random.fold_in(rng, s), temperature=temperature, top_p=top_p,
                         eos_ids=eos, pad_id=pad)
    texts = rollout.decode(tok, ro)
    for j, text in enumerate(texts):
      r = chunk[j // k]
      prompts.append(r["prompt"])
      replies.append(text)
      where.append(f"{data}: row {s + j // k + 1} reply {j % k}")
      for key, v in r.items():
        if key != "prompt":
          columns.setdefault(key, []).append(v)
  if isinstance(scorer, RewardJudge):
    scores = scorer.scores(prompts, replies, where, columns)
  else:
    scores = scorer.scores(prompts, replies, where)
  pairs, ties = [], 0
  for i, row in enumerate(rows):
    sc, rep = scores[i * k:(i + 1) * k], replies[i * k:(i + 1) * k]
    best, worst = int(np.argmax(sc)), int(np.argmin(sc))
    if sc[best] == sc[worst] or rep[best].strip() == rep[worst].strip():
      ties += 1
      continue
    pairs.append({"prompt": row["prompt"], "chosen": _turn(row["prompt"], rep[best]),
                  "rejected": _turn(row["prompt"], rep[worst]),
                  "chosen_score": float(sc[best]), "rejected_score": float(sc[worst])})
  if not pairs:
    raise UserError(f"{data}: no pair: the judge scored every prompt's {k} replies the same "
                    f"({ties} prompts); sample more (--k) or with a higher --temperature")
  provenance = {
      "judge": judge, "judge_name": scorer.__name__,
      "rubric": os.path.abspath(rubric) if rubric else None,
      "rubric_sha256": hashlib.sha256(rubric_text.encode()).hexdigest() if rubric else None,
      "judge_scale": judge_scale if judge.startswith("llm:") else None,
      "policy": os.path.abspath(policy) if os.path.exists(policy) else policy,
      "data": os.path.abspath(data), "seed": seed, "k": k, "temperature": temperature,
      "top_p": top_p, "max_new_tokens": max_new_tokens, "prompts": len(rows),
      "pairs": len(pairs), "ties": ties,
      "mean_margin": float(np.mean([p["chosen_score"] - p["rejected_score"] for p in pairs])),
  }
  _write(out, pairs, provenance)
  return provenance


def _write(out: str, pairs: list[dict], provenance: dict):
  """The rows and their provenance, each whole or not at all."""
  for path, text in ((out, "".join(json.dumps(p) + "\n" for p in pairs)),
                     (out + ".provenance.json", json.dumps(provenance, indent=2) + "\n")):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
