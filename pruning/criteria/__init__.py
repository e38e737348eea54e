"""Importance criteria: how much each KV group and MLP channel is worth.

One file per criterion; ``registry`` imports them and is the one source of their facts (name, options,
whether they need calibration text, a backward, the whole model). ``base`` holds the interface and the
per-structure score helpers every criterion shares. docs/architecture.md says how to add one.
"""
