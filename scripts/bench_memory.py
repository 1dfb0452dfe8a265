"""Memory and speed of the merge engine's residency policies (device / host / disk), per worker process.

Makes a random Llama base and experts locally (bf16; ``--size 0.5b`` ~0.48B parameters, ``1.5b``
~1.4B), then for each policy runs worker processes that build a ``MergeEngine`` and materialize
candidates, and prints:

- seconds per candidate per method, and the ratio to ``device`` measured in the same run;
- effective bandwidth (inputs read once + output written once, per second) against a memcpy;
- per worker: anonymous RSS (private), file-backed RSS, PSS (shared pages divided among the processes
  mapping them; read from /proc/PID/smaps_rollup while all workers of a run are alive), peak RSS, and
  the engine's own count (``memory_info``), for 1 and for 2 workers on the machine at once;
- mergekit's peak RSS and wall time for the same task-arithmetic merge (``mergekit-yaml``), as anchor;
- the error of bf16 task vectors (``delta_dtype``) against float32 ones on the same recipe.

On a CUDA machine (``--device cuda``) it also prints ``torch.cuda.max_memory_allocated`` per policy
and the host-to-device bandwidth (pinned and pageable). Only torch, transformers and safetensors (and
evomerge's own dependencies) are needed: mergekit is used when installed, Ray never.

    python scripts/bench_memory.py --size 0.5b --experts 3 --workers 1 2
    python scripts/bench_memory.py --device cuda --size 1.5b --experts 3     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_merge import memcpy_bandwidth  # scripts/ is on the path when run as a script

SIZES = {"0.1b": (768, 8), "0.5b": (1280, 20), "1.5b": (2048, 24)}  # hidden size, layers (vocab 32000)
GiB = 2**30


def recipe(method: str, names: list[str]) -> dict[str, Any]:
    base, others = names[0], names[1:]
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": n, "parameters": {"weight": 1.0}} for n in names]}
    if method == "task_arithmetic":
        return {"merge_method": "task_arithmetic", "base_model": base,
                "models": [{"model": n, "parameters": {"weight": [0.3, 0.6]}} for n in others]}
    if method == "dare_ties":
        return {"merge_method": "dare_ties", "base_model": base, "evomerge": {"seed": 1},
                "models": [{"model": n, "parameters": {"weight": 0.5, "density": 0.5}} for n in others]}
    raise ValueError(method)


def make_models(root: Path, size: str, experts: int, dtype: torch.dtype) -> dict[str, Path]:
    """A random Llama base and ``experts`` nudged copies, as HF checkpoints (made once, reused)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.tokenizer import char_tokenizer

    hidden, layers = SIZES[size]
    names = ["base"] + [f"expert{i}" for i in range(experts)]
    paths = {n: root / f"{size}-{str(dtype).replace('torch.', '')}" / n for n in names}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      tie_word_embeddings=False)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    tok = char_tokenizer()
    for i, name in enumerate(names):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p), alpha=1e-3)
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


def h2d_bandwidth(nbytes: int = 1 << 30) -> dict[str, float]:
    """Host-to-device bytes per second, from pinned and from pageable memory (CUDA only)."""
    out = {}
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for kind in ("pinned", "pageable"):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=kind == "pinned")
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        out[kind] = 3 * nbytes / (start.elapsed_time(end) / 1e3)
    return out


# -- one worker process ------------------------------------------------------------------------------

