"""C++ CPU kernels (the registry's "cpu" backend), built on first use with torch.utils.cpp_extension.

`csrc/cpu_ops.cpp` is compiled once per machine into the torch extensions cache
(`$TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`) with `-O3 -march=native`; the
extension's name carries a hash of the source, the flags, this CPU's instruction-set flags and the
source's path, so a changed source, another CPU or another checkout gets its own build and a warm cache
loads in well under a second.
Threads come from ATen's intra-op pool (`at::parallel_for`: torch's own OpenMP runtime and
`torch.get_num_threads()`), so these kernels add no second OpenMP runtime.

The paged decode attention, which reads K/V in place in their cache blocks where the torch path
gathers every row's blocks each step, the rotary embedding fused with the paged KV cache write
(`rotary_kv_write`: q and k rotated and k and v stored in one pass, where the engine's torch path rotates into
a new tensor and index_copy_s from it) and the greedy pick of a batch without log-probs (`greedy_argmax`:
each row's first maximum, as torch.max) are the registry's CPU defaults where they build (falling back to
the torch path with the reason logged: no compiler, a failed build). The vector paths of the attention,
the one-row linear and the greedy pick are AVX-512 or AVX2 (one body over per-ISA vector traits), chosen at
compile time from this CPU's flags; `isa_variant` builds the same source with AVX-512 switched off, or with
the portable loops only, beside the engine's build (the tests of the AVX2 paths on an AVX-512 CPU,
benchmarks/decode_isa.py). The registry's `rms_norm` / `silu_and_mul` on CPU are `engine_elementwise.py`'s (the
training kernels' forwards in fp32, `csrc/bf16_rms_norm.cpp` in bf16), CPU defaults too; since then every op with a
C++ kernel is a CPU default, so `RL_ENGINE_CPU_KERNELS=1` or an override `OP=cpu` (`*=cpu`: every op that has one)
chooses nothing more. `RL_ENGINE_CPU_KERNELS=0` never builds any. The switch is read once per process, at the first use
of a kernel (the loader and the registry's resolutions are cached): set it before the process starts
(tests that flip it call `registry.clear_cache()` and the loaders' `cache_clear()`). The decode attention and the
rotary + KV cache write are also torch.library custom ops (`ops.py`), so the engine's compiled decode steps
(`compile_decode`) call them as opaque graph nodes. The same source defines `rl_engine::cpu_gemv` in C++ (TORCH_LIBRARY), the one-row
linear that `packed_linear.py` takes for batch-1 steps of an engine that packs its weights (inductor's C++
wrapper calls it without Python).

The batch-invariant kernels (`csrc/invariant_linear.cpp`, `csrc/invariant_attention.cpp`) are built
by the same `load_source` but are not opt-in: `kernels/invariant.py` loads each on its first use under
`model.batch_invariant` and otherwise runs its torch fallback, logging why once per process;
`RL_ENGINE_CPU_KERNELS=0` switches them off too. So is the engine's tiled prefill attention
(`csrc/prefill_attention.cpp`, `prefill_attention.py`), which `ops.paged_prefill_attention` loads on its
first call.

`extension_status()` says whether the kernels can run and why not: no C++ compiler on PATH, the
build failed (its first error lines), or `RL_ENGINE_CPU_KERNELS=0`. Wrappers of each op: `ops.py`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.cpp"
# -fopenmp: at::parallel_for is a header template that runs its whole range on the calling thread
# unless the including file is compiled with OpenMP (ATen/ParallelOpenMP.h defines the parallel form
# under _OPENMP only); built with it, the kernels split their ranges over torch's intra-op threads,
# and the OpenMP symbols resolve to torch's own libgomp (nothing is added at link: no second runtime).
# It also enables the `omp simd` loop hints. -fno-trapping-math and
# -fno-math-errno let loops with floor / float->int (fast_exp) vectorise; no -ffast-math (it would
# drop inf/NaN semantics and reassociate where the kernels mirror the references' rounding).
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math")
# clang's -ffp-contract=fast fuses a product into a sum across statements and ignores `#pragma clang fp
# contract(off)`, which the rotary sections set (their products rounded apart: bit-equal to torch) where g++ takes
# GCC's optimize pragma; under on (clang's default: within an expression) clang honours it. (fast-honor-pragmas,
# fast but for the pragma, is not a driver option of clang 14.)
CLANG_CONTRACT = "-ffp-contract=on"
ENV_SWITCH = "RL_ENGINE_CPU_KERNELS"  # "1": the default on CPU; "0": never built; unset: only by override


def default_on() -> bool:
    """True when `RL_ENGINE_CPU_KERNELS=1`: the registry's CPU default where an op has a C++ kernel."""
    return os.environ.get(ENV_SWITCH) == "1"

