"""Merging: pure tensor methods behind a registry, parameter resolution, the in-memory engine."""
