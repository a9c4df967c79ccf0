"""Step functions shared by tests whose steps run elsewhere."""

from __future__ import annotations


def never_here(_ctx: object) -> None:
    """A step the test declares only to enqueue its flow: worker processes run the real one."""
    raise AssertionError("steps run in the worker processes, not in the test")
