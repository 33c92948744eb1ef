"""Start every actor of a run on this machine and wait: `run_actors(cfg)` is what `rl-engine train
CONFIG` does when `placement.mode` is colocated or disaggregated.

The run is resolved once, here, before anything starts: the builtin model and task are written into
the run dir, the model is checked against the parallel layout, the optional supervised warm start runs
with the single-process trainer (its weights become the actors' model), and the resolved config goes
to `<output_dir>/actors/config.yaml`, which every actor loads, so all of them see the same paths.
Processes: the coordinator (its exit ends the run; its output, the progress, is echoed), the
`tp * pp * dp` trainer ranks (torch.distributed), and in disaggregated mode the rollout workers, whose
death the launcher tolerates (`required=False`) because the coordinator requeues their prompts.
`rl_engine.launch` stops them all on exit, on error and on Ctrl-C. Every process gets the run's id
(RL_ENGINE_RUN_ID, in its environment), which names the run's shared-memory staging regions; once the
processes have ended, whatever way, the run's regions still in /dev/shm (a killed worker's) are removed,
and only those: another run on the machine has another id.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import IO

import yaml

from rl_engine.auth import RunAuth
from rl_engine.config import ConfigError, to_dict
from rl_engine.launch import LaunchResult, LocalLauncher, ProcessSpec
from rl_engine.launch.ports import listen, port_of
from rl_engine.train_config import RLConfig
from rl_engine.weight_sync.staging import RUN_ID_ENV, new_run_id, sweep_run


class ActorsFailed(RuntimeError):
    def __init__(self, result: LaunchResult) -> None:
        super().__init__(result.summary())
        self.result = result


def prepare(cfg: RLConfig) -> tuple[RLConfig, str]:
    """(the resolved config, the path of its YAML file for the actors)."""
    from rl_engine.policy import ModelConfig
    from rl_engine.policy.parallel import check_model_layout
    from rl_engine.run_checkpoint import resolve_resume
    from rl_engine.trainer import resolve_paths

    out = cfg.train.output_dir
    os.makedirs(out, exist_ok=True)
    model_path, data_path, eval_path, warm_path = resolve_paths(cfg)
    model_config = ModelConfig.from_pretrained(model_path)
    t = cfg.train
    try:
        check_model_layout(model_config, tp=t.tp, pp=t.pp, ep=t.ep)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.rollout.routing_replay and not model_config.is_moe:
        raise ConfigError(f"rollout.routing_replay=true needs an MoE model; {model_path} is dense")
    # A checkpoint to resume from is verified here, before anything starts (CheckpointError names the file).
    resuming = resolve_resume(out, cfg.train.resume) is not None
    warm_dir = os.path.join(out, "warm_start_model")
    if warm_path and cfg.warmup.steps > 0:
        # A resumed run takes its weights from the checkpoint; the warm start already ran.
        model_path = warm_dir if resuming and os.path.isdir(warm_dir) else _warm_start(cfg, model_path)
    resolved = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, path=os.path.abspath(model_path)),
        data=dataclasses.replace(cfg.data, path=os.path.abspath(data_path),
                                 eval_path=os.path.abspath(eval_path) if eval_path else None),
        warmup=dataclasses.replace(cfg.warmup, path=None),
        train=dataclasses.replace(cfg.train, output_dir=os.path.abspath(out)))
    path = os.path.join(out, "actors", "config.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(resolved), f, sort_keys=False)
    return resolved, path


def _warm_start(cfg: RLConfig, model_path: str) -> str:
    """The supervised warm start, in this process; returns the directory of the warm-started model."""
    from rl_engine.trainer import GRPOTrainer

    # Here, in this process: whatever the launcher (a Ray run's warm start runs on the driver too).
    single = dataclasses.replace(cfg, placement=dataclasses.replace(cfg.placement, mode="single_process",
                                                                    launcher="local"),
                                 ray=dataclasses.replace(cfg.ray, max_worker_restarts=0),
                                 rollout=dataclasses.replace(cfg.rollout, mode="sync"),
                                 train=dataclasses.replace(cfg.train, tp=1, pp=1, dp=1, ep=1, cp=1))
    trainer = GRPOTrainer(single)
    try:
        print(f"warm start: {cfg.warmup.steps} supervised steps on {trainer.warmup_path}", flush=True)
        stats = trainer.warm_start()
        print(f"warm start done, loss {stats['warmup/loss_last']:.3f}", flush=True)
        target = os.path.join(cfg.train.output_dir, "warm_start_model")
        trainer.model.save_pretrained(target)
    finally:
        trainer.close()
    for name in os.listdir(model_path):  # tokenizer, chat template, generation config
        src = os.path.join(model_path, name)
        if os.path.isfile(src) and not os.path.exists(os.path.join(target, name)) and not name.endswith(
                (".safetensors", ".bin", ".pt", ".index.json")):
            shutil.copy(src, target)
    return target


def build_specs(cfg: RLConfig, config_path: str, *, run_id: str, coordinator_host: str | None = None,
                coordinator_ports: tuple[int, int] | None = None,
                coordinator_listen_fds: tuple[int, int] | None = None) -> list[ProcessSpec]:
    """The processes of a run: coordinator, trainer ranks, rollout workers (disaggregated). The
    coordinator listens on `coordinator_host` (default `placement.host`) at `coordinator_ports`, served
    from `coordinator_listen_fds` when given: sockets the launching process bound to those ports and
    hands down (rl_engine.launch.ports), so no other process can take a port between its choice and
    the coordinator's start. Without ports, two sockets are bound here on `placement.host`."""
    p = cfg.placement
    host = coordinator_host or p.host
    if coordinator_ports is None:
        listeners = [listen(host), listen(host)]
        coordinator_ports = (port_of(listeners[0]), port_of(listeners[1]))
        coordinator_listen_fds = (listeners[0].detach(), listeners[1].detach())  # the launcher closes them
    port, heartbeat_port = coordinator_ports
    fd_args = [] if coordinator_listen_fds is None else [
        "--listen-fd", str(coordinator_listen_fds[0]), "--heartbeat-listen-fd", str(coordinator_listen_fds[1])]
    coordinator, heartbeat = f"tcp://{host}:{port}", f"tcp://{host}:{heartbeat_port}"
    threads = str(p.threads_per_process)
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, RUN_ID_ENV: run_id}
    base = ["--config", config_path]
    links = [*base, "--coordinator", coordinator, "--heartbeat", heartbeat]
    specs = [ProcessSpec(name="coordinator", module="rl_engine.actors.coordinator", ends_run=True, echo=True, env=env,
                         args=[*base, "--port", str(port), "--heartbeat-port", str(heartbeat_port), *fd_args],
                         pass_fds=coordinator_listen_fds or ())]
    specs += [ProcessSpec(name=f"trainer-{rank}", module="rl_engine.actors.trainer_group", args=links, env=env,
                          dist_rank=rank, master_socket=rank == 0) for rank in range(cfg.train.world_size)]
    if p.mode == "disaggregated":
        specs += [ProcessSpec(name=f"rollout-{i}", module="rl_engine.actors.rollout_worker", env=env, required=False,
                              args=[*links, "--worker-id", f"rollout-{i}"]) for i in range(p.num_rollout_workers)]
    return specs


