"""Mutation testing on demand (not in CI): ``python -m tools.mutation`` (docs/mutation-testing.md)."""
