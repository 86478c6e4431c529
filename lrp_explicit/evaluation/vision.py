"""A small synthetic vision task with ground truth for explanations.

Every 32×32 RGB image shows five small glyphs (5×5 pixels) in random colours on a noisy
background, each in its own cell of a 4×4 grid of 8×8 cells at a random offset inside the
cell (so objects never overlap but may sit at any pixel position). Exactly one glyph is a
*target*: its shape (plus, cross, square ring, diamond ring) is the class. The four others are
*distractors*: bars, an L, a block, a diagonal, a T, a pair of dots — strokes that also occur in
the targets, so that the class is only decided by the target's shape. The target's box is the
ground truth of where the evidence is.

:func:`load_model` returns a tiny torchvision ``VisionTransformer`` trained on the task (800
seeded steps on CPU, about 4 minutes on one thread; cached under ``$XDG_CACHE_HOME/lrp_explicit`` or
``~/.cache/lrp_explicit``); :func:`relevance_mass_accuracy` is the faithfulness measure: the
share of positive relevance that falls inside the target's box (Arras et al., 2022). A random
heatmap scores the box's share of the image, :data:`RANDOM_BASELINE` (25 / 1024 ≈ 2.4 %).

Examples
--------
>>> from lrp_explicit.evaluation import vision as vt
>>> images, labels, boxes = vt.make_batch(8, seed=0)
>>> model = vt.load_model()                          # trains once, then loads from the cache
>>> heatmaps = vt.explain(model, images, labels, "attnlrp", gamma=(0.25, 0.25))  # (8, 32, 32)
>>> rma = vt.relevance_mass_accuracy(heatmaps, boxes)
>>> table = vt.evaluate(model, n=500)          # every method of METHODS: mean RMA and more

``python examples/vision_task_rma.py`` prints the table of :func:`evaluate` (the README's).
Formerly ``lrp_explicit.vision_task``, which still imports as an alias of this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .. import composites
from ..pipeline import Target, attribute, prepare

__all__ = ["IMAGE_SIZE", "GLYPH", "CLASSES", "RANDOM_BASELINE", "TaskConfig", "make_batch",
           "normalize", "box_mask", "relevance_mass_accuracy", "build_model", "train",
           "accuracy", "cache_dir", "load_model", "gamma_composite", "explain",
           "evaluate", "METHODS", "MEAN", "STD"]

IMAGE_SIZE = 32
GLYPH = 5
_CELL = 8
_OBJECTS = 5  # one target, four distractors

_TARGETS = {
    "plus": ["..#..", "..#..", "#####", "..#..", "..#.."],
    "cross": ["#...#", ".#.#.", "..#..", ".#.#.", "#...#"],
    "square": ["#####", "#...#", "#...#", "#...#", "#####"],
    "diamond": ["..#..", ".#.#.", "#...#", ".#.#.", "..#.."],
}
_DISTRACTORS = [
    [".....", ".....", "#####", ".....", "....."],  # horizontal bar
    ["..#..", "..#..", "..#..", "..#..", "..#.."],  # vertical bar
    ["#....", "#....", "#....", "#....", "#####"],  # L
    [".....", ".###.", ".###.", ".###.", "....."],  # block
    ["#....", ".#...", "..#..", "...#.", "....#"],  # diagonal
    ["#####", "..#..", "..#..", "..#..", "....."],  # T
    ["#...#", ".....", ".....", ".....", "#...#"],  # four dots
]

#: Class names, in label order.
CLASSES: tuple[str, ...] = tuple(_TARGETS)

#: Expected relevance mass accuracy of a heatmap of i.i.d. random values: the box's area share.
RANDOM_BASELINE = GLYPH * GLYPH / IMAGE_SIZE ** 2

#: Mean of the images' pixel values, subtracted by :func:`normalize` (measured on 10 000 images).
MEAN = 0.20
#: Standard deviation of the images' pixel values, divided out by :func:`normalize`.
STD = 0.15


def _glyphs(rows: list[list[str]]) -> Tensor:
    return torch.tensor([[[c == "#" for c in r] for r in g] for g in rows], dtype=torch.float32)


_TARGET_GLYPHS = _glyphs(list(_TARGETS.values()))
_DISTRACTOR_GLYPHS = _glyphs(_DISTRACTORS)


def make_batch(n: int, seed: int | None = None, generator: torch.Generator | None = None,
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``n`` images of the task.

    Parameters
    ----------
    n : int
        Number of images.
    seed : int, optional
        Seed of a fresh generator (reproducible batches); ignored if ``generator`` is given.
    generator : torch.Generator, optional
        Generator to draw from (a stream of batches for training).

    Returns
    -------
    images : Tensor
        ``(n, 3, 32, 32)`` float32 in ``[0, 1]`` (not normalised, see :func:`normalize`).
    labels : Tensor
        ``(n,)`` int64 class of the target glyph, an index into :data:`CLASSES`.
    boxes : Tensor
        ``(n, 4)`` int64 ``(top, left, bottom, right)`` of the target, bottom/right exclusive.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    g = generator
    cells_per_side = IMAGE_SIZE // _CELL
    images = torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 0.35
    cells = torch.rand(n, cells_per_side ** 2, generator=g).argsort(1)[:, :_OBJECTS]
    offsets = torch.randint(0, _CELL - GLYPH + 1, (n, _OBJECTS, 2), generator=g)
    top = (cells // cells_per_side) * _CELL + offsets[..., 0]
    left = (cells % cells_per_side) * _CELL + offsets[..., 1]
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    distractors = torch.randint(0, len(_DISTRACTORS), (n, _OBJECTS - 1), generator=g)
    shapes = torch.cat([_TARGET_GLYPHS[labels][:, None], _DISTRACTOR_GLYPHS[distractors]], 1)
    colours = 0.55 + 0.45 * torch.rand(n, _OBJECTS, 3, generator=g)

    span = torch.arange(GLYPH)
    rows = (top[..., None] + span)[..., :, None].expand(n, _OBJECTS, GLYPH, GLYPH)
    cols = (left[..., None] + span)[..., None, :].expand(n, _OBJECTS, GLYPH, GLYPH)
    batch = torch.arange(n)[:, None, None, None].expand_as(rows)
    for c in range(3):
        plane = images[:, c]
        ink = colours[..., c][..., None, None].expand_as(shapes)
        current = plane[batch, rows, cols]
        plane[batch, rows, cols] = torch.where(shapes > 0, ink, current)
    boxes = torch.stack([top[:, 0], left[:, 0], top[:, 0] + GLYPH, left[:, 0] + GLYPH], 1)
    return images, labels, boxes


def normalize(images: Tensor) -> Tensor:
    """The model's input: ``(images − mean) / std`` (background pixels are not zero)."""
    return (images - MEAN) / STD


