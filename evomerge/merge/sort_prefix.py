"""Which entries a CPU ``torch.sort`` puts first, without sorting: mergekit's top-k cut, ties included.

mergekit 0.1.5 prunes by magnitude with a full sort: ``torch.argsort(|d|, descending=True)[:k]``
(TIES) and ``torch.sort(|d|).indices[n_bot : n_bot + k]`` (breadcrumbs), on float32 magnitudes on a
CPU. Which of the entries tied at the cut it keeps (fine-tunes made with AdamW have thousands of
deltas of one magnitude) is decided by that sort, which is not stable and not a function of the
index: torch's CPU kernel (``aten/src/ATen/native/cpu/SortingKernel.cpp``, ``stable=False``) runs
``std::sort`` on (value, index) pairs compared by value only, and libstdc++'s ``std::sort`` is an
introsort whose placement of equal values follows from its partitions.

The rule is therefore the algorithm itself, and this module reproduces the part of it that decides
the set of the first ``k`` positions, in O(n):

- ``__introsort_loop``: while a range is longer than 16, move the median of (first + 1, middle,
  last - 1) to ``first`` (``__move_median_to_first``), Hoare-partition the rest around it
  (``__unguarded_partition``: the left scan stops at an entry not strictly before the pivot, the
  right scan at one not strictly after it, the two are swapped), and sort both sides; after
  2 * floor(log2 n) partitions along a path it heap-sorts instead.
- A partition never moves an entry across its cut afterwards, so the first ``k`` positions hold
  the left side whole when the cut is at most ``k``, and none of the right side when it is more:
  only the side that contains position ``k`` needs following (a selection), each level being one
  vectorised pass (both scans' stopping positions are the entries <= / >= the pivot, paired in
  order until they cross).
- ``__final_insertion_sort`` leaves ranges of <= 16 in a stable order of their arrangement at
  that point, and moves no entry across a cut.

When the path would need the heap-sort fallback (adversarial inputs), when a NaN is present, or
when the one-time self-check against ``torch.argsort`` on this torch build fails (another standard
library or sort kernel), the callers sort with torch as mergekit does: the result is mergekit's in
every case, only the cost differs.
"""

from __future__ import annotations

import numpy as np
import torch

_THRESHOLD = 16  # libstdc++'s _S_threshold
SMALL = 1 << 14  # up to this many entries torch's own sort is faster than the emulation's numpy passes


def _median_to_first(a: np.ndarray, ix: np.ndarray, m: int) -> None:
    """``__move_median_to_first(first, first + 1, mid, last - 1)`` for a descending comparator."""
    mid = m // 2
    x, y, z = a[1], a[mid], a[m - 1]
    if x > y:
        s = mid if y > z else (m - 1 if x > z else 1)
    elif x > z:
        s = 1
    elif y > z:
        s = m - 1
    else:
        s = mid
    a[0], a[s] = a[s], a[0]
    ix[0], ix[s] = ix[s], ix[0]


