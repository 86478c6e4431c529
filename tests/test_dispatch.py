"""The op dispatch routes each functional form to its rule (checked against the rule's formula
or against the functional wrapper called directly), and layout ops pass through."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lrp_explicit
from lrp_explicit import composites
from lrp_explicit import functional as lf

D = torch.float64
EPS = 1e-12


def s(z):
    return z + EPS * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def dispatched(fn, tensors, relevance=None, variant="attnlrp", on_path=None):
    """Run ``fn`` under the composite's op rules; return output and the input relevances."""
    on_path = on_path or [True] * len(tensors)
    leaves = [t.clone().requires_grad_(p) for t, p in zip(tensors, on_path)]
    with composites.get(variant).op_rules():
        out = fn(*leaves)
    relevance = torch.randn_like(out) if relevance is None else relevance
    out.backward(relevance)
    return out.detach(), [leaf.grad for leaf in leaves], relevance


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


a0 = lambda *shape: torch.randn(*shape, dtype=D)  # noqa: E731


# (id, function of the path tensors, shapes, relevance formula(inputs, z, R) -> grads)
ADD_CASES = [
    ("a+b", lambda a, b: a + b, [(3, 4), (4,)], lambda a, b, z, g: [a * g, (b * g).sum(0)]),
    ("torch.add alpha", lambda a, b: torch.add(a, b, alpha=2.0), [(3, 4), (3, 4)],
     lambda a, b, z, g: [a * g, 2 * b * g]),
    ("a.add", lambda a, b: a.add(b), [(3, 4), (3, 4)], lambda a, b, z, g: [a * g, b * g]),
    ("a-b", lambda a, b: a - b, [(3, 4), (3, 4)], lambda a, b, z, g: [a * g, -b * g]),
    ("torch.sub", lambda a, b: torch.sub(a, b), [(3, 4), (3, 4)],
     lambda a, b, z, g: [a * g, -b * g]),
    ("a.sub", lambda a, b: a.sub(b, alpha=0.5), [(3, 4), (3, 4)],
     lambda a, b, z, g: [a * g, -0.5 * b * g]),
    ("a+scalar", lambda a: a + 2.0, [(3, 4)], lambda a, z, g: [a * g]),
    ("scalar+a", lambda a: 2.0 + a, [(3, 4)], lambda a, z, g: [a * g]),
    ("scalar-a", lambda a: 2.0 - a, [(3, 4)], lambda a, z, g: [-a * g]),
    ("iadd", lambda a, b: _iop(a, b, "__iadd__"), [(3, 4), (3, 4)],
     lambda a, b, z, g: [a * g, b * g]),
    ("isub", lambda a, b: _iop(a, b, "__isub__"), [(3, 4), (4,)],
     lambda a, b, z, g: [a * g, (-b * g).sum(0)]),
    ("add_", lambda a, b: _iop(a, b, "add_"), [(3, 4), (3, 4)],
     lambda a, b, z, g: [a * g, b * g]),
    ("sum dim", lambda a: a.sum(-1), [(3, 4)], lambda a, z, g: [a * g[:, None]]),
    ("torch.sum dims keepdim", lambda a: torch.sum(a, (0, 1), keepdim=True), [(3, 4, 2)],
     lambda a, z, g: [a * g]),
    ("sum all", lambda a: a.sum(), [(3, 4)], lambda a, z, g: [a * g]),
    ("mean", lambda a: a.mean(1), [(3, 4)], lambda a, z, g: [a * g[:, None] / 4]),
    ("torch.mean", lambda a: torch.mean(a, dim=0), [(3, 4)], lambda a, z, g: [a * g / 3]),
]


def _iop(a, b, name):
    c = a.clone()
    getattr(c, name)(b)
    return c