def box_mask(boxes: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Boolean ``(n, size, size)`` masks, ``True`` inside each ``(top, left, bottom, right)``."""
    grid = torch.arange(size, device=boxes.device)
    inside_rows = (grid >= boxes[:, 0, None]) & (grid < boxes[:, 2, None])
    inside_cols = (grid >= boxes[:, 1, None]) & (grid < boxes[:, 3, None])
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def relevance_mass_accuracy(relevance: Tensor, boxes: Tensor) -> Tensor:
    """Share of the positive relevance inside the ground-truth box, per image.

    Parameters
    ----------
    relevance : Tensor
        ``(n, H, W)`` heatmaps (sum over channels first), or ``(n, C, H, W)`` (summed here).
    boxes : Tensor
        ``(n, 4)`` boxes as returned by :func:`make_batch`.

    Returns
    -------
    Tensor
        ``(n,)`` values in ``[0, 1]``: ``Σ_box R⁺ / Σ R⁺`` (0 for a heatmap without positive
        relevance).
    """
    if relevance.dim() == 4:
        relevance = relevance.sum(1)
    if relevance.dim() != 3 or boxes.shape != (relevance.shape[0], 4):
        raise ValueError(f"relevance must be (n, H, W) or (n, C, H, W) and boxes (n, 4); got "
                         f"{tuple(relevance.shape)} and {tuple(boxes.shape)}")
    from .metrics import mass_accuracy

    truth = box_mask(boxes, relevance.shape[-1])
    return mass_accuracy(relevance.flatten(1), truth.flatten(1))


# -------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class TaskConfig:
    """Architecture and training recipe of the task's model (part of the cache key)."""

    patch_size: int = 4
    num_layers: int = 4
    num_heads: int = 4
    hidden_dim: int = 64
    mlp_dim: int = 128
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    version: int = 1  # bump when the task's images change


def build_model(config: TaskConfig = TaskConfig()) -> nn.Module:
    """An untrained torchvision ``VisionTransformer`` for the task (seeded by ``config.seed``)."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(config.seed)
    return VisionTransformer(IMAGE_SIZE, config.patch_size, config.num_layers,
                             config.num_heads, config.hidden_dim, config.mlp_dim,
                             num_classes=len(CLASSES))


@torch.no_grad()
def accuracy(model: nn.Module, n: int = 2000, seed: int = 12345) -> float:
    """Accuracy of ``model`` on ``n`` held-out images (a seed not used in training)."""
    images, labels, _ = make_batch(n, seed=seed)
    was_training = model.training
    model.eval()
    correct = sum(int((model(normalize(x)).argmax(-1) == y).sum())
                  for x, y in zip(images.split(500), labels.split(500)))
    model.train(was_training)
    return correct / n


def train(config: TaskConfig = TaskConfig(), progress: Callable[[int, float], None] | None = None,
          ) -> nn.Module:
    """Train the task's model from scratch on freshly drawn images (seeded, CPU).

    Parameters
    ----------
    config : TaskConfig
        Architecture and recipe.
    progress : callable, optional
        Called as ``progress(step, loss)`` every 100 steps.
    """
    model = build_model(config)
    generator = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                 * max(0.0, 1 - s / config.steps))
    model.train()
    for step in range(config.steps):
        images, labels, _ = make_batch(config.batch_size, generator=generator)
        loss = nn.functional.cross_entropy(model(normalize(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None and (step + 1) % 100 == 0:
            progress(step + 1, loss.item())
    return model.eval()


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lrp_explicit`` (``~/.cache/lrp_explicit`` without the variable)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lrp_explicit"


def _cache_file(config: TaskConfig) -> Path:
    key = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"vision_task_vit_{key}.pt"


def load_model(config: TaskConfig = TaskConfig(), retrain: bool = False,
               verbose: bool = True) -> nn.Module:
    """The trained model of the task: loaded from the cache, or trained and cached.

    Parameters
    ----------
    config : TaskConfig
        Architecture and recipe; each configuration has its own cache file.
    retrain : bool
        Train even if a cached file exists (and overwrite it).
    verbose : bool
        Print progress of a training run.

    Returns
    -------
    nn.Module
        The model in eval mode, float32, on CPU.
    """
    path = _cache_file(config)
    model = build_model(config)
    if path.exists() and not retrain:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    start = time.perf_counter()

    def report(step: int, loss: float) -> None:
        if verbose:
            print(f"  training the vision-task ViT: step {step}/{config.steps}, loss {loss:.3f}",
                  flush=True)

    if verbose:
        print(f"training the vision-task ViT once ({config.steps} steps; cached in {path})")
    model = train(config, report)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    if verbose:
        print(f"  done in {time.perf_counter() - start:.0f} s, held-out accuracy "
              f"{accuracy(model):.1%}")
    return model


# ------------------------------------------------------------------------- explanations


#: Methods measured by :func:`evaluate`: name -> (composite, (γ for Conv2d, γ for Linear)).
#: ``"gxi"`` is plain Gradient×Input; ``γ = None`` leaves the layers to our ε-rule (no zennit).
METHODS: dict[str, tuple[str, tuple[float, float] | None]] = {
    "Gradient×Input": ("gxi", None),
    "AttnLRP (ε)": ("attnlrp", None),
    "AttnLRP γ=0.01": ("attnlrp", (0.01, 0.01)),
    "AttnLRP γ=0.1": ("attnlrp", (0.1, 0.1)),
    "AttnLRP γ=0.25": ("attnlrp", (0.25, 0.25)),
    "AttnLRP γ=1": ("attnlrp", (1.0, 1.0)),
    "CP-LRP (ε)": ("cp-lrp", None),
    "CP-LRP γ=0.25": ("cp-lrp", (0.25, 0.25)),
}


def gamma_composite(conv_gamma: float, linear_gamma: float) -> object:
    """A zennit ``LayerMapComposite`` with ``Gamma`` on ``nn.Conv2d`` and ``nn.Linear``."""
    from zennit.composites import LayerMapComposite
    from zennit.rules import Gamma

    return LayerMapComposite([(nn.Conv2d, Gamma(conv_gamma)), (nn.Linear, Gamma(linear_gamma))])


def explain(model: nn.Module, images: Tensor, targets: Tensor, method: str = "attnlrp",
            gamma: tuple[float, float] | None = None, batch_size: int = 64) -> Tensor:
    """Pixel heatmaps of ``model`` for class ``targets`` (relevance summed over channels).

    Parameters
    ----------
    model : nn.Module
        An image classifier taking :func:`normalize`-d images.
    images : Tensor
        ``(n, 3, H, W)`` images in ``[0, 1]``.
    targets : Tensor
        ``(n,)`` class explained for each image; the relevance starts from its logit.
    method : {"attnlrp", "cp-lrp", "gxi"}
        An LRP composite of the registry, or plain Gradient×Input.
    gamma : (float, float), optional
        γ for ``nn.Conv2d`` and for ``nn.Linear``: those layers are left to zennit's ``Gamma``
        rule in the same backward pass; ``None`` keeps our ε-rule there.
    batch_size : int
        Images per backward pass.

    Returns
    -------
    Tensor
        ``(n, H, W)`` float32 heatmaps (relevance of the normalised input).
    """
    if method not in ("attnlrp", "cp-lrp", "gxi"):
        raise ValueError(f"method must be 'attnlrp', 'cp-lrp' or 'gxi', got {method!r}")
    if method == "gxi" and gamma is not None:
        raise ValueError("gamma applies to the LRP methods, not to Gradient×Input")
    if images.dim() != 4 or targets.shape != images.shape[:1]:
        raise ValueError(f"images must be (n, 3, H, W) and targets (n,); got "
                         f"{tuple(images.shape)} and {tuple(targets.shape)}")
    comp = None
    if method != "gxi":
        zen = gamma_composite(*gamma) if gamma is not None else None
        comp = composites.get(method, model, zennit=zen)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), images.dtype)
    was_training = model.training
    model.eval()
    maps = []
    try:
        for x, t in zip(images.split(batch_size), targets.split(batch_size)):
            item = prepare(model, normalize(x).to(dtype))  # the positional leaf "input"
            t = t.to(item.leaf.device)

            def logit(output: Tensor, t: Tensor = t) -> Target:
                y = output.gather(1, t[:, None])
                # LRP starts from the logit's value, Gradient×Input from the plain gradient
                return Target(y, y.detach() if comp is not None else torch.ones_like(y))

            relevance = attribute(model, item, logit, comp).relevance["input"]
            if comp is None:
                relevance = relevance * item.leaf.detach()
            maps.append(relevance.sum(1).detach().float())
    finally:
        model.train(was_training)
    return torch.cat(maps)


def evaluate(model: nn.Module, n: int = 500, seed: int = 2024,
             methods: dict[str, tuple[str, tuple[float, float] | None]] | None = None,
             progress: bool = False) -> dict[str, dict[str, float]]:
    """Relevance mass accuracy of each method on ``n`` held-out images.

    Parameters
    ----------
    model : nn.Module
        The task's model (e.g. :func:`load_model`).
    n : int
        Number of images (drawn with ``seed``, not used in training).
    seed : int
        Seed of the images.
    methods : dict, optional
        ``{name: (method, gamma)}`` as in :data:`METHODS` (the default).
    progress : bool
        Show a tqdm progress bar over the methods.

    Returns
    -------
    dict
        ``{name: {"rma": mean, "sem": standard error, "median": median}}``, plus the entry
        ``"random"`` with the expected score of a random heatmap (:data:`RANDOM_BASELINE`) and
        ``"accuracy"`` with the model's accuracy on the images (``rma`` holds it).
    """
    images, labels, boxes = make_batch(n, seed=seed)
    methods = METHODS if methods is None else methods
    items = list(methods.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="methods")
    from .results import evaluate as evaluate_rows

    truth = list(box_mask(boxes, images.shape[-1]))
    table: dict[str, dict[str, float]] = {}
    for name, (method, gamma) in items:
        maps = explain(model, images, labels, method, gamma)
        scores = evaluate_rows({"relevance": list(maps)}, truth=truth)  # RMA of every image
        rma = torch.tensor(scores.per_row["RMA"], dtype=torch.float64)
        table[name] = {"rma": rma.mean().item(), "sem": (rma.std() / n ** 0.5).item(),
                       "median": rma.median().item()}
    table["random"] = {"rma": RANDOM_BASELINE, "sem": 0.0, "median": RANDOM_BASELINE}
    with torch.no_grad():
        correct = (model(normalize(images)).argmax(-1) == labels).double().mean().item()
    table["accuracy"] = {"rma": correct, "sem": 0.0, "median": correct}
    return table
