"""Search-space presets, installed as evomerge.presets (see evomerge.resources)."""