def _first_crossing(left: np.ndarray, right: np.ndarray) -> int:
    """The first j with left[j] >= right[j] (left increasing, right decreasing, so the predicate
    is monotone: a binary search), or the shorter length when they never cross."""
    lo, hi = 0, min(left.size, right.size)
    while lo < hi:
        mid = (lo + hi) // 2
        if left[mid] >= right[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _partition(a: np.ndarray, ix: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """One ``__unguarded_partition_pivot`` on the range ``a`` (moved median to ``a[0]`` in place):
    the cut and the positions the scans swap (every left one < cut <= every right one); the swaps
    themselves are left to the caller, which applies only those of the side it follows."""
    _median_to_first(a, ix, a.size)
    p = a[0]
    left = np.flatnonzero(a <= p)[1:]  # where the left scan stops (from 1: a[0] is the pivot)
    right = np.flatnonzero(a >= p)[::-1]  # where the right scan stops, in order
    swaps = _first_crossing(left, right)
    if swaps == 0:
        cut = int(left[0])
    elif swaps < left.size:
        cut = int(min(left[swaps], right[swaps - 1]))
    else:
        cut = int(right[swaps - 1])
    return cut, left[:swaps], right[:swaps]


def std_sort_range(keys: np.ndarray, start: int, stop: int) -> np.ndarray | None:
    """The indices that ``std::sort`` of (keys[i], i) by key, descending, places at positions
    ``[start, stop)`` (unordered), or None where the heap-sort fallback or a NaN would decide.

    Only ranges that contain ``start`` or ``stop`` are partitioned further (a selection): while both
    lie in one range, one path; where a cut separates them, one path each."""
    n = int(keys.size)
    start, stop = max(0, start), min(n, stop)
    if start >= stop:
        return np.zeros(0, dtype=np.int64)
    if start == 0 and stop == n:
        return np.arange(n)
    if np.isnan(keys).any():
        return None
    a0 = np.array(keys, dtype=keys.dtype, copy=True)
    ix0 = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    kept: list[np.ndarray] = []
    # ranges to follow: (keys, indices, global position of the range's first entry, depth left)
    todo = [(a0, ix0, 0, 2 * (n.bit_length() - 1))]
    while todo:
        a, ix, lo, depth = todo.pop()
        hi = lo + a.size
        if stop <= lo or hi <= start:
            continue
        if start <= lo and hi <= stop:
            kept.append(ix)
            continue
        if a.size <= _THRESHOLD:  # the final insertion sort orders a short range stably
            kept.append(ix[np.argsort(-a, kind="stable")[max(0, start - lo) : stop - lo]])
            continue
        if depth == 0:
            return None
        cut, la, ra = _partition(a, ix)
        go_left, go_right = start < lo + cut, lo + cut < stop
        if go_left and go_right:  # both sides hold part of the range: every swap
            moved_a, moved_ix = a[la], ix[la]
            a[la], ix[la] = a[ra], ix[ra]
            a[ra], ix[ra] = moved_a, moved_ix
        elif go_right:  # only the side that is followed needs its swapped entries
            a[ra], ix[ra] = a[la], ix[la]
        else:
            a[la], ix[la] = a[ra], ix[ra]
        if go_left:
            todo.append((a[:cut], ix[:cut], lo, depth - 1))
        if go_right:
            todo.append((a[cut:], ix[cut:], lo + cut, depth - 1))
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


def std_sort_prefix(keys: np.ndarray, k: int) -> np.ndarray | None:
    """The indices that ``std::sort`` of (keys[i], i) by key, descending, places in its first ``k``
    positions (unordered), or None where the heap-sort fallback or a NaN would decide."""
    return std_sort_range(keys, 0, k)


_VERIFIED: bool | None = None


def emulation_matches_torch() -> bool:
    """Whether :func:`std_sort_prefix` reproduces this torch build's CPU ``argsort`` (checked once,
    on tensors built to tie, at several cuts, both directions)."""
    global _VERIFIED
    if _VERIFIED is None:
        g = torch.Generator().manual_seed(0)
        ok = True
        for n, levels in ((5000, 7), (20011, 3), (3000, 1000)):
            w = torch.randint(0, levels, (n,), generator=g).float()
            for descending in (True, False):
                order = torch.argsort(w, descending=descending).numpy()
                keys = w.numpy() if descending else -w.numpy()
                for k in (1, n // 3, n // 2 + 1, n - 17):
                    got = std_sort_prefix(keys, k)
                    ok = ok and got is not None and np.array_equal(np.sort(got), np.sort(order[:k]))
        _VERIFIED = ok
    return _VERIFIED


def sorted_range_mask(w: torch.Tensor, start: int, stop: int, descending: bool = True) -> torch.Tensor:
    """A bool mask of the entries ``torch.sort(w, descending=descending)`` places at positions
    ``[start, stop)`` (breadcrumbs' cut at both ends): one traversal, shared until the two cuts part."""
    n = w.numel()
    if n <= SMALL:
        return _sorted_by_torch(w, start, stop, descending)
    if start <= 0 or stop >= n or emulation_matches_torch():
        if start <= 0:
            return sorted_prefix_mask(w, stop, descending)
        if stop >= n:
            return ~sorted_prefix_mask(w, start, descending)
        keys = w.numpy() if descending else np.negative(w.numpy())
        chosen = std_sort_range(keys, start, stop)
        if chosen is not None:
            mask = np.zeros(n, dtype=bool)
            mask[chosen] = True
            return torch.from_numpy(mask)
    return sorted_prefix_mask(w, stop, descending) & ~sorted_prefix_mask(w, start, descending)


def sorted_prefix_mask(w: torch.Tensor, k: int, descending: bool = True) -> torch.Tensor:
    """A bool mask (shaped like the 1-D float32 CPU tensor ``w``) of the ``k`` entries that
    ``torch.sort(w, descending=descending)`` places first, ties at the cut included.

    :func:`std_sort_prefix` decides (it is a selection, as fast as numpy's introselect on these
    tensors, and exact whether or not a tie straddles the cut). Where it cannot (NaN, heap-sort
    depth) ``torch.argsort`` runs; on a torch build where it fails its self-check, the k-th value
    is found by numpy's introselect, and only when a tie straddles the cut does ``torch.argsort``
    run."""
    n = w.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k > 0, dtype=torch.bool)
    if n <= SMALL:
        return _sorted_by_torch(w, 0, k, descending)
    keys = w.numpy() if descending else np.negative(w.numpy())  # descending on -w sorts as ascending on w
    if emulation_matches_torch():
        chosen = std_sort_range(keys, 0, k)
    else:
        threshold = np.partition(keys, n - k)[n - k]
        at_least = keys >= threshold
        if int(np.count_nonzero(at_least)) == k:  # no tie straddles the cut: no choice to make
            return torch.from_numpy(at_least)
        chosen = None
    if chosen is None:
        chosen = torch.argsort(w, descending=descending)[:k].numpy()
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return torch.from_numpy(mask)


def _sorted_by_torch(w: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """The mask from torch's sort itself (what mergekit calls), for small tensors."""
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[torch.sort(w, descending=descending).indices[max(0, start) : max(0, stop)]] = True
    return mask
