"""Explanations of a whole dataset: :func:`explain_dataset` writes one row per sample as parquet
shards into a folder, resumes where a killed run stopped, and runs unchanged on several
processes (``torchrun``, ``accelerate launch``).

A run folder holds

``lrp_run.json``
    The run's metadata: model, task, composite, ε, the fields read, the contrast, the batch
    size, the library version (:data:`META`).
``rows-SSSSSSSSS-EEEEEEEEE.parquet``
    One shard per batch: the rows of the samples ``SSSSSSSSS ≤ row < EEEEEEEEE`` of the data
    that it explained. A shard is written under a temporary name and then renamed
    (``os.replace``), so a folder never holds a partial shard: a run killed at any moment loses
    at most the batch in flight.

Each row has the columns ``id`` (the ``id_field``'s value, else the row number), ``row`` (the
position in the data), ``tokens``, ``ids``, ``relevance`` (one value per token), ``words``,
``word_relevance`` and ``special`` (with a tokenizer), ``target``, ``label``, ``score``,
``prediction``, ``contrast``, ``position`` (the explained token position of a language model),
and the data fields named in ``keep``. With ``generate=N`` a row is one generation:
``relevance`` is the matrix ``(generated, tokens)`` of
:class:`~lrp_explicit.GenerationExplanation`, ``target`` the generated ids, ``label``,
``score`` and ``probabilities`` one entry per generated token, and ``prompt_length``.

:func:`load_run` (and :func:`lrp_explicit.load` on the folder) reads the rows back as a
``datasets.Dataset`` in the order of the data.

**Processes.** The batches still to do are split between the processes with accelerate's
``PartialState.split_between_processes`` (``torch.distributed`` with gloo on CPU, nccl on
GPUs, as ``torchrun`` or ``accelerate launch`` set it up): each process explains a contiguous
share of the batches and writes its own shards. The batches are the same for any number of
processes (batch ``j`` holds the unfinished rows ``j·B ≤ row < (j+1)·B``), so every row is
computed exactly as in a one-process run.

Every explanation is a call of :func:`lrp_explicit.explain` on one batch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .composites import Composite
from .explain import ExplanationBatch, explain
from .explain.common import model_name
from .explain.store import jsonable, library_version, register_folder_reader
from .functional import default_epsilon
from .pipeline import progress as show_progress
from .pipeline import resolve_composite, task_of

__all__ = ["explain_dataset", "load_run", "read_data", "run_metadata", "RowError", "META",
           "FORMATS", "RESERVED", "fingerprint", "process_state", "process_gpus",
           "add_arguments", "run_command"]

#: File name of a run folder's metadata.
META = "lrp_run.json"
#: Data formats read by :func:`read_data`, by file suffix.
FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv",
           ".parquet": "parquet", ".pq": "parquet"}
_SHARD = re.compile(r"^rows-(\d{9})-(\d{9})\.parquet$")
_TEMPORARY = ".tmp-"
#: The lock file of a run folder: held (``flock``) by the run writing into it.
LOCK = ".lrp_run.lock"
#: Metadata entries that must agree between a run folder and a rerun into it.
_SETTINGS = ("model", "model_class", "task", "dtype", "composite", "epsilon", "text_field",
             "target_field", "contrast", "continuation", "generate", "generation_kwargs",
             "position", "id_field", "keep")
#: The columns a run computes; a data field of the same name given in ``keep`` is stored as
#: ``data.<name>`` (never over a computed column).
RESERVED = frozenset({"id", "row", "tokens", "ids", "relevance", "words", "word_relevance",
                      "special", "target", "label", "score", "prediction", "contrast",
                      "position", "prompt_length", "probabilities"})
#: The hidden column of the shards: a hash of the data each row was explained from.
_INPUT = "_input_sha256"


class RowError(ValueError):
    """A sample of the data that cannot be explained; the message names its row (counted from
    0, as in the ``datasets.Dataset``) and its id.

    Attributes
    ----------
    row : int
        Position of the sample in the data.
    id : Any
        Its id.
    """

    def __init__(self, row: int, id: Any, message: str) -> None:
        self.row, self.id = row, id
        name = f"row {row}" if id == row else f"row {row} (id {id!r})"
        super().__init__(f"{name}: {' '.join(str(message).split())}")


# ============================================================================ processes


class _OneProcess:
    """The process state of a run without ``torch.distributed`` (accelerate not installed)."""

    process_index = 0
    local_process_index = 0
    num_processes = 1
    is_main_process = True
    is_local_main_process = True
    device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        """Nothing to wait for."""

    @contextlib.contextmanager
    def split_between_processes(self, items: list[Any]) -> Iterator[list[Any]]:
        yield items

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        yield


def process_state() -> Any:
    """accelerate's ``PartialState``: this process's rank among those that ``torchrun`` or
    ``accelerate launch`` started (``torch.distributed`` initialised with gloo where no
    accelerator is available, nccl on GPUs), or the one process of a plain run.

    Raises
    ------
    ImportError
        If several processes were started (``WORLD_SIZE`` > 1) and accelerate is not installed.
    """
    try:
        from accelerate import PartialState
    except ImportError:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ImportError("a run on several processes needs accelerate: pip install "
                              "accelerate (or lrp-explicit[data])") from None
        return _OneProcess()
    return PartialState(cpu=not torch.accelerator.is_available())


# ============================================================================ data


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    import datasets

    logging = datasets.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield datasets
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def read_data(data: Any, format: str | None = None) -> Any:
    """The samples as a ``datasets.Dataset``.

    Parameters
    ----------
    data : path-like, datasets.Dataset, list of dict or dict of lists
        A JSON lines, CSV or parquet file (read with ``datasets.load_dataset``), a
        ``datasets.Dataset``, a list of rows or a dict of columns.
    format : {"json", "csv", "parquet"}, optional
        The file format; default: from the suffix (:data:`FORMATS`).

    Returns
    -------
    datasets.Dataset

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        For a file that cannot be read (the message says where, e.g. the row of a JSON
        error), an unknown format, or a ``DatasetDict`` (choose a split).
    """
    with _quiet_datasets() as datasets:
        if isinstance(data, datasets.Dataset):
            return data
        if isinstance(data, datasets.DatasetDict):
            raise ValueError(f"data is a DatasetDict with splits {sorted(data)}; pass one "
                             "split, e.g. data['train']")
        if isinstance(data, Mapping):
            return datasets.Dataset.from_dict(dict(data))
        if isinstance(data, list):
            return datasets.Dataset.from_list(data)
        if not isinstance(data, (str, os.PathLike)):
            raise TypeError(f"data must be a file, a datasets.Dataset, a list of rows or a dict "
                            f"of columns, not {type(data).__name__}")
        path = Path(data).expanduser()
        kind = format or FORMATS.get(path.suffix.lower())
        if kind not in set(FORMATS.values()):
            raise ValueError(f"{path}: unknown data format {kind or path.suffix!r}; use one of "
                             f"{', '.join(sorted(FORMATS))} files or give the format (json, "
                             "csv, parquet)")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: the file is empty (no rows)")
        try:
            with _offline():
                table = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as err:  # noqa: BLE001 - any failure of the reader is one line
            cause = err.__cause__ if err.__cause__ is not None else err
            raise ValueError(f"{path}: cannot read it as {kind}: "
                             f"{' '.join(str(cause).split()) or type(cause).__name__}") from err
        if len(table) == 0:
            raise ValueError(f"{path}: no rows")
        return table


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """``datasets`` and ``huggingface_hub`` offline and without telemetry while a local file
    is read: no request leaves the machine."""
    import datasets.config
    import huggingface_hub.constants as hub

    settings = [(datasets.config, "HF_HUB_OFFLINE", True),
                (datasets.config, "HF_DATASETS_OFFLINE", True),
                (hub, "HF_HUB_OFFLINE", True), (hub, "HF_HUB_DISABLE_TELEMETRY", True)]
    before = [(owner, name, getattr(owner, name)) for owner, name, _ in settings
              if hasattr(owner, name)]
    for owner, name, value in settings:
        if hasattr(owner, name):
            setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in before:
            setattr(owner, name, value)


def _check_fields(data: Any, fields: dict[str, str | None], where: str) -> None:
    have = list(data.column_names)
    for option, field in fields.items():
        if field is not None and field not in have:
            raise ValueError(f"{where}: no field {field!r} for {option} (fields: "
                             f"{', '.join(have)})")


def _ids(data: Any, id_field: str | None) -> list[Any]:
    if id_field is None:
        return list(range(len(data)))
    ids = list(data[id_field])
    seen: dict[Any, int] = {}
    for row, value in enumerate(ids):
        if value is None or isinstance(value, bool) or not isinstance(value, (int, str)):
            raise RowError(row, row, f"id field {id_field!r} is {value!r}; ids are ints or "
                           "strings")
        if value in seen:
            raise RowError(row, value, f"id {value!r} repeats row {seen[value]}; ids must be "
                           "unique")
        seen[value] = row
    if len({type(v) for v in ids}) > 1:
        raise ValueError(f"id field {id_field!r} mixes ints and strings")
    return ids


def _check_row(row: int, id: Any, text: Any, target: Any, text_field: str,
               target_field: str | None, size: int | None) -> None:
    """The checks that need no model: a text (or token ids), and a target if one is read."""
    if text is None:
        raise RowError(row, id, f"field {text_field!r} is missing")
    if isinstance(text, str):
        if not text.strip():
            raise RowError(row, id, f"field {text_field!r} is an empty text")
    elif isinstance(text, list):
        if not text:
            raise RowError(row, id, f"field {text_field!r} is an empty list of token ids")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in text):
            raise RowError(row, id, f"field {text_field!r} must be a text or a list of token "
                           "ids")
    else:
        raise RowError(row, id, f"field {text_field!r} is a {type(text).__name__}, not a text")
    if target_field is None:
        return
    if target is None or (isinstance(target, str) and not target):
        raise RowError(row, id, f"field {target_field!r} is missing")
    if isinstance(target, int) and not isinstance(target, bool) and size is not None \
            and not 0 <= target < size:
        raise RowError(row, id, f"target {target} is not one of the model's {size} outputs")


def _outputs(model: nn.Module, task: str | None) -> int | None:
    """The number of logits of the explained head (vocabulary or classes), if known."""
    config = getattr(model, "config", None)
    if task in ("causal-lm", "masked-lm"):
        head = getattr(model, "get_output_embeddings", lambda: None)()
        weight = getattr(head, "weight", None)
        return int(weight.shape[0]) if weight is not None else getattr(config, "vocab_size",
                                                                       None)
    return getattr(config, "num_labels", None) if task == "classification" else None


# ============================================================================ the folder


def _shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _SHARD.match(p.name)) if folder.is_dir() \
        else []


def _read_shard(path: Path, columns: list[str] | None = None) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable shard ({' '.join(str(err).split())}); move it "
                         "away to explain its rows again") from err


def _finished(folder: Path) -> dict[Any, str | None]:
    """The ids of the rows written so far, each with the hash of its data."""
    done: dict[Any, str | None] = {}
    for path in _shards(folder):
        table = _read_shard(path)
        ids = table.column("id").to_pylist()
        hashes = table.column(_INPUT).to_pylist() if _INPUT in table.column_names \
            else [None] * len(ids)
        done.update(zip(ids, hashes))
    return done


def _write_atomic(path: Path, write: Any) -> None:
    """``write(temporary path)``, then rename it to ``path`` (never a partial file)."""
    tmp = path.with_name(f"{_TEMPORARY}{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def run_metadata(source: str | os.PathLike | Any) -> dict[str, Any]:
    """The metadata of a run: of a run folder's :data:`META`, or of a dataset returned by
    :func:`load_run` (kept in its ``info.description``).

    Raises
    ------
    ValueError
        If ``source`` is neither.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser() / META
        if not path.is_file():
            raise ValueError(f"{Path(source)} is not a run folder of explain_dataset (no {META})")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not readable JSON ({' '.join(str(err).split())}); the "
                             "run's metadata is damaged (force_new=True / --force-new starts "
                             "afresh)") from err
        if not isinstance(meta, dict) or meta.get("kind") != "dataset":
            raise ValueError(f"{path} is not the metadata of an explain_dataset run")
        return meta
    info = getattr(source, "info", None)
    text = getattr(info, "description", None) or ""
    try:
        meta = json.loads(text)
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("kind") != "dataset":
        raise ValueError("no run metadata: give a run folder or a dataset from load_run")
    return meta


