"""Run at the start of every Python the tests start (tests/conftest.py puts this directory on
PYTHONPATH): a script run goes to the pytest process's warm zygote when it can
(ftjax_zygote.py), and the suite's XLA compile policy applies (ftjax_xla_policy.py)."""

import os

if os.environ.get("FTJAX_TEST_ZYGOTE"):
  import ftjax_zygote
  ftjax_zygote.launch()  # returns only where the command starts the ordinary way

import ftjax_xla_policy  # noqa: E402

ftjax_xla_policy.install()
