"""Heatmaps of a Vision Transformer for a grid of γ values: zennit's γ rule on Conv2d × Linear.

AttnLRP (or CP-LRP) handles attention, LayerNorm, GELU, residuals and the functional ops; the
``nn.Conv2d`` patch embedding and every ``nn.Linear`` are left to zennit's ``Gamma`` rule, with one
γ per layer type, in one backward pass. The grid is saved as one PNG.

By default the model is the synthetic vision task's tiny ViT (trained once on CPU, about 4
minutes on one thread, and cached under ~/.cache/lrp_explicit) and the images are held-out
task images, with the ground-truth box of the deciding object drawn in::

    python examples/vit_gamma_sweep.py --output docs/vit_gamma_sweep.png

With torchvision's pretrained ``vit_b_16`` weights on disk (nothing is downloaded) and an image
of your own::

    python examples/vit_gamma_sweep.py --vit-b-16 --weights vit_b_16-c867db91.pth \\
        --image cat.jpg --conv-gammas 0.1,0.25,100 --linear-gammas 0,0.01,0.05,0.1,1

CLIP's vision tower, with a CLIP checkpoint folder on disk (model and processor, e.g. a saved
``openai/clip-vit-base-patch32``; nothing is downloaded): the image–text similarity is
explained, γ goes to the vision tower's ``Conv2d`` and ``Linear`` layers only
(:func:`lrp_explicit.composites.vision_gamma`) and the text tower keeps the ε-rule::

    python examples/vit_gamma_sweep.py --clip ./clip-vit-base-patch32 --image cat.jpg \\
        --text "a photo of a cat"
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
from torch import nn

import lrp_explicit
from lrp_explicit.evaluation import vision as vt
from lrp_explicit.pipeline import output_target


def parse_gammas(text: str) -> list[float]:
    """``"0.1,0.25"`` -> ``[0.1, 0.25]`` (non-negative values)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative γ values, got {text!r}")
    return values


def find_vit_b_16_weights(path: str | None) -> Path:
    """The local file of torchvision's ``ViT_B_16_Weights.IMAGENET1K_V1`` (never downloads).

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file, or without ``path`` if the torch hub cache lacks it.
    """
    from torchvision.models import ViT_B_16_Weights

    name = os.path.basename(ViT_B_16_Weights.IMAGENET1K_V1.url)
    candidate = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / name
    if not candidate.is_file():
        where = f"at {candidate}" if path else f"in the torch hub cache ({candidate})"
        raise FileNotFoundError(
            f"torchvision's vit_b_16 weights were not found {where}. This script never "
            f"downloads: fetch {ViT_B_16_Weights.IMAGENET1K_V1.url} where you have internet "
            "access and pass the file with --weights.")
    return candidate


def load_vit_b_16(weights_path: str | None, image_path: str) -> tuple[nn.Module, torch.Tensor,
                                                                      list[str]]:
    """The pretrained ``vit_b_16``, the preprocessed image ``(1, 3, 224, 224)`` and the
    ImageNet class names."""
    from PIL import Image
    from torchvision.models import ViT_B_16_Weights, vit_b_16

    weights = ViT_B_16_Weights.IMAGENET1K_V1
    path = find_vit_b_16_weights(weights_path)
    if not Path(image_path).is_file():
        raise FileNotFoundError(f"image {image_path!r} not found")
    model = vit_b_16()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    image = weights.transforms()(Image.open(image_path).convert("RGB")).unsqueeze(0)
    return model.eval(), image, list(weights.meta["categories"])


def heatmap(model: nn.Module, x: torch.Tensor, target: int, composite: str,
            conv_gamma: float, linear_gamma: float) -> torch.Tensor:
    """Relevance of the (normalised) input ``x`` for logit ``target``, summed over channels."""
    zen = vt.gamma_composite(conv_gamma, linear_gamma)
    comp = lrp_explicit.pipeline.resolve_composite(composite, model, zennit=zen)
    result = lrp_explicit.attribute(model, lrp_explicit.pipeline.prepare(model, x),
                                    lambda out: output_target(out, (0, target)), comp)
    return result.relevance["input"][0].sum(0).detach()


def clip_heatmap(model: nn.Module, pixels: torch.Tensor, ids: list[int], composite: str,
                 conv_gamma: float, linear_gamma: float) -> torch.Tensor:
    """Relevance of the pixels ``(1, 3, H, W)`` for CLIP's similarity with the text ``ids``,
    summed over channels, with γ on the vision tower only."""
    zen = lrp_explicit.composites.vision_gamma(conv_gamma, linear_gamma)
    comp = lrp_explicit.pipeline.resolve_composite(composite, model, zennit=zen)
    return lrp_explicit.explain(model, (pixels[0], ids), composite=comp).image.relevance


