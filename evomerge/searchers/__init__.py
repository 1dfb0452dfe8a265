"""Search drivers behind one ask/tell interface (see `base` for the contract).

    s = make_searcher("cmaes", lower, upper, seed=0, popsize=8)
    genomes = s.ask(); s.tell(genomes, objectives)   # objectives maximized, NaN = failed
    blob = s.state_dict(); s2 = Searcher.from_state(blob)   # continues bit-identically
"""

from evomerge.searchers.base import Searcher, SearcherSpec
from evomerge.searchers.registry import CHOICES, make_searcher, searcher_class

__all__ = ["Searcher", "SearcherSpec", "make_searcher", "searcher_class", "CHOICES"]
