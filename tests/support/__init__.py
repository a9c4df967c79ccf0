"""Helpers shared by test modules of several tiers (no test module imports another)."""
