"""`rl-engine generate`: generate from a model directory on the command line.

Prints each completion's text (or, with --json, one JSON object per prompt with token ids, log-probs,
versions and finish reasons). Prompts are text (--prompt, repeatable), token ids (--prompt-ids
"1,2,3") or a chat message rendered with the model's template (--chat). Speculative decoding:
--speculative-method ngram|draft_model with --num-speculative-tokens (and --prompt-lookup-max/-min, or
--draft-model PATH); its acceptance metrics go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    parser.add_argument("--prompt-ids", action="append", default=[], help="a prompt as comma-separated token ids")
    parser.add_argument("--chat", action="append", default=[], help="a user message, rendered with the chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_engine_arguments(parser)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's flags (shared with `rl-engine serve`); `build_llm` reads them."""
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="bytes for the KV pool")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--compile-decode", action="store_true",
                        help="CPU: compile each decode batch-size bucket's step (torch.compile, static shapes) on "
                             "its first use")
    spec = parser.add_argument_group("speculative decoding")
    spec.add_argument("--speculative-method", choices=["ngram", "draft_model"], default=None)
    spec.add_argument("--num-speculative-tokens", type=int, default=None, help="drafts per sequence per step")
    spec.add_argument("--prompt-lookup-max", type=int, default=None, help="ngram: longest n-gram matched")
    spec.add_argument("--prompt-lookup-min", type=int, default=None, help="ngram: shortest n-gram matched")
    spec.add_argument("--draft-model", default=None, help="draft_model: the draft's model directory")


MAX_N = 4096  # --n: samples per prompt, as rollout.n
MAX_TEMPERATURE = 100.0  # --temperature: finite; 0 is greedy


def _check_flags(args: argparse.Namespace) -> None:
    """What SamplingParams and the engine leave open (they check the other flags themselves): an upper
    bound on --n and a finite --temperature; an InputError for the CLI to print as one line."""
    from rl_engine.config import ConfigError, InputError, check_float, check_int

    try:
        check_int("--n", args.n, lo=1, hi=MAX_N)
        check_float("--temperature", args.temperature, lo=0, hi=MAX_TEMPERATURE, note="0 means greedy")
    except ConfigError as e:
        raise InputError(str(e)) from None


def _load_tokenizer(path: str):
    """The model directory's tokenizer (None without a tokenizer.json); a file the tokenizers library
    cannot parse is an InputError naming the directory."""
    import os

    from rl_engine.config import InputError
    from rl_engine.policy import ModelConfig
    from rl_engine.policy.tokenizer import Tokenizer

    eos = ModelConfig.from_pretrained(path).eos_token_id  # InputError for a missing dir or bad config.json
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    try:
        return Tokenizer.from_pretrained(path, eos_token_ids=eos or None)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions for a bad file
        raise InputError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {e})") from None


def main(args: argparse.Namespace) -> int:
    """Raises InputError for a bad flag or model directory; `rl_engine.cli.main` prints it."""
    from rl_engine.inference.sampling_params import SamplingParams

    _check_flags(args)
    try:
        params = SamplingParams(n=args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                min_p=args.min_p, max_tokens=args.max_tokens, seed=args.seed, stop=args.stop,
                                ignore_eos=args.ignore_eos)
        prompts: list = list(args.prompt)
        for ids in args.prompt_ids:
            prompts.append([int(t) for t in ids.replace(" ", "").split(",") if t])
        speculative_config = _speculative_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not prompts and not args.chat:
        print("error: give at least one --prompt, --prompt-ids or --chat", file=sys.stderr)
        return 2
    try:
        llm = build_llm(args, model=args.model, speculative_config=speculative_config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for message in args.chat:
        if llm.tokenizer is None:
            print("error: --chat needs a tokenizer.json in the model directory", file=sys.stderr)
            return 2
        prompts.append(llm.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=True))
    outputs = llm.generate(prompts, params)
    failed = 0
    for out in outputs:
        if out.error:
            failed += 1
            print(f"error: request {out.request_id}: {out.error}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"prompt": out.prompt, "prompt_token_ids": out.prompt_token_ids, "outputs": [
                {"text": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs,
                 "policy_versions": c.policy_versions, "finish_reason": c.finish_reason} for c in out.outputs]}))
        else:
            for c in out.outputs:
                print(c.text if c.text is not None else " ".join(map(str, c.token_ids)))
    if speculative_config is not None:
        print(f"speculative: {json.dumps(llm.engine.stats()['speculative'])}", file=sys.stderr)
    return 1 if failed else 0


def build_llm(args: argparse.Namespace, *, model: str, speculative_config: dict | None):
    """An `LLM` from the engine flags (`add_engine_arguments`); ValueError for a bad value."""
    import torch

    from rl_engine.inference.llm import LLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return LLM(model, tokenizer=_load_tokenizer(model), dtype=args.dtype, device=device, block_size=args.block_size,
               kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len,
               enable_prefix_caching=not args.no_prefix_caching, compile_decode=args.compile_decode,
               speculative_config=speculative_config)


def _speculative_config(args: argparse.Namespace) -> dict | None:
    """The speculative_config dict from the flags; flags of speculative decoding without a method, or
    of the other method, are errors (the config validates the values)."""
    flags = {"num_speculative_tokens": args.num_speculative_tokens, "prompt_lookup_max": args.prompt_lookup_max,
             "prompt_lookup_min": args.prompt_lookup_min, "model": args.draft_model}
    given = {k: v for k, v in flags.items() if v is not None}
    if args.speculative_method is None:
        if given:
            names = ", ".join("--" + ("draft-model" if k == "model" else k.replace("_", "-")) for k in given)
            raise ValueError(f"{names} need --speculative-method ngram|draft_model")
        return None
    if "num_speculative_tokens" not in given:
        raise ValueError("--speculative-method needs --num-speculative-tokens (drafts per step, e.g. 3)")
    if "model" in given and args.speculative_method != "draft_model":
        raise ValueError("--draft-model is only for --speculative-method draft_model")
    if args.speculative_method == "draft_model" and "model" not in given:
        raise ValueError("--speculative-method draft_model needs --draft-model PATH")
    from rl_engine.inference.speculative import SpeculativeConfig

    config = {"method": args.speculative_method, **given}
    SpeculativeConfig.from_dict(config)  # validate now, before loading the model
    return config
