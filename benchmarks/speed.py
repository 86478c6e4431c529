"""Speed and peak memory of explaining one prediction, method by method.

Methods, measured in one process on the same model object, weights and inputs:

- ``forward``: the plain forward pass without autograd (``torch.no_grad()``);
- ``ixg``: plain Input×Gradient, one backward pass through the stock model;
- ``mgxi``: AttnLRP as modified Gradient×Input (:mod:`mgxi`, the formulation of the seed paper,
  patched non-linearities and one plain backward);
- ``attnlrp`` / ``cp-lrp``: lrp_explicit's composites.

What is timed is the explanation itself (embedding lookup, forward, backward, relevance), for
every method one pass of :func:`lrp_explicit.pipeline.attribute` (``composite=None`` for the
gradients): the composites are registered and the modified-G×I patches applied right before
each timed call and removed right after it, outside the timer (``attribute`` uses a composite
the model carries without registering it again); ``register()``/``remove()`` are timed on
their own.

Time: median of ``repeats`` warm calls per method (fixed per case, so a run always measures the
same thing). The methods are interleaved round by round, each round in a rotated order, so that
the load of a shared machine hits all of them alike, and the ratios are medians of the per-round
ratios. Both wall time and process CPU time are recorded (CPU time is the steadier figure on a
loaded machine; the targets are judged on wall time). Peak memory: a fresh subprocess per
method; on CUDA ``torch.cuda.max_memory_allocated`` of the second call, on CPU the peak resident
set (``VmHWM``, reset right before the first call, after the model and inputs exist):
``peak`` is the process's peak, ``delta`` what the call added to the resident set before it.

Causal LMs compute the logits of the last position only (``logits_to_keep=1``, as in
generation); BERT's masked-LM head runs on all positions and one position is explained.

    python benchmarks/speed.py            # the full run (about 16 minutes on 2 shared CPU cores)
    python benchmarks/speed.py --quick    # tiny models, about a minute; writes to a temp folder
    python benchmarks/speed.py --device cuda --dtype bfloat16   # on a GPU (not run here)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import common  # noqa: F401  (puts lrp_explicit on the path)
import torch

import lrp_explicit
import mgxi
from lrp_explicit.pipeline import Prepared, Target, attribute

METHODS = ["forward", "ixg", "mgxi", "attnlrp", "cp-lrp"]
LABELS = {"forward": "forward", "ixg": "Input×Gradient", "mgxi": "modified G×I",
          "attnlrp": "AttnLRP", "cp-lrp": "CP-LRP"}
TIME_TARGET = 1.10  # AttnLRP / modified G×I at 512 tokens and more
SHORT_TIME_TARGET = 1.25  # … at 128 tokens (fixed costs weigh more)
MEMORY_TARGET = 1.15  # AttnLRP / Input×Gradient peak memory at 2048 tokens and more
BATCH_TIME_TARGET = 1.15  # a batch in one explain() call / modified G×I of the same batch
BATCH_SPEEDUP_TARGET = 1.5  # single explain() calls / one batched call


def time_target(seq: int) -> float:
    """The AttnLRP / modified G×I time target at ``seq`` tokens."""
    return SHORT_TIME_TARGET if seq <= 128 else TIME_TARGET


@dataclass
class Case:
    name: str
    family: str  # llama | gpt2 | bert
    config: dict[str, Any]
    seqs: list[int]
    repeats: int = 5
    skip: dict[int, str] = field(default_factory=dict)  # seq -> reason
    time_registration: bool = False
    memory: bool = True


def llama(name: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
          vocab: int) -> dict[str, Any]:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                max_position_embeddings=4096, tie_word_embeddings=False)


FULL_CASES = [
    Case("llama-10m", "llama", llama("10m", 256, 6, 4, 4, 704, 10000), [128, 512, 2048, 4096],
         repeats=7),
    Case("llama-60m", "llama", llama("60m", 512, 12, 8, 4, 1408, 24000),
         [128, 512, 2048, 4096]),
    Case("llama-350m", "llama", llama("350m", 1024, 24, 16, 8, 2816, 32000), [128, 512, 2048],
         repeats=3, time_registration=True,
         skip={2048: "time budget: about 15 minutes for its rounds and memory runs on 2 CPU "
                     "cores, more than half of the whole run"}),
    Case("gpt2-124m", "gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
                                   n_positions=1024), [512]),
    Case("bert-110m", "bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                   intermediate_size=3072, vocab_size=30522), [512]),
]

#: Batches explained in one ``explain()`` call: (case, samples, tokens per sample).
BATCH_CASES = [(FULL_CASES[0], 8, 128), (FULL_CASES[1], 8, 128)]

QUICK_CASES = [
    Case("llama-tiny", "llama", llama("tiny", 64, 2, 4, 2, 176, 1000), [128], repeats=3,
         time_registration=True),
    Case("gpt2-tiny", "gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=1000,
                                   n_positions=256), [64], repeats=3, memory=False),
    Case("bert-tiny", "bert", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=256, vocab_size=1000), [64], repeats=3,
         memory=False),
]


QUICK_BATCH_CASES = [(QUICK_CASES[0], 4, 32)]


# ------------------------------------------------------------------------------ models and calls


def build(case: Case, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The case's model with seeded random weights (the same weights in every process)."""
    import transformers

    torch.manual_seed(0)
    if case.family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**case.config))
    elif case.family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            **case.config, bos_token_id=0, eos_token_id=0))
    elif case.family == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(**case.config))
    else:  # pragma: no cover
        raise ValueError(case.family)
    model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Method:
    """One method on one model: ``enter()``/``exit()`` (outside the timer) around ``run()``."""
    run: Callable[[], torch.Tensor | None]
    enter: Callable[[], None] = lambda: None
    exit: Callable[[], None] = lambda: None

    def __call__(self) -> torch.Tensor | None:
        self.enter()
        try:
            return self.run()
        finally:
            self.exit()


