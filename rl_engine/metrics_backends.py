"""Where a run's scalars go besides `metrics.jsonl`: TensorBoard and Weights & Biases.

`MetricsLogger` (rl_engine.metrics) always writes the JSONL files; each step's numeric scalars (the
deterministic row and the wall-clock row, under the same names: `reward/mean`, `train/entropy`,
`time/tokens_per_s`, ...) also go to every backend configured here:

- TensorBoard (`metrics.tensorboard`, on by default): `torch.utils.tensorboard.SummaryWriter`
  event files in `<output_dir>/tensorboard`. A resumed run purges the events after its checkpoint's
  step, as the JSONL is truncated.
- Weights & Biases (`metrics.wandb.project` set; the `wandb` extra): one run per training run, its
  files under `<output_dir>/wandb`, `mode` online or offline (offline writes the run to disk for a
  later `wandb sync`). The run id is kept in `<output_dir>/metrics.wandb_run_id`, so a resumed run
  continues the same W&B run; W&B ignores steps it has already seen, so after a crash the steps
  between the checkpoint and the crash keep their first values there (the JSONL has the resumed ones).

A null in the JSONL (a non-finite value) is not sent; strings, lists and dicts are JSONL-only.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol

from rl_engine.config import ConfigError, InputError

_WANDB_NAME = re.compile(r"^[^/\\#?%:]{1,128}$")  # W&B refuses these characters in project/entity names


@dataclass(kw_only=True)
class WandbConfig:
    """`metrics.wandb`: off while `project` is null."""

    project: str | None = None
    entity: str | None = None  # a W&B team or user; null: the logged-in user's default
    mode: Literal["online", "offline"] = "online"
    name: str | None = None  # the run's display name; null: W&B picks one
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("project", "entity"):
            value = getattr(self, key)
            if value is not None and not _WANDB_NAME.match(value):
                raise ConfigError(f"metrics.wandb.{key}={value!r} must be 1-128 characters without / \\ # ? % :")
        if self.project is None:
            given = [k for k in ("entity", "name", "group") if getattr(self, k) is not None]
            if given or self.tags or self.mode != "online":
                set_keys = given + (["tags"] if self.tags else []) + (["mode"] if self.mode != "online" else [])
                raise ConfigError(f"metrics.wandb.{set_keys[0]} is set but metrics.wandb.project is null: set "
                                  "metrics.wandb.project=NAME to log to Weights & Biases")
            return
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"metrics.wandb.project={self.project!r} needs the wandb package: "
                              "pip install 'rl_engine[wandb]' (or set metrics.wandb.project=null)")

    @property
    def enabled(self) -> bool:
        return self.project is not None


@dataclass(kw_only=True)
class MetricsConfig:
    """`metrics`: the JSONL files are always written; these choose the rest."""

    tensorboard: bool = True  # event files in <output_dir>/tensorboard
    plot: bool = True  # metrics.png at the end of the run (matplotlib)
    wandb: WandbConfig = field(default_factory=WandbConfig)


class ScalarBackend(Protocol):
    def log(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardBackend:
    def __init__(self, log_dir: Path, *, resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise InputError(f"metrics.tensorboard=true needs the tensorboard package ({e}): it is a dependency of "
                             "rl_engine, reinstall it (pip install tensorboard) or set metrics.tensorboard=false") from None
        # purge_step drops events after the resumed step, like the JSONL truncation.
        self._writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class WandbBackend:
    def __init__(self, config: WandbConfig, *, run_dir: Path, id_path: Path, resume_step: int | None,
                 run_config: Mapping[str, Any] | None) -> None:
        try:
            import wandb
        except ImportError:
            raise InputError(f"metrics.wandb.project={config.project!r} needs the wandb package: "
                             "pip install 'rl_engine[wandb]'") from None
        resume = resume_step is not None and id_path.is_file()
        self._run = wandb.init(project=config.project, entity=config.entity, mode=config.mode, name=config.name,
                               group=config.group, tags=list(config.tags) or None, dir=str(run_dir),
                               id=id_path.read_text().strip() if resume else None,
                               resume="allow" if resume else None, config=dict(run_config or {}))
        if not resume:
            id_path.write_text(self._run.id + "\n")

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log(dict(scalars), step=step)

    def close(self) -> None:
        self._run.finish()


def open_backends(*, tensorboard: bool, wandb: WandbConfig | None, jsonl_path: Path, resume_step: int | None,
                  run_config: Mapping[str, Any] | None) -> list[ScalarBackend]:
    """The backends a logger writing `jsonl_path` forwards its scalars to."""
    backends: list[ScalarBackend] = []
    if tensorboard:
        backends.append(TensorBoardBackend(jsonl_path.with_name("tensorboard"), resume_step=resume_step))
    if wandb is not None and wandb.enabled:
        stem = jsonl_path.name.removesuffix(".jsonl")
        try:
            backends.append(WandbBackend(wandb, run_dir=jsonl_path.parent,
                                         id_path=jsonl_path.with_name(stem + ".wandb_run_id"),
                                         resume_step=resume_step, run_config=run_config))
        except BaseException:
            for backend in backends:
                backend.close()
            raise
    return backends
