"""The bytes a searcher saves: a JSON header plus an optional opaque payload.

Why a header at all: the run store keeps one blob per run, and `Searcher.from_state(blob)` must know
which searcher to rebuild, with which bounds and options, before it reads the engine's own state.
cmaes and random search save everything in the header (JSON, floats written exactly, arrays as
base64 of their raw bytes): no pickle, readable by any tool. pymoo and nevergrad objects can only be
saved with (dill) pickle, so their payload is a pickle: load such blobs only from runs you trust.

Also here: a private stand-in for numpy's *global* RNG. nevergrad (and the `cma` package) draw from
``np.random`` directly; without isolation their asks depend on whoever else used the global RNG, and a
resumed run would start from a different global state. Each searcher keeps its own global-RNG state,
swaps it in around engine calls and saves it with the rest.
"""

from __future__ import annotations

import base64
import contextlib
import json
import struct
from typing import Any, Iterator

import numpy as np

MAGIC = b"evomerge-searcher-state\x00"
FORMAT = 1


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """MAGIC | u64 header length | header JSON | payload."""
    head = json.dumps(header, allow_nan=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<Q", len(head)) + head + payload


def unpack(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """Inverse of `pack`; raises on bytes that are not a searcher state."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"a searcher state is bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 8:
        raise ValueError("these bytes are not an evomerge searcher state (bad magic); pass what state_dict() returned")
    (n,) = struct.unpack("<Q", blob[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    if start + n > len(blob):
        raise ValueError(f"truncated searcher state: header says {n} bytes, only {len(blob) - start} present")
    header = json.loads(blob[start : start + n])
    if header.get("format") != FORMAT:
        raise ValueError(f"searcher state format {header.get('format')!r} is not supported (expected {FORMAT})")
    return header, blob[start + n :]


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """Exact, pickle-free encoding of a numpy array (dtype, shape, raw little-endian bytes)."""
    a = np.asarray(a)
    if a.dtype.hasobject:
        raise TypeError(f"cannot encode an object array (dtype {a.dtype})")
    le = a.astype(a.dtype.newbyteorder("<"), copy=False)
    raw = np.ascontiguousarray(le).tobytes()
    return {"dtype": le.dtype.str, "shape": list(a.shape), "b64": base64.b64encode(raw).decode()}


def decode_array(d: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(d["b64"])
    dtype = np.dtype(d["dtype"])
    return np.frombuffer(raw, dtype=dtype).reshape(d["shape"]).astype(dtype.newbyteorder("="))


def encode_legacy_rng(state: tuple) -> dict[str, Any]:
    """`np.random.RandomState.get_state()` (MT19937) as JSON."""
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": encode_array(np.asarray(keys, dtype=np.uint32)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def decode_legacy_rng(d: dict[str, Any]) -> tuple:
    return (d["name"], decode_array(d["keys"]), d["pos"], d["has_gauss"], d["cached_gaussian"])


class GlobalRNG:
    """A private state for numpy's global RNG, swapped in only while an engine runs.

    Not thread-safe: another thread drawing from ``np.random`` during an engine call would draw from
    this state. The search driver calls searchers from one thread, which is all this needs.
    """

    def __init__(self, seed: int) -> None:
        self.state: Any = np.random.RandomState(seed).get_state()  # numpy's legacy state tuple

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        outer = np.random.get_state()
        np.random.set_state(self.state)
        try:
            yield
        finally:
            self.state = np.random.get_state()
            np.random.set_state(outer)

    def to_json(self) -> dict[str, Any]:
        return encode_legacy_rng(self.state)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "GlobalRNG":
        g = cls.__new__(cls)
        g.state = decode_legacy_rng(d)
        return g
