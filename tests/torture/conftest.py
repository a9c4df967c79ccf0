"""Hypothesis profiles for the model checker (tests/torture/test_model.py).

By default a quick pass (200 fixed examples a backend, about 15 s in all). Before a
release, or after a change to progress.py, the worker or a storage, run many more
(several minutes a backend, so past pytest-timeout's 300 s):

    .venv/bin/python -m pytest tests/torture --hypothesis-profile=model-long --timeout=0

A failing example is printed (shrunk) with its shape, and hypothesis replays it
first on the next run (from .hypothesis/, which it keeps out of git itself).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# No deadline: an example's time is the worker's polling and a busy machine's,
# not what is under test.
_COMMON = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The quick pass runs in every `make test`: the same 200 examples each time (a red CI
# is then a change's, not the dice's), and no example database written into the tree.
settings.register_profile("model-quick", _COMMON, max_examples=200, derandomize=True, database=None)
settings.register_profile("model-long", _COMMON, max_examples=5000)
if settings.get_current_profile_name() == "default":  # no --hypothesis-profile given
    settings.load_profile("model-quick")