# seconds the last build (or cache load) took, for the benchmark's report
load_seconds: float | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def compiler() -> str:
    """The C++ compiler torch's extension builds run: `$CXX`, else `c++`."""
    return os.environ.get("CXX", "c++")


@functools.cache
def _is_clang(compiler: str) -> bool:
    """Whether `compiler`'s preprocessor defines __clang__ (clang, Apple clang, or a `c++` that is clang)."""
    try:
        probe = subprocess.run([compiler, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True,
                               timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False  # no such compiler: load_source says so
    return "__clang__" in probe.stdout


def build_flags() -> tuple[str, ...]:
    """CFLAGS as this process's compiler takes them: under clang, `CLANG_CONTRACT` for -ffp-contract=fast."""
    if not _is_clang(compiler()):
        return CFLAGS
    return tuple(CLANG_CONTRACT if flag == "-ffp-contract=fast" else flag for flag in CFLAGS)


def extension_name(source: Path = SOURCE, *, extra_cflags: tuple[str, ...] = ()) -> str:
    """The torch-extensions-cache name of `source`'s build: its stem and a hash of the source, csrc/'s
    headers, the flags, this CPU's flags and the source's path. The path: torch's build directory keeps one ninja
    file per name, which names the source by path, so two checkouts of the same source (a worktree, a
    fresh clone beside the working tree) sharing a name rebuilt it (~30 s) whenever the other had loaded it."""
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):  # the sources' shared headers (fast_exp.h)
        digest.update(header.read_bytes())
    digest.update(str(source.resolve()).encode())
    digest.update(" ".join(build_flags() + extra_cflags).encode())
    digest.update(_cpu_flags().encode())
    return f"rl_engine_{source.stem}_{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def _build_lock(name: str):
    """Held around torch's build (or load) of extension `name`; yields its build directory. torch's own
    build lock is a file (`lock` in that directory) that a builder killed mid-build (a process its launcher
    stopped, a timeout) leaves behind, and every later load of the extension then waits for it forever
    (seen: a run's processes hung at start-up for 10+ minutes). This lock is an flock, which the kernel
    releases when its holder dies, and every build of this project's extensions holds it: a `lock` file
    found while holding it is such a leftover and is removed."""
    from torch.utils import cpp_extension

    directory = cpp_extension._get_build_directory(name, verbose=False)
    with open(os.path.join(directory, "rl_engine_build.flock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released at close, or when this process dies
        stale = os.path.join(directory, "lock")
        if os.path.exists(stale):
            logger.warning("removing %s, left by a build of %s that did not finish (its process died)", stale, name)
            os.remove(stale)
        yield directory


def source_kernel(source: Path, what: str) -> Callable[[], ModuleType | None]:
    """The cached loader of one source's extension for the ops of one wrapper module (`what` names them in the
    log): the module, or None with the reason logged once, its callers then taking the torch reference."""
    @functools.cache
    def kernel() -> ModuleType | None:
        module, reason = load_source(source)
        if module is None:
            logger.warning("%s: C++ kernel unavailable (%s); using the torch reference", what, reason)
        return module
    return kernel


@functools.cache
def load_source(source: Path, *, extra_cflags: tuple[str, ...] = ()) -> tuple[ModuleType | None, str]:
    """Build (or load from the cache) the C++ extension of one source file under `csrc/`:
    (module, reason), or (None, why not). Every C++ kernel file of the project goes through here, so
    they share the compiler check, the flags, the cache naming and the `RL_ENGINE_CPU_KERNELS=0` off
    switch (which never builds any). `extra_cflags` (after CFLAGS) make another build of the same source
    under its own name (`ISA_VARIANTS`)."""
    global load_seconds
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None, f"disabled by {ENV_SWITCH}=0"
    if shutil.which(compiler()) is None:
        return None, f"no C++ compiler ({compiler()!r} not on PATH; set CXX or install g++)"
    flags = build_flags() + extra_cflags
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        name = extension_name(source, extra_cflags=extra_cflags)
        with _build_lock(name) as directory:
            module = cpp_extension.load(name=name, sources=[str(source)], extra_cflags=list(flags),
                                        build_directory=directory, verbose=False)
    except Exception as exc:  # a failed build falls back to torch, with the compiler's first lines
        message = " ".join(str(exc).split())[:400]
        logger.warning("rl_engine C++ CPU kernels (%s) unavailable, using torch: %s", source.name, message)
        return None, f"build failed ({type(exc).__name__}: {message})"
    seconds = time.perf_counter() - start
    if source == SOURCE and not extra_cflags:
        load_seconds = seconds
    logger.info("rl_engine C++ CPU kernels ready in %.1f s (%s)", seconds, name)
    return module, f"C++ CPU kernels ({' '.join(flags)}), built in the torch extensions cache"


def extension_status(source: Path = SOURCE) -> tuple[bool, str]:
    """(usable, reason) of the extension of `source` (default: the kernels of `cpu_ops.cpp`). Builds it on
    the first call (cached on disk afterwards)."""
    module, reason = load_source(source)
    return module is not None, reason


def extension(source: Path = SOURCE) -> ModuleType:
    """The compiled module of `source`; RuntimeError with the reason when it cannot be built."""
    module, reason = load_source(source)
    if module is None:
        raise RuntimeError(f"rl_engine C++ CPU kernels ({source.name}) are unavailable: {reason}")
    return module


# Builds of cpu_ops.cpp (or another kernel source) beside the engine's, for the tests and benchmarks/decode_isa.py:
# its AVX2 paths on a CPU that has AVX-512 (GCC and clang's -mno-avx512f also switch off every AVX-512 extension,
# bf16 included), and its portable C++ loops (what a CPU with neither runs). Neither registers the rl_engine torch
# ops, which the engine's build (`extension()`) defines: torch refuses a second definition in one process.
ISA_VARIANTS = {
    "avx2": ("-mno-avx512f", "-DRL_ENGINE_NO_TORCH_LIBRARY"),
    "portable": ("-DRL_ENGINE_PORTABLE", "-DRL_ENGINE_NO_TORCH_LIBRARY"),
}


def cpu_has_avx2() -> bool:
    """Whether this CPU runs the AVX2 paths (AVX2, FMA and F16C), so that the "avx2" variant can be built and run."""
    return {"avx2", "fma", "f16c"} <= set(_cpu_flags().split())


def isa_variant(isa: str, source: Path = SOURCE) -> ModuleType:
    """The `ISA_VARIANTS[isa]` build of `source`, cpu_ops.cpp by default (whose `isa()` says which vector path it
    compiled); RuntimeError with the reason when it cannot be built."""
    if isa not in ISA_VARIANTS:
        raise ValueError(f"unknown ISA variant {isa!r}; choose one of {sorted(ISA_VARIANTS)}")
    module, reason = load_source(source, extra_cflags=ISA_VARIANTS[isa])
    if module is None:
        raise RuntimeError(f"rl_engine C++ CPU kernels ({source.name}, {isa} build) are unavailable: {reason}")
    return module
