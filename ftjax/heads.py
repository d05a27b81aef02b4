"""Output heads over the decoder's final hidden states: LM logits, a score, a value.

`Decoder(..., return_hidden=True)` gives hidden [B, T, D] (after the final norm); each head is
a small function `(params, hidden) -> out` over the full params tree, so one trunk feeds
several heads (PPO's policy and value) and a loss can apply the LM head one chunk of T at a
time (`losses.token_logprobs`) instead of holding [B, T, V] float32 logits.

Param paths: `embed` [V, D] (tied LM head), `lm_head` [D, V], `score` [D, 1], `value` [D, 1],
`token_score` [D, 2] (a process reward model's step classifier; HF's *ForTokenClassification
`score`, exported without a bias).
Heads are plain matrices (never LoRA-wrapped nor quantized), so they read the arrays directly.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ftjax.config import TOKEN_LABELS, ModelConfig, dot_precision

# Logical axes of each head param, for sharding rules (see model.Decoder, which creates them).
AXES = {"lm_head": ("embed", "vocab"), "score": ("embed", None), "value": ("embed", None),
        "token_score": ("embed", None)}


def lm_logits(params: dict, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Next-token logits: hidden [..., D] -> float32 [..., V] (the tied embedding if configured)."""
  dt = jnp.dtype(cfg.dtype)
  x = hidden.astype(dt)
  prec = dot_precision(cfg.matmul_precision, dt)
  if cfg.tie_embeddings:
    return jnp.einsum("...D,VD->...V", x, params["embed"].astype(dt),
                      preferred_element_type=jnp.float32, precision=prec)
  return jnp.einsum("...D,DV->...V", x, params["lm_head"].astype(dt),
                    preferred_element_type=jnp.float32, precision=prec)


def _scalar(kernel: jax.Array, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
  dt = jnp.dtype(cfg.dtype)
  return jnp.einsum("...D,DO->...O", hidden.astype(dt), kernel.astype(dt),
                    preferred_element_type=jnp.float32,
                    precision=dot_precision(cfg.matmul_precision, dt))[..., 0]


def score(params: dict, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Reward-model score (HF's *ForSequenceClassification `score`): [..., D] -> float32 [...]."""
  return _scalar(params["score"], hidden, cfg)


def score_index(tokens: jax.Array, mask: jax.Array, pad_id: Optional[int]) -> jax.Array:
  """Per row [B], the position a score head reads: transformers' sequence-classification rule.

  HF's `*ForSequenceClassification` (and so TRL's RewardTrainer) pools at the rightmost token
  whose id is not `pad_token_id`. With pad == eos (Qwen base tokenizers, the common
  `pad_token = eos_token` recipe) that is the token before a trailing EOS, not the EOS; the
  readout must be the same here or an exported reward model scores a different token.
  Positions outside `mask` count as padding whatever id they hold; with no pad id it is the
  last position in `mask` (HF: the last token). A row with no candidate reads position 0, as
  HF's argmax does.

  Args:
    tokens: int [B, T]; mask: bool [B, T] (True on real tokens); pad_id: the config's
      pad_token_id (None when there is none).
  """
  keep = mask if pad_id is None else mask & (tokens != pad_id)
  return jnp.max(jnp.where(keep, jnp.arange(tokens.shape[-1]), 0), axis=-1)


def sequence_score(params: dict, hidden: jax.Array, tokens: jax.Array, mask: jax.Array,
                   cfg: ModelConfig) -> jax.Array:
  """A reward model's score per sequence, read at `score_index` as HF's classifiers read it.

  The one readout of the reward trainer, PPO's reward model and `rewards.reward_model`. Only the
  picked rows go through the head, not all T positions.

  Args:
    params: the reward model's params (with `score`); hidden: [B, T, D] of its forward over
      `tokens` int [B, T] with `mask` bool [B, T]; cfg: its config (for `pad_token_id`).
  Returns:
    float32 [B].
  """
  last = score_index(tokens, mask, cfg.pad_token_id)
  picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
  return score(params, picked, cfg)


def value(params: dict, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
  """State value for PPO's critic on the policy's trunk: [..., D] -> float32 [...]."""
  return _scalar(params["value"], hidden, cfg)


def init_value(cfg: ModelConfig) -> dict:
  """A zero value head `{"value": [D, 1]}` to merge into the params; trainable, like `score`
  for reward models (zero, so every value starts at 0 whatever the trunk)."""
  return {"value": jnp.zeros((cfg.d_model, 1), jnp.dtype(cfg.adapter_dtype))}


def token_logits(params: dict, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
  """A token classifier's logits (a process reward model): [..., D] -> float32 [..., 2], class 1
  a good step and class 0 a bad one, as TRL's PRMTrainer labels them."""
  dt = jnp.dtype(cfg.dtype)
  return jnp.einsum("...D,DC->...C", hidden.astype(dt), params["token_score"].astype(dt),
                    preferred_element_type=jnp.float32,
                    precision=dot_precision(cfg.matmul_precision, dt))


def step_scores(params: dict, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
  """P(good step) at every position: softmax of `token_logits`, class 1 (TRL's step score)."""
  return jax.nn.softmax(token_logits(params, hidden, cfg), axis=-1)[..., 1]


def init_token_score(cfg: ModelConfig) -> jax.Array:
  """A zero step classifier [D, 2] (both classes equally likely until it trains)."""
  return jnp.zeros((cfg.d_model, TOKEN_LABELS), jnp.dtype(cfg.adapter_dtype))
