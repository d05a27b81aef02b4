"""AI feedback: sample k replies per prompt, score them with a judge, write preference pairs.

  python experiments/label.py --policy=SFT_HF_DIR --data=prompts.jsonl --k=4 \
      --judge=llm:JUDGE_HF_DIR --rubric=constitution.txt --out=pairs.jsonl
  python experiments/label.py --policy=SFT_HF_DIR --data=ftjax/demo/data/eval.jsonl \
      --judge=support_scorer --out=pairs.jsonl          # the task's rule scorer
  python experiments/label.py ... --judge=reward_model:RM_DIR   # a reward model

`--data` rows hold a `prompt` (string or messages) or `messages` (the prompt is every turn
before the last assistant turn). The output rows are TRL's (prompt, chosen, rejected) with the
judge's scores; `<out>.provenance.json` records judge, rubric, policy and seed. Train on them with
`python experiments/dpo.py --config=configs/dpo.py --config.data.path=pairs.jsonl ...`.
The logic: ftjax/labeling.py.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import cli, labeling  # noqa: E402
from ftjax.errors import UserError  # noqa: E402


def define_flags():
  flags.DEFINE_string("policy", None, "The model that writes the replies: an HF directory or "
                      "an ftjax training workdir.")
  flags.DEFINE_string("data", None, "JSONL/JSON/parquet prompt rows (prompt, or messages).")
  flags.DEFINE_string("out", None, "Output JSONL of preference rows.")
  flags.DEFINE_string("judge", None, "llm:PATH | reward_model:PATH | a task reward "
                      "(support_scorer, answer_match:answer, ...).")
  flags.DEFINE_string("rubric", "", "Text file of principles (the constitution) for llm:.")
  flags.DEFINE_enum("judge_scale", "10", list(labeling.SCALES), "llm: verdicts 1..10 or yes/no.")
  flags.DEFINE_float("min_score_mass", 0.5, "llm: least probability on the verdict tokens.")
  flags.DEFINE_integer("k", 4, "Replies sampled per prompt.")
  flags.DEFINE_integer("max_new_tokens", 64, "Reply length limit.", lower_bound=1)
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("batch_size", 8, "Prompts per sampling batch (the judge then reads "
                       "their batch_size x k replies at once).", lower_bound=1)
  flags.DEFINE_integer("max_prompts", 0, "Use the first N prompts (0: all).", lower_bound=0)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  for name in ("policy", "data", "out", "judge"):
    if not getattr(FLAGS, name):
      raise UserError(f"--{name} is required")
  prov = labeling.label(FLAGS.policy, FLAGS.data, FLAGS.out, FLAGS.judge, k=FLAGS.k,
                        rubric=FLAGS.rubric, judge_scale=FLAGS.judge_scale,
                        min_score_mass=FLAGS.min_score_mass, max_new_tokens=FLAGS.max_new_tokens,
                        temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed,
                        batch_size=FLAGS.batch_size, max_prompts=FLAGS.max_prompts)
  print(json.dumps(prov))


if __name__ == "__main__":
  cli.run(main, define_flags)
