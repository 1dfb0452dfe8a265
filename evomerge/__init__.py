"""evomerge: evolutionary model merging for LLMs.

A search driver proposes genomes, a merge worker materializes each candidate in memory, fitness
estimators score it from a small IRT-chosen subset of benchmark items, and Ray spreads the work.
See design.md (shipped in docs/) for the path of one candidate.
"""

__version__ = "0.1.0"
