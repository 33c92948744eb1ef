"""Prompt datasets: rows of local files -> rendered prompts, taken in a resumable order.

Sources (`read_records`): JSON lines (`.jsonl` / `.json`, read here so an error names `file:line`),
Parquet (pyarrow), and through Hugging Face `datasets` (the `datasets` extra): a `save_to_disk`
directory, a directory of data files such as a dataset repository's snapshot, a `.csv` / `.tsv` /
`.arrow` file, or a file pattern (`dir/data/train-*.parquet`). Only local files are read: nothing is
downloaded, and `datasets` caches into a temporary directory that is removed after reading. A source
with several splits is refused with their names; point the path at one split.

Rows are read and validated eagerly (prompt sets are small; errors surface at start-up, naming the
file, line and key, as `InputError`: invalid UTF-8 or JSON, a duplicate key, a missing or null prompt
or answer). The order of epoch e is a permutation seeded by (seed, e), so it depends on
nothing but those two numbers; the cursor (epoch, position) is the whole sampling state, which
makes `state_dict()` / `load_state_dict()` resume exactly. Every item taken carries a unique id
(epoch, row index) for the "every prompt taken is trained, dropped or in flight" accounting.
"""

from __future__ import annotations

import glob
import json
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from rl_engine.config import InputError, parse_json

ChatTemplate = Callable[..., str]  # apply_chat_template(messages, add_generation_prompt=True) -> str
Messages = list[dict[str, str]]


@dataclass(kw_only=True)
class PromptDataConfig:
    """path: any source `read_records` reads (JSON lines, Parquet, `datasets` directories and files,
    file patterns). prompt_key holds a string or a list of
    chat messages; answer_key (None: no answer) is passed to rewards as a string; metadata_keys
    are copied from each row and passed to rewards as keyword arguments."""

    path: str
    prompt_key: str = "prompt"
    answer_key: str | None = "answer"
    metadata_keys: tuple[str, ...] = ()
    shuffle: bool = True
    seed: int = 0
    max_epochs: int | None = None  # None: cycle forever

    def __post_init__(self) -> None:
        if self.max_epochs is not None and self.max_epochs <= 0:
            raise ValueError(f"max_epochs ({self.max_epochs}) must be > 0, or None to cycle forever")
        self.metadata_keys = tuple(self.metadata_keys)


@dataclass(frozen=True, kw_only=True)
class PromptItem:
    epoch: int
    index: int  # row index in the dataset
    text: str  # the prompt as the model sees it (chat template applied)
    messages: Messages | None  # the chat messages, when a chat template was applied
    answer: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    row: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)  # every field, as read

    @property
    def uid(self) -> str:
        """Unique over a run: a row is taken once per epoch."""
        return f"{self.epoch}:{self.index}"


JSON_LINES_SUFFIXES = (".jsonl", ".json")
# File kinds read through `datasets` (its packaged builders: local files only); Parquet too in a pattern.
DATASETS_BUILDERS = {".csv": "csv", ".tsv": "csv", ".arrow": "arrow", ".parquet": "parquet", ".jsonl": "json",
                     ".json": "json"}
_PATTERN = re.compile(r"[*?\[]")


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """-> [(line or row number, record)]. JSONL line numbers are 1-based (blank lines skipped); other
    sources number their rows from 1. An unreadable source or line is an `InputError` naming it
    (`file:line` for a JSONL line)."""
    if _PATTERN.search(str(path)):
        return _read_pattern(str(path))
    path = Path(path)
    if not path.exists():
        raise InputError(f"dataset {str(path)!r} does not exist")
    if path.is_dir():
        return _read_directory(path)
    if not path.is_file():
        raise InputError(f"dataset {str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix in DATASETS_BUILDERS and suffix not in JSON_LINES_SUFFIXES:
        return _read_through_datasets(str(path), builder=DATASETS_BUILDERS[suffix], data_files=[str(path)])
    if suffix not in JSON_LINES_SUFFIXES:
        raise InputError(f"dataset {path}: unknown format {suffix!r}; use .jsonl / .json (JSON lines), .parquet, "
                         ".csv, .tsv, .arrow, a `datasets` directory (save_to_disk) or a file pattern")
    records = []
    try:
        with path.open("rb") as f:
            for line_number, raw in enumerate(f, start=1):
                try:  # a byte-order mark may start the file
                    line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{path}:{line_number}: invalid UTF-8 (byte {raw[e.start]:#04x} at column "
                                     f"{e.start + 1})") from None
                if line.strip():
                    records.append((line_number, parse_json(line, f"{path}:{line_number}")))
    except OSError as e:
        raise InputError(f"dataset {str(path)!r} cannot be read: {e.strerror or e}") from None
    return records


def _read_parquet(path: Path) -> list[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())})") from None
    return list(enumerate(rows, start=1))