def load_clip(folder: str, image_path: str, text: str) -> tuple[nn.Module, torch.Tensor,
                                                                 list[int]]:
    """A CLIP model and processor from a local folder (never downloads), the preprocessed
    image ``(1, 3, H, W)`` and the text's ids.

    Raises
    ------
    FileNotFoundError
        If the folder or the image is missing.
    """
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(
            f"no CLIP checkpoint at {folder!r} (a folder with config.json, the weights and the "
            "processor files). This script never downloads: save one with "
            "CLIPModel.from_pretrained(name).save_pretrained(folder) and "
            "CLIPProcessor.from_pretrained(name).save_pretrained(folder) where you have "
            "internet access.")
    if not Path(image_path).is_file():
        raise FileNotFoundError(f"image {image_path!r} not found")
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    enc = processor(text=text, images=Image.open(image_path).convert("RGB"),
                    return_tensors="pt")
    return model, enc["pixel_values"], enc["input_ids"][0].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conv-gammas", type=parse_gammas, default=[0.0, 0.25, 100.0],
                        help="γ values for nn.Conv2d (rows), comma-separated")
    parser.add_argument("--linear-gammas", type=parse_gammas, default=[0.0, 0.05, 0.25, 1.0],
                        help="γ values for nn.Linear (columns), comma-separated")
    parser.add_argument("--composite", choices=["attnlrp", "cp-lrp"], default="attnlrp",
                        help="rules for attention, norms, activations and functional ops")
    parser.add_argument("--images", type=int, default=2,
                        help="task images, one grid each (synthetic task only)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the task images")
    parser.add_argument("--vit-b-16", action="store_true",
                        help="use torchvision's pretrained vit_b_16 (needs --image)")
    parser.add_argument("--weights", help="vit_b_16 weights file (default: torch hub cache)")
    parser.add_argument("--image", help="an image file to explain with --vit-b-16 or --clip")
    parser.add_argument("--clip", help="a local CLIP checkpoint folder: explain the image–text "
                        "similarity with γ on the vision tower (needs --image and --text)")
    parser.add_argument("--text", help="the text compared with the image (--clip)")
    parser.add_argument("--output", default="vit_gamma_sweep.png", help="PNG file to write")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if args.vit_b_16 and not args.image:
        parser.error("--vit-b-16 needs --image")
    if args.clip and not (args.image and args.text):
        parser.error("--clip needs --image and --text")
    if args.images < 1:
        parser.error("--images must be at least 1")
    torch.set_num_threads(args.threads)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from tqdm import tqdm

    if args.clip:
        try:
            model, x, ids = load_clip(args.clip, args.image, args.text)
        except FileNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        samples = [(x, ids, None, x[0], f"text: {args.text}")]
    elif args.vit_b_16:
        try:
            model, x, categories = load_vit_b_16(args.weights, args.image)
        except FileNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        with torch.no_grad():
            target = int(model(x).argmax())
        samples = [(x, target, None, x[0], f"predicted: {categories[target]}")]
    else:
        model = vt.load_model()
        images, labels, boxes = vt.make_batch(args.images, seed=args.seed)
        samples = [(vt.normalize(images[i:i + 1]), int(labels[i]), boxes[i], images[i],
                    f"class: {vt.CLASSES[labels[i]]}") for i in range(args.images)]

    grid = list(itertools.product(args.conv_gammas, args.linear_gammas))
    rows, cols = len(args.conv_gammas), len(args.linear_gammas) + 1
    figure, axes = plt.subplots(rows * len(samples), cols, squeeze=False,
                                figsize=(1.6 * cols, 1.6 * rows * len(samples)))
    with tqdm(total=len(grid) * len(samples), desc="heatmaps") as bar:
        for s, (x, target, box, picture, title) in enumerate(samples):
            picture = picture.permute(1, 2, 0)
            picture = (picture - picture.min()) / (picture.max() - picture.min())
            for r in range(rows):
                axes[s * rows + r, 0].imshow(picture.numpy())
                if box is not None:
                    top, left, bottom, right = (int(v) for v in box)
                    axes[s * rows + r, 0].add_patch(Rectangle(
                        (left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                        edgecolor="lime", linewidth=1))
            axes[s * rows, 0].set_title(title, fontsize=7)
            for (i, conv_gamma), (j, linear_gamma) in itertools.product(
                    enumerate(args.conv_gammas), enumerate(args.linear_gammas)):
                relevance = (clip_heatmap if args.clip else heatmap)(
                    model, x, target, args.composite, conv_gamma, linear_gamma)
                scale = float(relevance.abs().max()) or 1.0
                ax = axes[s * rows + i, j + 1]
                ax.imshow((relevance / scale).numpy(), cmap="bwr", vmin=-1, vmax=1)
                if s == 0 and i == 0:
                    ax.set_title(f"γ Linear {linear_gamma:g}", fontsize=7)
                if j == 0:
                    ax.set_ylabel(f"γ Conv2d {conv_gamma:g}", fontsize=7)
                bar.update()
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    where = " of CLIP's vision tower" if args.clip else ""
    figure.suptitle(f"{args.composite} with zennit Gamma on Conv2d × Linear{where}", fontsize=8)
    figure.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=80)
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
