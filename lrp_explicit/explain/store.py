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

import ctypes
import errno
import importlib.metadata
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import Tensor

__all__ = ["FORMAT", "META", "TENSORS", "SUFFIX", "load", "write", "read", "register_reader",
           "register_folder_reader", "library_version", "jsonable", "check_record"]

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
    lists, mapping keys as strings (int keys stay ints: :func:`write` keeps them, ``json``
    writes them as strings), anything else that JSON cannot hold as its ``repr``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value  # NaN and infinities too: Python's json writes and reads them
    if isinstance(value, Mapping):
        return {k if isinstance(k, int) and not isinstance(k, bool) else str(k): jsonable(v)
                for k, v in value.items()}
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
    """Write a record folder, atomically.

    The record is written into a temporary sibling folder (``.NAME.tmp-…``) and put in place
    by one rename; an existing record is swapped with it in one step (``renameat2`` with
    ``RENAME_EXCHANGE`` on Linux; elsewhere two renames, the old record kept under
    ``.NAME.old-…`` until the new one is in place, where :func:`read` finds it). A reader, or a
    writer killed at any moment, sees the old record or the new one, never a mix.

    Parameters
    ----------
    path : path-like
        The folder; created if missing. An existing folder must be empty or a record (it is
        replaced).
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
        If ``path`` is a file, a symbolic link, or a folder with other files than a record's
        (or whose files are links).
    """
    from safetensors.torch import save_file

    folder = Path(path).expanduser()
    if folder.is_symlink():
        raise ValueError(f"{folder} is a symbolic link; a record is written as a folder of its "
                         "own (links are not followed)")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; a record is a folder (e.g. result.lrp)")
    if not folder.parent.is_dir():
        raise FileNotFoundError(f"{folder.parent}: no such folder")
    if folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if p.name not in (META, TENSORS))
        if others:
            raise ValueError(f"{folder} holds other files ({', '.join(others[:3])}); write the "
                             "record into a new or empty folder")
        links = [p.name for p in folder.iterdir() if p.is_symlink()]
        if links:
            raise ValueError(f"{folder}: {links[0]} is a symbolic link; a record's files are "
                             "its own (links are not followed)")
    _clean_stale(folder)
    data = _tag_int_keys({"format": FORMAT, "kind": kind, "version": library_version(), **meta})
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    tmp = folder.with_name(f".{folder.name}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        # a copy of each tensor: safetensors refuses tensors that share memory
        save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()},
                  str(tmp / TENSORS), metadata={"format": FORMAT, "kind": kind})
        with open(tmp / META, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync(tmp / TENSORS)
        _fsync(tmp)
        _put_in_place(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync(folder.parent)
    return folder


_INT_KEYS = "__int_keys__"  # a mapping whose keys are ints, as a list of [key, value] pairs


def _tag_int_keys(value: Any) -> Any:
    """Mappings whose keys are all ints as ``{"__int_keys__": [[key, value], …]}`` (JSON keys
    are strings; :func:`_untag_int_keys` gives the ints back)."""
    if isinstance(value, Mapping):
        items = {k: _tag_int_keys(v) for k, v in value.items()}
        if items and all(isinstance(k, int) and not isinstance(k, bool) for k in items):
            return {_INT_KEYS: [[k, v] for k, v in items.items()]}
        return {str(k): v for k, v in items.items()}
    if isinstance(value, list):
        return [_tag_int_keys(v) for v in value]
    return value


def _untag_int_keys(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _INT_KEYS in obj and isinstance(obj[_INT_KEYS], list):
        return {int(k): v for k, v in obj[_INT_KEYS]}
    return obj


_TMP = ".tmp-"  # ``.NAME.tmp-PID-…``: a record being written
_OLD = ".old-"  # ``.NAME.old-PID-…``: the record being replaced (where no atomic swap exists)


def _fsync(path: Path) -> None:
    """Flush a file or folder to the disk (where the platform can)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"cannot put the record in place: {os.strerror(code)}", str(b))


def _put_in_place(tmp: Path, folder: Path) -> None:
    """Move the finished record ``tmp`` to ``folder``; an old record there goes in the same
    step (or, without an atomic swap, is kept as ``.NAME.old-…`` until the new one is there).
    ``tmp`` afterwards holds the old record (or nothing) and is removed by the caller."""
    if not folder.exists():
        try:
            os.rename(tmp, folder)
            return
        except OSError:
            if not folder.exists():
                raise
    if _exchange(tmp, folder):
        return
    old = folder.with_name(f".{folder.name}{_OLD}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _leftovers(folder: Path, marker: str) -> list[Path]:
    """Sibling folders ``.NAME{marker}PID-…`` of ``folder``, newest first."""
    prefix = f".{folder.name}{marker}"
    try:
        found = [p for p in folder.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def _clean_stale(folder: Path) -> None:
    """Remove temporary folders of writers of ``folder`` that were killed (their process is
    gone); an old record that a killed writer left without its replacement is put back."""
    for marker in (_TMP, _OLD):
        for stale in _leftovers(folder, marker):
            pid = stale.name[len(folder.name) + 1 + len(marker):].split("-", 1)[0]
            if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
                continue
            if marker == _OLD and not folder.exists():
                os.rename(stale, folder)  # the new record never arrived: the old one is it
            else:
                shutil.rmtree(stale, ignore_errors=True)


def _record_folder(folder: Path) -> Path:
    """``folder``, or where a writer killed between its two renames left the old record."""
    if folder.exists() or folder.is_symlink():
        return folder
    old = _leftovers(folder, _OLD)
    return old[0] if old else folder


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The metadata and tensors of a record folder.

    Raises
    ------
    FileNotFoundError
        If there is no such folder.
    ValueError
        If the folder is not a record of lrp_explicit, or a file of it is unreadable, a link,
        or lacks an entry it needs (the message names the file and the entry).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    named = Path(path).expanduser()
    folder = _record_folder(named)
    if not folder.exists():
        raise FileNotFoundError(f"no record at {named}")
    if folder.is_symlink():
        raise ValueError(f"{named} is a symbolic link; records are read from their own folder")
    if not folder.is_dir() or not (folder / META).is_file():
        raise ValueError(f"{named} is not a record of lrp_explicit (a folder with {META} and "
                         f"{TENSORS}, written by result.save('name{SUFFIX}'))")
    for name in (META, TENSORS):
        if (folder / name).is_symlink():
            raise ValueError(f"{named / name} is a symbolic link; a record's files are its own")
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"),
                          object_hook=_untag_int_keys)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{named / META}: not readable JSON ({' '.join(str(err).split())}); "
                         "the record is damaged") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{named / META} is not the metadata of an lrp_explicit record")
    for key, kind in (("kind", str), ("version", str)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{named / META}: field {key!r} is missing or not a "
                             f"{kind.__name__}")
    if not (folder / TENSORS).is_file():
        raise ValueError(f"{named / TENSORS}: missing; the record is incomplete")
    try:
        tensors = load_file(str(folder / TENSORS))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{named / TENSORS}: unreadable tensors "
                         f"({' '.join(str(err).split())}); the record is damaged") from err
    return meta, tensors


#: The parts of a result made of two explanations (an image–text result's pixels and text).
_PARTS = ("image", "text")


def check_record(result: Any, where: str) -> None:
    """Raise ``ValueError`` if a loaded result contradicts itself: tokens, ids, pieces and the
    relevance's last dimension must agree in length, and relevance must be a float tensor. An
    image–text result is checked part by part (its ``image`` and its ``text``)."""
    items = list(result) if isinstance(result, list) else [result]
    for i, item in enumerate(items):
        label = f"{where} item {i}" if isinstance(result, list) else where
        parts = [(name, getattr(item, name, None)) for name in _PARTS]
        if getattr(item, "relevance", None) is None and all(p is not None for _, p in parts):
            for name, part in parts:
                check_record(part, f"{label} ({name})")
            continue
        relevance = getattr(item, "relevance", None)
        if not isinstance(relevance, Tensor) or not relevance.is_floating_point():
            raise ValueError(f"{label}: tensor 'relevance' is missing or not a float tensor")
        tokens = getattr(item, "tokens", None)
        if tokens is None:
            continue
        n = relevance.shape[-1] if relevance.dim() else 0
        if len(tokens) != n:
            raise ValueError(f"{label}: field 'tokens' has {len(tokens)} entries but "
                             f"'relevance' has {n} per row; the record is inconsistent")
        ids = getattr(item, "ids", None)
        if ids is not None and len(ids) != len(tokens):
            raise ValueError(f"{label}: field 'ids' has {len(ids)} entries for {len(tokens)} "
                             "tokens; the record is inconsistent")


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
        If the folder is not a record, or of a kind this version cannot read, or damaged:
        unreadable JSON or tensors, a missing or mistyped entry, tokens and relevance of
        different lengths (the message names the file and the entry).
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
    try:
        result = reader(meta, tensors)
    except KeyError as err:
        name = err.args[0] if err.args else "?"
        where = TENSORS if isinstance(name, str) and name in _tensor_names(name) else META
        raise ValueError(f"{folder / where}: entry {name!r} is missing; the record is "
                         "incomplete") from err
    except (TypeError, ValueError, AttributeError, IndexError) as err:
        raise ValueError(f"{folder / META}: a field has the wrong type or shape "
                         f"({' '.join(str(err).split())})") from err
    check_record(result, str(folder))
    return result


def _tensor_names(name: str) -> set[str]:
    """``{name}`` if it looks like a tensor's key in a record (``relevance``, ``0/image``,
    ``latent:3`` …), else nothing."""
    base = name.rsplit("/", 1)[-1]
    return {name} if base in ("relevance", "image") or base.startswith(("latent:", "units:")) \
        else set()