def _check_settings(folder: Path, meta: dict[str, Any]) -> None:
    """Refuse to resume a run whose settings or fingerprint (model weights and config,
    adapters, tokenizer, generation settings) differ, naming what changed."""
    if not (folder / META).is_file():
        return
    old = run_metadata(folder)
    if "fingerprint" not in old:
        raise ValueError(f"{folder} holds a run written by lrp_explicit {old.get('version')} "
                         "without a fingerprint of its model and data, so a resumed run "
                         "cannot be checked against it; start afresh with force_new=True "
                         "(--force-new) or use another folder")
    changed = [f"{k}: {old.get(k)!r} → {meta.get(k)!r}" for k in _SETTINGS
               if old.get(k) != meta.get(k)]
    then, now = old.get("fingerprint") or {}, meta["fingerprint"]
    changed += [f"{k} changed ({str(then.get(k))[:12]} → {str(now.get(k))[:12]})"
                for k in now if then.get(k) != now.get(k)]
    if changed:
        raise ValueError(f"{folder} holds a run with other settings ({'; '.join(changed)}); "
                         "rerun with the same model, data and settings to resume it, start "
                         "afresh with force_new=True (--force-new), or use another folder")


def _check_inputs(folder: Path, done: dict[Any, str | None], ids: list[Any],
                  hashes: list[str]) -> None:
    """Refuse to resume when a finished row's data (text, target, kept fields) differs from
    the data given now: the old rows would keep the old texts."""
    position = {value: row for row, value in enumerate(ids)}
    for value, old in done.items():
        row = position.get(value)
        if row is None:
            raise ValueError(f"{folder} holds rows of ids the data lacks (id {value!r}); the "
                             "data changed: start afresh with force_new=True (--force-new) or "
                             "use another folder")
        if old != hashes[row]:
            name = f"row {row}" if value == row else f"row {row} (id {value!r})"
            raise ValueError(f"{folder}: the data of {name} differs from the data it was "
                             "explained from (its text, target or kept fields changed); start "
                             "afresh with force_new=True (--force-new) or use another folder")


