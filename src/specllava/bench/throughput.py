"""`specllava bench --throughput`: tokens/s and latency against the number of concurrent requests.

For each concurrency c (default 1, 2, 4, 8) the prompts are taken c at a time (consecutive groups
of the prompt list; a last incomplete group is dropped); the c requests of a group arrive
together and are decoded together:

  hf       transformers' batched generate() on the group, left-padded as generate() wants
           (greedy; every request's latency is the call's wall time, since all rows return together)
  ar       specllava's batched plain decoding: `start` every request, then `step` them together
  dynamic  specllava's batched speculative decoding, the same way (and any other method given)

Per group and method: wall time from the group's arrival to its last token, and per request its
latency (arrival to its own last token) and its new tokens. Methods are interleaved per group, their
order rotating by one per group. Reported per (method, c): aggregate tokens/s (all new tokens /
all wall time), tokens per CPU second (process CPU time, all threads: robust to other jobs on a
shared machine, which stretch wall time), p50 and p95 request latency, and the speedup of
aggregate tokens/s (and of tokens per CPU second) over the same method at c=1, and each request's
latency over its own latency alone (the same prompt and method at c=1): the median and the largest
such ratio (`latency_vs_alone_p50`, `latency_vs_alone_max`). At T=0 every
request's tokens are compared with hf's for the same prompt decoded alone (`match_hf`; hf's own
batched rows too): a difference at a bf16 near-tie of batched matmuls is possible, and
`divergences` lists each with the target's top-2 logit margin there.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..core.decoder import SpeculativeDecoder
from .harness import method_order, prepare_inputs

THROUGHPUT_METHODS = ("hf", "ar", "dynamic")


def batch_inputs(rows: list[dict], pad_id: int) -> dict:
    """One padded batch (left padding) from per-request prepared inputs, as a processor with
    padding_side="left" returns it: input_ids and attention_mask [B, longest], the images of the
    rows that have one stacked in row order."""
    width = max(r["input_ids"].shape[1] for r in rows)
    ids, mask = [], []
    for r in rows:
        pad = width - r["input_ids"].shape[1]
        ids.append(torch.nn.functional.pad(r["input_ids"], (pad, 0), value=pad_id))
        mask.append(torch.nn.functional.pad(r["attention_mask"], (pad, 0), value=0))
    out = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask)}
    for key in ("pixel_values", "image_sizes"):
        parts = [r[key] for r in rows if r.get(key) is not None]
        if parts:
            out[key] = torch.cat(parts)
    return out


def pad_and_eos(target) -> tuple[int, set[int]]:
    """The padding id for `batch_inputs` (the generation config's, else its smallest EOS id, else
    0) and the set of EOS ids, from `target.generation_config`."""
    eos_ids = target.generation_config.eos_token_id
    eos = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) - {None}
    pad_id = target.generation_config.pad_token_id
    return (pad_id if pad_id is not None else (min(eos) if eos else 0)), eos


def _new_tokens(row: torch.Tensor, eos: set[int]) -> list[int]:
    """A generate() row's new tokens up to its first EOS (kept)."""
    out = []
    for tok in row.tolist():
        out.append(tok)
        if tok in eos:
            break
    return out


def time_group(method: str, target, decoder: SpeculativeDecoder | None, rows: list[dict], max_new_tokens: int,
               pad_id: int, eos: set[int]) -> dict:
    """One group of requests arriving together, decoded by `method`: wall time, per-request
    latency and tokens."""
    if method == "hf":
        batch = batch_inputs(rows, pad_id)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = target.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = [_new_tokens(r, eos) for r in out[:, batch["input_ids"].shape[1]:]]
        return {"wall_s": wall, "cpu_s": cpu, "latency_s": [wall] * len(rows), "tokens": tokens}
    t0, c0 = time.perf_counter(), time.process_time()
    seqs = [decoder.start(**r, max_new_tokens=max_new_tokens) for r in rows]
    while not all(s.finished for s in seqs):
        decoder.step(seqs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "latency_s": [s.t_end - t0 for s in seqs], "tokens": [s.tokens for s in seqs],
            "mean_accepted": [s.summary()["mean_accepted"] for s in seqs]}


