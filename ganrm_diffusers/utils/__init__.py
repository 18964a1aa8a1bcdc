"""Shared utilities with no knowledge of reward models or generators: errors, atomic writes, image input, cache
paths, plots."""
