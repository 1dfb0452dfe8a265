"""Time to produce one merge candidate: evomerge's in-memory engine vs mergekit.

For each model set (the zoo, and a larger randomly initialised Llama made locally) and each method,
prints seconds per candidate for
  - evomerge ``MergeEngine.materialize`` (sources resident, one preallocated model),
  - mergekit's Python API (``run_merge``; import time excluded, load + merge + write included),
  - mergekit's CLI (``mergekit-yaml``; everything a user waits for),
the ratio to the engine, and the engine's effective bandwidth (bytes read + written per second,
counting each resident input once and the output once) against a memcpy measured in this run.

    python scripts/bench_merge.py                 # zoo + a ~300M-parameter model
    python scripts/bench_merge.py --skip-large --reps 20
    python scripts/bench_merge.py --new-methods   # the newer methods vs task_arithmetic and mergekit
    python scripts/bench_merge.py --family        # the task-arithmetic family vs task_arithmetic (engine only)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import MergeEngine

METHODS = {
    "linear": lambda names: {"merge_method": "linear", "models": [
        {"model": n, "parameters": {"weight": 1.0}} for n in names]},
    "task_arithmetic": lambda names: {"merge_method": "task_arithmetic", "base_model": names[0], "models": [
        {"model": n, "parameters": {"weight": [0.3, 0.6]}} for n in names[1:]]},
    "ties": lambda names: {"merge_method": "ties", "base_model": names[0], "models": [
        {"model": n, "parameters": {"weight": 0.5, "density": 0.5}} for n in names[1:]]},
    "dare_ties": lambda names: {"merge_method": "dare_ties", "base_model": names[0], "models": [
        {"model": n, "parameters": {"weight": 0.5, "density": 0.5}} for n in names[1:]]},
}


def memcpy_bandwidth(nbytes: int = 1 << 29, reps: int = 5) -> float:
    """Bytes read + written per second by a plain tensor copy (best of ``reps``)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def make_large(root: Path, hidden: int, layers: int, n_experts: int, dtype: torch.dtype) -> dict[str, Path]:
    """A random Llama base and ``n_experts`` nudged copies of it, saved as HF checkpoints."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.tokenizer import char_tokenizer

    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    # transformers wraps .to with functools.wraps(Module.to), so mypy reads it unbound (self = the dtype)
    model = LlamaForCausalLM(cfg).to(dtype)  # type: ignore[arg-type]
    paths = {}
    tok = char_tokenizer()
    for i, name in enumerate(["base"] + [f"expert{j}" for j in range(n_experts)]):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


def time_engine(engine: MergeEngine, recipe: MergeConfig, reps: int) -> float:
    engine.materialize(recipe)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        engine.materialize(recipe)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def time_mergekit_api(cfg: dict, out: Path, reps: int) -> float:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(cfg)
    times = []
    for _ in range(reps):
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        run_merge(config, str(out), options=MergeOptions(quiet=True, write_model_card=False, random_seed=0))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def time_mergekit_cli(cfg: dict, work: Path) -> float:
    path = work / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = work / "cli-out"
    shutil.rmtree(out, ignore_errors=True)
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    t = time.perf_counter()
    subprocess.run([exe, str(path), str(out), "--quiet", "--no-write-model-card"], check=True, capture_output=True)
    return time.perf_counter() - t


def bench_set(label: str, paths: dict[str, Path], reps: int, mk_reps: int, work: Path, memcpy: float,
              dtype: torch.dtype | None) -> list[dict]:
    names = list(paths)
    t = time.perf_counter()
    engine = MergeEngine(paths, base=names[0], dtype=dtype)
    load = time.perf_counter() - t
    assert engine.model is not None  # a new engine holds its model until detach_model()
    n_params = sum(p.numel() for p in engine.model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    print(f"\n== {label}: {n_params / 1e6:.1f}M parameters x {len(names)} models, "
          f"{engine.dtype}; engine load {load:.2f} s, resident {engine.resident_bytes() / 1e9:.2f} GB")
    rows = []
    try:
        import mergekit  # noqa: F401
        have_mergekit = True
    except ImportError:
        have_mergekit = False
        print("mergekit not installed: pip install -e '.[bench]' for the comparison")
    for method, make in METHODS.items():
        cfg = make(names)
        ours = time_engine(engine, MergeConfig.model_validate(cfg), reps)
        traffic = (len(names) + 1) * model_bytes  # the base and every source read, one output written
        row: dict[str, Any] = {"set": label, "method": method, "engine_s": ours, "bandwidth": traffic / ours,
               "pct_memcpy": 100 * traffic / ours / memcpy}
        if have_mergekit:
            file_cfg = {**cfg, "models": [{**m, "model": str(paths[m["model"]])} for m in cfg["models"]]}
            if "base_model" in cfg:
                file_cfg["base_model"] = str(paths[cfg["base_model"]])
            if dtype is not None:
                file_cfg["dtype"] = str(dtype).replace("torch.", "")
            row["mergekit_api_s"] = time_mergekit_api(file_cfg, work / "api-out", mk_reps)
            row["mergekit_cli_s"] = time_mergekit_cli(file_cfg, work)
        rows.append(row)
        line = (f"{method:16s} engine {ours * 1e3:9.1f} ms  {row['bandwidth'] / 1e9:6.2f} GB/s "
                f"({row['pct_memcpy']:5.1f}% of memcpy)")
        if have_mergekit:
            line += (f" | mergekit API {row['mergekit_api_s']:7.2f} s ({row['mergekit_api_s'] / ours:7.1f}x)"
                     f" | CLI {row['mergekit_cli_s']:7.2f} s ({row['mergekit_cli_s'] / ours:7.1f}x)")
        print(line, flush=True)
    del engine
    return rows


def to_markdown(rows: list[dict], memcpy: float, command: str) -> str:
    lines = [f"Command: `{command}`", "", f"memcpy bandwidth (read + write): {memcpy / 1e9:.2f} GB/s", "",
             "| model | method | engine | bandwidth (% memcpy) | mergekit API | x | mergekit CLI | x |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        api, cli = r.get("mergekit_api_s"), r.get("mergekit_cli_s")
        lines.append(f"| {r['set']} | {r['method']} | {r['engine_s'] * 1e3:.1f} ms | "
                     f"{r['bandwidth'] / 1e9:.2f} GB/s ({r['pct_memcpy']:.0f}%) | "
                     + (f"{api:.2f} s | {api / r['engine_s']:.0f}x | {cli:.2f} s | {cli / r['engine_s']:.0f}x |"
                        if api else "- | - | - | - |"))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# mergekit 0.1.5's newer methods: engine vs mergekit's Python API, and each against task_arithmetic


NEW_METHODS = {
    "task_arithmetic": METHODS["task_arithmetic"],
    "nuslerp": lambda names: {"merge_method": "nuslerp", "base_model": names[0], "models": [
        {"model": n, "parameters": {"weight": w}} for n, w in zip(names[1:3], (0.4, 0.6))]},
    "multislerp": lambda names: {"merge_method": "multislerp", "base_model": names[0], "models": [
        {"model": n, "parameters": {"weight": [0.3, 0.6]}} for n in names[1:]]},
    "karcher": lambda names: {"merge_method": "karcher", "base_model": names[0], "models": [
        {"model": n} for n in names[1:]]},
    "sce": lambda names: {"merge_method": "sce", "base_model": names[0], "parameters": {"select_topk": 0.5},
                          "models": [{"model": n} for n in names[1:]]},
    "nearswap": lambda names: {"merge_method": "nearswap", "base_model": names[0], "parameters": {"t": 0.001},
                               "models": [{"model": names[1]}]},
    "arcee_fusion": lambda names: {"merge_method": "arcee_fusion", "base_model": names[0],
                                   "models": [{"model": names[1]}]},
    "passthrough": lambda names: {"merge_method": "passthrough", "models": [
        {"model": names[1], "parameters": {"scale": [{"filter": "o_proj", "value": 0.8}]}}]},
    "ram": lambda names: {"merge_method": "ram", "base_model": names[0], "parameters": {"epsilon": 5e-4},
                          "models": [{"model": n} for n in names[1:]]},
    "ramplus_tl": lambda names: {"merge_method": "ramplus_tl", "base_model": names[0],
                                 "parameters": {"epsilon": 5e-4}, "models": [{"model": n} for n in names[1:]]},
}


def top_ops(engine: MergeEngine, recipe: MergeConfig, k: int = 3) -> str:
    """What dominates one candidate: the ``k`` torch ops with the most self CPU time, with shares."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.materialize(recipe)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:k])