@pytest.mark.parametrize("name,fn,shapes,formula", ADD_CASES, ids=[c[0] for c in ADD_CASES])
def test_epsilon_rules(name, fn, shapes, formula):
    tensors = [a0(*shape) for shape in shapes]
    out, grads, relevance = dispatched(fn, tensors)
    assert torch.equal(out, fn(*tensors))
    g = relevance / s(out)
    for got, want in zip(grads, formula(*tensors, out, g)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


IDENTITY_CASES = [
    ("a*scalar", lambda a: a * 3.0), ("scalar*a", lambda a: 3.0 * a),
    ("a*const", lambda a: a * CONST), ("torch.mul const", lambda a: torch.mul(a, CONST)),
    ("a/scalar", lambda a: a / 4.0), ("scalar/a", lambda a: 4.0 / a),
    ("torch.div const", lambda a: torch.div(a, CONST)), ("-a", lambda a: -a),
    ("torch.neg", torch.neg), ("imul", lambda a: _iop(a, 2.0, "__imul__")),
    ("itruediv", lambda a: _iop(a, 2.0, "__itruediv__")), ("gelu", F.gelu),
    ("gelu tanh", lambda a: F.gelu(a, approximate="tanh")), ("silu", F.silu),
    ("relu", F.relu), ("relu inplace", lambda a: F.relu(a * 1, inplace=True)),
    ("tanh", torch.tanh), ("sigmoid", torch.sigmoid), ("Tensor.exp", lambda a: a.exp()),
    ("pow", lambda a: a ** 2), ("torch.pow", lambda a: torch.pow(a, 3)),
    ("abs", torch.abs), ("rsqrt of exp", lambda a: torch.rsqrt(a.exp())),
]
CONST = torch.randn(3, 4, dtype=D)


@pytest.mark.parametrize("name,fn", IDENTITY_CASES, ids=[c[0] for c in IDENTITY_CASES])
def test_identity_rules(name, fn):
    a = a0(3, 4)
    out, (grad,), relevance = dispatched(fn, [a])
    assert torch.equal(out, fn(a))
    assert torch.equal(grad, relevance)


def test_product_of_two_path_tensors_is_uniform():
    a, b = a0(3, 4), a0(4)
    for fn in (lambda x, y: x * y, torch.mul, lambda x, y: x.mul(y),
               lambda x, y: _iop(x, y, "mul_")):
        out, (ga, gb), relevance = dispatched(fn, [a, b])
        assert torch.allclose(ga, relevance / 2, rtol=1e-15)
        assert torch.allclose(gb, (relevance / 2).sum(0), rtol=1e-15)


def test_cp_lrp_holds_the_gate_constant():
    a, b = a0(3, 4), a0(3, 4)
    out, (ga, gb), relevance = dispatched(lambda x, y: F.silu(x) * y, [a, b], variant="cp-lrp")
    assert ga is None and torch.equal(gb, relevance)
    out, (ga, gb), relevance = dispatched(lambda x, y: y * torch.sigmoid(x), [a, b],
                                          variant="cp-lrp")
    assert ga is None and torch.equal(gb, relevance)
    out, (ga, gb), relevance = dispatched(lambda x, y: F.silu(x) * y, [a, b])
    assert torch.allclose(ga, relevance / 2) and torch.allclose(gb, relevance / 2)


MATMUL_CASES = [
    ("@", lambda a, b: a @ b), ("torch.matmul", torch.matmul),
    ("Tensor.matmul", torch.Tensor.matmul),
    ("bmm", torch.bmm), ("einsum", lambda a, b: torch.einsum("bij,bjk->bik", a, b)),
    ("einsum list", lambda a, b: torch.einsum("bij,bjk->bik", [a, b])),
]


@pytest.mark.parametrize("name,fn", MATMUL_CASES, ids=[c[0] for c in MATMUL_CASES])
@pytest.mark.parametrize("constant_b", [False, True])
def test_matmul_rules(name, fn, constant_b):
    a, b = a0(2, 3, 4), a0(2, 4, 5)
    out, (ga, gb), relevance = dispatched(fn, [a, b], on_path=[True, not constant_b])
    assert torch.equal(out, fn(a, b))
    g = relevance / s(out)
    share = 1.0 if constant_b else 0.5
    assert torch.allclose(ga, share * a * (g @ b.mT), rtol=1e-10, atol=1e-13)
    if constant_b:
        assert gb is None
    else:
        assert torch.allclose(gb, 0.5 * b * (a.mT @ g), rtol=1e-10, atol=1e-13)


def test_linear_and_addmm():
    x, w, bias = a0(5, 4), a0(3, 4), a0(3)
    out, (gx,), relevance = dispatched(lambda t: F.linear(t, w, bias), [x])
    assert torch.equal(out, F.linear(x, w, bias))
    assert torch.allclose(gx, x * ((relevance / s(out)) @ w), rtol=1e-10)
    out, (gx,), relevance = dispatched(lambda t: torch.addmm(bias, t, w.T), [x])
    assert torch.equal(out, torch.addmm(bias, x, w.T))
    assert torch.allclose(gx, x * ((relevance / s(out)) @ w), rtol=1e-10)


def direct_and_dispatched(fn_plain, fn_rule, tensors, variant="attnlrp"):
    out, grads, relevance = dispatched(fn_plain, tensors, variant=variant)
    leaves = [t.clone().requires_grad_() for t in tensors]
    direct = fn_rule(*leaves)
    direct.backward(relevance)
    assert torch.equal(out, fn_plain(*tensors))
    for got, leaf in zip(grads, leaves):
        if leaf.grad is None:
            assert got is None
        else:
            assert torch.equal(got, leaf.grad)


@pytest.mark.parametrize("form", [
    lambda x: F.softmax(x, dim=-1), lambda x: x.softmax(-1), lambda x: torch.softmax(x, -1),
    lambda x: F.softmax(x, -1, dtype=torch.float32)])
def test_softmax_forms(form):
    direct_and_dispatched(form, lambda x: lf.softmax(x, -1, form(x).dtype if form(x).dtype != D
                                                    else None), [a0(2, 3, 5)])


def test_softmax_is_stopped_in_cp_lrp():
    x = a0(2, 5).requires_grad_()
    with composites.get("cp-lrp").op_rules():
        weights = F.softmax(x, -1)
    assert torch.equal(weights, F.softmax(x.detach(), -1)) and not weights.requires_grad


@pytest.mark.parametrize("variant", ["attnlrp", "cp-lrp"])
def test_sdpa_forms(variant):
    q, k, v = a0(2, 4, 5, 8), a0(2, 2, 5, 8), a0(2, 2, 5, 8)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    hold = variant == "cp-lrp"
    direct_and_dispatched(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, scale=0.3),
        lambda q, k, v: lf.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True,
                                                        scale=0.3, hold_weights=hold),
        [q, k, v], variant)
    direct_and_dispatched(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        lambda q, k, v: lf.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                        hold_weights=hold),
        [q, k[:, :1].expand(2, 4, 5, 8).contiguous(), v[:, :1].expand(2, 4, 5, 8).contiguous()],
        variant)