def make_method(model: torch.nn.Module, family: str, method: str, ids: torch.Tensor,
                composites: dict) -> Method:
    """``method`` on ``model``: ``run()`` explains one prediction and returns the per-token
    relevance (``None`` for the forward pass).

    Every explanation is one :func:`lrp_explicit.pipeline.attribute` pass: Input×Gradient and
    modified G×I (under the :func:`mgxi.modified_gxi` patches) with ``composite=None`` and the
    initial relevance 1 (a plain gradient, times the input), AttnLRP / CP-LRP with their
    composite, registered by ``enter()`` outside the timer (``attribute`` then uses it as it is,
    without registering it again) and initialised with the logit. What ``attribute`` adds to
    a plain ``y.backward()`` is the same for every method and small next to the passes: a walk
    over the modules (no module is recorded), a hook on the input leaf and a copy of its
    gradient.
    """
    embed = model.get_input_embeddings()
    kwargs = {"logits_to_keep": 1} if family in ("llama", "gpt2") else {}
    position = -1 if family in ("llama", "gpt2") else ids.shape[1] // 2
    target = 1

    def prepared() -> Prepared:
        """The embedded input as the explained leaf (built here rather than by ``prepare()``,
        which would also check the ids and spell the tokens inside the timer)."""
        with torch.no_grad():
            e = embed(ids)
        return Prepared({"inputs_embeds": e.requires_grad_(method != "forward")}, dict(kwargs))

    def logit(plain: bool) -> Callable[[Any], Target]:
        def fn(output: Any) -> Target:
            y = output.logits[0, position, target]
            return Target(y, torch.ones_like(y) if plain else y.detach())
        return fn

    if method == "forward":
        def run():
            item = prepared()
            with torch.no_grad():
                item.run(model)
            return None
        return Method(run)
    if method in ("ixg", "mgxi"):
        def run():
            item = prepared()
            grad = attribute(model, item, logit(True), None).relevance["inputs_embeds"]
            return (grad * item.leaf.detach()).sum(-1)
        if method == "ixg":
            return Method(run)
        stack = ExitStack()
        return Method(run, lambda: stack.enter_context(mgxi.modified_gxi(model, "attnlrp")),
                      stack.close)
    comp = composites[method]

    def run():
        return attribute(model, prepared(), logit(False), comp).relevance["inputs_embeds"].sum(-1)
    return Method(run, lambda: comp.register(model), comp.remove)


def inputs(model: torch.nn.Module, seq: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seq)
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(3, vocab, (1, seq), generator=generator).to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_composites(model):
    return {m: lrp_explicit.composites.get(m, model) for m in ("attnlrp", "cp-lrp")}


# ------------------------------------------------------------------------------ timing


