"""Token alignment between two vocabularies, after FuseLLM (Wan et al. 2024).

Two problems, two pure functions:

1. **Sequence alignment.** The same text tokenised by two tokenizers gives two token sequences that
   do not line up (BPE ``33`` against characters ``3`` ``3``). :func:`dtw_align` pairs them by
   dynamic programming over the edit distance between token strings, as FuseLLM does; ties, which
   repetitive text makes common (``3333``), are broken by character position so that a token pairs
   with the tokens that cover the same characters. :func:`same_prefix_positions` then keeps only
   the pairs where both models have read exactly the same text: there, and only there, the source's
   next-token distribution is a prediction about the same thing as the target's.
2. **Vocabulary mapping.** A source's next token is one of *its* tokens; :func:`vocab_map` sends each
   to the target token with the smallest edit distance between their strings (FuseLLM's "soft"
   alignment), preferring the longest common prefix among equals, because for a next-token
   prediction what matters is what the target would emit first (``88`` -> ``8``). Special tokens
   map by role (EOS to EOS), whatever their spelling.

Everything here works on strings and integers; models and tensors live in ``distributions.py``.
"""

from __future__ import annotations

from typing import Any, Sequence

SPECIAL_ROLES = ("eos", "bos", "pad", "unk")  # a token with several roles takes the first listed


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for ca, cb in zip(a, b):
        if ca != cb:
            break
        n += 1
    return n


def special_marker(role: str) -> str:
    """The surface string a special token is given: no text, its role only, so BOS meets BOS."""
    return f"\x00{role}"


def token_surfaces(tokenizer: Any) -> list[str]:
    """The text each vocabulary id stands for, indexed by id.

    Byte-level BPE spells a space ``Ġ`` and SentencePiece ``▁``; comparing raw token strings across
    the two would count those as differences, so each token is passed through its tokenizer's own
    decoder (FuseLLM replaces the two markers by hand). Special tokens get :func:`special_marker`.
    """
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    roles: dict[int, str] = {}
    for role in reversed(SPECIAL_ROLES):  # the first role listed wins
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None:
            roles[tid] = role
    specials = set(getattr(tokenizer, "all_special_ids", []))
    out = []
    for i, tok in enumerate(tokens):
        if i in roles:
            out.append(special_marker(roles[i]))
        elif i in specials or tok is None:
            out.append(special_marker(str(tok)))
        elif decoder is not None:
            out.append(decoder.decode([tok]))
        else:
            out.append(tok)
    return out


def dtw_align(a: Sequence[str], b: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Align two token-string sequences of one text; returns, for each ``a`` index, the ``b`` indices
    paired with it, and the same for ``b``.

    Dynamic time warping: every token is paired with at least one of the other side, in order, and
    the path minimises the summed edit distance of its pairs (FuseLLM). A second, strictly smaller
    term (the distance between the tokens' character midpoints, scaled so that it can never outweigh
    one unit of edit distance) decides between paths of equal edit cost.
    """
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        raise ValueError(f"cannot align an empty token sequence (lengths {n} and {m})")

    def midpoints(seq: Sequence[str]) -> list[float]:
        out, pos = [], 0
        for s in seq:
            length = 0 if s.startswith("\x00") else len(s)
            out.append(pos + length / 2)
            pos += length
        return out

    ma, mb = midpoints(a), midpoints(b)
    scale = 1.0 / ((n + m + 1) * (max(ma[-1], mb[-1]) * 2 + 2))
    dist: dict[tuple[str, str], int] = {}
    inf = float("inf")
    acc = [[inf] * (m + 1) for _ in range(n + 1)]
    acc[0][0] = 0.0
    for i in range(1, n + 1):
        row, prev = acc[i], acc[i - 1]
        for j in range(1, m + 1):
            key = (a[i - 1], b[j - 1])
            d = dist.get(key)
            if d is None:
                d = dist[key] = edit_distance(*key)
            cost = d + scale * abs(ma[i - 1] - mb[j - 1])
            row[j] = cost + min(prev[j - 1], prev[j], row[j - 1])
    a_to_b: list[list[int]] = [[] for _ in range(n)]
    b_to_a: list[list[int]] = [[] for _ in range(m)]
    i, j = n, m
    while True:
        a_to_b[i - 1].append(j - 1)
        b_to_a[j - 1].append(i - 1)
        if i == 1 and j == 1:
            break
        moves = [(acc[i - 1][j - 1], i - 1, j - 1), (acc[i - 1][j], i - 1, j), (acc[i][j - 1], i, j - 1)]
        _, i, j = min(moves, key=lambda t: t[0])  # the diagonal wins ties (listed first)
    for lst in a_to_b + b_to_a:
        lst.reverse()
    return a_to_b, b_to_a


def same_prefix_positions(target: Sequence[str], source: Sequence[str]) -> list[int | None]:
    """For each target position, the source position that has read exactly the same text, or None.

    The DTW path splits into blocks at its diagonal steps: a block is a run of target tokens and a
    run of source tokens covering one stretch of text (``3`` ``3`` against ``33``). Where a block's
    two runs spell the same string and everything before it agrees as well, the last target token
    of the block and the last source token have read the same prefix; the target tokens inside the
    block have read part of a source token, where the source made no prediction (FuseLLM falls back
    to the reference token there, and so does the caller).
    """
    if list(target) == list(source):
        return list(range(len(target)))
    t_to_s, _ = dtw_align(target, source)
    path = [(i, j) for i, js in enumerate(t_to_s) for j in js]
    out: list[int | None] = [None] * len(target)
    t_read, s_read = "", ""
    start = 0
    for k in range(1, len(path) + 1):
        if k < len(path) and not (path[k][0] > path[k - 1][0] and path[k][1] > path[k - 1][1]):
            continue  # same block: the path stayed on a row or a column
        (i0, j0), (i1, j1) = path[start], path[k - 1]
        t_read += "".join(target[i0:i1 + 1])
        s_read += "".join(source[j0:j1 + 1])
        if t_read == s_read:
            out[i1] = j1
        start = k
    return out


def vocab_map(source: Sequence[str], target: Sequence[str]) -> list[int]:
    """For each source token id, the target id whose string is nearest in edit distance.

    Exact matches are looked up; the rest scan the target vocabulary by increasing length gap (the
    edit distance is at least the difference of lengths), so the scan stops as soon as no remaining
    token can beat the best found. Among equals: the longest common prefix, then the lowest id.
    """
    exact: dict[str, int] = {}
    for tid, s in enumerate(target):
        exact.setdefault(s, tid)
    by_len: dict[int, list[int]] = {}
    for s, tid in exact.items():
        by_len.setdefault(len(s), []).append(tid)
    lengths = sorted(by_len)
    out = []
    for s in source:
        if s in exact:
            out.append(exact[s])
            continue
        best: tuple[int, int, int] | None = None  # (distance, -common prefix, id)
        for length in sorted(lengths, key=lambda n: abs(n - len(s))):
            if best is not None and abs(length - len(s)) > best[0]:
                break
            for tid in by_len[length]:
                t = target[tid]
                cand = (edit_distance(s, t), -_common_prefix(s, t), tid)
                if best is None or cand < best:
                    best = cand
        assert best is not None, "the target vocabulary is empty"
        out.append(best[2])
    return out