def _import_datasets(source: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise InputError(f"dataset {source}: reading it needs Hugging Face datasets: pip install "
                         "'rl_engine[datasets]' (or convert it to JSONL or Parquet)") from None
    return datasets


def _one_split(source: str, splits: Mapping[str, Any], example: str) -> Any:
    if len(splits) != 1:
        raise InputError(f"dataset {source} holds the splits {sorted(splits)}: point the path at one split, "
                         f"e.g. {example}")
    return next(iter(splits.values()))


def _read_directory(path: Path) -> list[tuple[int, Any]]:
    """A `save_to_disk` directory (a Dataset, or a DatasetDict whose splits are its subdirectories), or
    any directory of data files that `datasets` reads locally (split names from the file names)."""
    if (path / "dataset_dict.json").is_file():  # a DatasetDict's save_to_disk: one subdirectory per split
        try:
            names = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            names = sorted(p.name for p in path.iterdir() if p.is_dir())
        _one_split(str(path), dict.fromkeys(names), str(path / names[0]) if names else f"{path}/<split>")
        path = path / names[0]
    datasets = _import_datasets(str(path))
    if (path / "state.json").is_file():  # a Dataset's save_to_disk
        try:
            dataset = datasets.load_from_disk(str(path), keep_in_memory=True)
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
            raise InputError(f"dataset {path}: not a readable `datasets` directory ({' '.join(str(e).split())})") from None
        return list(enumerate(dataset.to_list(), start=1))
    return _read_through_datasets(str(path), builder=str(path), data_files=None)


def _read_pattern(pattern: str) -> list[tuple[int, Any]]:
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise InputError(f"dataset pattern {pattern!r} matches no file")
    kinds = {Path(f).suffix.lower() for f in files}
    if len(kinds) != 1 or next(iter(kinds)) not in DATASETS_BUILDERS:
        raise InputError(f"dataset pattern {pattern!r} matches files of kinds {sorted(kinds)}; it must match files "
                         f"of one kind among {sorted(DATASETS_BUILDERS)}")
    return _read_through_datasets(pattern, builder=DATASETS_BUILDERS[kinds.pop()], data_files=files)


def _read_through_datasets(source: str, *, builder: str, data_files: list[str] | None) -> list[tuple[int, Any]]:
    """`datasets.load_dataset` on local files: a packaged builder (csv, json, parquet, arrow) with
    `data_files`, or a local directory (`builder` is its path). The Arrow cache goes to a temporary
    directory, removed before returning; the progress bars stay off while reading."""
    datasets = _import_datasets(source)
    import pyarrow as pa

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="rl_engine_datasets_") as cache_dir:
            kwargs: dict[str, Any] = {"delimiter": "\t"} if source.lower().endswith(".tsv") else {}
            loaded = datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir, keep_in_memory=True,
                                           **kwargs)
            dataset = _one_split(source, loaded, f"a pattern such as '{source}/data/train-*.parquet'")
            rows = dataset.to_list()
    except (OSError, ValueError, pa.ArrowException, datasets.exceptions.DatasetsError) as e:
        raise InputError(f"dataset {source}: `datasets` cannot read it ({' '.join(str(e).split())[:500]})") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    return list(enumerate(rows, start=1))


