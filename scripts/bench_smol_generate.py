"""Items per second of the built-in chat-aware evaluator vs ``model.generate`` on SmolLM2-135M-Instruct.

The same items, the same chat-rendered prompts, the same end tokens, greedy, in the same run:

- ``evomerge``: ItemsBenchmark(chat_template=True) (length-sorted batches, left padding, KV cache,
  a batch ends when every row has ended);
- ``generate batched``: ``model.generate`` on the same batches (left-padded, in the file's order);
- ``generate one by one``: ``model.generate`` per item (no padding at all).

Each is timed ``--repeats`` times, alternating, and the best time is kept (the machine is shared).
Usage: python scripts/bench_smol_generate.py [--items 64] [--batch-size 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from evomerge.evaluate.base import EvalContext  # noqa: E402
from evomerge.evaluate.builtin import ItemsBenchmark  # noqa: E402
from evomerge.evaluate.chat import chat_ids, end_token_ids  # noqa: E402
from evomerge.zoo.smol import SYSTEM_PROMPT, TEST_SPEC, ensure_smol_zoo  # noqa: E402


def generate_batched(model, tok, items, batch_size: int, max_new: int) -> list[str]:
    ends = end_token_ids(tok, model, chat=True)
    texts = []
    for start in range(0, len(items), batch_size):
        rows = [chat_ids(tok, it["prompt"], SYSTEM_PROMPT) for it in items[start:start + batch_size]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=ends, pad_token_id=tok.pad_token_id)
        texts += tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=64, help="items, half add and half upper (test split)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="upper", help="zoo member to run: base, add or upper")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    zoo = ensure_smol_zoo(TEST_SPEC)
    tok = AutoTokenizer.from_pretrained(zoo.base)
    model = AutoModelForCausalLM.from_pretrained(zoo.model(args.model), dtype=torch.float32).eval()
    half = args.items // 2
    items = zoo.items("add", "test")[:half] + zoo.items("upper", "test")[: args.items - half]
    items = (items * (1 + args.items // max(1, len(items))))[: args.items]
    items = [{**it, "id": f"{i}"} for i, it in enumerate(items)]
    max_new = 8
    bench = ItemsBenchmark("mix", items, chat_template=True, system_prompt=SYSTEM_PROMPT, max_new_tokens=max_new,
                           batch_size=args.batch_size)
    runs = {
        "evomerge ItemsBenchmark": lambda: bench.evaluate(model, tok, EvalContext()),
        "model.generate batched": lambda: generate_batched(model, tok, items, args.batch_size, max_new),
        "model.generate one by one": lambda: generate_batched(model, tok, items, 1, max_new),
    }
    best = {name: float("inf") for name in runs}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    ours = best["evomerge ItemsBenchmark"]
    print(f"SmolLM2-135M-Instruct ({args.model}), {args.items} chat items, <= {max_new} new tokens, "
          f"batch {args.batch_size}, {args.threads} threads, best of {args.repeats}")
    for name, t in best.items():
        print(f"  {name:<28} {t:7.2f} s  {args.items / t:7.1f} items/s  ({t / ours:.2f}x evomerge's time)")


if __name__ == "__main__":
    main()
