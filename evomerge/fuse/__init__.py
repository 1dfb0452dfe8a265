"""Heterogeneous merging by distribution fusion (FuseLLM): sources of any architecture and tokenizer
teach one target through their next-token distributions, aligned to the target's tokens.

``align`` (token and vocabulary alignment), ``distributions`` (sources' top-k distributions and the
fusion strategies), ``train`` (the loss and the resumable loop), ``config`` (the experiment file),
``run`` (``evomerge fuse``).
"""

from evomerge.fuse.align import dtw_align, same_prefix_positions, token_surfaces, vocab_map
from evomerge.fuse.config import FuseExperiment, load_fuse_experiment
from evomerge.fuse.distributions import ce_weights, coalesce, fuse_mince, fuse_weighted, source_distributions
from evomerge.fuse.run import run_fuse
from evomerge.fuse.train import fusion_loss, train_fused

__all__ = ["FuseExperiment", "ce_weights", "coalesce", "dtw_align", "fuse_mince", "fuse_weighted", "fusion_loss",
           "load_fuse_experiment", "run_fuse", "same_prefix_positions", "source_distributions", "token_surfaces",
           "train_fused", "vocab_map"]
