"""The OpenAI-compatible server's overhead: output tokens/s of N concurrent streaming clients against
`rl-engine serve`, as a ratio of offline `LLM.generate` on the same prompts in this process, measured
in the same run; and the time to first token (TTFT) percentiles of the served requests. Also the CPU
time per token of the offline engine over the server's (its HTTP process and its engine process
together; the HTTP process's share is reported beside it), steadier than wall time on a shared
machine (it leaves out the clients, which run in this process). The clients' own CPU time is reported
too (`client_cpu_s`): on a 2-core machine the clients and the server share the cores, which the served
wall time pays for and the offline run does not (vLLM's benchmark_serving has the same split, a
client process counting the server's output tokens over wall time, on machines with cores to spare).

The server is started as it is deployed (`python -m rl_engine.cli serve`, uvicorn, loopback: an HTTP
process and the engine in a child process of its own); the clients are asyncio tasks of this process
reading the server-sent events with httpx (`/v1/completions`, `stream: true`, token-id prompts,
`ignore_eos`, greedy, no log-probs asked: the server runs them with `logprobs=None`, and so does the
offline side). Both sides generate the same number of tokens per prompt with the same engine
settings and torch thread count (`--threads`; the engine's `cpu_threads="auto"` only lowers it when
other processes take cores, on both sides alike). Each client sends `--requests-per-client` requests
one after the other; the offline baseline generates all the prompts in one `LLM.generate` call (the
same concurrency when that is 1). Both sides are warmed up on two prompts first; then each is timed
`--repeats` times, alternating, and the best time of each is kept (the machine is shared).

    python benchmarks/serve.py                      # 32 clients, the ~3M preset with its tokenizer
    python benchmarks/serve.py --clients 1,8,32 --new-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_helpers import emit, parse_args  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="32", help="comma-separated numbers of concurrent streaming clients")
    p.add_argument("--requests-per-client", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--preset", default="3m", help="model preset (rl_engine.policy.presets), written offline")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server and of the offline engine")
    p.add_argument("--repeats", type=int, default=3)
    return p


def start_server(model: str, threads: int, log_path: str) -> tuple[subprocess.Popen, int]:
    """`rl-engine serve --port 0` (the server binds a port the kernel picks and prints it: no port picked
    here that another process could take before the server binds it); returns it with its port once it
    answers /health. Its output goes to `log_path` (a file: a pipe nobody reads would stall it)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("RL_ENGINE_API_KEY", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rl_engine.cli", "serve", model, "--port", "0",
                                 "--served-model-name", "bench", "--log-level", "warning", "--kv-cache-memory",
                                 str(256 << 20)], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    import httpx

    def output() -> str:
        with open(log_path, errors="replace") as f:
            return f.read()

    port = None
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {output()}")
        if port is None and (found := re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)/v1", output())):
            port = int(found.group(1))
        try:
            if port is not None and httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not start within 120 s: {output()}")