def file_config(cfg: dict, paths: dict[str, Path], dtype: torch.dtype | None) -> dict:
    out = {**cfg, "models": [{**m, "model": str(paths[m["model"]])} for m in cfg["models"]]}
    if "base_model" in cfg:
        out["base_model"] = str(paths[cfg["base_model"]])
    if dtype is not None:
        out["dtype"] = str(dtype).replace("torch.", "")
    return out


def bench_new_methods(label: str, paths: dict[str, Path], reps: int, mk_reps: int, work: Path,
                      dtype: torch.dtype | None) -> list[dict]:
    """Seconds per candidate for each new method (engine, mergekit API), the engine's ratio to its
    own task_arithmetic, and for methods over 3x that, the ops that dominate."""
    names = list(paths)
    engine = MergeEngine(paths, base=names[0], dtype=dtype)
    assert engine.model is not None  # a new engine holds its model until detach_model()
    n_params = sum(p.numel() for p in engine.model.parameters())
    print(f"\n== new methods, {label}: {n_params / 1e6:.1f}M parameters x {len(names)} models, {engine.dtype}")
    rows, ta = [], None
    for method, make in NEW_METHODS.items():
        cfg = make(names)
        recipe = MergeConfig.model_validate(cfg)
        ours = time_engine(engine, recipe, reps)
        ta = ours if method == "task_arithmetic" else ta
        row: dict[str, Any] = {"set": label, "method": method, "engine_s": ours, "vs_ta": ours / ta if ta else 1.0}
        row["mergekit_api_s"] = time_mergekit_api(file_config(cfg, paths, dtype), work / "api-out", mk_reps)
        if row["vs_ta"] > 3:
            row["dominant"] = top_ops(engine, recipe)
        rows.append(row)
        print(f"{method:16s} engine {ours * 1e3:9.1f} ms ({row['vs_ta']:6.1f}x task_arithmetic) | mergekit API "
              f"{row['mergekit_api_s']:7.2f} s ({row['mergekit_api_s'] / ours:6.1f}x)"
              + (f" | dominant: {row['dominant']}" if "dominant" in row else ""), flush=True)
    del engine
    return rows


