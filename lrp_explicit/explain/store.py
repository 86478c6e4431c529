"""Results that last: explanations written to a folder and read back with :func:`load`.

A record is a folder (by convention named ``*.lrp``) holding two files:

``lrp.json``
    The metadata in JSON: ``"format": "lrp_explicit"``, the ``"kind"`` of result
    (``"explanation"``, ``"batch"``, ``"generation"``), the library ``"version"`` that wrote
    it, and every value of the result that is not a tensor (tokens, ids, target, score, labels,
    model and composite names …).
``tensors.safetensors``
    The tensors (relevance, latent relevance, images) in the `safetensors
    <https://huggingface.co/docs/safetensors>`_ format, exactly as they were (dtype and
    values).

``result.save("run.lrp")`` writes one (:meth:`lrp_explicit.Explanation.save`,
:meth:`lrp_explicit.ExplanationBatch.save`, :meth:`lrp_explicit.GenerationExplanation.save`);
``lrp_explicit.load("run.lrp")`` reads it back as the same kind of object, equal in every
value. Each kind registers a reader (:func:`register_reader`), so that other kinds of folders
can be loaded by the same :func:`load`.
"""
from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import Tensor

__all__ = ["FORMAT", "META", "TENSORS", "SUFFIX", "load", "write", "read", "register_reader",
           "register_folder_reader", "library_version", "jsonable"]

#: The ``"format"`` entry of every record's metadata.
FORMAT = "lrp_explicit"
#: File name of the metadata in a record folder.
META = "lrp.json"
#: File name of the tensors in a record folder.
TENSORS = "tensors.safetensors"
#: The suffix of record folders (``save`` writes a record for a path with this suffix).
SUFFIX = ".lrp"

#: kind → reader(meta, tensors) returning the result object.
_READERS: dict[str, Callable[[dict[str, Any], dict[str, Tensor]], Any]] = {}
#: metadata file name → reader(folder) of other kinds of folders (a dataset run's
#: ``lrp_run.json``: :func:`lrp_explicit.runs.load_run`).
_FOLDER_READERS: dict[str, Callable[[Path], Any]] = {}


def library_version() -> str:
    """The version of lrp_explicit that is running."""
    root = sys.modules.get("lrp_explicit")
    version = getattr(root, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("lrp-explicit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def register_reader(kind: str, reader: Callable[[dict[str, Any], dict[str, Tensor]], Any]
                    ) -> None:
    """Make :func:`load` read records of ``kind`` with ``reader(meta, tensors)``.

    Parameters
    ----------
    kind : str
        The ``"kind"`` entry of the record's metadata.
    reader : callable
        Takes the metadata (a dict) and the tensors (a dict of name to tensor) and returns the
        result object.
    """
    _READERS[kind] = reader


def register_folder_reader(name: str, reader: Callable[[Path], Any]) -> None:
    """Make :func:`load` read a folder holding a file ``name`` with ``reader(folder)`` (how
    :mod:`lrp_explicit.runs` loads a dataset run).

    Parameters
    ----------
    name : str
        The metadata file that marks such a folder.
    reader : callable
        Takes the folder and returns the result object.
    """
    _FOLDER_READERS[name] = reader


def jsonable(value: Any) -> Any:
    """``value`` as JSON data: tuples as lists, tensors and numpy numbers as Python numbers or
    lists, mapping keys as strings, anything else that JSON cannot hold as its ``repr``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value  # NaN and infinities too: Python's json writes and reads them
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return jsonable(value.tolist())
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            pass
    return repr(value)


def write(path: str | Path, kind: str, meta: Mapping[str, Any],
          tensors: Mapping[str, Tensor]) -> Path:
    """Write a record folder.

    Parameters
    ----------
    path : path-like
        The folder; created if missing. An existing folder must be empty or a record (it is
        overwritten).
    kind : str
        The kind of result (for :func:`load`).
    meta : mapping
        JSON-ready metadata.
    tensors : mapping of str to Tensor
        Saved with safetensors (copied to the CPU, contiguous).

    Returns
    -------
    Path
        The folder.

    Raises
    ------
    ValueError
        If ``path`` is a file, or a folder with other files than a record's.
    """
    from safetensors.torch import save_file

    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; a record is a folder (e.g. result.lrp)")
    if folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if p.name not in (META, TENSORS))
        if others:
            raise ValueError(f"{folder} holds other files ({', '.join(others[:3])}); write the "
                             "record into a new or empty folder")
    folder.mkdir(parents=False, exist_ok=True)
    data = {"format": FORMAT, "kind": kind, "version": library_version(), **meta}
    # a copy of each tensor: safetensors refuses tensors that share memory
    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()},
              str(folder / TENSORS), metadata={"format": FORMAT, "kind": kind})
    (folder / META).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n",
                               encoding="utf-8")
    return folder


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The metadata and tensors of a record folder.

    Raises
    ------
    FileNotFoundError
        If there is no such folder.
    ValueError
        If the folder is not a record of lrp_explicit.
    """
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"no record at {folder}")
    if not folder.is_dir() or not (folder / META).is_file():
        raise ValueError(f"{folder} is not a record of lrp_explicit (a folder with {META} and "
                         f"{TENSORS}, written by result.save('name{SUFFIX}'))")
    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{folder / META} is not the metadata of an lrp_explicit record")
    tensors = load_file(str(folder / TENSORS)) if (folder / TENSORS).is_file() else {}
    return meta, tensors


def load(path: str | Path) -> Any:
    """Read a result written by ``result.save(path)``.

    Parameters
    ----------
    path : path-like
        A record folder (``*.lrp``), or the folder of a dataset run
        (:func:`lrp_explicit.explain_dataset`).

    Returns
    -------
    Explanation, ExplanationBatch, GenerationExplanation or datasets.Dataset
        The same kind of object that was saved, equal in every value (tensors with their
        dtype, tokens, ids, target, score, labels, latent relevance, model and composite
        names, and the library version that computed it); for a dataset run its rows
        (:func:`lrp_explicit.runs.load_run`).

    Raises
    ------
    FileNotFoundError
        If there is no such folder.
    ValueError
        If the folder is not a record, or of a kind this version cannot read.
    """
    folder = Path(path).expanduser()
    for name, folder_reader in _FOLDER_READERS.items():
        if folder.is_dir() and (folder / name).is_file():
            return folder_reader(folder)
    meta, tensors = read(path)
    kind = meta.get("kind")
    reader = _READERS.get(str(kind))
    if reader is None:
        raise ValueError(f"{path}: a record of kind {kind!r}, which this version "
                         f"({library_version()}) cannot read; kinds: {', '.join(sorted(_READERS))}")
    return reader(meta, tensors)