def child(args: argparse.Namespace) -> None:
    """Build an engine under one policy, time candidates, report, then wait to be measured."""
    from evomerge.merge.config import MergeConfig
    from evomerge.merge.engine import MergeEngine
    from evomerge.merge.residency import process_memory

    spec = json.loads(args.child)
    torch.set_num_threads(spec["threads"])
    if spec["policy"] == "baseline":  # the interpreter with torch, transformers and evomerge loaded
        import transformers  # noqa: F401

        print("READY " + json.dumps({"proc": process_memory()}), flush=True)
        sys.stdin.readline()
        return
    t0 = time.perf_counter()
    engine = MergeEngine(spec["models"], "base", spec["device"], spec.get("dtype"),
                         memory={"policy": spec["policy"], "cache_dir": spec["cache"],
                                 "delta_dtype": spec.get("delta_dtype"), "budget": 0.95})
    load_s = time.perf_counter() - t0
    names = list(spec["models"])
    times: dict[str, float] = {}
    for method in spec["methods"]:
        rec = MergeConfig.model_validate(recipe(method, names))
        engine.materialize(rec)  # warm-up: first touch of the pages
        laps = []
        for _ in range(spec["reps"]):
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            engine.materialize(rec)
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            laps.append(time.perf_counter() - t)
        times[method] = statistics.median(laps)
    info = engine.memory_info()
    report = {"policy": engine.policy, "load_s": load_s, "seconds": times, "engine": info,
              "proc": process_memory(), "inputs_bytes": engine.footprint.model_bytes + engine.footprint.delta_bytes,
              "model_bytes": engine.footprint.model_bytes,
              "built_cache": bool(engine.cache is not None and engine.cache.built)}
    if engine.device.type == "cuda":
        report["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated(engine.device))
    print("READY " + json.dumps(report), flush=True)
    sys.stdin.readline()  # the parent reads our /proc entries, then closes stdin


def smaps_rollup(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, value = line.split(":")
            out[key.strip()] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def run_workers(spec: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """``n`` worker processes at once under one policy; each one's report plus its PSS measured
    while all ``n`` are alive."""
    spec = {**spec, "threads": max(1, spec["threads"] // n)}  # n workers share the cores
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TQDM_DISABLE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    reports = []
    for p in procs:
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("READY "):
                reports.append(json.loads(line[6:]))
                break
        else:
            raise RuntimeError(f"worker {p.pid} ended without a report (exit {p.wait()})")
    for p, r in zip(procs, reports):
        r["smaps"] = smaps_rollup(p.pid)
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
        p.wait()
    return reports


def mergekit_anchor(models: dict[str, Path], work: Path) -> dict[str, float] | None:
    """Peak RSS and wall time of ``mergekit-yaml`` on the same task-arithmetic merge (None without
    mergekit)."""
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    if not Path(exe).exists():
        return None
    import yaml

    cfg = recipe("task_arithmetic", list(models))
    cfg = {**cfg, "base_model": str(models["base"]), "dtype": "bfloat16",
           "models": [{**m, "model": str(models[m["model"]])} for m in cfg["models"]]}
    path = work / "mergekit.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = work / "mergekit-out"
    t = time.perf_counter()
    proc = subprocess.Popen([exe, str(path), str(out), "--quiet", "--no-write-model-card"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    if status != 0:
        return None
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024}


def delta_dtype_error(root: Path, cache: Path, threads: int) -> dict[str, tuple[float, float]]:
    """Error of bf16 task vectors against float32 ones, float32 arithmetic, same recipe: the relative
    L2 error of the merged weights and of the merged change (merged - base). On a ~0.1B float32 model:
    a float32 reference at 0.5B would not fit the memory cap."""
    from evomerge.checkpoint import TensorReader
    from evomerge.merge.config import MergeConfig
    from evomerge.merge.engine import MergeEngine

    torch.set_num_threads(threads)
    models = make_models(root, "0.1b", 3, torch.float32)
    reader = TensorReader(models["base"])
    ties = {"merge_method": "ties", "base_model": "base",
            "models": [{"model": n, "parameters": {"weight": 0.5, "density": 0.5}} for n in list(models)[1:]]}
    out = {}
    for method in ("task_arithmetic", "ties", "dare_ties"):
        rec = MergeConfig.model_validate(ties if method == "ties" else recipe(method, list(models)))
        ref = MergeEngine(models, "base", dtype="float32", memory={"policy": "disk", "cache_dir": cache})
        a = {k: v.clone() for k, v in ref.materialize(rec).state_dict().items()}
        del ref
        low = MergeEngine(models, "base", dtype="float32",
                          memory={"policy": "disk", "cache_dir": cache, "delta_dtype": "bfloat16"})
        b = low.materialize(rec).state_dict()
        sq = lambda x: float(x.double().norm() ** 2)
        num = sum(sq(a[k] - b[k]) for k in a)
        weights = sum(sq(a[k]) for k in a)
        change = sum(sq(a[k] - reader.get(k)) for k in a if k in reader.index)
        del low
        out[method] = ((num / weights) ** 0.5, (num / change) ** 0.5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    ap.add_argument("--experts", type=int, default=3, help="sources besides the base (task vectors)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--policies", nargs="+", default=["device", "host", "disk"])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--two-worker-policies", nargs="+", default=["disk"],
                    help="policies also run with 2 workers (device/host hold (N+2)x each: mind the RAM)")
    ap.add_argument("--methods", nargs="+", default=["linear", "task_arithmetic"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "evomerge-bench-memory")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-delta-error", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "cache"
    t = time.perf_counter()
    models = make_models(args.work / "models", args.size, args.experts, torch.bfloat16)
    print(f"models: {args.size} bf16, base + {args.experts} experts in {args.work} ({time.perf_counter() - t:.0f} s)")
    memcpy = memcpy_bandwidth(1 << 28)
    print(f"memcpy {memcpy / 1e9:.1f} GB/s (read + write)")
    if args.device.startswith("cuda"):
        h2d = h2d_bandwidth()
        print(f"H2D pinned {h2d['pinned'] / 1e9:.1f} GB/s, pageable {h2d['pageable'] / 1e9:.1f} GB/s")
    spec = {"models": {k: str(v) for k, v in models.items()}, "device": args.device, "cache": str(cache),
            "methods": args.methods, "reps": args.reps, "threads": args.threads}
    if "disk" in args.policies:  # build the cache once, outside the timed runs
        t = time.perf_counter()
        built = run_workers({**spec, "policy": "disk", "methods": [], "reps": 0}, 1)[0]
        print(f"delta cache: {'built' if built['built_cache'] else 'found'} in {time.perf_counter() - t:.0f} s "
              f"({built['engine']['shared_bytes'] / GiB:.2f} GiB at {built['engine']['cache']})")
    base = run_workers({**spec, "policy": "baseline"}, 1)[0]
    baseline = {"anon": base["proc"].get("rss_anon_bytes", 0), "pss": base["smaps"].get("Pss", 0)}
    print(f"baseline process (torch + transformers + evomerge imported): anon {baseline['anon'] / GiB:.2f} GiB, "
          f"PSS {baseline['pss'] / GiB:.2f} GiB")
    args.baseline = baseline
    rows = []
    for policy in args.policies:
        for n in args.workers:
            if n > 1 and policy not in args.two_worker_policies:
                continue
            reports = run_workers({**spec, "policy": policy}, n)
            rows.append((policy, n, reports))
            r0 = reports[0]
            size = r0["model_bytes"]
            print(f"{policy:6s} x{n}: " + ", ".join(f"{m} {s:.3f} s" for m, s in r0["seconds"].items()) +
                  " | per worker: " + "; ".join(
                      f"anon {r['proc'].get('rss_anon_bytes', 0) / GiB:.2f} GiB "
                      f"({r['proc'].get('rss_anon_bytes', 0) / size:.2f}x)"
                      f" file {r['proc'].get('rss_file_bytes', 0) / GiB:.2f} PSS {r['smaps'].get('Pss', 0) / GiB:.2f}"
                      f" peak {r['proc'].get('peak_rss_bytes', 0) / GiB:.2f}"
                      f" engine dev {r['engine']['device_bytes'] / GiB:.2f}"
                      + (f" cuda max {r['cuda_max_allocated'] / GiB:.2f}" if "cuda_max_allocated" in r else "")
                      for r in reports))
    anchor = None if args.no_mergekit else mergekit_anchor(models, args.work)
    err = None if args.no_delta_error else delta_dtype_error(args.work / "models", cache, args.threads)
    print_table(rows, memcpy, anchor, err, args)


def print_table(rows: list, memcpy: float, anchor: dict[str, float] | None, err: dict | None,
                args: argparse.Namespace) -> None:
    device = {m: s for (p, n, rs) in rows if p == "device" and n == 1 for m, s in rs[0]["seconds"].items()}
    methods = args.methods
    print("\n| policy | workers | " + " | ".join(f"{m} s (x device)" for m in methods) +
          " | bandwidth task_arithmetic (% memcpy) | anon RSS / worker (- baseline) | PSS / worker | "
          "PSS all workers (- baselines) | peak RSS / worker | engine on device |")
    print("|---" * (len(methods) + 8) + "|")
    b_anon, b_pss = args.baseline["anon"], args.baseline["pss"]
    for policy, n, reports in rows:
        r = reports[0]
        size = r["model_bytes"]
        secs = r["seconds"]
        cells = [f"{secs[m]:.3f} ({secs[m] / device[m]:.2f}x)" if m in device else f"{secs[m]:.3f}" for m in methods]
        ta = secs.get("task_arithmetic")
        moved = r["inputs_bytes"] + size
        bw = f"{moved / ta / 1e9:.1f} GB/s ({100 * moved / ta / memcpy:.0f}%)" if ta else "-"
        anon = max(x["proc"].get("rss_anon_bytes", 0) for x in reports)
        pss = max(x["smaps"].get("Pss", 0) for x in reports)
        pss_all = sum(x["smaps"].get("Pss", 0) for x in reports)
        peak = max(x["proc"].get("peak_rss_bytes", 0) for x in reports)
        dev = r["engine"]["device_bytes"] if "cuda_max_allocated" not in r else r["cuda_max_allocated"]
        own, own_all = anon - b_anon, pss_all - n * b_pss
        print(f"| {policy} | {n} | " + " | ".join(cells) + f" | {bw} | {anon / GiB:.2f} GiB ({own / GiB:.2f} GiB = "
              f"{own / size:.2f}x) | {pss / GiB:.2f} GiB | {pss_all / GiB:.2f} GiB ({own_all / GiB:.2f} GiB = "
              f"{own_all / size:.2f}x) | {peak / GiB:.2f} GiB | {dev / GiB:.2f} GiB |")
    size = rows[0][2][0]["model_bytes"] if rows else 0
    print(f"\nmodel size {size / GiB:.2f} GiB (bf16), {args.experts} task vectors; memcpy {memcpy / 1e9:.1f} GB/s; "
          f"baseline process anon {b_anon / GiB:.2f} GiB, PSS {b_pss / GiB:.2f} GiB")
    if anchor:
        print(f"mergekit-yaml task_arithmetic (same sources, bf16): {anchor['seconds']:.1f} s wall, peak RSS "
              f"{anchor['peak_rss'] / GiB:.2f} GiB ({anchor['peak_rss'] / size:.2f}x model)")
    if err:
        print("bf16 task vectors vs float32 (float32 arithmetic, ~0.1B float32 model), relative L2 error of the "
              "merged weights / of the merged change: "
              + ", ".join(f"{m} {w:.1e} / {c:.1e}" for m, (w, c) in err.items()))


if __name__ == "__main__":
    main()