async def _stream_one(host: str, port: int, body: bytes) -> tuple[int, float | None]:
    """One streamed completion over a connection of its own: (tokens received, TTFT). A minimal HTTP/1.1
    client (the request, then the chunked server-sent events, each JSON-decoded for its token ids):
    a few times less CPU per event than httpx, CPU the clients take from the server on a 2-core machine."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), len(body), body))
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"the server answered {status!r}: {await reader.read()!r}")
    while (await reader.readline()) not in (b"\r\n", b""):  # headers (uvicorn streams with chunked encoding)
        pass
    tokens, first, pending = 0, None, b""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            break
        pending += (await reader.readexactly(size + 2))[:-2]
        *events, pending = pending.split(b"\n\n")
        for event in events:
            if event.startswith(b"data: {"):
                got = len(json.loads(event[6:])["choices"][0]["token_ids"])
                if got and first is None:
                    first = time.perf_counter() - t0
                tokens += got
    writer.close()
    return tokens, first


async def run_clients(url: str, prompts: list[list[int]], *, clients: int, new_tokens: int) -> dict:
    """Every prompt through `clients` concurrent streaming clients: (wall s, tokens, TTFTs)."""
    host, port = url.split("//")[1].rsplit(":", 1)
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttfts: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                               "stream": True, "ignore_eos": True, "return_token_ids": True}).encode()
            got, first = await _stream_one(host, int(port), body)
            tokens += got
            ttfts.append(first)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"wall_s": time.perf_counter() - t0, "tokens": tokens, "ttfts": ttfts}


def run_event_loop(coro):
    """The clients' event loop: uvloop where installed (a dependency of rl_engine on Linux and macOS)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The process's children (the server's engine process), from /proc (Linux)."""
    kids: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def main() -> None:
    args = parse_args(build_parser(), smoke={"clients": "2", "new_tokens": 4, "repeats": 1, "preset": "tiny",
                                             "prompt_tokens": 8})
    from rl_engine.inference import LLM, SamplingParams
    from rl_engine.policy.presets import write_preset_checkpoint

    torch.set_num_threads(args.threads)
    workdir = tempfile.mkdtemp(prefix="bench_serve_")
    model = write_preset_checkpoint(args.preset, os.path.join(workdir, "model"), seed=0, max_position_embeddings=1024)
    llm = LLM(model, kv_cache_memory=256 << 20)
    vocab = llm.engine.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    server, port = start_server(model, args.threads, os.path.join(workdir, "server.log"))
    engine_pids = child_pids(server.pid)  # the engine process (rl-engine serve runs the engine in its own)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for clients in [int(c) for c in args.clients.split(",")]:
            n = clients * args.requests_per_client
            prompts = [torch.randint(5, vocab, (args.prompt_tokens,), generator=gen).tolist() for _ in range(n)]
            params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, logprobs=None)
            llm.generate(prompts[:2], params)  # warm both sides
            run_event_loop(run_clients(url, prompts[:2], clients=2, new_tokens=args.new_tokens))
            best_offline, best_served = float("inf"), None
            offline_cpu, served_cpu, client_cpu, front_cpu = float("inf"), float("inf"), float("inf"), float("inf")
            for _ in range(args.repeats):
                llm.reset_prefix_cache()
                c0, t0 = time.process_time(), time.perf_counter()
                outs = llm.generate(prompts, params)
                best_offline = min(best_offline, time.perf_counter() - t0)
                offline_cpu = min(offline_cpu, time.process_time() - c0)
                offline_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
                c0, e0, k0 = cpu_seconds(server.pid), sum(map(cpu_seconds, engine_pids)), time.process_time()
                served = run_event_loop(run_clients(url, prompts, clients=clients, new_tokens=args.new_tokens))
                engine_cpu = sum(map(cpu_seconds, engine_pids)) - e0
                if engine_cpu + cpu_seconds(server.pid) - c0 < served_cpu:
                    served_cpu, front_cpu = engine_cpu + cpu_seconds(server.pid) - c0, cpu_seconds(server.pid) - c0
                client_cpu = min(client_cpu, time.process_time() - k0)
                if best_served is None or served["wall_s"] < best_served["wall_s"]:
                    best_served = served
            assert best_served["tokens"] == offline_tokens == n * args.new_tokens, (best_served["tokens"], offline_tokens)
            offline_tps = offline_tokens / best_offline
            served_tps = best_served["tokens"] / best_served["wall_s"]
            ttfts = best_served["ttfts"]
            row = {"clients": clients, "requests": n, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                   "offline_tokens_per_s": round(offline_tps, 1), "served_tokens_per_s": round(served_tps, 1),
                   "served_over_offline": round(served_tps / offline_tps, 3),
                   # CPU seconds per token, offline over the server process's (busy-machine-proof)
                   # (null in a run too short for the CPU clock's tick: --smoke under ATEN_CPU_CAPABILITY=default
                   # measured 0 s)
                   "cpu_offline_over_served": round(offline_cpu / served_cpu, 3) if served_cpu > 0 else None,
                   # least CPU seconds of one run: offline, the server (its HTTP process and its engine
                   # process together, and the HTTP process alone), the clients (this process)
                   "offline_cpu_s": round(offline_cpu, 3), "server_cpu_s": round(served_cpu, 3),
                   "server_http_cpu_s": round(front_cpu, 3),
                   "client_cpu_s": round(client_cpu, 3),
                   "ttft_ms": {f"p{q}": round(1000 * percentile(ttfts, q), 1) for q in (50, 90, 99)}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    emit({"benchmark": "serve", "preset": args.preset, "threads": args.threads, "repeats": args.repeats,
          "target": "served_over_offline >= 0.8 at 32 clients", "rows": rows})


if __name__ == "__main__":
    main()
