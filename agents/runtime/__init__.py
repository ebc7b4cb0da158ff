"""The shared agent runtime: every agent kind is a set of roles on top of it."""
