"""lm-eval's model interface over the worker's resident vLLM engine.

lm-eval's own ``VLLM`` class starts an engine from a path and accepts no running one, so a search
would pay an engine start (and a checkpoint on disk) per candidate. This ``TemplateLM`` asks the
worker's engine instead, and follows ``HFLM``'s conventions wherever they decide a score, so that
a task scores the same items the same way on either backend:

- tokenisation as ``HFLM.tok_encode`` (no special tokens added unless asked, none when the string
  already starts with the prefix token), context/continuation split by ``TemplateLM``;
- a log-likelihood is the sum of the continuation's prompt log-probabilities, ``is_greedy`` whether
  each continuation token is the argmax, the sequence cut to the last ``max_length + 1`` tokens;
- generation is greedy, ends at the tokenizer's EOS (and the generation config's), and the text is
  decoded without special tokens and cut at the task's ``until`` strings, as ``HFLM`` does.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text

from evomerge.evaluate.chat import end_token_ids
from evomerge.evaluate.vllm_engine import VllmModel


class EngineLM(TemplateLM):
    """An lm-eval model that scores on a :class:`VllmModel` (one per worker, weights pushed per candidate)."""

    def __init__(self, engine: VllmModel, tokenizer: Any, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None):
        super().__init__()
        self.engine = engine
        self.tokenizer = tokenizer
        self._max_length = max_length or engine.max_model_len
        self._max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token

    # -- what TemplateLM needs -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            add = self.add_bos_token
            if has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                add = False
        else:
            add = add_special_tokens
        return list(self.tokenizer.encode(string, **({} if add is None else {"add_special_tokens": add})))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return str(self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt))

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = []
        for _, ctx, cont in requests:
            whole = (ctx + cont)[-(self.max_length + 1):]
            pairs.append((whole[: len(whole) - len(cont)], cont))
        results = self.engine.loglikelihoods(pairs, greedy=True)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (string,) = req.args
            tokens = self.tok_encode(string, add_special_tokens=False)
            if len(tokens) + 1 > self.max_length:
                raise ValueError(f"loglikelihood_rolling over {len(tokens)} tokens needs windows longer than "
                                 f"evaluation.vllm.max_model_len {self.max_length}; raise it")
            ((total, _),) = self.engine.loglikelihoods([([self.prefix_token_id], tokens)])
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        prompts, budgets, untils = [], [], []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self._max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError("a search scores candidates greedily; the task asks for do_sample: true (set "
                                 "gen_kwargs do_sample=false)")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            budget = int(kwargs.pop("max_gen_toks"))
            ids = self.tok_encode(context)[-(self.max_length - budget):]
            prompts.append(ids)
            budgets.append(budget)
            untils.append(until)
        ends = end_token_ids(self.tokenizer, self.engine)
        outs = self.engine.generate(prompts, budgets, ends, stop=untils)
        texts = []
        for (req, tokens, until) in zip(requests, outs, untils):
            text = postprocess_generated_text(self.tokenizer.decode(tokens, skip_special_tokens=True), until, None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            texts.append(text)
        return texts