def _timed(method: Method, device: str) -> tuple[float, float, torch.Tensor | None]:
    """(wall seconds, process CPU seconds, relevance) of one call, setup outside the timer."""
    gc.collect()
    method.enter()
    try:
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        relevance = method.run()
        synchronize(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        method.exit()
    return wall, cpu, relevance


def time_case(case: Case, seq: int, repeats: int, dtype: torch.dtype,
              device: str) -> dict[str, Any]:
    model = build(case, dtype, device)
    ids = inputs(model, seq, device)
    composites = make_composites(model)
    methods = {m: make_method(model, case.family, m, ids, composites) for m in METHODS}
    relevance = {m: _timed(methods[m], device)[2] for m in METHODS}  # warm-up; agreement
    wall: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(repeats):
        for m in METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]:
            w, c, _ = _timed(methods[m], device)
            wall[m].append(w)
            cpu[m].append(c)

    def ratios(times):
        def ratio(a, b):
            return statistics.median(x / y for x, y in zip(times[a], times[b]))
        return {"attnlrp/mgxi": ratio("attnlrp", "mgxi"), "cp-lrp/mgxi": ratio("cp-lrp", "mgxi"),
                "attnlrp/ixg": ratio("attnlrp", "ixg"), "mgxi/ixg": ratio("mgxi", "ixg")}

    result = {
        "model": case.name, "family": case.family, "parameters": parameters(model), "seq": seq,
        "repeats": repeats,
        "time_s": {m: statistics.median(wall[m]) for m in METHODS},
        "cpu_s": {m: statistics.median(cpu[m]) for m in METHODS},
        "times_s": wall, "cpu_times_s": cpu,
        "ratios": ratios(wall), "cpu_ratios": ratios(cpu),
        "agreement": agreement(relevance),
    }
    if case.time_registration:
        result["registration"] = time_registration(model, composites["attnlrp"])
    del model, methods, composites
    gc.collect()
    return result


def agreement(relevance: dict[str, torch.Tensor | None]) -> dict[str, float]:
    """How closely lrp_explicit's AttnLRP matches the modified Gradient×Input (same rules,
    ε → 0 there): relative L2 difference and Pearson correlation of the token relevance."""
    a = relevance["attnlrp"].double().flatten()
    b = relevance["mgxi"].double().flatten()
    diff = float((a - b).norm() / b.norm().clamp_min(1e-300))
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if a.numel() > 1 else 1.0
    return {"attnlrp_vs_mgxi_rel_l2": diff, "attnlrp_vs_mgxi_pearson": corr}


def time_registration(model, comp, repeats: int = 20) -> dict[str, Any]:
    register, remove = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        comp.register(model)
        mid = time.perf_counter()
        comp.remove()
        end = time.perf_counter()
        register.append(mid - start)
        remove.append(end - mid)
    modules = sum(1 for _ in model.modules())
    return {"register_ms": 1e3 * statistics.median(register),
            "remove_ms": 1e3 * statistics.median(remove), "modules": modules,
            "parameters": parameters(model)}


# ------------------------------------------------------------------------------ batches


BATCH_METHODS = ["batch", "mgxi-batch", "singles"]
BATCH_LABELS = {"batch": "AttnLRP, one explain() call", "mgxi-batch": "modified G×I of the batch",
                "singles": "AttnLRP, one explain() call per sample"}


def make_batch_methods(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, Method]:
    """The batch ``ids`` (``(samples, tokens)``) explained three ways, each explaining logit 1
    at every sample's last token: ``lrp_explicit.explain`` on the whole batch (one forward and
    one backward), the modified Gradient×Input of the same batch (one pass of
    :func:`lrp_explicit.pipeline.attribute` under the :func:`mgxi.modified_gxi` patches, the
    sum of the samples' logits explained at once), and ``explain`` called once per sample.
    Each returns the ``(samples, tokens)`` relevance."""
    comp = lrp_explicit.composites.get("attnlrp", model)
    embed = model.get_input_embeddings()

    def batch():
        out = lrp_explicit.explain(model, ids, target=1, composite=comp, progress=False,
                                   batch_size=ids.shape[0])
        return torch.stack([e.relevance for e in out])

    def singles():
        return torch.stack([lrp_explicit.explain(model, row[None], target=1, composite=comp,
                                                 progress=False).relevance for row in ids])

    def modified():
        with torch.no_grad():
            e = embed(ids)
        item = Prepared({"inputs_embeds": e.requires_grad_()}, {})

        def target(output: Any) -> Target:
            y = output.logits[:, -1, 1].sum()
            return Target(y, torch.ones_like(y))

        grad = attribute(model, item, target, None).relevance["inputs_embeds"]
        return (grad * item.leaf.detach()).sum(-1)

    stack = ExitStack()
    return {"batch": Method(batch), "singles": Method(singles),
            "mgxi-batch": Method(modified,
                                 lambda: stack.enter_context(mgxi.modified_gxi(model, "attnlrp")),
                                 stack.close)}


