"""Where the time of one explanation goes: forward and backward, node by node.

Profiles one model and sequence length of :mod:`speed` (default: llama-10m at 512 tokens, the
case the speed target is judged on) with ``torch.profiler`` and writes, per method, the forward
and backward wall time (median of warm calls) and the backward time of each kind of autograd
node (the rule Functions for lrp_explicit, the stock nodes for the modified Gradient×Input).
The table says where the explicit rules pay more than the fused plain backward, and why. Two
more figures per method: the activations the autograd graph keeps for the backward (distinct
storages, parameters excluded) and the minor page faults of one call.

This script is a profiler, not an entry point: it runs the forward and the backward pass by
hand (not through :func:`lrp_explicit.pipeline.attribute`, as :mod:`speed` does) because it
times them apart and walks the autograd graph between them.

    python benchmarks/profile_backward.py                    # results/speed_profile.{json,md}
    python benchmarks/profile_backward.py --model llama-60m --seq 128
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import common
import torch
from torch.profiler import ProfilerActivity, profile

import mgxi
import speed

METHODS = ["ixg", "mgxi", "attnlrp"]


def _enter(method: str, model, composites, stack: ExitStack) -> None:
    if method == "mgxi":
        stack.enter_context(mgxi.modified_gxi(model, "attnlrp"))
    elif method in composites:
        stack.enter_context(composites[method].context(model))


def split_times(model, ids, composites, family: str, repeats: int) -> dict[str, dict[str, float]]:
    """Median forward and backward wall time per method (interleaved rounds)."""
    kwargs = {"logits_to_keep": 1} if family in ("llama", "gpt2") else {}
    embed = model.get_input_embeddings()
    times: dict[str, dict[str, list[float]]] = {
        m: {"forward": [], "backward": [], "page_faults": []} for m in METHODS}
    for r in range(repeats + 1):
        for method in METHODS:
            with ExitStack() as stack:
                _enter(method, model, composites, stack)
                x = embed(ids).detach().requires_grad_()
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                y = model(inputs_embeds=x, **kwargs).logits[0, -1, 1]
                mid = time.perf_counter()
                y.backward(y.detach())
                end = time.perf_counter()
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            if r:  # the first round warms up
                times[method]["forward"].append(mid - start)
                times[method]["backward"].append(end - mid)
                times[method]["page_faults"].append(faults)
    return {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}


def saved_bytes(model, ids, composites, family: str, method: str) -> int:
    """Bytes of the distinct storages the autograd graph saves for the backward (parameters
    excluded)."""
    kwargs = {"logits_to_keep": 1} if family in ("llama", "gpt2") else {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with ExitStack() as stack:
        _enter(method, model, composites, stack)
        x = model.get_input_embeddings()(ids).detach().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(inputs_embeds=x, **kwargs)
    return sum(storages.values())



def node_times(model, ids, composites, family: str, method: str,
               repeats: int) -> dict[str, float]:
    """Mean backward time (seconds, self and children) per kind of autograd node."""
    kwargs = {"logits_to_keep": 1} if family in ("llama", "gpt2") else {}
    embed = model.get_input_embeddings()
    total: dict[str, float] = {}
    with ExitStack() as stack:
        _enter(method, model, composites, stack)
        for r in range(repeats + 1):
            x = embed(ids).detach().requires_grad_()
            y = model(inputs_embeds=x, **kwargs).logits[0, -1, 1]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                y.backward(y.detach())
            if not r:
                continue
            for event in prof.key_averages():
                name = event.key
                if "Backward" in name and not name.startswith("autograd::engine"):
                    total[name] = total.get(name, 0.0) + event.cpu_time_total * 1e-6 / repeats
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def report(results: dict[str, Any], out: Path) -> None:
    common.write_json(out / "speed_profile.json", results)
    split = results["split_s"]
    lines = [f"# Where the time goes: {results['model']} at {results['seq']} tokens "
             f"({results['environment']['device_label']})", "",
             f"Command: `{results['command']}`.", "",
             "| method | forward ms | backward ms | total ms | total / modified G×I |",
             "|---|---|---|---|---|"]
    def total(row):
        return row["forward"] + row["backward"]

    lines[-2] += " page faults | saved MiB |"
    lines[-1] += "---|---|"
    for m in METHODS:
        f, b = split[m]["forward"], split[m]["backward"]
        row = (f"| {speed.LABELS[m]} | {1e3 * f:.1f} | {1e3 * b:.1f} | {1e3 * (f + b):.1f} | "
               f"{(f + b) / total(split['mgxi']):.2f} | {split[m]['page_faults']:.0f} | "
               f"{results['saved_bytes'][m] / 2 ** 20:.1f} |")
        lines.append(row)
    lines += ["", "Backward time per kind of autograd node (profiler, mean of "
              f"{results['repeats']} calls; a node's time includes the kernels it launches):", ""]
    for m in ("mgxi", "attnlrp"):
        nodes = results["nodes_s"][m]
        lines += [f"**{speed.LABELS[m]}** (sum {1e3 * sum(nodes.values()):.1f} ms)", "",
                  "| node | ms |", "|---|---|"]
        lines += [f"| `{k}` | {1e3 * v:.2f} |" for k, v in list(nodes.items())[:10]]
        lines.append("")
    out.joinpath("speed_profile.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-10m",
                        help="a model name of speed.FULL_CASES or speed.QUICK_CASES")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    case = next(c for c in speed.FULL_CASES + speed.QUICK_CASES if c.name == args.model)
    model = speed.build(case, torch.float32, "cpu")
    ids = speed.inputs(model, args.seq, "cpu")
    composites = speed.make_composites(model)
    env = common.environment()
    env["device_label"] = f"cpu, float32, 1 thread, {env['cpu']}, {env['cpu_count']} cores"
    results = {
        "environment": env, "model": case.name, "seq": args.seq, "repeats": args.repeats,
        "command": " ".join(["python benchmarks/profile_backward.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "split_s": split_times(model, ids, composites, case.family, args.repeats),
        "nodes_s": {m: node_times(model, ids, composites, case.family, m, args.repeats)
                    for m in ("mgxi", "attnlrp")},
        "saved_bytes": {m: saved_bytes(model, ids, composites, case.family, m)
                        for m in METHODS},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    report(results, args.out)
    print((args.out / "speed_profile.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