def _sha(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _weights_hash(model: nn.Module, samples: int = 256) -> str:
    """Every parameter's name, shape and dtype, and ``samples`` of its values spread evenly
    over it (a cheap fingerprint: two trainings of one architecture differ in it)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters(remove_duplicate=False):
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            if param.is_meta or param.numel() == 0:
                continue
            flat = param.detach().reshape(-1)
            index = torch.linspace(0, flat.numel() - 1, min(flat.numel(), samples),
                                   device=flat.device).long()
            digest.update(flat[index].to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()


def _config_hash(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        data = {k: v for k, v in to_dict().items()
                if k not in ("_name_or_path", "transformers_version", "_commit_hash")}
        return _sha(type(model).__qualname__, json.dumps(jsonable(data), sort_keys=True))
    return _sha(type(model).__qualname__, repr(model))


def _adapters_hash(model: nn.Module) -> str:
    peft = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapters", None)
    if callable(active):
        try:
            active = active()
        except (ValueError, RuntimeError):
            active = None
    return _sha(json.dumps(jsonable({k: getattr(v, "to_dict", lambda v=v: repr(v))()
                                     for k, v in (peft or {}).items()}), sort_keys=True),
                jsonable(active))


def _tokenizer_hash(tokenizer: Any) -> str | None:
    if tokenizer is None:
        return None
    vocab = getattr(tokenizer, "get_vocab", None)
    items = sorted(vocab().items()) if callable(vocab) else []
    special = getattr(tokenizer, "special_tokens_map", None)
    return _sha(type(tokenizer).__qualname__, json.dumps(items, ensure_ascii=False),
                json.dumps(jsonable(special), sort_keys=True),
                getattr(tokenizer, "padding_side", None))


def fingerprint(model: nn.Module, tokenizer: Any = None,
                generate: int | None = None) -> dict[str, str | None]:
    """The identity of a model for a dataset run: hashes of its config, its weights (names,
    shapes and sampled values of every parameter), its adapters, the tokenizer's vocabulary
    and special tokens, and (with ``generate``) the model's generation config.

    Returns
    -------
    dict of str to str
        ``{"model config", "model weights", "adapters", "tokenizer", "generation config"}``.
    """
    generation = getattr(model, "generation_config", None) if generate is not None else None
    diff = getattr(generation, "to_diff_dict", None)
    return {"model config": _config_hash(model), "model weights": _weights_hash(model),
            "adapters": _adapters_hash(model), "tokenizer": _tokenizer_hash(tokenizer),
            "generation config": None if not callable(diff) else _sha(json.dumps(jsonable(
                {k: v for k, v in diff().items() if k != "transformers_version"}),
                sort_keys=True))}


def _input_hashes(texts: list[Any], targets: list[Any], kept: dict[str, list[Any]]
                  ) -> list[str]:
    """A hash per row of the data it is explained from (text, target, kept fields)."""
    names = sorted(kept)
    return [_sha(json.dumps(jsonable([texts[r], targets[r], *[kept[k][r] for k in names]]),
                            ensure_ascii=False, sort_keys=True))
            for r in range(len(texts))]


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the run folder's lock file for a run (an OS lock, released also when the process
    is killed); another run into the folder is refused while it is held."""
    try:
        import fcntl
    except ImportError:  # no flock: a lock file created exclusively, removed at the end
        fcntl = None
    path = folder / LOCK
    owner = f"process {os.getpid()} on {socket.gethostname()}"
    if fcntl is None:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise ValueError(f"{folder} is in use by another run ({_lock_owner(path)}); wait "
                             f"for it to end, or delete {path} if that run is gone") from None
        os.write(fd, owner.encode())
        os.close(fd)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
        return
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ValueError(f"{folder} is in use by another run ({_lock_owner(path)}); wait "
                             "for it to end or use another folder") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by the run that held it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, owner.encode())
        yield
    finally:
        try:
            path.unlink(missing_ok=True)  # still holding the lock: no one else has it
        finally:
            os.close(fd)


