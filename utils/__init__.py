"""Shared helpers: config parsing, errors, atomic file IO, metrics, maps."""
