"""The `rl-engine` command. Each subcommand lives in the package it belongs to; this file only
wires them, importing each lazily so that `rl-engine env` starts fast.

A user's mistake (a bad config value, an unreadable model directory, dataset or YAML file) raises
`rl_engine.config.InputError`, caught here alone: one line on stderr naming the key or the file, exit
code 2. Any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, function adding its arguments, function running it, help)
SUBCOMMANDS: dict[str, tuple[str, str, str, str]] = {
    "env": ("rl_engine.env_report", "add_arguments", "main", "show torch, device, threads and active backends"),
    "train": ("rl_engine.train_cli", "add_arguments", "main", "run RL (no arguments: the built-in CPU demo)"),
    "generate": ("rl_engine.inference.cli", "add_arguments", "main", "generate text with the inference engine"),
    "convert": ("rl_engine.convert", "add_arguments", "main",
                "convert between Hugging Face directories, sharded checkpoints (any layout) and training checkpoints"),
    "serve": ("rl_engine.serve.cli", "add_arguments", "main", "serve a model over an OpenAI-compatible HTTP API"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rl-engine", description="RL post-training engine for LLMs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add_args, _, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            getattr(importlib.import_module(module), add_args)(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_unavailable=f"'{name}' is not available in this build ({module} missing)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(args._unavailable, file=sys.stderr)
        return 2
    from rl_engine.config import InputError

    module, _, run, _ = SUBCOMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(module), run)(args) or 0)
    except InputError as e:
        print(f"{e.label}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
