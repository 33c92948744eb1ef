"""`rl-engine env`: what this machine gives the engine and which kernel backend each op uses."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="device to resolve kernels for (default: cuda if available, else cpu)")


def report(device: str | None = None) -> str:
    import torch

    from rl_engine.kernels import registry

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lines = [
        f"rl_engine   {__import__('rl_engine').__version__}",
        f"python      {platform.python_version()} ({platform.machine()})",
        f"torch       {torch.__version__}",
        f"device      {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""),
        f"threads     {torch.get_num_threads()} intra-op, {os.cpu_count()} cpus",
        f"distributed gloo={torch.distributed.is_gloo_available()} nccl={torch.distributed.is_nccl_available()}",
        "optional packages:",
    ]
    for pkg in ("triton", "flashinfer", "transformer_engine", "ray", "pyarrow", "transformers", "tensorboard", "wandb",
                "datasets", "matplotlib"):
        found = importlib.util.find_spec(pkg) is not None
        lines.append(f"  {pkg:<20} {'importable' if found else 'not installed'}")
    lines.append("kernel backends:")
    lines.append(registry.format_backends_table(device))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    print(report(args.device))
    return 0
