"""`LLM`: vLLM-style offline generation over the engine.

`LLM(model=...)` takes a Hugging Face model directory or the trainer's own `CausalLM`; in the second
case the engine runs on the very same parameter tensors (never a copy), so a trainer step is visible
to the next generation as soon as `update_weights()` is called to bump the version.

`speculative_config` turns on speculative decoding, vLLM-style: {"method": "ngram",
"num_speculative_tokens": k, "prompt_lookup_max": ..., "prompt_lookup_min": ...} or {"method":
"draft_model", "model": PATH_OR_CAUSAL_LM, "num_speculative_tokens": k}. Outputs keep the target's
distribution and log-probs; `llm.engine.stats()["speculative"]` reports acceptance.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Callable, Sequence

import torch

from rl_engine.inference.config import EngineConfig
from rl_engine.inference.engine import LLMEngine
from rl_engine.inference.sampling_params import SamplingParams
from rl_engine.inference.sequence import CompletionOutput, RequestOutput
from rl_engine.inference.speculative import SpeculativeConfig

logger = logging.getLogger(__name__)

Prompt = str | list[int] | RequestOutput


class LLM:
    def __init__(
        self,
        model,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        tokenizer=None,
        block_size: int = 16,
        kv_cache_memory: int = 1 << 30,
        num_kv_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        graph_batch_sizes: list[int] | None = None,
        enforce_eager: bool = False,
        compile_decode: bool = False,
        seed: int = 0,
        record_routing: bool = False,
        speculative_config: "dict | SpeculativeConfig | None" = None,
        cpu_threads: str = "auto",
        cpu_prepack_weights: bool = True,
        cpu_huge_pages: bool = True,
        cpu_decode_kernel: bool = True,
        fork_copy_partial_block: bool = True,
        cpu_step_arena: bool = True,
    ) -> None:
        dtype = _dtype(dtype)
        if isinstance(model, (str, os.PathLike)):
            from rl_engine.policy import from_pretrained

            path = str(model)
            model = from_pretrained(path, dtype=dtype or torch.float32, device=device)
            if tokenizer is None and os.path.isfile(os.path.join(path, "tokenizer.json")):
                from rl_engine.policy.tokenizer import Tokenizer

                tokenizer = Tokenizer.from_pretrained(path, eos_token_ids=model.config.eos_token_id or None)
        else:
            if dtype is not None and dtype != model.dtype:
                raise ValueError(f"dtype={dtype} differs from the given model's {model.dtype}; the engine uses the "
                                 "model's own tensors and never converts or copies them (omit dtype)")
            if device is not None and torch.device(device) != next(model.parameters()).device:
                raise ValueError(f"device={device} differs from the given model's; omit device")
        if isinstance(tokenizer, (str, os.PathLike)):
            from rl_engine.policy.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(str(tokenizer))
        config = EngineConfig(block_size=block_size, kv_cache_memory=kv_cache_memory, num_kv_blocks=num_kv_blocks,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                              graph_batch_sizes=graph_batch_sizes, enforce_eager=enforce_eager,
                              compile_decode=compile_decode, seed=seed,
                              record_routing=record_routing, speculative_config=speculative_config,
                              cpu_threads=cpu_threads, cpu_prepack_weights=cpu_prepack_weights,
                              cpu_huge_pages=cpu_huge_pages, cpu_decode_kernel=cpu_decode_kernel,
                              fork_copy_partial_block=fork_copy_partial_block, cpu_step_arena=cpu_step_arena)
        self.engine = LLMEngine(model, config=config, tokenizer=tokenizer)
        self._ids = itertools.count()

    @property
    def model(self):
        return self.engine.model

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def weights_version(self) -> int:
        return self.engine.weights_version

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in prompt order. A prompt the engine refuses (too long,
        bad token ids) comes back with `error` set and no tokens; the others are generated."""
        if isinstance(prompts, (str, RequestOutput)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        engine = self.engine
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, params in zip(prompts, params_list):
            rid = f"gen-{next(self._ids)}"
            order.append(rid)
            try:
                engine.add_request(rid, prompt, params)
            except ValueError as e:
                logger.warning("request %s refused: %s", rid, e)
                results[rid] = _refused(rid, prompt, params, str(e))
        # Until this call's requests are done: others sharing the engine (a server's) may still run.
        waiting = set(order) - set(results)
        while waiting:
            for out in engine.step():
                if out.finished and out.request_id in waiting:
                    results[out.request_id] = out
                    waiting.discard(out.request_id)
        return [results[rid] for rid in order]

    def interrupt(self) -> list[RequestOutput]:
        return self.engine.interrupt()

    def update_weights(self, apply: Callable[[torch.nn.Module], None] | None = None, *, version: int | None = None,
                       recompute_kv: bool = False) -> int:
        return self.engine.update_weights(apply, version=version, recompute_kv=recompute_kv)

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()


def _refused(rid: str, prompt: Prompt, params: SamplingParams | None, error: str) -> RequestOutput:
    n = params.n if params is not None else 1
    text = prompt if isinstance(prompt, str) else None
    ids = list(prompt) if isinstance(prompt, list) else []
    outs = [CompletionOutput(index=i, token_ids=[], text=None, logprobs=[], policy_versions=[], kv_versions=[],
                             finish_reason="abort") for i in range(n)]
    return RequestOutput(request_id=rid, prompt=text, prompt_token_ids=ids, outputs=outs, finished=True,
                         sampling_params=params, error=error)


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(names)}")
    return names[dtype]
