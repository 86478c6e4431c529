"""Modified Gradient×Input reference for state-space and linear-attention layers (MambaLRP).

It extends :mod:`gxi` (the attention families' reference) with the ``.detach()`` tricks of
MambaLRP (Rezaei Jafari et al., NeurIPS 2024), written here without ``lrp_explicit``:

- the input-dependent parameters of the scan are detached where they are made: the output of
  Mamba's ``x_proj`` (``[Δ_low, B, C]``) and of Qwen3-Next's ``in_proj_ba`` (β and the decay),
  and Mamba 2's sections Δ of ``in_proj``'s output and B, C of the convolution's output, found
  by their sizes from the shapes of the mixer's weights;
- the scan is then linear in its input: plain gradient (the recurrence, the convolution, the
  skip ``D·x``);
- a gated RMSNorm ``y = norm(x, gate)`` with its deviation constant: AttnLRP
  ``½ x ⊙ [y / x] + ½ g ⊙ [y / g]``, CP-LRP ``x ⊙ [y / x]`` (the gate a constant);
- the l2-normalisation of queries and keys ``x · rsqrt(Σx²)``: the ``rsqrt`` detached;
- ``solve_triangular(A, B)``: ``A`` detached (linear in ``B``).

:class:`Float64Inside` keeps the float32 casts of the stock modeling code in float64, so that
conservation can be checked in float64 throughout.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import gxi

T = torch.Tensor
SPLITS = {torch.split, T.split}
HELD_CHILDREN = ("x_proj", "in_proj_ba", "in_proj_b", "in_proj_a", "a_proj", "b_proj")
GATED_NORMS = ("Mamba2RMSNormGated", "Qwen3NextRMSNormGated", "Qwen3_5RMSNormGated",
               "BambaRMSNormGated", "NemotronHRMSNormGated", "Zamba2RMSNormGated",
               "GraniteMoeHybridRMSNormGated", "FalconH1RMSNormGated",
               "OlmoHybridRMSNormGated", "Qwen3_5MoeRMSNormGated", "LaraMiniRMSNormGated")


def _held_sections(model: nn.Module) -> dict[tuple[int, ...], set[int]]:
    """Mamba 2 and the hybrids reusing its mixer: ``gate, xBC, dt = in_proj(x).split(...)`` and
    ``x, B, C = split(conv(xBC))``; Zamba: ``Δ_low, B, C = split(x_proj_weight @ x)``; the
    sizes from the weights' shapes (a Mamba 2 mixer: ``in_proj``, ``conv1d``, a gated ``norm``
    and a ``dt_bias`` per head)."""
    sections: dict[tuple[int, ...], set[int]] = {}
    for module in model.modules():
        if hasattr(module, "x_proj_weight"):  # Zamba: Δ_low, B, C = split(x_proj_weight @ x)
            rank = module.dt_proj_weight.shape[-1]
            state = (module.x_proj_weight.shape[1] - rank) // 2
            sections[(rank, state, state)] = {0, 1, 2}
            continue
        children = dict(module.named_children())
        if not {"in_proj", "conv1d", "norm"} <= set(children) or not hasattr(module, "dt_bias"):
            continue
        inner = children["norm"].weight.shape[0]
        conv = children["conv1d"].in_channels
        heads = module.dt_bias.shape[0]
        assert children["in_proj"].out_features == inner + conv + heads
        groups = (conv - inner) // 2
        sections[(inner, conv, heads)] = {2}
        sections[(inner, groups, groups)] = {1, 2}
    return sections


class _SSMMode(gxi._Mode):
    def __init__(self, attnlrp: bool, sections: dict):
        super().__init__(attnlrp)
        self.sections = sections

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if func in SPLITS:
            out = func(*args, **kwargs)
            sizes = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections",
                                                              kwargs.get("split_size"))
            held = self.sections.get(tuple(sizes)) if isinstance(sizes, (list, tuple)) else None
            if held:
                out = tuple(t.detach() if i in held else t for i, t in enumerate(out))
            return out
        if func is torch.linalg.solve_triangular:
            return func(args[0].detach(), *args[1:], **kwargs)
        if func in (torch.rsqrt, T.rsqrt):  # the l2-normalisation's statistic
            return func(*args, **kwargs).detach()
        return super().__torch_function__(func, types, args, kwargs)


def _gated_norm(module: nn.Module, attnlrp: bool):
    original = type(module).forward

    def forward(x, gate=None):
        with torch.no_grad():
            y = original(module, x, gate)
        if gate is None or not gxi.grad_path(gate):
            return gxi.ratio_trick(x, y)
        if not attnlrp:
            return gxi.ratio_trick(x, y) if gxi.grad_path(x) else y
        return (0.5 * gxi.ratio_trick(x, y) + 0.5 * gxi.ratio_trick(gate, y)).to(y.dtype)

    return forward


class ModifiedGradientTimesInputSSM:
    """Context manager: the model runs its MambaLRP-modified forward (``variant`` "attnlrp" or
    "cp-lrp"): :class:`gxi.ModifiedGradientTimesInput` plus the tricks above."""

    def __init__(self, model: nn.Module, variant: str):
        self.model, self.variant = model, variant
        self.attnlrp = variant == "attnlrp"

    def __enter__(self):
        self.base = gxi.ModifiedGradientTimesInput(self.model, self.variant)
        self.base.__enter__()
        self.base.mode.__exit__(None, None, None)  # replaced by the extended mode
        self.hooks = []
        for name, module in self.model.named_modules():
            if name.rsplit(".", 1)[-1] in HELD_CHILDREN:
                self.hooks.append(module.register_forward_hook(lambda m, a, out: out.detach()))
            if type(module).__name__ in GATED_NORMS:
                module.forward = _gated_norm(module, self.attnlrp)
                if module not in self.base.patched:
                    self.base.patched.append(module)
        self.mode = _SSMMode(self.attnlrp, _held_sections(self.model))
        self.base.mode = self.mode
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return self.base.__exit__(*exc)


def reference_relevance(model: nn.Module, variant: str, embeds: torch.Tensor, select,
                        run=None, **kwargs) -> torch.Tensor:
    """Relevance of ``inputs_embeds`` for the score ``select(output)`` by MambaLRP-modified
    Gradient×Input; ``run(model, embeds)`` calls the model where the default
    ``model(inputs_embeds=embeds, **kwargs)`` does not do."""
    for p in model.parameters():
        p.requires_grad_(False)
    x = embeds.detach().clone().requires_grad_(True)
    with ModifiedGradientTimesInputSSM(model, variant):
        output = run(model, x) if run is not None else model(inputs_embeds=x, **kwargs)
        score = select(output)
    score.sum().backward()
    return (x * x.grad).detach()


class Float64Inside(TorchFunctionMode):
    """Test-only: ``.float()`` and ``.to(torch.float32)`` of float64 tensors return them as
    they are, so the whole model runs in float64. Entered before the composite's op dispatch,
    it sits below it and sees the casts after the rules."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.float, torch.Tensor.to) and args[0].dtype == torch.float64:
            if func is torch.Tensor.float or torch.float32 in args[1:] \
                    or kwargs.get("dtype") is torch.float32:
                return args[0] if not kwargs.get("copy") else args[0].clone()
        return func(*args, **kwargs)


#: The ε of the ε-rules moves relevance by about ε/|z| where a sum z comes near zero; in this
#: Qwen3.5 model (CP-LRP) the default ε (1e-12) moves it by 1.2e-7 in float64 (1e-15 at
#: ε = 1e-20), which float32 rounding then lifts past 1e-6, so it is compared at a smaller ε.
EPSILON = {"qwen3_5": 1e-20}