def _close_fds(fds: set[int]) -> None:
    for fd in fds:
        os.close(fd)


def run_actors(cfg: RLConfig, *, edit_specs: Callable[[list[ProcessSpec]], list[ProcessSpec]] | None = None,
               echo_stream: IO[bytes] | None = None) -> dict:
    """Resolve, launch, wait; returns the coordinator's summary. Raises `ActorsFailed` (with the
    launcher's report: which process failed and its last log lines) unless the run completed.
    `edit_specs` may change the process list before launch (fault injection in tests)."""
    resolved, config_path = prepare(cfg)
    run_id = new_run_id()
    log_dir = os.path.join(resolved.train.output_dir, "logs")
    try:
        if cfg.placement.launcher == "ray":
            # Ray places the same processes on the cluster's nodes; imported here: only this launcher uses Ray.
            from rl_engine.launch.ray_cluster import launch_on_ray

            result = launch_on_ray(resolved, config_path, run_id=run_id, log_dir=log_dir, edit_specs=edit_specs,
                                   echo_stream=echo_stream, auth=RunAuth.generate())
        else:
            specs = build_specs(resolved, config_path, run_id=run_id)
            held = {fd for s in specs for fd in s.pass_fds}  # the coordinator's listening sockets, bound here
            try:
                if edit_specs is not None:
                    specs = edit_specs(specs)
                # The run's secret reaches the actors in their environment only (see rl_engine.auth).
                launcher = LocalLauncher(specs, log_dir=log_dir, grace_period_s=cfg.placement.grace_period_s,
                                         echo_stream=echo_stream, env=RunAuth.generate().child_env())
            except BaseException:
                _close_fds(held)
                raise
            _close_fds(held - {fd for s in specs for fd in s.pass_fds})  # the launcher closes the others
            print(f"launching {len(specs)} processes ({cfg.placement.mode}, trainer tp={cfg.train.tp} "
                  f"pp={cfg.train.pp} dp={cfg.train.dp}{f' cp={cfg.train.cp}' if cfg.train.cp > 1 else ''}); "
                  f"logs in {log_dir}", flush=True)
            result = launcher.run()
    finally:  # the children have ended (launch stops them on every way out): what they left is the run's
        if removed := sweep_run(run_id):
            print(f"removed {len(removed)} shared-memory region(s) the run's processes left behind: "
                  f"{', '.join(removed)}", file=sys.stderr, flush=True)
    if result.status != "completed":
        raise ActorsFailed(result)
    lost = [p.name for p in result.processes if p.returncode not in (0, None) and not p.stopped_by_launcher]
    if lost:
        print(f"processes lost during the run (their work was requeued): {', '.join(lost)}", file=sys.stderr)
    with open(os.path.join(resolved.train.output_dir, "summary.json")) as f:
        return json.load(f)
