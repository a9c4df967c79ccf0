"""Integrations with frameworks; each module imports its framework only when used."""
