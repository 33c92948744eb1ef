"""The `rl-engine` command's public surface."""

import subprocess
import sys

import torch

from rl_engine.cli import SUBCOMMANDS, build_parser, main


def test_env_reports_torch_threads_and_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert "threads" in out and "rms_norm" in out and "paged_decode_attention" in out
    # On CPU an op without a C++ kernel resolves to the torch reference.
    if not torch.cuda.is_available():
        rows = [line.split() for line in out.splitlines() if line.startswith(("apply_rotary ", "rotary_cos_sin "))]
        assert rows and all(r[1] == "torch" for r in rows)


def test_subcommands_are_wired():
    parser = build_parser()
    for name in ("env", "train", "generate"):
        assert name in SUBCOMMANDS
        assert parser.parse_args([name] if name != "generate" else [name, "--model", "x", "--prompt", "hi"]).command == name


def test_console_script_without_command_prints_help():
    proc = subprocess.run([sys.executable, "-m", "rl_engine.cli"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train" in proc.stdout and "generate" in proc.stdout