def run_throughput(target, decoders: dict, processor, prompts, concurrency: list[int], max_new_tokens: int,
                   warmup: int = 1, progress: bool = True) -> dict:
    """Every (concurrency, group, method), interleaved; `decoders`: method -> SpeculativeDecoder
    (None for hf). Returns {"runs": [...], "summary": {...}}."""
    from tqdm import tqdm

    from ..core.model_info import input_device

    device = input_device(target)
    rows = [prepare_inputs(processor, p, target.dtype, device) for p in prompts]
    pad_id, eos = pad_and_eos(target)
    methods = tuple(decoders)
    for _ in range(warmup):  # untimed: lazy initialisation, allocator growth, kernel choice
        for method in methods:
            time_group(method, target, decoders[method], rows[: max(concurrency)], 8, pad_id, eos)
    work = [(c, g) for c in concurrency for g in range(len(rows) // c)]
    runs = []
    bar = tqdm(total=len(work) * len(methods), disable=not progress, desc="throughput")
    for turn, (c, g) in enumerate(work):
        group = rows[g * c : (g + 1) * c]
        for method in method_order(methods, turn):
            rec = time_group(method, target, decoders[method], group, max_new_tokens, pad_id, eos)
            runs.append({"method": method, "concurrency": c, "group": g,
                         "prompts": [p.id for p in prompts[g * c : (g + 1) * c]], **rec})
            bar.update()
    bar.close()
    divergences = _match_hf(runs, target, {p.id: row for p, row in zip(prompts, rows)})
    return {"runs": runs, "summary": summarize(runs), "divergences": divergences}


def _match_hf(runs: list[dict], target, inputs: dict) -> list[dict]:
    """Each request's tokens against hf's for the same prompt decoded alone (c=1, else hf's row in
    the same group): `match_hf` per run; every mismatch listed with the target's top-2 margin at
    the first differing position (`harness.divergence`), hf's own batched rows included."""
    from .harness import divergence

    alone = {r["prompts"][0]: r["tokens"][0] for r in runs if r["method"] == "hf" and r["concurrency"] == 1}
    grouped = {(r["concurrency"], r["group"]): r["tokens"] for r in runs if r["method"] == "hf"}
    out = []
    for r in runs:
        refs = [alone.get(pid) for pid in r["prompts"]]
        if any(ref is None for ref in refs):
            refs = grouped.get((r["concurrency"], r["group"]))
        if refs is None or (r["method"] == "hf" and r["concurrency"] == 1):
            continue
        r["match_hf"] = [a == b for a, b in zip(r["tokens"], refs)]
        for pid, ok, ref, got in zip(r["prompts"], r["match_hf"], refs, r["tokens"]):
            if not ok:
                with torch.inference_mode():
                    d = divergence(target, inputs[pid], ref, got)
                out.append({"method": r["method"], "concurrency": r["concurrency"], "prompt": pid, **d})
    return out


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(runs: list[dict]) -> dict:
    """{method: {c: {tokens_per_s, p50_latency_s, p95_latency_s, requests, speedup_vs_c1, ...}}}."""
    out: dict = {}
    for r in runs:
        cell = out.setdefault(r["method"], {}).setdefault(r["concurrency"], {"tokens": 0, "wall": 0.0, "cpu": 0.0, "lat": [],
                                                                             "match": [], "tau": [], "ratio": []})
        cell["tokens"] += sum(len(t) for t in r["tokens"])
        cell["wall"] += r["wall_s"]
        cell["cpu"] += r.get("cpu_s", 0.0)
        cell["lat"] += r["latency_s"]
        cell["match"] += r.get("match_hf", [])
        cell["tau"] += r.get("mean_accepted", [])
    alone = {(r["method"], pid): lat for r in runs if r["concurrency"] == 1 and "prompts" in r
             for pid, lat in zip(r["prompts"], r["latency_s"])}
    for r in runs:  # each request's latency over the same request's alone
        for pid, lat in zip(r.get("prompts", []), r["latency_s"]):
            if (r["method"], pid) in alone:
                out[r["method"]][r["concurrency"]]["ratio"].append(lat / alone[(r["method"], pid)])
    summary: dict = {}
    for method, by_c in out.items():
        summary[method] = {}
        for c, cell in sorted(by_c.items()):
            summary[method][c] = {
                "tokens_per_s": cell["tokens"] / cell["wall"],
                "tokens_per_cpu_s": cell["tokens"] / cell["cpu"] if cell["cpu"] else None,
                "p50_latency_s": statistics.median(cell["lat"]),
                "p95_latency_s": _percentile(cell["lat"], 0.95),
                "requests": len(cell["lat"]),
                "match_hf": f"{sum(cell['match'])}/{len(cell['match'])}" if cell["match"] else None,
                "mean_accepted": statistics.mean(cell["tau"]) if cell["tau"] else None,
                "latency_vs_alone_p50": statistics.median(cell["ratio"]) if cell["ratio"] else None,
                "latency_vs_alone_max": max(cell["ratio"]) if cell["ratio"] else None,
            }
        one = summary[method].get(min(by_c))
        for c, row in summary[method].items():
            row["speedup_vs_c1"] = row["tokens_per_s"] / one["tokens_per_s"] if one else None
            row["cpu_speedup_vs_c1"] = (row["tokens_per_cpu_s"] / one["tokens_per_cpu_s"]
                                        if one and one["tokens_per_cpu_s"] and row["tokens_per_cpu_s"] else None)
            row["latency_vs_c1"] = row["p50_latency_s"] / one["p50_latency_s"] if one else None
    return summary


def markdown(summary: dict) -> str:
    lines = ["| method | concurrent | tokens/s | x c=1 | tokens/CPU-s | x c=1 (CPU) | p50 latency (s) | "
             "p95 latency (s) | x c=1 (p50) | latency / alone (p50, max) | mean accepted | = hf rows |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, by_c in summary.items():
        for c, r in by_c.items():
            tau = f"{r['mean_accepted']:.2f}" if r["mean_accepted"] is not None else "–"
            cpu = (f"{r['tokens_per_cpu_s']:.1f} | {r['cpu_speedup_vs_c1']:.2f}" if r["tokens_per_cpu_s"]
                   and r["cpu_speedup_vs_c1"] else "– | –")
            alone = (f"{r['latency_vs_alone_p50']:.2f}, {r['latency_vs_alone_max']:.2f}"
                     if r.get("latency_vs_alone_max") is not None else "–")
            lines.append(f"| {method} | {c} | {r['tokens_per_s']:.1f} | {r['speedup_vs_c1']:.2f} | {cpu} | "
                         f"{r['p50_latency_s']:.2f} | {r['p95_latency_s']:.2f} | {r['latency_vs_c1']:.2f} | {alone} | {tau} | "
                         f"{r['match_hf'] or '–'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for k, (method, by_c) in enumerate(summary.items()):
        cs, color = sorted(by_c), f"C{k}"  # one colour per method in both panels
        ax1.plot(cs, [by_c[c]["tokens_per_s"] for c in cs], marker="o", color=color, label=method)
        ax2.plot(cs, [by_c[c]["p50_latency_s"] for c in cs], marker="o", color=color, label=f"{method} p50")
        ax2.plot(cs, [by_c[c]["p95_latency_s"] for c in cs], marker="x", linestyle=":", color=color,
                 label=f"{method} p95")
    for ax, label in ((ax1, "aggregate tokens/s"), (ax2, "request latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c for by_c in summary.values() for c in by_c}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
