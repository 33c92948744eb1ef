#!/usr/bin/env bash
# The GPU check (issue 23): every CUDA path of rl_engine on one CUDA GPU, in at most 8 minutes.
#
#   scripts/gpu_check.sh OUT_DIR [--only STEP,STEP] [--budget-s 470] [--work-dir DIR]   # on a GPU
#   scripts/gpu_check.sh --dry-run [OUT_DIR]                          # on CPU (CI runs this)
#
# On the project's device machine (no network; its image has torch, Triton, transformers, pytest),
# from the repository root, with the wheels fetched here first by scripts/fetch_gpu_wheels.sh:
#   run(command="scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=560)
#
# Wheels: when .whl/*.whl exist (the packages of scripts/gpu_wheels.txt, cp312 manylinux x86_64),
# they are installed with `pip install --no-index --no-deps --target $RL_ENGINE_GPU_SITE` and put
# on PYTHONPATH; absent wheels are reported, not an error (a dry run in a fresh clone has none).
#
# Steps (scripts/gpu_check.py STEPS, in this order, each in a child process under its own budget in
# seconds; a failure or timeout is recorded and the next step runs; once the 470 s global budget is
# spent the remaining steps are recorded as skipped):
#   env 20                 CUDA device, versions, the kernel registry's backend per op
#   cuda_tests 45          pytest -m cuda tests (the tests that skip without CUDA)
#   triton_compiled 80     TRITON_INTERPRET=0 pytest tests/kernels: every Triton kernel compiled vs torch
#   device_tests 50        RL_ENGINE_TEST_DEVICE=cuda pytest on the engine / graph-cache / log-prob /
#                          policy tests that take the `test_device` fixture
#   engine_parity 40       greedy tokens CUDA fp32 (identical) and bf16 (agreement) vs CPU fp32 on a
#                          tiny Qwen2 checkpoint; log-prob contract on CUDA (fp32 gap <= 1e-5)
#   cuda_graphs 45         capture per bucket, lookup picks the bucket, replay == eager logits
#                          (<= 1e-5 fp32), replay vs eager decode-step time, graphs vs enforce_eager
#   weight_sync_zero_copy 25  colocated engine on the trainer's CUDA tensors: zero-copy update
#   flashinfer 15          FlashInfer tests, or not_installed
#   transformer_engine 15  Transformer Engine tests, or not_installed
#   bench_train_step 30    benchmarks/train_step.py --device cuda --dtype bfloat16
#   rl_demo 75             rl-engine train train.device=cuda
#   bench_generate 90      benchmarks/generate.py --device cuda --dtype bfloat16 --size 0.5b
#                          --batches 1,64 (Qwen2-0.5B-shaped random model written offline)
#
# Output: OUT_DIR/report.json and OUT_DIR/gpu_check.log (every step's output) only: two files, so
# both come back from the device machine (at most 8 files return). Scratch files (checkpoints, JUnit
# XML, each step's result.json) go to --work-dir DIR, by default a new folder under the temp dir.
# Exit status: 0 when no step failed, 1 when one did, 2 on bad arguments or no CUDA device.
#
# report.json (schema "rl_engine.gpu_check/1", checked by gpu_check.validate_report before writing):
#   schema          "rl_engine.gpu_check/1"
#   dry_run         bool
#   started_at, finished_at   ISO 8601 UTC
#   seconds         wall time of the whole run
#   budget_seconds  the global budget
#   host            {python, executable, torch, cuda, cuda_available, device?, torch_error?}
#   wheels          {dir, files: [wheel file names], bytes, present: [package], missing: [package],
#                    installed: "no" | "installed" | "failed: <pip's last lines>"}
#   steps           [{name, what, status, seconds, budget_seconds, figures, error}]
#                     status: "passed" | "failed" | "skipped" | "not_installed"
#                     figures: the step's measurements (pytest steps: passed, failed, skipped,
#                       failed_tests, pytest_exit_code; others as named in gpu_check_steps.py);
#                       kept when the step fails
#                     error: null, or the failure / reason text (required when failed or not_installed)
#   summary         {passed, failed, skipped, not_installed}: counts of the step statuses
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
dry=0
for arg in "$@"; do
    [ "$arg" = "--dry-run" ] && dry=1
done
export RL_ENGINE_GPU_WHEELS=no
if [ "$dry" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
    site=${RL_ENGINE_GPU_SITE:-/tmp/rl_engine_gpu_site}
    if pip_out=$("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                 --target "$site" .whl/*.whl 2>&1); then
        export RL_ENGINE_GPU_WHEELS=installed
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        export RL_ENGINE_GPU_WHEELS="failed: $(echo "$pip_out" | tail -3)"
    fi
    echo "wheels: $RL_ENGINE_GPU_WHEELS"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