def time_batch_case(case: Case, samples: int, seq: int, repeats: int, dtype: torch.dtype,
                    device: str, threads: int) -> dict[str, Any]:
    """Times of a batch explained in one call, its modified G×I, and one call per sample
    (methods interleaved per round, as in :func:`time_case`), with ``threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build(case, dtype, device)
        generator = torch.Generator().manual_seed(seq)
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(3, vocab, (samples, seq), generator=generator).to(device)
        methods = make_batch_methods(model, ids)
        relevance = {m: _timed(methods[m], device)[2] for m in BATCH_METHODS}  # warm-up
        wall: dict[str, list[float]] = {m: [] for m in BATCH_METHODS}
        for r in range(repeats):
            for m in BATCH_METHODS[r % 3:] + BATCH_METHODS[:r % 3]:
                wall[m].append(_timed(methods[m], device)[0])
    finally:
        torch.set_num_threads(previous)

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(wall[a], wall[b]))

    same = float((relevance["batch"] - relevance["singles"]).abs().max()
                 / relevance["singles"].abs().max())
    return {"model": case.name, "parameters": parameters(model), "samples": samples,
            "seq": seq, "threads": threads, "repeats": repeats,
            "time_s": {m: statistics.median(wall[m]) for m in BATCH_METHODS}, "times_s": wall,
            "ratios": {"batch/mgxi-batch": ratio("batch", "mgxi-batch"),
                       "singles/batch": ratio("singles", "batch")},
            "batch_vs_singles_max_rel_diff": same,
            "agreement": agreement({"attnlrp": relevance["batch"],
                                    "mgxi": relevance["mgxi-batch"]})}


# ------------------------------------------------------------------------------ memory


def _status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field_name)


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: peak memory of one method's call."""
    torch.set_num_threads(spec["threads"])
    case = Case(**spec["case"])
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    model = build(case, dtype, device)
    ids = inputs(model, spec["seq"], device)
    composites = make_composites(model)
    method = make_method(model, case.family, spec["method"], ids, composites)
    gc.collect()
    method.enter()
    if device.startswith("cuda"):
        method.run()  # warm-up (kernels, workspaces), then the measured call
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        method.run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        kind = "cuda max_memory_allocated"
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = _status("VmRSS")
        method.run()
        peak = _status("VmHWM")
        kind = "VmHWM of a fresh process"
    method.exit()
    return {"peak_bytes": peak, "base_bytes": base, "delta_bytes": peak - base, "kind": kind}


def measure_memory(case: Case, seq: int, method: str, args) -> dict[str, Any]:
    spec = {"case": case.__dict__, "seq": seq, "method": method, "threads": args.threads,
            "device": args.device, "dtype": args.dtype}
    proc = subprocess.run([sys.executable, __file__, "--memory-worker", json.dumps(spec)],
                          capture_output=True, text=True, cwd=Path(__file__).parent)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memories(case: Case, seq: int, args) -> dict[str, Any]:
    """All methods' peak memory, ``--memory-jobs`` fresh processes at a time (their timings are
    not used, so running them side by side changes nothing but the wall time)."""
    with ThreadPoolExecutor(max_workers=args.memory_jobs) as pool:
        futures = {m: pool.submit(measure_memory, case, seq, m, args) for m in METHODS}
        return {m: f.result() for m, f in futures.items()}


# ------------------------------------------------------------------------------ report


def mib(x: float) -> float:
    return x / 2**20


