"""Normalisation and colours: every renderer takes its colours from one matplotlib colour map."""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

RGB = tuple[int, int, int]

#: Ends of the default diverging scale (ColorBrewer RdBu, as in matplotlib's ``RdBu``): +1 and
#: −1; 0 is white.
POSITIVE: RGB = (178, 24, 43)
NEGATIVE: RGB = (33, 102, 172)
WHITE: RGB = (255, 255, 255)


def normalise(relevance: Tensor) -> Tensor:
    """``relevance / max |relevance|`` in float64 (all zeros stay zeros; NaN and ±Inf count as 0).

    Parameters
    ----------
    relevance : Tensor
        Any shape.

    Returns
    -------
    Tensor
        Values in [−1, 1], of the same shape, on the CPU.
    """
    r = relevance.detach().to("cpu", torch.float64)
    r = torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)
    scale = r.abs().max() if r.numel() else torch.tensor(0.0)
    return r / scale if scale > 0 else torch.zeros_like(r)


def scale_of(relevance: Tensor) -> float:
    """``max |relevance|`` over the finite values (0.0 when there is none): the value that
    :func:`normalise` maps to 1, shown at the ends of every colour scale."""
    r = relevance.detach().to("cpu", torch.float64)
    r = torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)
    return float(r.abs().max()) if r.numel() else 0.0


@functools.lru_cache(maxsize=1)
def _default_map() -> Any:
    from matplotlib.colors import LinearSegmentedColormap

    stops = [tuple(c / 255 for c in rgb) for rgb in (NEGATIVE, WHITE, POSITIVE)]
    # 2¹⁶ + 1 entries: dyadic values (0, ±1/2, ±1/4 …) fall exactly on an entry
    return LinearSegmentedColormap.from_list("lrp_relevance", stops, N=(1 << 16) + 1)


def colour_map(cmap: Any = None) -> Any:
    """The matplotlib colour map of relevance, called on ``(v + 1) / 2`` for a normalised ``v``.

    Parameters
    ----------
    cmap : str, matplotlib Colormap or None
        ``None``: the default diverging map (blue :data:`NEGATIVE` at −1, white at 0, red
        :data:`POSITIVE` at +1, matplotlib's ``RdBu`` ends). A name registered with matplotlib
        (``"RdBu_r"``, ``"coolwarm"``, ``"PiYG"``, ``"viridis"`` …) or a ``Colormap`` object.

    Returns
    -------
    matplotlib.colors.Colormap

    Raises
    ------
    ValueError
        If ``cmap`` names no matplotlib colour map (the message lists close names).
    TypeError
        If ``cmap`` is neither a name nor a ``Colormap``.
    """
    if cmap is None:
        return _default_map()
    from matplotlib import colormaps
    from matplotlib.colors import Colormap

    if isinstance(cmap, Colormap):
        return cmap
    if isinstance(cmap, str):
        try:
            return colormaps[cmap]
        except KeyError as err:
            import difflib

            close = difflib.get_close_matches(cmap, list(colormaps), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
                "; see matplotlib.colormaps for the names"
            raise ValueError(f"cmap={cmap!r} is not a matplotlib colour map{hint}") from err
    raise TypeError(f"cmap must be a matplotlib colour map name or Colormap, not "
                    f"{type(cmap).__name__}")


def colours(values: Tensor, cmap: Any = None) -> Tensor:
    """:func:`colour` of every normalised value, as a ``uint8`` tensor of shape
    ``values.shape + (3,)`` (one vectorised look-up in the colour map).

    Parameters
    ----------
    values : Tensor
        Normalised values in [−1, 1] (clamped).
    cmap : str, Colormap or None
        See :func:`colour_map`.
    """
    v = values.detach().to("cpu", torch.float64).clamp(-1.0, 1.0)
    rgba = colour_map(cmap)(((v.reshape(-1) + 1.0) / 2.0).numpy())
    rgb = (torch.from_numpy(rgba[:, :3]) * 255.0).round().to(torch.uint8)
    return rgb.reshape(*v.shape, 3)


def colour(value: float, cmap: Any = None) -> RGB:
    """The colour of a normalised value in [−1, 1] (default map: white at 0, red above, blue
    below).

    Parameters
    ----------
    value : float
        Normalised relevance.
    cmap : str, Colormap or None
        See :func:`colour_map`.
    """
    return tuple(int(c) for c in colours(torch.tensor(float(value)), cmap))  # type: ignore[return-value]


def luminance(rgb: RGB) -> float:
    """Relative luminance of an sRGB colour (WCAG 2), 0 for black and 1 for white."""
    def channel(c: int) -> float:
        x = c / 255.0
        return x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def ink_on(rgb: RGB) -> RGB:
    """Black or white, whichever contrasts more with the background ``rgb`` (WCAG 2 contrast
    ratio)."""
    lum = luminance(rgb)
    return (0, 0, 0) if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else (255, 255, 255)


def ink(value: float, cmap: Any = None) -> RGB:
    """Text colour readable on :func:`colour` of ``value``: black or white, by contrast.

    Parameters
    ----------
    value : float
        Normalised relevance.
    cmap : str, Colormap or None
        See :func:`colour_map`.
    """
    return ink_on(colour(value, cmap))


def hex_colour(rgb: RGB) -> str:
    """``#rrggbb``."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def ramp(cmap: Any = None, steps: int = 11) -> list[RGB]:
    """``steps`` colours of the map from −1 to +1, for legends and scale lines."""
    n = max(2, steps)
    return [tuple(int(c) for c in rgb)  # type: ignore[misc]
            for rgb in colours(torch.linspace(-1.0, 1.0, n, dtype=torch.float64), cmap).tolist()]


def number(x: float) -> str:
    """A value for a scale or tooltip: 4 significant digits, the sign always shown."""
    return f"{x:+.4g}"


def matrix_parts(rows: Any, columns: Any, matrix: Tensor) -> tuple[Tensor, Tensor]:
    """The matrix in float64 on the CPU and its blank cells.

    Blank are non-finite cells and, in each row, the run of exact zeros at its end: the
    positions from the row's own token on, which it cannot depend on. A zero before a non-zero
    value of the row is a real zero and is shown as one.
    """
    m = torch.as_tensor(matrix).detach().to("cpu", torch.float64)
    if m.dim() != 2:
        raise ValueError(f"matrix must be 2-D (generated tokens × context tokens), got shape "
                         f"{tuple(m.shape)}")
    if m.shape != (len(rows), len(columns)):
        raise ValueError(f"matrix of shape {tuple(m.shape)} for {len(rows)} rows and "
                         f"{len(columns)} columns; give one row per generated token and one "
                         "column per context token")
    bad = ~torch.isfinite(m)
    m = m.masked_fill(bad, 0.0)
    nonzero = m != 0
    # a cell is trailing when no non-zero value lies at or after it in its row
    after = (nonzero.to(torch.int8).flip(-1).cummax(-1).values.flip(-1).bool() if m.numel()
             else nonzero)
    return m, bad | ~after