def _lock_owner(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "unknown process"
    except OSError:
        return "unknown process"


def _remove_run(folder: Path) -> None:
    """Delete a run's own files (metadata, shards, temporary shards) for ``force_new``."""
    for path in folder.iterdir():
        if path.name == META or _SHARD.match(path.name) or path.name.startswith(_TEMPORARY):
            path.unlink()


def _stale(path: Path) -> bool:
    """A temporary shard whose writer is gone (its process id is in the name)."""
    pid = path.name[len(_TEMPORARY):].split("-", 1)[0]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return int(pid) == os.getpid()


def load_run(folder: str | os.PathLike) -> Any:
    """The rows of a run folder, in the order of the data.

    Parameters
    ----------
    folder : path-like
        A folder written by :func:`explain_dataset` (finished or not: the rows done so far).

    Returns
    -------
    datasets.Dataset
        One row per explained sample (columns: see :mod:`lrp_explicit.runs`); the run's
        metadata is in :func:`run_metadata` of it.

    Raises
    ------
    ValueError
        If the folder is not a run folder or a shard is unreadable.
    """
    import pyarrow as pa

    path = Path(folder).expanduser()
    meta = run_metadata(path)
    tables = [_read_shard(p) for p in _shards(path)]
    with _quiet_datasets() as datasets:
        info = datasets.DatasetInfo(description=json.dumps(meta))
        if not tables:
            return datasets.Dataset.from_dict({"id": [], "row": []}, info=info)
        table = pa.concat_tables(tables, promote_options="permissive").sort_by("row")
        if _INPUT in table.column_names:
            table = table.drop_columns([_INPUT])
        return datasets.Dataset(table.replace_schema_metadata(None), info=info)


def _load_folder(folder: Path) -> Any:
    return load_run(folder)


register_folder_reader(META, _load_folder)


# ============================================================================ rows


def _relevance_type(tensor: torch.Tensor) -> Any:
    import pyarrow as pa

    return pa.float64() if tensor.dtype == torch.float64 else pa.float32()


def _position(e: Any, task: str | None, position: int | None, tokenizer: Any) -> int | None:
    """The token position whose logits were explained (language models)."""
    if task not in ("causal-lm", "masked-lm") or e.tokens is None or isinstance(e.target, list):
        return None
    n = len(e.tokens)
    if position is not None:
        return position % n
    if task == "causal-lm":
        return n - 1
    mask = getattr(tokenizer, "mask_token_id", None)
    return e.ids.index(mask) if e.ids is not None and mask in e.ids else None


def _rows(results: list[Any], rows: list[int], ids: list[Any], data: Any,
          keep: dict[str, list[Any]],
          task: str | None, position: int | None, tokenizer: Any, generate: bool,
          id_type: Any, hashes: list[str] | None = None) -> Any:
    """One parquet table for the explained samples of a batch."""
    import pyarrow as pa

    floats = _relevance_type(results[0].relevance)
    strings, ints = pa.list_(pa.string()), pa.list_(pa.int64())
    columns: dict[str, Any] = {
        "id": pa.array([ids[r] for r in rows], type=id_type),
        "row": pa.array(rows, type=pa.int64()),
        "tokens": pa.array([e.tokens for e in results], type=strings),
        "ids": pa.array([e.ids for e in results], type=ints),
    }
    if generate:
        matrix = pa.list_(pa.list_(floats))
        columns.update(
            relevance=pa.array([e.relevance.double().tolist() for e in results], type=matrix),
            prompt_length=pa.array([e.prompt_length for e in results], type=pa.int64()),
            target=pa.array([e.generated for e in results], type=ints),
            label=pa.array([e.labels for e in results], type=strings),
            score=pa.array([e.scores for e in results], type=pa.list_(pa.float64())),
            probabilities=pa.array([e.probabilities for e in results],
                                   type=pa.list_(pa.float64())))
        if tokenizer is not None:
            columns.update(
                words=pa.array([e.words for e in results], type=strings),
                word_relevance=pa.array([e.word_relevance.double().tolist() for e in results],
                                        type=matrix),
                special=pa.array([e.special for e in results], type=pa.list_(pa.bool_())))
    else:
        continuation = any(isinstance(e.target, list) for e in results)
        columns.update(
            relevance=pa.array([e.relevance.double().tolist() for e in results],
                               type=pa.list_(floats)),
            target=pa.array([e.target for e in results], type=ints if continuation
                            else pa.int64()),
            label=pa.array([e.label for e in results], type=pa.string()),
            score=pa.array([e.score for e in results], type=pa.float64()),
            prediction=pa.array([e.prediction for e in results], type=pa.int64()),
            contrast=pa.array([e.contrast if isinstance(e.contrast, int) else None
                               for e in results], type=pa.int64()),
            position=pa.array([_position(e, task, position, tokenizer) for e in results],
                              type=pa.int64()))
        if tokenizer is not None:
            columns.update(
                words=pa.array([e.words for e in results], type=strings),
                word_relevance=pa.array([e.word_relevance.double().tolist() for e in results],
                                        type=pa.list_(floats)),
                special=pa.array([e.special for e in results], type=pa.list_(pa.bool_())))
    for name, values in keep.items():
        kind = data.data.schema.field(name).type
        columns[_kept_column(name)] = pa.array([values[r] for r in rows], type=kind)
    if hashes is not None:
        columns[_INPUT] = pa.array([hashes[r] for r in rows], type=pa.string())
    return pa.table(columns)


def _kept_column(name: str) -> str:
    """The column of a kept data field: its name, or ``data.<name>`` for a computed column's."""
    return f"data.{name}" if name in RESERVED or name.startswith("_") else name


# ============================================================================ the run


def explain_dataset(model: nn.Module, data: Any, output: str | os.PathLike, *,
                    tokenizer: Any = None, text_field: str = "text",
                    target_field: str | None = None, contrast: Any = None,
                    composite: str | Composite = "attnlrp", batch_size: int = 8,
                    id_field: str | None = None, keep: Sequence[str] = (),
                    position: int | None = None, continuation: bool = False,
                    generate: int | None = None,
                    generation_kwargs: Mapping[str, Any] | None = None,
                    format: str | None = None, progress: bool | None = None,
                    force_new: bool = False) -> Any:
    """Explain every sample of a dataset and write the rows as parquet shards into ``output``.

    Each batch of ``batch_size`` samples is one call of :func:`lrp_explicit.explain` (one
    forward and one backward pass), and its rows are written as one shard (under a temporary
    name, then renamed). A rerun into the same folder skips the samples already written, so a
    run killed at any moment loses at most the batch in flight. Started by ``torchrun`` or
    ``accelerate launch``, each process explains its share of the batches (accelerate's
    ``PartialState.split_between_processes``); the rows are the same as those of one process.

    Parameters
    ----------
    model : nn.Module
        The model, on the device it runs on (in a distributed run: this process's device,
        ``PartialState().device``, or a ``device_map`` of its own).
    data : path-like, datasets.Dataset, list of dict or dict of lists
        JSON lines, CSV or parquet file, or the samples themselves (:func:`read_data`).
    output : path-like
        The run folder (created if missing).
    tokenizer : tokenizer, optional
        Needed for text, and for the ``words`` of each row.
    text_field : str
        The field holding each sample's text (or a list of token ids).
    target_field : str, optional
        The field holding each sample's target (a token or class id, a token, a label name, or
        a continuation with ``continuation=True``); default: the model's prediction.
    contrast : int or str, optional
        A contrast for every sample (a token or class, or ``"softmax"``; see
        :func:`lrp_explicit.explain`).
    composite : str or Composite
        ``"attnlrp"``, ``"cp-lrp"`` or a :class:`~lrp_explicit.Composite`.
    batch_size : int
        Samples per forward and backward pass, and per shard.
    id_field : str, optional
        A field with a unique id (int or str) per sample; default: the row number.
    keep : sequence of str
        Fields of the data copied into the rows (e.g. a ground truth for
        :func:`lrp_explicit.evaluate`). A field named like a computed column (``label``,
        ``target``, ``score``, ``tokens`` …: :data:`RESERVED`) is stored as ``data.<name>``.
    position : int, optional
        Token position of a per-token output, as in :func:`lrp_explicit.explain`.
    continuation : bool
        The targets of a causal LM are continuations (their summed logits are explained).
    generate : int, optional
        Let a causal LM generate this many tokens after each text and explain each one.
    generation_kwargs : mapping, optional
        More arguments of ``model.generate``.
    format : {"json", "csv", "parquet"}, optional
        The format of a data file (default: from its suffix).
    progress : bool, optional
        Show a progress bar (default: on the main process).
    force_new : bool
        Delete a run already in ``output`` (its metadata and shards) and start afresh, instead
        of resuming it.

    Returns
    -------
    datasets.Dataset
        All rows of the folder (:func:`load_run`), on every process once all are done.

    Raises
    ------
    RowError
        For a sample that cannot be explained (missing field, empty text, a target the model
        does not have …): one line naming its row and id. The shards written before stay.
    ValueError
        For an unreadable data file, a missing field, duplicate ids, a folder holding a run
        with other settings, another model (config, weights, adapters), another tokenizer or
        generation config, or other data for rows it has finished (the message names what
        changed), or a folder another run is writing into (its lock file is held).

    Notes
    -----
    A run's identity is its settings and :func:`fingerprint` (in the metadata) and a hash of
    each finished row's data (text, target and kept fields, in a hidden column of the shards).
    Resuming with any of them changed is refused; new rows appended to the data are explained.
    """
    import pyarrow as pa

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if generate is not None and (isinstance(generate, bool) or not isinstance(generate, int)
                                 or generate < 1):
        raise ValueError(f"generate must be a positive int, got {generate!r}")
    limit = _max_positions(model)
    if generate is not None and limit is not None and generate >= limit:
        raise ValueError(f"generate={generate} does not fit the model's {limit} positions")
    keep = [keep] if isinstance(keep, str) else list(keep)
    columns = [_kept_column(k) for k in keep]
    if len(set(columns)) != len(columns):
        raise ValueError(f"keep names a column twice ({', '.join(keep)}; fields named like a "
                         "computed column are stored as data.<name>)")
    state = process_state()
    with state.main_process_first():
        table = read_data(data, format)
    where = str(data) if isinstance(data, (str, os.PathLike)) else "data"
    _check_fields(table, {"text_field": text_field, "target_field": target_field,
                          "id_field": id_field, **{f"keep {k!r}": k for k in keep}}, where)
    ids = _ids(table, id_field)
    id_type = pa.string() if ids and isinstance(ids[0], str) else pa.int64()
    task = task_of(model)
    comp = resolve_composite(composite, model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    meta = {"format": "lrp_explicit", "kind": "dataset", "version": library_version(),
            "model": model_name(model), "model_class": type(model).__name__, "task": task,
            "dtype": str(dtype).replace("torch.", ""), "composite": comp.name,
            "epsilon": comp.epsilon if comp.epsilon is not None else default_epsilon(dtype),
            "text_field": text_field, "target_field": target_field,
            "contrast": contrast, "continuation": continuation, "generate": generate,
            "generation_kwargs": dict(generation_kwargs) if generation_kwargs else None,
            "position": position, "id_field": id_field, "keep": keep,
            "batch_size": batch_size, "data": where, "rows": len(table),
            "data_fields": [f for f in (text_field, target_field, id_field, *keep)
                            if f is not None],
            "fingerprint": fingerprint(model, tokenizer, generate)}
    if isinstance(data, (str, os.PathLike)):
        stat = Path(data).expanduser().stat()
        meta.update(data_size=stat.st_size, data_mtime_ns=stat.st_mtime_ns)
    meta = json.loads(json.dumps(jsonable(meta)))  # as it reads back from lrp_run.json
    folder = Path(output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; the output is a folder")
    others = sorted(p.name for p in folder.iterdir() if p.name not in (META, LOCK)
                    and not _SHARD.match(p.name) and not p.name.startswith(_TEMPORARY)) \
        if folder.is_dir() else []
    if others:
        raise ValueError(f"{folder} holds other files ({', '.join(others[:3])}); give a new or "
                         "empty folder, or a run folder to resume")
    texts = list(table[text_field])
    targets = list(table[target_field]) if target_field is not None else [None] * len(table)
    kept = {name: list(table[name]) for name in keep}
    hashes = _input_hashes(texts, targets, kept)
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder) if state.is_main_process else contextlib.nullcontext():
        if force_new:
            if state.is_main_process:
                _remove_run(folder)
            state.wait_for_everyone()
        return _run(model, folder, meta, table, ids, id_type, texts, targets, kept, hashes,
                    task, comp, contrast, state, progress, dict(
                        tokenizer=tokenizer, position=position, continuation=continuation,
                        generate=generate, generation_kwargs=generation_kwargs),
                    text_field, target_field, batch_size)


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _run(model: nn.Module, folder: Path, meta: dict[str, Any], table: Any, ids: list[Any],
         id_type: Any, texts: list[Any], targets: list[Any], kept: dict[str, list[Any]],
         hashes: list[str], task: str | None, comp: Composite, contrast: Any, state: Any,
         progress: bool | None, options: dict[str, Any], text_field: str,
         target_field: str | None, batch_size: int) -> Any:
    """The checks against the folder and the explanations, with the folder's lock held."""
    _check_settings(folder, meta)
    done = _finished(folder)
    _check_inputs(folder, done, ids, hashes)
    size = _outputs(model, task)
    pending = [r for r in range(len(table)) if ids[r] not in done]
    for r in pending:
        _check_row(r, ids[r], texts[r], targets[r], text_field, target_field, size)
    batches: dict[int, list[int]] = {}
    for r in pending:
        batches.setdefault(r // batch_size, []).append(r)
    if state.is_main_process:
        for stale in folder.glob(f"{_TEMPORARY}*"):
            if _stale(stale):
                stale.unlink()  # left by a killed run; no process of this run writes yet
        _write_atomic(folder / META, lambda p: p.write_text(
            json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"))
    state.wait_for_everyone()  # every process has listed the same finished rows
    position, tokenizer, generate = options["position"], options["tokenizer"], options["generate"]
    with state.split_between_processes(sorted(batches.items())) as mine:
        mine = list(mine)
        show = state.is_local_main_process if progress is None else progress
        bar = show_progress(range(sum(len(b) for _, b in mine)), bool(show),
                            desc=f"explain (process {state.process_index})"
                            if state.num_processes > 1 else "explain",
                            total=sum(len(b) for _, b in mine))
        for number, rows in mine:
            results = _explain_rows(model, rows, ids, texts, targets, comp, contrast, options)
            shard = _rows(results, rows, ids, table, kept, task, position, tokenizer,
                          generate is not None, id_type, hashes)
            name = (f"rows-{number * batch_size:09d}-"
                    f"{min((number + 1) * batch_size, len(table)):09d}.parquet")
            _write_shard(folder / name, shard)
            if hasattr(bar, "update"):
                bar.update(len(rows))
        if hasattr(bar, "close"):
            bar.close()
    state.wait_for_everyone()
    return load_run(folder)


def _write_shard(path: Path, table: Any) -> None:
    import pyarrow.parquet as pq

    if path.exists():  # the same batch of rows written twice: never overwrite a shard
        path = path.with_name(f"{path.stem}-{time.time_ns()}{path.suffix}")
        if not _SHARD.match(path.name):
            raise ValueError(f"{path.parent} already holds a shard for rows {path.stem}")
    _write_atomic(path, lambda p: pq.write_table(table, p))


def _explain_rows(model: nn.Module, rows: list[int], ids: list[Any], texts: list[Any],
                  targets: list[Any], comp: Composite, contrast: Any,
                  options: dict[str, Any]) -> list[Any]:
    """One batch through :func:`lrp_explicit.explain`; a failing batch is retried sample by
    sample to name the row that fails."""
    batch_targets = None if options["generate"] is not None else [targets[r] for r in rows]
    try:
        return list(_explain(model, [texts[r] for r in rows], batch_targets, comp, contrast,
                             options))
    except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as err:
        first = err
    for r in rows:
        try:
            _explain(model, [texts[r]], None if batch_targets is None else [targets[r]], comp,
                     contrast, options)
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as err:
            raise RowError(r, ids[r], str(err.args[0]) if isinstance(err, KeyError)
                           and err.args else str(err)) from err
    raise RowError(rows[0], ids[rows[0]], f"the batch of rows {rows[0]}–{rows[-1]} failed: "
                   f"{first}") from first


def _explain(model: nn.Module, inputs: list[Any], targets: list[Any] | None, comp: Composite,
             contrast: Any, options: dict[str, Any]) -> ExplanationBatch:
    out = explain(model, inputs, targets, comp, contrast, options["tokenizer"],
                  position=options["position"], progress=False, batch_size=len(inputs),
                  continuation=options["continuation"], generate=options["generate"],
                  generation_kwargs=options["generation_kwargs"])
    if len(out) != len(inputs):
        raise ValueError(f"{len(inputs)} samples gave {len(out)} explanations")
    return out


# ============================================================================ command line


def add_arguments(parser: Any) -> None:
    """The arguments of ``lrp-explicit explain-dataset``."""
    parser.add_argument("--model", required=True, metavar="PATH_OR_NAME",
                        help="local Hugging Face model folder or hub name")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="JSON lines, CSV or parquet file with one sample per row")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="run folder: parquet shards and lrp_run.json (a rerun resumes)")
    parser.add_argument("--text-field", default="text", metavar="F",
                        help="field holding the text (default: text)")
    parser.add_argument("--target-field", metavar="T",
                        help="field holding the target token, class or label (default: the "
                             "prediction)")
    parser.add_argument("--id-field", metavar="F", help="field with a unique id per sample "
                        "(default: the row number)")
    parser.add_argument("--keep", action="append", default=[], metavar="F",
                        help="copy this data field into the rows (repeatable)")
    parser.add_argument("--contrast", help="contrast token or class for every sample, or "
                        "'softmax'")
    parser.add_argument("--continuation", action="store_true",
                        help="the targets are continuations of a causal LM")
    parser.add_argument("--generate", type=int, metavar="N",
                        help="let a causal LM generate N tokens and explain each")
    parser.add_argument("--position", type=int, help="token position of a per-token output")
    parser.add_argument("--composite", default="attnlrp",
                        help="composite name (default: attnlrp; also cp-lrp)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="samples per pass and per shard (default 8)")
    parser.add_argument("--format", choices=sorted(set(FORMATS.values())),
                        help="data format (default: from the file suffix)")
    parser.add_argument("--device", help="torch device (default: this process's, e.g. "
                        "cuda:LOCAL_RANK under torchrun, else cpu)")
    parser.add_argument("--device-map", metavar="MAP",
                        help="'auto': spread the model over this process's share of the GPUs "
                             "(GPUs / processes per node)")
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"),
                        help="run the model in this dtype (default: as stored)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--force-new", action="store_true",
                        help="delete a run already in the output folder and start afresh "
                             "(default: resume it, if model, data and settings are the same)")


def process_gpus(local_rank: int, local_processes: int, gpus: int) -> list[int]:
    """The GPUs of process ``local_rank`` of ``local_processes`` on a node with ``gpus``:
    an equal contiguous share (for one model spread over several GPUs per process)."""
    if local_processes < 1 or gpus < local_processes:
        raise ValueError(f"{local_processes} processes cannot share {gpus} GPUs")
    share = gpus // local_processes
    return list(range(local_rank * share, (local_rank + 1) * share))


def run_command(args: Any, load_model: Any, load_tokenizer: Any) -> int:
    """Run ``lrp-explicit explain-dataset`` with parsed ``args``.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed arguments (:func:`add_arguments`).
    load_model : callable
        ``load_model(dtype, device, device_map_kwargs)`` returns the model.
    load_tokenizer : callable
        ``load_tokenizer()`` returns the tokenizer.

    Returns
    -------
    int
        0 when every row is written.
    """
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    data = Path(args.data).expanduser()
    if not data.is_file():
        raise ValueError(f"--data {args.data}: no such file")
    state = process_state()
    extra: dict[str, Any] = {}
    device = args.device
    if args.device_map is not None:
        if args.device_map != "auto":
            raise ValueError("--device-map takes 'auto'")
        gpus = torch.cuda.device_count()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        own = process_gpus(state.local_process_index, local, gpus)
        extra = {"device_map": "auto", "max_memory": {
            g: torch.cuda.get_device_properties(g).total_memory for g in own}}
        device = None
    elif device is None:
        device = str(state.device)
    model = load_model(args.dtype, device, extra)
    tokenizer = load_tokenizer()
    rows = explain_dataset(
        model, data, args.output, tokenizer=tokenizer, text_field=args.text_field,
        target_field=args.target_field, contrast=_spec(args.contrast),
        composite=args.composite, batch_size=args.batch_size, id_field=args.id_field,
        keep=args.keep, position=args.position, continuation=args.continuation,
        generate=args.generate, format=args.format,
        progress=False if args.no_progress else None, force_new=args.force_new)
    if state.is_main_process:
        print(f"{len(rows)} rows in {args.output}")
    destroy = getattr(state, "destroy_process_group", None)
    if state.num_processes > 1 and callable(destroy):
        destroy()
    return 0


def _spec(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value
