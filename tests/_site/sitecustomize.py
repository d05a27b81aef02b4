"""Run at the start of every Python the tests start (tests/conftest.py puts this directory on
PYTHONPATH): the suite's XLA compile policy (ftjax_xla_policy.py)."""

import ftjax_xla_policy

ftjax_xla_policy.install()
