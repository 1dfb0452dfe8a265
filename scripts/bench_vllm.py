"""The vLLM backend against the transformers evaluator on the real SmolLM2-135M model, in one process.

Both are the search's own workers (``evomerge.workers.Worker``: sources resident, merge in memory), one with
``evaluation.backend: hf`` and one with ``vllm`` (the merge streamed into a resident engine). Items: the smol
zoo's test split (the default spec's 120 items per skill, asked through the chat template after the
experiment's system prompt, as experiments/smol_ps.yaml asks them), and the same items as multiple choice
(the answer against three corruptions). Models: the smol test zoo (base + two short fine-tunes), built on
first use in about a minute. Prints items/s per backend and their ratio, how many items score differently,
the time split per candidate (merge, push, evaluation) for task arithmetic and TIES, and the memory the
vLLM worker adds (engine weights, reserved KV cache, process RSS).

Usage: python scripts/bench_vllm.py [--threads 2] [--items 120] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from evomerge.recipe import hand_recipe  # noqa: E402
from evomerge.workers import Worker  # noqa: E402
from evomerge.zoo.smol import TEST_SPEC, SmolSpec, ensure_smol_zoo, make_smol_items, word_list  # noqa: E402

SYSTEM = "Answer with the result only."


def choices_of(answer: str) -> list[str]:
    """The answer and three wrong ones of the same kind (digits changed, letters cased otherwise)."""
    wrong = [answer[::-1], answer + answer[-1], answer.swapcase() if answer.isalpha() else str(int(answer) + 1)]
    out = [answer] + [w for w in dict.fromkeys(wrong) if w != answer]
    return (out + [answer + "x", "x" + answer])[:4]


def benchmarks(n: int, tok) -> dict:
    items = make_smol_items(SmolSpec(experts=("add", "upper"), cross_targets=()), word_list(tok))
    fitness = {}
    for skill in ("add", "upper"):
        rows = items[skill]["test"][:n]
        fitness[skill] = {"type": "items", "name": skill, "items": rows, "chat_template": True,
                          "system_prompt": SYSTEM, "batch_size": 60}
        mc = [{"id": r["id"], "prompt": r["prompt"], "choices": choices_of(r["answer"]), "answer": 0} for r in rows]
        fitness[f"{skill}_mc"] = {"type": "items", "name": f"{skill}_mc", "items": mc, "chat_template": True,
                                  "system_prompt": SYSTEM, "scorer": "multiple_choice", "batch_size": 60}
    return {"fitness": fitness}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--items", type=int, default=120, help="test items per skill (the smol zoo has 120)")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes per backend (the best is reported)")
    ap.add_argument("--bf16", action="store_true", help="also a vLLM engine in bfloat16 (scores may then differ)")
    args = ap.parse_args()
    zoo = ensure_smol_zoo(TEST_SPEC)
    models = {"base": str(zoo.base), **{k: str(v) for k, v in zoo.experts.items()}}
    experts = list(zoo.experts)
    bench = benchmarks(args.items, AutoTokenizer.from_pretrained(zoo.base))
    gen = [n for n in bench["fitness"] if not n.endswith("_mc")]
    mc = [n for n in bench["fitness"] if n.endswith("_mc")]
    recipes = {"task_arithmetic w=1": hand_recipe("task_arithmetic", "base", experts, weight=1.0),
               "ties d=0.5 w=1": hand_recipe("ties", "base", experts, weight=1.0, density=0.5)}
    print(f"load average before: {os.getloadavg()}; threads {args.threads}; {args.items} items a skill")

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t = time.perf_counter()
    hf = Worker(models, "base", bench, device="cpu", threads=args.threads)
    hf_start, rss_hf = time.perf_counter() - t, proc.memory_info().rss
    t = time.perf_counter()
    vl = Worker(models, "base", bench, device="cpu", threads=args.threads, evaluation={"backend": "vllm"})
    vl_start, rss_vl = time.perf_counter() - t, proc.memory_info().rss
    assert vl.vllm is not None
    print(f"worker start: hf {hf_start:.1f} s, vllm {vl_start:.1f} s (engine start included)")
    print(f"memory: hf worker +{(rss_hf - rss0) / 2**20:.0f} MiB RSS; vllm worker +{(rss_vl - rss_hf) / 2**20:.0f} "
          f"MiB RSS (KV cache reserved "
          f"{vl.vllm.kv_cache_bytes / 2**20:.0f} MiB, merge engine inputs {vl.engine.resident_bytes() / 2**20:.0f} "
          f"MiB, no HF model: {vl.engine.model is None})")

    backends = [("hf", hf), ("vllm", vl)]
    if args.bf16:
        backends.append(("vllm bf16", Worker(models, "base", bench, device="cpu", threads=args.threads,
                                            evaluation={"backend": "vllm", "vllm": {"dtype": "bfloat16"}})))
    for kind, names in (("generation", gen), ("multiple choice", mc)):
        n_items = sum(len(bench["fitness"][b]["items"]) for b in names)
        best: dict[str, float] = {}
        scores: dict[str, list] = {}
        for backend, worker in backends:
            for _ in range(args.repeat):
                r = worker.evaluate(recipes["task_arithmetic w=1"], benchmarks=names)
                if r.error:
                    raise SystemExit(r.error)
                best[backend] = min(best.get(backend, float("inf")), r.eval_seconds)
                scores[backend] = [s for resp in r.responses for s in resp.scores]
        for backend in best:
            differ = sum(a != b for a, b in zip(scores["hf"], scores[backend]))
            rate = n_items / best[backend]
            print(f"{kind}: {n_items} items, {backend:<9} {best[backend]:6.1f} s ({rate:5.1f} items/s), "
                  f"{best['hf'] / best[backend]:4.2f}x hf; {differ} items score differently from hf", flush=True)

    print("\ntime split per candidate (generation items, best of the passes):")
    for name, recipe in recipes.items():
        for backend, worker in (("hf", hf), ("vllm", vl)):
            runs = [worker.evaluate(recipe, benchmarks=gen) for _ in range(args.repeat)]
            r = min(runs, key=lambda x: x.merge_seconds + x.push_seconds + x.eval_seconds)
            total = r.merge_seconds + r.push_seconds + r.eval_seconds
            print(f"  {name:<20} {backend:<5} merge {r.merge_seconds:6.2f} s  push {r.push_seconds:5.2f} s  "
                  f"eval {r.eval_seconds:6.2f} s  total {total:6.2f} s  " + " ".join(
                      f"{k} {v:.3f}" for k, v in r.objectives.items()), flush=True)
    print(f"\npeak RSS of the process: {proc.memory_info().rss / 2**20:.0f} MiB; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
