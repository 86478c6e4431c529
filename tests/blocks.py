"""Small hand-written transformer blocks built from plain PyTorch parts, and an independent
modified Gradient×Input reference for them (appendix D of Arras et al.)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm → sdpa attention → residual, LayerNorm → SiLU-gated
    MLP → residual, then a LayerNorm-free head on the token mean."""

    def __init__(self, dim: int = 16, heads: int = 4, hidden: int = 24, classes: int = 5,
                 kv_heads: int | None = None, bias: bool = True) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.v = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.o = nn.Linear(dim, dim, bias=bias)
        self.norm2 = nn.LayerNorm(dim, bias=bias)
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.SiLU()
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.head = nn.Linear(dim, classes, bias=bias)

    def attention(self, h, mask=None, causal=False):
        b, t, _ = h.shape
        q = self.q(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.kv_heads != self.heads)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x, mask=None, causal=False):
        x = x + self.attention(self.norm1(x), mask, causal)
        h = self.norm2(x)
        x = x + self.down(self.act(self.gate(h)) * self.up(h))
        return self.head(x.mean(dim=1))


def gxi_reference(block: Block, x: torch.Tensor, target: int, variant: str,
                  mask=None, causal=False) -> torch.Tensor:
    """Relevance of ``x`` by the modified Gradient×Input formulation: a forward with
    ``.detach()`` tricks, one plain backward of the target logit, then input × gradient."""
    attn = variant == "attnlrp"
    x = x.detach().clone().requires_grad_(True)

    def uniform_product(z):  # ½ z + ½ [z]_detach: half of the gradient to each factor
        return 0.5 * z + 0.5 * z.detach()

    def rms(h, norm):  # the standard deviation held constant
        return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps).detach() * norm.weight

    def layer(h, norm):
        mu = h.mean(-1, keepdim=True)
        sd = torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + norm.eps).detach()
        out = (h - mu) / sd * norm.weight
        return out + norm.bias if norm.bias is not None else out

    def silu_identity(z):  # z ⊙ [g(z)/z]_detach reproduces R_in = R_out
        ratio = torch.where(z == 0, torch.zeros_like(z), F.silu(z) / z)
        return z * ratio.detach()

    b, t, _ = x.shape
    h = rms(x, block.norm1)
    q = F.linear(h, block.q.weight, block.q.bias).view(b, t, block.heads, -1).transpose(1, 2)
    k = F.linear(h, block.k.weight, block.k.bias).view(b, t, block.kv_heads, -1).transpose(1, 2)
    v = F.linear(h, block.v.weight, block.v.bias).view(b, t, block.kv_heads, -1).transpose(1, 2)
    groups = block.heads // block.kv_heads
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2)
    if attn:
        scores = uniform_product(scores)
    scores = scores / math.sqrt(block.head_dim)
    if causal:
        keep = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask
    weights = torch.softmax(scores, -1)
    out = uniform_product(weights @ v) if attn else weights.detach() @ v
    out = F.linear(out.transpose(1, 2).reshape(b, t, -1), block.o.weight, block.o.bias)
    x1 = x + out
    h2 = layer(x1, block.norm2)
    gate = silu_identity(F.linear(h2, block.gate.weight, block.gate.bias))
    up = F.linear(h2, block.up.weight, block.up.bias)
    prod = uniform_product(gate * up) if attn else gate.detach() * up
    x2 = x1 + F.linear(prod, block.down.weight, block.down.bias)
    logits = F.linear(x2.mean(1), block.head.weight, block.head.bias)
    logits[:, target].sum().backward()
    return (x * x.grad).detach()