def _memory_ratio(r: dict[str, Any], key: str) -> float | None:
    mem = r.get("memory", {})
    a, b = mem.get("attnlrp", {}).get(key), mem.get("ixg", {}).get(key)
    return a / b if a and b else None


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per case and length: the time target (AttnLRP / modified G×I ≤ 1.25 at 128 tokens,
    ≤ 1.10 from 512 on) and the memory target (peak AttnLRP / I×G ≤ 1.15 from 2048 tokens
    on), and whether they hold; per batch case the batch targets."""
    out = []
    for r in results["cases"]:
        if "skipped" in r:
            continue
        time_ratio, peak = r["ratios"]["attnlrp/mgxi"], _memory_ratio(r, "peak_bytes")
        judged = r["seq"] >= 2048
        out.append({"model": r["model"], "seq": r["seq"], "time_ratio": time_ratio,
                    "cpu_time_ratio": r["cpu_ratios"]["attnlrp/mgxi"],
                    "time_target": time_target(r["seq"]),
                    "time_target_holds": time_ratio <= time_target(r["seq"]),
                    "peak_ratio": peak, "delta_ratio": _memory_ratio(r, "delta_bytes"),
                    "memory_target_holds": (None if peak is None or not judged
                                            else peak <= MEMORY_TARGET)})
    for b in results.get("batches", []):
        out.append({"model": b["model"], "batch": f"{b['samples']} × {b['seq']}",
                    "batch_ratio": b["ratios"]["batch/mgxi-batch"],
                    "batch_target_holds": b["ratios"]["batch/mgxi-batch"] <= BATCH_TIME_TARGET,
                    "speedup": b["ratios"]["singles/batch"],
                    "speedup_target_holds": b["ratios"]["singles/batch"]
                    >= BATCH_SPEEDUP_TARGET})
    return out


def report(results: dict[str, Any], out: Path) -> None:
    from common import markdown_table, pyplot, write_json

    results["verdicts"] = verdicts(results)
    write_json(out / "speed.json", results)
    rows = []
    for r in results["cases"]:
        params = f"{r['parameters'] / 1e6:.{0 if r['parameters'] >= 1e7 else 1}f}M"
        if "skipped" in r:
            rows.append([r["model"], params, r["seq"]] + ["—"] * 11
                        + [f"skipped: {r['skipped']}"])
            continue
        t, q, c, mem = r["time_s"], r["ratios"], r["cpu_ratios"], r.get("memory", {})

        def m(method, key="peak_bytes"):
            v = mem.get(method, {}).get(key)
            return f"{mib(v):.0f}" if v is not None else "—"

        def fmt(v, bold=False):
            return "—" if v is None else (f"**{v:.2f}**" if bold else f"{v:.2f}")

        rows.append([
            r["model"], params, r["seq"], *(f"{1e3 * t[k]:.0f}" for k in METHODS),
            fmt(q["attnlrp/mgxi"], True), f"{c['attnlrp/mgxi']:.2f}",
            f"{q['cp-lrp/mgxi']:.2f}", f"{q['attnlrp/ixg']:.2f}",
            f"{m('ixg')} / {m('attnlrp')}", fmt(_memory_ratio(r, "peak_bytes"), r["seq"] >= 2048),
            f"{m('ixg', 'delta_bytes')} / {m('attnlrp', 'delta_bytes')}",
            fmt(_memory_ratio(r, "delta_bytes")), f"{r['repeats']}",
        ])
    header = ["model", "params", "tokens", *(f"{LABELS[k]} ms" for k in METHODS),
              "AttnLRP / mod. G×I", "(CPU time)", "CP-LRP / mod. G×I", "AttnLRP / I×G",
              "peak MiB I×G / AttnLRP", "peak ratio", "Δ MiB I×G / AttnLRP", "Δ ratio",
              "rounds"]
    env = results["environment"]
    lines = [f"# Speed and memory ({env['device_label']})", "",
             f"Command: `{results['command']}`; {env.get('wall_s', 0) / 60:.0f} minutes; load "
             f"average {results['load_average']['start'][0]:.2f} at the start, "
             f"{results['load_average'].get('end', [float('nan')])[0]:.2f} at the end "
             f"(torch {env['torch']}, transformers {env['transformers']}).", "",
             markdown_table(header, rows), "",
             "Times: wall-clock median of warm calls (registration outside the timer), methods "
             "interleaved per round; ratios: median of the per-round ratios, also in process CPU "
             "time. Memory: peak resident set (VmHWM) of a fresh process per method, which "
             "includes the Python runtime, torch and the weights; Δ: what the call added to the "
             "resident set before it.", ""]
    def held(ok: bool | None) -> str:
        return "not judged" if ok is None else "held" if ok else "**missed**"

    for v in results["verdicts"]:
        if "batch" in v:
            continue
        lines.append(f"- {v['model']} at {v['seq']} tokens: time AttnLRP / modified G×I "
                     f"{v['time_ratio']:.3f} (target ≤ {v['time_target']}: "
                     f"{held(v['time_target_holds'])}); peak memory AttnLRP / I×G "
                     f"{fmt(v['peak_ratio'])} (target ≤ {MEMORY_TARGET} from 2048 tokens: "
                     f"{held(v['memory_target_holds'])}; Δ of the call "
                     f"{fmt(v['delta_ratio'])}).")
    batches = results.get("batches", [])
    if batches:
        lines += ["", "Batches in one call (`lrp_explicit.explain` on a 2-D id tensor, "
                      "`batch_size` = the batch):", "",
                  markdown_table(["model", "batch", "threads",
                                  *(f"{BATCH_LABELS[m]} ms" for m in BATCH_METHODS),
                                  "batch / mod. G×I of the batch", "single calls / batch",
                                  "max rel. diff batch vs singles", "rounds"],
                                 [[b["model"], f"{b['samples']} × {b['seq']}", b["threads"],
                                   *(f"{1e3 * b['time_s'][m]:.0f}" for m in BATCH_METHODS),
                                   f"{b['ratios']['batch/mgxi-batch']:.2f}",
                                   f"{b['ratios']['singles/batch']:.2f}",
                                   f"{b['batch_vs_singles_max_rel_diff']:.1e}", b["repeats"]]
                                  for b in batches]), ""]
        for v in results["verdicts"]:
            if "batch" not in v:
                continue
            lines.append(f"- {v['model']}, {v['batch']} tokens: one call / modified G×I of the "
                         f"batch {v['batch_ratio']:.3f} (target ≤ {BATCH_TIME_TARGET}: "
                         f"{held(v['batch_target_holds'])}); single calls / one call "
                         f"{v['speedup']:.2f} (target ≥ {BATCH_SPEEDUP_TARGET}: "
                         f"{held(v['speedup_target_holds'])}).")
    reg = [r["registration"] for r in results["cases"] if "registration" in r]
    if reg:
        g = reg[-1]
        lines += ["", f"`register()` / `remove()` on the {g['parameters'] / 1e6:.0f}M-parameter "
                      f"model ({g['modules']} modules): {g['register_ms']:.1f} ms / "
                      f"{g['remove_ms']:.1f} ms (median of 20)."]
    (out / "speed.md").write_text("\n".join(lines) + "\n")

    plt = pyplot()
    if plt is None:
        return
    done = [r for r in results["cases"] if "skipped" not in r]
    if not done:
        return
    labels = [f"{r['model']}\n{r['seq']}" for r in done]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(done) + 3), 4.2))
    xs = range(len(done))
    width = 0.38
    axes[0].bar([x - width / 2 for x in xs], [r["ratios"]["attnlrp/mgxi"] for r in done], width,
                label="AttnLRP")
    axes[0].bar([x + width / 2 for x in xs], [r["ratios"]["cp-lrp/mgxi"] for r in done], width,
                label="CP-LRP")
    axes[0].axhline(TIME_TARGET, color="k", ls="--", lw=1, label=f"target {TIME_TARGET}×")
    axes[0].axhline(1.0, color="grey", lw=0.5)
    axes[0].set_title("time / modified Gradient×Input")
    for k, (key, label) in enumerate((("peak_bytes", "peak"), ("delta_bytes", "Δ of the call"))):
        pairs = [(i, _memory_ratio(r, key)) for i, r in enumerate(done)]
        pairs = [(i, v) for i, v in pairs if v is not None]
        axes[1].bar([i + (k - 0.5) * width for i, _ in pairs], [v for _, v in pairs], width,
                    label=label)
    axes[1].axhline(MEMORY_TARGET, color="k", ls="--", lw=1, label=f"target {MEMORY_TARGET}×")
    axes[1].axhline(1.0, color="grey", lw=0.5)
    axes[1].set_title("AttnLRP memory / Input×Gradient")
    for ax in axes:
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results; a temp folder with "
                             "--quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per case (default: fixed per case, 3 to 7)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default 1: the methods run one at a "
                             "time, and 1 thread is the fairest choice on a shared machine)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-jobs", type=int, default=2,
                        help="memory subprocesses run side by side")
    parser.add_argument("--only", default=None, help="comma-separated model names")
    parser.add_argument("--batch-threads", type=int, default=2,
                        help="torch threads for the batch cases (default 2: the cores a batch "
                             "can share)")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0
    if args.device.startswith("cuda"):
        args.memory_jobs = 1  # one process per GPU at a time
    torch.set_num_threads(args.threads)
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.only:
        cases = [c for c in cases if c.name in args.only.split(",")]
    out = args.out or (Path(tempfile.mkdtemp(prefix="speed-quick-")) if args.quick
                       else common.RESULTS)
    dtype = getattr(torch, args.dtype)
    env = common.environment()
    env["device_label"] = (f"{args.device}, {args.dtype}, {args.threads} thread"
                           f"{'s' if args.threads > 1 else ''}"
                           + ("" if args.device.startswith("cuda") else
                              f", {env['cpu']}, {env['cpu_count']} cores"))
    command = " ".join(["python benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)])
    results: dict[str, Any] = {
        "environment": env, "command": command, "cases": [],
        "load_average": {"start": list(os.getloadavg())},
        "targets": {"attnlrp/mgxi time at 128 tokens": SHORT_TIME_TARGET,
                    "attnlrp/mgxi time from 512 tokens": TIME_TARGET,
                    "attnlrp/ixg peak memory from 2048 tokens": MEMORY_TARGET,
                    "batch/mgxi-batch time": BATCH_TIME_TARGET,
                    "singles/batch speed-up": BATCH_SPEEDUP_TARGET}}
    started = time.perf_counter()
    for case in cases:
        for seq in case.seqs:
            if seq in case.skip:
                results["cases"].append({"model": case.name, "seq": seq,
                                         "parameters": _count(case),
                                         "skipped": case.skip[seq]})
                print(f"{case.name} @ {seq}: skipped ({case.skip[seq]})", flush=True)
                continue
            start = time.perf_counter()
            repeats = args.repeats or (min(case.repeats, 3) if seq >= 4096 else case.repeats)
            r = time_case(case, seq, repeats, dtype, args.device)
            if case.memory and not args.no_memory:
                r["memory"] = measure_memories(case, seq, args)
            r["wall_s"] = time.perf_counter() - start
            r["load_average"] = list(os.getloadavg())
            results["cases"].append(r)
            peak = _memory_ratio(r, "peak_bytes")
            print(f"{case.name} @ {seq}: " + ", ".join(
                f"{k} {1e3 * v:.0f} ms" for k, v in r["time_s"].items())
                + f"; AttnLRP/mGxI {r['ratios']['attnlrp/mgxi']:.3f}"
                + f" (CPU {r['cpu_ratios']['attnlrp/mgxi']:.3f})"
                + ("" if peak is None else f", peak AttnLRP/I×G {peak:.2f}")
                + f" ({r['wall_s']:.0f} s)", flush=True)
            env["wall_s"] = time.perf_counter() - started
            results["load_average"]["end"] = list(os.getloadavg())
            report(results, out)
    results["batches"] = []
    for case, samples, seq in (QUICK_BATCH_CASES if args.quick else BATCH_CASES):
        if args.only and case.name not in args.only.split(","):
            continue
        b = time_batch_case(case, samples, seq, args.repeats or case.repeats, dtype,
                            args.device, args.batch_threads)
        results["batches"].append(b)
        print(f"{case.name} batch {samples} × {seq}: " + ", ".join(
            f"{k} {1e3 * v:.0f} ms" for k, v in b["time_s"].items())
            + f"; batch/mGxI {b['ratios']['batch/mgxi-batch']:.3f}, singles/batch "
            f"{b['ratios']['singles/batch']:.2f}", flush=True)
    env["wall_s"] = time.perf_counter() - started
    results["load_average"]["end"] = list(os.getloadavg())
    report(results, out)
    print(f"results in {out} ({env['wall_s']:.0f} s)")
    return 0


def _count(case: Case) -> int:
    """Parameter count without building the weights (meta device)."""
    with torch.device("meta"):
        import transformers

        cls, cfg = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config),
                    "bert": (transformers.BertForMaskedLM, transformers.BertConfig)}[case.family]
        return parameters(cls(cfg(**case.config)))


if __name__ == "__main__":
    sys.exit(main())
