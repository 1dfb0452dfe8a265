"""Evaluators: each returns one score in [0, 1] per benchmark item, keyed by item id."""
