"""Example flows that ship with the package (the demo uses them)."""