def test_norm_forms():
    w, b = a0(6), a0(6)
    direct_and_dispatched(lambda x: F.layer_norm(x, (6,), w, b, 1e-5),
                          lambda x: lf.layer_norm(x, (6,), w, b, 1e-5), [a0(3, 6)])
    direct_and_dispatched(lambda x: F.rms_norm(x, (6,), w, 1e-6),
                          lambda x: lf.rms_norm(x, w, 1e-6), [a0(3, 6)])


LAYOUT = [
    lambda a: a.view(2, 6), lambda a: a.reshape(-1), lambda a: a.transpose(0, 1),
    lambda a: a.permute(1, 0), lambda a: a.T, lambda a: a.mT, lambda a: a[1:, ::2],
    lambda a: torch.cat([a, a], 0), lambda a: torch.stack([a, a]), lambda a: a.unsqueeze(0),
    lambda a: a.expand(2, 3, 4), lambda a: a.chunk(2, -1)[1], lambda a: a.to(torch.float32),
    lambda a: a.masked_fill(a > 0, 0.0), lambda a: torch.where(a > 0, a, 0.0),
    lambda a: F.pad(a, (1, 1)), lambda a: F.dropout(a, 0.5, training=False),
    lambda a: a.max(-1).values, lambda a: a.contiguous(), lambda a: a.flatten(),
]


@pytest.mark.parametrize("index", range(len(LAYOUT)))
def test_layout_ops_pass_through_in_strict_mode(index):
    fn = LAYOUT[index]
    a = a0(3, 4)
    leaves = [a.clone().requires_grad_()]
    with composites.get("attnlrp", strict=True).op_rules():
        out = fn(*leaves)
    relevance = torch.randn_like(out)
    out.backward(relevance)
    plain = a.clone().requires_grad_()
    fn(plain).backward(relevance)
    assert torch.equal(leaves[0].grad, plain.grad)


@pytest.mark.parametrize("form", [lambda a, b: a / b, torch.div,
                                  lambda a, b: _iop(a, b, "__itruediv__")])
def test_division_by_a_path_tensor_holds_the_denominator_constant(form):
    a, b = a0(3, 4), a0(4).abs() + 1
    out, (ga, gb), relevance = dispatched(form, [a, b])
    assert torch.equal(out, a / b)
    assert gb is None and torch.equal(ga, relevance)


@pytest.mark.parametrize("fn,op", [
    (lambda a, b: torch.cumprod(a, 0), "torch.cumprod"),
    (lambda a, b: a ** b, "Tensor.pow")])
def test_unruled_forms_are_reported(fn, op):
    a, b = a0(3, 4).abs() + 1, a0(3, 4).abs() + 1
    comp = composites.get("attnlrp", strict=True)
    with pytest.raises(lrp_explicit.UnruledOpError, match=op.replace(".", r"\.")):
        with comp.op_rules("label"):
            fn(a.requires_grad_(), b.requires_grad_())


@pytest.mark.parametrize("form", [lambda a: a.norm(dim=-1), lambda a: torch.norm(a, dim=1),
                                  lambda a: torch.linalg.vector_norm(a, dim=-1, keepdim=True),
                                  lambda a: a.norm()])
def test_euclidean_norm_is_identity_of_an_epsilon_sum_of_squares(form):
    a = a0(3, 4)
    out, (grad,), relevance = dispatched(form, [a])
    assert torch.equal(out, form(a))
    squares = (a * a).sum(-1, keepdim=True) if out.dim() else (a * a).sum()
    expected = a * a * (relevance.reshape(squares.shape) / s(squares))
    assert torch.allclose(grad, expected, rtol=1e-10)
    assert torch.allclose(grad.sum(), relevance.sum(), rtol=1e-9)  # conserving