def _as_messages(value: Any, where: str, key: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise InputError(
        f"{where}: key {key!r} must be a string or a non-empty list of {{'role': str, 'content': str}} "
        f"messages, got {type(value).__name__}"
    )


class PromptDataset:
    """Rows rendered to prompts, taken in a deterministic per-(seed, epoch) order."""

    def __init__(
        self,
        records: Sequence[tuple[int, Any]],
        *,
        config: PromptDataConfig,
        apply_chat_template: ChatTemplate | None = None,
    ) -> None:
        """records: (line number, row) pairs as from `read_records`; config.path names the source
        in errors. apply_chat_template: e.g. functools.partial(tokenizer.apply_chat_template,
        tokenize=False); without one, string prompts are used as they are."""
        self.config = config
        self._rows = [
            self._parse(index, line, row, apply_chat_template) for index, (line, row) in enumerate(records)
        ]
        self._lines = [line for line, _ in records]
        if not self._rows:
            raise InputError(f"dataset {config.path} has no rows")
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(0)

    @classmethod
    def from_config(cls, config: PromptDataConfig, *, apply_chat_template: ChatTemplate | None = None) -> PromptDataset:
        return cls(read_records(config.path), config=config, apply_chat_template=apply_chat_template)

    def _parse(self, index: int, line: int, row: Any, apply_chat_template: ChatTemplate | None) -> PromptItem:
        cfg = self.config
        where = f"{cfg.path}:{line}"
        if not isinstance(row, Mapping):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in (cfg.prompt_key, cfg.answer_key, *cfg.metadata_keys):
            if key is not None and key not in row:
                raise InputError(
                    f"{where}: missing key {key!r} (row has {sorted(row)}); set prompt_key / answer_key / "
                    "metadata_keys to the dataset's field names"
                )
        for key, what in ((cfg.prompt_key, "prompt"), (cfg.answer_key, "answer")):
            if key is not None and row[key] is None:  # an answer of null fails every reward of the row
                raise InputError(f"{where}: key {key!r} is null; every row needs its {what}")
        prompt = row[cfg.prompt_key]
        messages: Messages | None = _as_messages(prompt, where, cfg.prompt_key)  # validates the type
        if apply_chat_template is not None:
            text = apply_chat_template(messages, add_generation_prompt=True)
            if not isinstance(text, str):
                raise TypeError(
                    f"apply_chat_template returned {type(text).__name__}, expected str; with a Hugging Face "
                    "tokenizer pass functools.partial(tokenizer.apply_chat_template, tokenize=False)"
                )
        elif isinstance(prompt, str):
            text, messages = prompt, None
        else:
            raise InputError(
                f"{where}: key {cfg.prompt_key!r} is a list of chat messages but no apply_chat_template was "
                "given; pass one (e.g. from the tokenizer) to render them"
            )
        if not text:
            raise InputError(f"{where}: key {cfg.prompt_key!r} is an empty prompt")
        answer = row[cfg.answer_key] if cfg.answer_key is not None else None
        return PromptItem(
            epoch=0,
            index=index,
            text=text,
            messages=messages,
            answer=None if answer is None else str(answer),
            metadata={key: row[key] for key in cfg.metadata_keys},
            row=dict(row),
        )

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> tuple[PromptItem, ...]:
        """Every row as parsed (epoch 0), in file order."""
        return tuple(self._rows)

    def where(self, index: int) -> str:
        """`file:line` of row `index` (the row number for other sources than JSON lines), for messages."""
        return f"{self.config.path}:{self._lines[index]}"

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.config.shuffle:
            return np.arange(len(self._rows))
        # Seeded by the pair (seed, epoch) via SeedSequence: no collisions between seed+epoch sums.
        return np.random.default_rng([self.config.seed, epoch]).permutation(len(self._rows))

    @property
    def exhausted(self) -> bool:
        return self.config.max_epochs is not None and self._epoch >= self.config.max_epochs

    def take(self, n: int) -> list[PromptItem]:
        """The next n prompts, crossing epoch boundaries; fewer only when max_epochs is reached."""
        if n < 0:
            raise ValueError(f"take(n={n}): n must be >= 0")
        items: list[PromptItem] = []
        while len(items) < n and not self.exhausted:
            row = self._rows[int(self._order[self._position])]
            items.append(replace(row, epoch=self._epoch))
            self._position += 1
            if self._position == len(self._rows):
                self._epoch, self._position = self._epoch + 1, 0
                self._order = self._epoch_order(self._epoch)
        return items

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.config.seed,
            "shuffle": self.config.shuffle,
            "num_rows": len(self._rows),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a saved cursor. The seed, shuffle flag and row count must match the saved run,
        else the resumed order would differ silently."""
        for key, ours in (("seed", self.config.seed), ("shuffle", self.config.shuffle), ("num_rows", len(self._rows))):
            if state[key] != ours:
                raise ValueError(
                    f"cannot resume prompt dataset {self.config.path}: saved {key}={state[key]!r} but this "
                    f"run has {key}={ours!r}; resume with the same dataset file and data config"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self._rows):
            raise ValueError(f"invalid saved cursor epoch={epoch} position={position} for {len(self._rows)} rows")
        self._epoch, self._position = epoch, position
        self._order = self._epoch_order(epoch)