def new_methods_markdown(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| model | method | engine | vs task_arithmetic | mergekit API | mergekit / engine | dominant ops (>3x) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['method']} | {r['engine_s'] * 1e3:.1f} ms | {r['vs_ta']:.1f}x | "
                     f"{r['mergekit_api_s']:.2f} s | {r['mergekit_api_s'] / r['engine_s']:.0f}x | "
                     f"{r.get('dominant', '')} |")
    return "\n".join(lines) + "\n"


def main_new_methods(args: argparse.Namespace) -> None:
    from evomerge.zoo import ensure_zoo

    zoo = ensure_zoo()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows += bench_new_methods("zoo (fp32)", {"base": zoo.base, **zoo.experts}, args.reps, args.mergekit_reps,
                                  work, None)
        if not args.skip_large:
            dtype = getattr(torch, args.large_dtype)
            paths = make_large(work / "large", args.large_hidden, args.large_layers, 3, dtype)
            rows += bench_new_methods(f"llama {args.large_hidden}x{args.large_layers} ({args.large_dtype})", paths,
                                      max(2, args.reps // 4), 1, work, dtype)
    if args.markdown:
        args.markdown.write_text(new_methods_markdown(rows, "python " + " ".join(sys.argv)))


# --------------------------------------------------------------------------------------------------
# The task-arithmetic family (issue 23): every method against task_arithmetic and memcpy, the random
# draws alone, and the pruning methods with the previous kernel (a full torch sort at tied cuts)


FAMILY = {
    "task_arithmetic": METHODS["task_arithmetic"],
    "linear": METHODS["linear"],
    **{name: (lambda name: lambda names: {"merge_method": name, "base_model": names[0], "models": [
        {"model": n, "parameters": {"weight": 0.5, "density": 0.5}} for n in names[1:]]})(name)
       for name in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")},
}


def time_draws(engine: MergeEngine, reps: int) -> float:
    """Seconds to draw the DARE masks alone (density 0.5, every delta of every tensor, as the
    engine draws them: one ``FastRng`` per tensor), median of ``reps``."""
    from evomerge.merge.engine import tensor_seed
    from evomerge.merge.methods import FastRng

    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for name in engine.tensor_names:
            stack = engine._held(name)[1]
            if stack is None:
                continue
            rng = FastRng(tensor_seed(0, name))
            for row in stack:
                rng.bernoulli(0.5, row, torch.bool)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench_family(label: str, paths: dict[str, Path], reps: int, memcpy: float, dtype: torch.dtype | None,
                 baseline: bool, only: list[str] | None = None) -> list[dict]:
    from evomerge.merge import sort_prefix

    names = list(paths)
    engine = MergeEngine(paths, base=names[0], dtype=dtype)
    assert engine.model is not None  # a new engine holds its model until detach_model()
    n_params = sum(p.numel() for p in engine.model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    print(f"\n== family, {label}: {n_params / 1e6:.1f}M parameters x {len(names)} models, {engine.dtype}")
    rows: list[dict] = []
    ta = None
    for method, make in FAMILY.items():
        if only and method not in only and method != "task_arithmetic":
            continue
        recipe = MergeConfig.model_validate(make(names))
        ours = time_engine(engine, recipe, reps)
        ta = ours if method == "task_arithmetic" else ta
        traffic = (len(names) + 1) * model_bytes
        row: dict[str, Any] = {"set": label, "method": method, "engine_s": ours, "vs_ta": ours / ta if ta else 1.0,
                               "pct_memcpy": 100 * traffic / ours / memcpy}
        if baseline and method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
            sort_prefix._VERIFIED = False  # the previous kernel: introselect, then torch's sort at a tied cut
            try:
                t = time.perf_counter()
                engine.materialize(recipe)
                row["sort_kernel_s"] = time.perf_counter() - t
            finally:
                sort_prefix._VERIFIED = None
        if method == "dare_ties":
            row["draws_s"] = time_draws(engine, reps)
        rows.append(row)
        extra = (f" | previous sort kernel {row['sort_kernel_s'] * 1e3:9.1f} ms ({row['sort_kernel_s'] / ours:4.1f}x)"
                 if "sort_kernel_s" in row else "")
        extra += f" | DARE draws alone {row['draws_s'] * 1e3:8.1f} ms" if "draws_s" in row else ""
        print(f"{method:16s} engine {ours * 1e3:9.1f} ms ({row['vs_ta']:5.1f}x task_arithmetic, "
              f"{row['pct_memcpy']:5.1f}% of memcpy){extra}", flush=True)
    del engine
    return rows


def family_markdown(rows: list[dict], memcpy: float, command: str) -> str:
    lines = [f"Command: `{command}`", "", f"memcpy bandwidth (read + write): {memcpy / 1e9:.2f} GB/s", "",
             "| model | method | engine | vs task_arithmetic | % of memcpy | previous sort kernel | DARE draws alone |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        sk = ""
        if "sort_kernel_s" in r:
            sk = f"{r['sort_kernel_s'] * 1e3:.0f} ms ({r['sort_kernel_s'] / r['engine_s']:.1f}x)"
        dr = f"{r['draws_s'] * 1e3:.0f} ms" if "draws_s" in r else ""
        lines.append(f"| {r['set']} | {r['method']} | {r['engine_s'] * 1e3:.1f} ms | {r['vs_ta']:.1f}x | "
                     f"{r['pct_memcpy']:.0f}% | {sk} | {dr} |")
    return "\n".join(lines) + "\n"


def main_family(args: argparse.Namespace) -> None:
    memcpy = memcpy_bandwidth()
    print(f"memcpy bandwidth (read + write): {memcpy / 1e9:.2f} GB/s; torch threads {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_zoo:
            from evomerge.zoo import ensure_zoo

            zoo = ensure_zoo()
            rows += bench_family("zoo (fp32)", {"base": zoo.base, **zoo.experts}, args.reps, memcpy, None,
                                 not args.no_baseline, args.methods)
        if not args.skip_large:
            dtype = getattr(torch, args.large_dtype)
            paths = make_large(work / "large", args.large_hidden, args.large_layers, 3, dtype)
            rows += bench_family(f"llama {args.large_hidden}x{args.large_layers} ({args.large_dtype})", paths,
                                 max(1, args.reps // 4), memcpy, dtype, not args.no_baseline, args.methods)
    if args.markdown:
        args.markdown.write_text(family_markdown(rows, memcpy, "python " + " ".join(sys.argv)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--mergekit-reps", type=int, default=2)
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--large-hidden", type=int, default=1024)
    ap.add_argument("--large-layers", type=int, default=16)
    ap.add_argument("--large-dtype", default="bfloat16")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    ap.add_argument("--family", action="store_true",
                    help="the task-arithmetic family against task_arithmetic, memcpy, DARE's draws alone and the "
                         "previous (sorting) pruning kernel; engine only")
    ap.add_argument("--skip-zoo", action="store_true", help="with --family: only the large model")
    ap.add_argument("--no-baseline", action="store_true", help="with --family: skip the previous sorting kernel")
    ap.add_argument("--methods", nargs="+", help="with --family: only these (task_arithmetic is always timed)")
    ap.add_argument("--new-methods", action="store_true",
                    help="time mergekit 0.1.5's newer methods (nuslerp ... ramplus_tl) against task_arithmetic")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.new_methods:
        main_new_methods(args)
        return
    if args.family:
        main_family(args)
        return
    memcpy = memcpy_bandwidth()
    print(f"memcpy bandwidth (read + write): {memcpy / 1e9:.2f} GB/s; torch threads {torch.get_num_threads()}")
    from evomerge.zoo import ensure_zoo

    zoo = ensure_zoo()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows += bench_set("zoo (fp32)", {"base": zoo.base, **zoo.experts}, args.reps, args.mergekit_reps, work,
                          memcpy, None)
        if not args.skip_large:
            dtype = getattr(torch, args.large_dtype)
            paths = make_large(work / "large", args.large_hidden, args.large_layers, 3, dtype)
            rows += bench_set(f"llama {args.large_hidden}x{args.large_layers} ({args.large_dtype})", paths,
                              max(2, args.reps // 4), 1, work, memcpy, dtype)
    if args.markdown:
        args.markdown.write_text(to_markdown(rows, memcpy, "python " + " ".join(sys.argv)))


if __name__ == "__main__":
    main()
