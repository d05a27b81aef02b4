"""Losses: small pure functions with shape-annotated docstrings, one module per family.

`tokens` (token log-probabilities, SFT cross-entropy, entropy), `preference` (DPO family,
Bradley-Terry), `grpo`, `rloo` (leave-one-out advantages, sequence-level loss), `ppo`. Formulas
only: the trainers in `ftjax.train` assemble batches and call them. Every public name is
re-exported here (`ftjax.losses.token_logprobs`, ...).
Shapes use the letters of `model.py` (B batch, T length, V vocab; M completion length).
"""

from ftjax.losses.grpo import (GRPO_LOSS_TYPES, SCALE_REWARDS, grpo_advantages, grpo_loss_sum,
                               grpo_per_token_loss)
from ftjax.losses.ppo import (KL_ESTIMATORS, adaptive_kl_update, apply_missing_eos_penalty, gae,
                              kl_penalty, last_index, masked_mean, masked_var, masked_whiten,
                              ppo_policy_losses, ppo_rewards, ppo_value_losses)
from ftjax.losses.preference import (CPO_LOSS_TYPES, DPO_LOSS_TYPES, F_DIVERGENCES,
                                     TRL_DPO_LOSS_TYPES, bradley_terry_losses,
                                     bradley_terry_metric_sums, check_dpo_options, cpo_loss,
                                     dpo_loss, dpo_metric_sums, dpo_multi_loss,
                                     KTO_LOSS_TYPES, kto_loss,
                                     ld_weighted_logps, log1mexp, orpo_loss,
                                     sequence_logps_sum_and_mean)
from ftjax.losses.rloo import rloo_advantages, rloo_loss_sum, sequence_kl
from ftjax.losses.tokens import logprobs_from_logits, sft_loss, token_entropy, token_logprobs

__all__ = [
    "GRPO_LOSS_TYPES", "SCALE_REWARDS", "grpo_advantages", "grpo_loss_sum", "grpo_per_token_loss",
    "KL_ESTIMATORS", "adaptive_kl_update", "apply_missing_eos_penalty", "gae", "kl_penalty",
    "last_index", "masked_mean", "masked_var", "masked_whiten", "ppo_policy_losses",
    "ppo_rewards", "ppo_value_losses",
    "rloo_advantages", "rloo_loss_sum", "sequence_kl",
    "CPO_LOSS_TYPES", "DPO_LOSS_TYPES", "F_DIVERGENCES", "TRL_DPO_LOSS_TYPES",
    "bradley_terry_losses", "bradley_terry_metric_sums", "check_dpo_options", "cpo_loss",
    "dpo_loss", "dpo_metric_sums", "dpo_multi_loss", "KTO_LOSS_TYPES", "kto_loss",
    "ld_weighted_logps",
    "log1mexp",
    "orpo_loss", "sequence_logps_sum_and_mean",
    "logprobs_from_logits", "sft_loss", "token_entropy", "token_logprobs",
]
