"""GPU check: specllava's CUDA tests, then speed and exactness on a LLaVA-1.5-7B-shaped target.

    PYTHONPATH=src python tools/gpu_check.py --out runs/gpu-check        # `make gpu-check`: one GPU, < 8 min
    PYTHONPATH=src python tools/gpu_check.py --tiny --out runs/gpu-check-tiny   # rehearsal: small shapes, any device
    PYTHONPATH=src python tools/gpu_check.py --plan                      # memory it needs (meta device, no GPU)

Everything lands in `<out>/gpu_check.json` (rewritten as each part finishes) and four plots:

1. tests: `pytest -m cuda` (tests/core/test_devices.py: greedy exactness against `generate()` in
   float32, float16 and bfloat16, target and draft on different devices, an accelerate-dispatched
   target, sampling, a sliding window), with the pass/fail/skip counts;
2. models: the target has the shape of llava-hf/llava-1.5-7b-hf (Vicuna-7B: 32 layers, hidden
   4096, 32 heads, intermediate 11008, vocabulary 32064; CLIP ViT-L/14 at 336 px) with random
   weights, built in the chosen dtype on the GPU; two drafts: a LLaVA-68M-shaped one (Llama,
   2 layers, hidden 768) with random weights sharing the target's vision tower, and a
   *self-draft*: the target's own first `--self-layers` layers, embeddings, final norm and LM
   head (shared tensors, no copy);
3. verification cost: one target forward over N tree nodes on top of a LLaVA-1.5 prompt (576
   image tokens), N = 1 .. 128, on the exact lean path and through transformers' forward; and
   each draft's forward over F frontier nodes;
4. methods against the random target: `generate()`, HF assisted generation with the 68M-shaped
   draft, and specllava's ar, chain, static and dynamic with it. A random draft is rarely
   accepted (mean accepted length near 1): this measures each method's overhead;
5. the speed-up envelope: the target's layers past the self-draft's get zero output projections
   (o_proj, down_proj), which leaves its cost as it was (the zeros are multiplied like any other
   weights) and makes its output that of its first layers: the self-draft is then a perfect
   draft, up to the rounding of tree against one-token forwards. `generate()`, HF assisted with
   the self-draft and every method again: the speed-up a draft of that cost reaches when it is
   always right, and the engine's time per step beside the models' (`overhead_ms_per_step`).

4b, 5b. many requests at once, after parts 4 and 5 with the same draft: `--concurrency` requests
   arriving together (default 1 and 8), decoded by transformers' batched `generate()`, batched
   `ar` and batched `dynamic` (`specllava bench --throughput`'s groups and summary): aggregate
   tokens/s and latency against concurrency, and a plot per part.

Every run of parts 4 and 5 is checked against `generate()`'s tokens for the same prompt: equal,
or a first divergence at a near-tie (the target's logits of the two tokens within `--tie-ulps`
units of its dtype's precision, the rule of tests/core/test_devices.py and of `specllava bench`'s
divergence list); anything else fails the check. So is every row of parts 4b and 5b, against
`generate()` on its prompt alone. Host syncs per decoding step are counted both
with `torch.cuda.set_sync_debug_mode` and with `core.syncs.HostSyncCounter`; peak GPU memory per
part. Exit status 1 when a test or an exactness check failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from specllava import SpeculativeDecoder  # noqa: E402
from specllava.bench.harness import divergence  # noqa: E402
from specllava.core.backends import exact_backend  # noqa: E402
from specllava.core.cache import crop  # noqa: E402
from specllava.core.runner import ModelRunner  # noqa: E402
from specllava.core.syncs import HostSyncCounter  # noqa: E402
from specllava.core.tree import ancestor_mask, attention_bias  # noqa: E402

IMAGE_TOKEN = 32000
VOCAB = 32064
SHAPES = {  # (target text, target vision, draft text)
    "full": (
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14),
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=12),
    ),
    "tiny": (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=336, patch_size=14),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
    ),
}
TREE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
FRONTIER_SIZES = (1, 2, 4, 8, 16)
METHODS = ("ar", "chain", "static", "dynamic")
# A random model's next-token distributions are nearly flat over 32064 tokens, so with its default
# confidence floors the dynamic tree would stay root-only (nothing passes `min_path_conf`) and
# measure nothing: here it grows to its node budget like a confident trained draft's tree does.
DYNAMIC_OPTIONS = dict(min_path_conf=0.0, min_feed_mass=0.0)
RUNS = ("hf", "hf-assisted", *METHODS)


# -- models ----------------------------------------------------------------------------------------
def llava_config(text: dict, vision: dict) -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision, projection_dim=768),
        text_config=LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0, **text),
        image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
    )


def llava(text: dict, vision: dict, dtype: torch.dtype, device: str) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model with random weights, built in `dtype` directly on `device`."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(llava_config(text, vision))
    finally:
        torch.set_default_dtype(default)
    return _finish(model)


def _finish(model):
    model.generation_config.eos_token_id = None  # random weights: decode the full length every time
    model.generation_config.pad_token_id = 0
    return model.eval()


def self_draft(target, layers: int) -> LlavaForConditionalGeneration:
    """The target's first `layers` decoder layers, with its vision tower, projector, embeddings,
    final norm and LM head: the same tensors (no copy), built on the meta device and filled."""
    cfg = copy.deepcopy(target.config)
    cfg.text_config.num_hidden_layers = layers
    with torch.device("meta"):
        draft = LlavaForConditionalGeneration(cfg)
    body, tbody = draft.model, target.model
    body.vision_tower, body.multi_modal_projector = tbody.vision_tower, tbody.multi_modal_projector
    lm, tlm = body.language_model, tbody.language_model
    lm.embed_tokens, lm.norm, lm.rotary_emb = tlm.embed_tokens, tlm.norm, tlm.rotary_emb
    lm.layers = nn.ModuleList(list(tlm.layers[:layers]))
    draft.lm_head = target.lm_head
    left = [n for n, t in [*draft.named_parameters(), *draft.named_buffers()] if t.is_meta]
    assert not left, f"self-draft tensors not shared: {left[:5]}"
    return _finish(draft)


@torch.no_grad()
def silence_upper_layers(target, keep: int, scale: float) -> None:
    """Scale the output projections (o_proj, down_proj) of every layer from `keep` on by `scale`
    (0: those layers add nothing to the residual stream, so the model computes what its first
    `keep` layers compute; their cost stays, every matrix is multiplied as before)."""
    for layer in target.model.language_model.layers[keep:]:
        layer.self_attn.o_proj.weight.mul_(scale)
        layer.mlp.down_proj.weight.mul_(scale)


def prompt(model, seed: int, device: str, text_len: int = 24) -> dict:
    g = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2
    text = torch.randint(3, IMAGE_TOKEN, (text_len,), generator=g)
    ids = torch.cat([torch.tensor([1]), text[:4], torch.full((n_image,), IMAGE_TOKEN), text[4:]])[None]
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=g)
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device, model.dtype)}


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- timing ----------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median wall time of fn() in ms over `repeats` runs, after one warm-up."""
    fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(1000 * (time.perf_counter() - t))
    return statistics.median(out)


class Memory:
    """Peak GPU memory (GiB allocated by torch) per part; nothing on a CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peaks: dict[str, float] = {}

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def record(self, part: str) -> None:
        if self.cuda:
            self.peaks[part] = torch.cuda.max_memory_allocated() / 2**30


@torch.inference_mode()
def forward_costs(model, inputs, sizes, device: str, repeats: int, backend=None) -> dict:
    """ms of one forward over n tree nodes (a random tree) on top of the prefilled prompt."""
    runner = ModelRunner(model, backend)
    runner.prefill(inputs["input_ids"], pixel_values=inputs["pixel_values"])
    prefix = runner.length
    g = torch.Generator().manual_seed(0)
    out = {}
    for n in sizes:
        parents = torch.tensor([-1] + [int(torch.randint(0, i, (), generator=g)) for i in range(1, n)])
        anc = ancestor_mask(parents).to(device)
        depth = anc.sum(1) - 1
        tokens = torch.randint(3, IMAGE_TOKEN, (n,), generator=g).to(device)
        bias = attention_bias(anc, prefix, runner.dtype) if n > 1 else None

        def step():
            runner.forward(tokens, prefix + depth, bias)
            crop(runner.cache, prefix)

        out[n] = timed(step, device, repeats)
    return out


# -- methods ---------------------------------------------------------------------------------------
def make_runs(target, draft) -> tuple[dict, dict]:
    """({name: fn(inputs, new_tokens) -> (new tokens, stats or None)} for every run, {method: its
    SpeculativeDecoder})."""
    decoders = {m: SpeculativeDecoder(target, None if m == "ar" else draft, method=m,
                                      **(DYNAMIC_OPTIONS if m == "dynamic" else {})) for m in METHODS}

    def hf(assistant=None):
        def run(inputs, n):
            kw = {} if assistant is None else {"assistant_model": assistant}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' notes on assisted generation's settings
                out = target.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
            return out[0, inputs["input_ids"].shape[1]:].tolist(), None
        return run

    def spec(method):
        def run(inputs, n):
            out = decoders[method].generate(**inputs, max_new_tokens=n)
            return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), out.stats
        return run

    return {"hf": hf(), "hf-assisted": hf(draft), **{m: spec(m) for m in METHODS}}, decoders


def near_tie(target, inputs, ref: list[int], got: list[int], ulps: int) -> dict:
    """Exactness of `got` against `generate()`'s `ref`: equal, or the first divergence with the
    target's logits of both tokens there and whether they lie within `ulps` units of its dtype's
    precision (a near-tie that tree and one-token kernels may round either way)."""
    if got == ref:
        return {"equal": True}
    d = divergence(target, inputs, ref, got)
    a, b = d.get("logit_hf_token"), d.get("logit_method_token")
    if a is None or b is None:  # one is a prefix of the other: a length bug, never a tie
        return {"equal": False, "near_tie": False, **d}
    tol = ulps * torch.finfo(target.dtype).eps * max(abs(a), abs(b), 1.0)
    return {"equal": False, "near_tie": abs(a - b) <= tol, "tolerance": tol, **d}


def interpolate(curve: dict, n: float) -> float:
    """ms at n tokens from a measured {tokens: ms} curve (linear between points, flat past the ends)."""
    xs = sorted(int(k) for k in curve)
    ys = [curve[x] if x in curve else curve[str(x)] for x in xs]
    if n <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if n <= x1:
            return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
    return ys[-1]


@torch.inference_mode()
def compare_methods(target, draft, inputs_list, device: str, new_tokens: int, ulps: int, memory: Memory,
                    label: str, verify_curve: dict, draft_curve: dict) -> dict:
    """Every run on every prompt (methods interleaved, their order rotating per prompt, after a
    warm-up of each), checked against `generate()`; then host syncs per step for each method.

    Per method, the models' own time per step predicted from part 3's curves (one verification
    forward over the mean tree, plus the draft forwards of a step at the mean nodes per forward)
    and the engine's time beside it: `engine_overhead_ms_per_step` = measured step - predicted."""
    runs, decoders = make_runs(target, draft)
    names = list(runs)
    for name in names:  # warm-up: kernels, allocator, the decoders' per-model checks
        runs[name](inputs_list[0], min(16, new_tokens))
    memory.start()
    results = {name: {"ms": [], "stats": [], "tokens": []} for name in names}
    for p, inputs in enumerate(inputs_list):
        order = names[p % len(names):] + names[: p % len(names)]
        for name in order:
            sync(device)
            t = time.perf_counter()
            tokens, stats = runs[name](inputs, new_tokens)
            sync(device)
            results[name]["ms"].append(1000 * (time.perf_counter() - t))
            results[name]["stats"].append(stats)
            results[name]["tokens"].append(tokens)
    memory.record(label)
    out = {}
    base = statistics.median(results["hf"]["ms"])
    for name in names:
        r = results[name]
        ms = statistics.median(r["ms"])
        entry = {"ms_per_request": ms, "tokens_per_s": 1000 * new_tokens / ms, "speedup_vs_generate": base / ms,
                 "exactness": [near_tie(target, inp, results["hf"]["tokens"][i], r["tokens"][i], ulps)
                               for i, inp in enumerate(inputs_list)]}
        stats = [s for s in r["stats"] if s]
        if stats:
            steps = sum(s["steps"] for s in stats)
            entry.update(
                mean_accepted=statistics.mean(s["mean_accepted"] for s in stats),
                tree_nodes_mean=statistics.mean(s["tree_nodes_mean"] for s in stats),
                decode_ms_per_token=1000 * sum(s["time_decode_s"] for s in stats) / sum(s["new_tokens"] for s in stats),
                ms_per_step=1000 * sum(s["time_decode_s"] for s in stats) / max(steps, 1),
                draft_ms_per_step=1000 * sum(s["time_draft_s"] for s in stats) / max(steps, 1),
                verify_ms_per_step=1000 * sum(s["time_verify_s"] for s in stats) / max(steps, 1),
            )
            # the loop's own time: a step's wall time less the drafting and the verification
            # (target forward, acceptance, compaction), which each end in a read of their result
            entry["overhead_ms_per_step"] = entry["ms_per_step"] - entry["draft_ms_per_step"] - entry["verify_ms_per_step"]
            # the engine's time beside the models': the step less the forwards part 3 timed alone
            forwards = sum(max(s["draft_forwards"] - 1, 0) for s in stats) / max(steps, 1)  # the prefill excluded
            per_forward = (entry["tree_nodes_mean"] + 1) / max(forwards, 1)  # pending tokens and frontiers
            entry["draft_forwards_per_step"] = forwards
            entry["predicted_model_ms_per_step"] = (interpolate(verify_curve, entry["tree_nodes_mean"] + 1)
                                                    + forwards * interpolate(draft_curve, per_forward))
            entry["engine_overhead_ms_per_step"] = entry["ms_per_step"] - entry["predicted_model_ms_per_step"]
            entry["host_syncs_per_step"] = host_syncs(decoders[name], inputs_list[0], new_tokens, device)
        out[name] = entry
        ok = all(e["equal"] or e.get("near_tie") for e in entry["exactness"])
        extra = "".join(f"  {k} {entry[k]:.2f}" for k in ("mean_accepted", "engine_overhead_ms_per_step") if k in entry)
        print(f"   {name:12s} {entry['tokens_per_s']:8.1f} tok/s  x{entry['speedup_vs_generate']:.2f} vs generate()"
              f"{extra}  exact: {'ok' if ok else 'FAILED'}"
              f"{'  syncs/step ' + json.dumps(entry.get('host_syncs_per_step')) if 'host_syncs_per_step' in entry else ''}",
              flush=True)
    return out


@torch.inference_mode()
def many_requests(target, draft, device: str, new_tokens: int, ulps: int, concurrency: list[int], memory: Memory,
                  label: str) -> dict:
    """Requests arriving together, c at a time (`specllava bench --throughput`'s groups, through
    its `time_group`): transformers' batched `generate()` (hf), batched plain decoding (ar) and
    batched dynamic trees, interleaved per group; aggregate tokens/s and latency per c (its
    `summarize`), and every row checked against `generate()` on that prompt alone (`near_tie`)."""
    from specllava.bench.harness import method_order
    from specllava.bench.throughput import pad_and_eos, summarize, time_group

    rows = [{**p, "attention_mask": torch.ones_like(p["input_ids"])}
            for p in (prompt(target, 100 + seed, device) for seed in range(max(concurrency)))]
    decoders = {"hf": None, "ar": SpeculativeDecoder(target, None, method="ar"),
                "dynamic": SpeculativeDecoder(target, draft, method="dynamic", **DYNAMIC_OPTIONS)}
    pad, eos = pad_and_eos(target)
    for method, decoder in decoders.items():  # warm-up: the batched kernels and buffers of every c
        time_group(method, target, decoder, rows, 4, pad, eos)
    memory.start()
    runs = []
    for turn, (c, g) in enumerate((c, g) for c in concurrency for g in range(len(rows) // c)):
        for method in method_order(tuple(decoders), turn):
            sync(device)
            rec = time_group(method, target, decoders[method], rows[g * c:(g + 1) * c], new_tokens, pad, eos)
            runs.append({"method": method, "concurrency": c, "group": g, "prompts": list(range(g * c, (g + 1) * c)),
                         **{k: v for k, v in rec.items() if k != "mean_accepted"}})
    memory.record(label)
    alone = {r["prompts"][0]: r["tokens"][0] for r in runs if r["method"] == "hf" and r["concurrency"] == 1}
    failures = []
    for r in runs:
        r["exactness"] = [near_tie(target, rows[i], alone[i], tokens, ulps) if i in alone else {"equal": None}
                          for i, tokens in zip(r["prompts"], r["tokens"])]
        failures += [f"{r['method']} c={r['concurrency']} prompt {i}" for i, e in zip(r["prompts"], r["exactness"])
                     if e["equal"] is False and not e.get("near_tie")]
    summary = summarize(runs)
    for method, by_c in summary.items():
        print(f"   {method:8s} " + "  ".join(f"c={c}: {x['tokens_per_s']:.1f} tok/s (x{x['speedup_vs_c1']:.2f}), "
                                            f"p50 {x['p50_latency_s']:.2f} s" for c, x in by_c.items()), flush=True)
    print(f"   rows equal to generate() alone or at a near-tie: {'all' if not failures else 'NOT ' + ', '.join(failures)}",
          flush=True)
    return {"summary": summary, "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
            "exactness_failures": failures}


SYNC_TOKENS = 48  # tokens decoded to count host syncs: several steps even when the draft is right


def host_syncs(decoder, inputs, new_tokens: int, device: str) -> dict:
    """Mean host syncs between two verification steps (prefill excluded): counted by torch calls
    (`HostSyncCounter`, any device) and, on CUDA, by the driver-level sync debug mode."""
    counter = HostSyncCounter()
    cuda_marks: list[int] = []
    on_cuda = device.startswith("cuda")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if on_cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            def on_step(tree, verdict):
                counter.mark()
                cuda_marks.append(sum("synchroniz" in str(w.message) for w in seen))

            with counter:  # at least 3 steps whatever the acceptance (the first is not counted)
                decoder.generate(**inputs, max_new_tokens=max(new_tokens, SYNC_TOKENS), on_step=on_step)
        finally:
            if on_cuda:
                torch.cuda.set_sync_debug_mode("default")
    steps = counter.per_step()
    out = {"counted": statistics.mean(steps) if steps else float("nan"), "counted_max": max(steps, default=0)}
    if on_cuda and len(cuda_marks) > 1:
        out["cuda_debug_mode"] = (cuda_marks[-1] - cuda_marks[0]) / (len(cuda_marks) - 1)
    return out


# -- tests, plots, plan ----------------------------------------------------------------------------
def run_tests(out: Path, timeout_s: int) -> dict:
    """pytest -m cuda, with a JUnit report; counts of passed, failed and skipped tests."""
    report = out / "pytest-cuda.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={report}",
           str(ROOT / "tests" / "core" / "test_devices.py")]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        tail, code = (proc.stdout + proc.stderr)[-4000:], proc.returncode
    except subprocess.TimeoutExpired as err:
        tail, code = f"timed out after {timeout_s} s: {err}", None
    counts = {}
    if report.exists():
        import xml.etree.ElementTree as ET

        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    print(tail[-1500:], flush=True)
    return {"command": " ".join(cmd), "returncode": code, "seconds": time.perf_counter() - t, "counts": counts,
            "output_tail": tail}


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = result.get("verify_ms")
    if costs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, series in {**costs, **{f"draft: {k}": v for k, v in result.get("draft_ms", {}).items()}}.items():
            ax.plot([int(n) for n in series], list(series.values()), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens in one forward (tree nodes; draft: frontier nodes)")
        ax.set_ylabel("ms per forward")
        ax.set_title(f"{result['target']} on {result['device_name']}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "verify_cost.png", dpi=120)
        plt.close(fig)
    scenarios = [(k, result[k]) for k in ("random_draft", "self_draft") if result.get(k)]
    if scenarios:
        fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4), squeeze=False)
        for ax, (key, runs) in zip(axes[0], scenarios):
            names = list(runs)
            bars = ax.bar(names, [runs[n]["tokens_per_s"] for n in names])
            for bar, n in zip(bars, names):
                tau = runs[n].get("mean_accepted")
                if tau is not None:
                    ax.annotate(f"tau {tau:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=8)
            ax.set_ylabel("tokens/s (one request)")
            ax.set_title({"random_draft": "random 68M-shaped draft (overhead)",
                          "self_draft": "self-draft, always right (envelope)"}[key], fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
        fig.suptitle(f"{result['target']} on {result['device_name']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "methods.png", dpi=120)
        plt.close(fig)
    from specllava.bench.throughput import plot as throughput_plot

    for key, name in (("many_random_draft", "random draft"), ("many_self_draft", "self-draft")):
        if result.get(key):
            throughput_plot(result[key]["summary"], out / f"{key}.png",
                            title=f"{result['target']} on {result['device_name']}, {name}, {result['new_tokens']} tokens")


def plan(dtype: torch.dtype, shapes: str, new_tokens: int, self_layers: int) -> dict:
    """What the check holds in GPU memory, counted on the meta device (no GPU needed): weights of
    the target and the 68M-shaped draft (the self-draft shares the target's), and one request's
    KV cache at the prompt's length plus the new tokens and the largest tree."""
    text, vision, draft_text = SHAPES[shapes]
    with torch.device("meta"):
        target = LlavaForConditionalGeneration(llava_config(text, vision))
        draft = LlavaForConditionalGeneration(llava_config(draft_text, vision))
    size = torch.finfo(dtype).bits // 8
    n_image = (vision["image_size"] // vision["patch_size"]) ** 2
    positions = 1 + n_image + 24 + new_tokens + max(TREE_SIZES)
    kv = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * (text["hidden_size"] // text["num_attention_heads"])
    out = {"dtype": str(dtype).removeprefix("torch."), "target_params": params(target), "draft_params": params(draft),
           "self_draft_layers": self_layers, "target_weights_gib": params(target) * size / 2**30,
           "draft_weights_gib": params(draft) * size / 2**30, "kv_positions": positions,
           "target_kv_cache_gib": positions * kv * size / 2**30}
    out["total_gib"] = out["target_weights_gib"] + out["draft_weights_gib"] + out["target_kv_cache_gib"]
    return out


# -- main ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    ap.add_argument("--tiny", action="store_true", help="small shapes: a rehearsal that runs in a minute or two on a CPU")
    ap.add_argument("--plan", action="store_true", help="print the GPU memory the check needs (meta device) and exit")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu (--tiny only)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--tests-timeout", type=int, default=240, help="seconds for the pytest part")
    ap.add_argument("--new-tokens", type=int, default=None, help="per request (default 64; 24 with --tiny)")
    ap.add_argument("--prompts", type=int, default=None, help="default 2; 1 with --tiny")
    ap.add_argument("--repeats", type=int, default=None, help="timed forwards per size in the cost curves "
                    "(default 5; 2 with --tiny)")
    ap.add_argument("--self-layers", type=int, default=None, help="the self-draft's layers (default: 2; 1 with --tiny)")
    ap.add_argument("--upper-scale", type=float, default=0.0,
                    help="part 5: scale of the output projections of the target's layers past the self-draft's "
                         "(0: the self-draft is always right; between 0 and 1: partly right)")
    ap.add_argument("--tie-ulps", type=int, default=4, help="near-tie tolerance, in units of the dtype's precision")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help="parts 4b and 5b: requests arriving together (default 1 8; 1 4 with --tiny)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    shapes = "tiny" if args.tiny else "full"
    args.new_tokens = args.new_tokens or (24 if args.tiny else 64)
    args.repeats = args.repeats or (2 if args.tiny else 5)
    args.prompts = args.prompts or (1 if args.tiny else 2)
    args.concurrency = sorted(set(args.concurrency or ([1, 4] if args.tiny else [1, 8])))
    k = args.self_layers or (1 if args.tiny else 2)
    if args.plan:
        print(json.dumps(plan(dtype, shapes, args.new_tokens, k), indent=1))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not args.tiny:
        why = ("this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible")
        ap.error(f"{why}: the full check needs a GPU and a CUDA build of torch (docs/models.md, 'GPU check'); "
                 "--tiny rehearses it on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    memory = Memory(device)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "dtype": args.dtype, "new_tokens": args.new_tokens, "tie_ulps": args.tie_ulps,
        "prompts": args.prompts, "concurrency": args.concurrency, "dynamic_tree_options": DYNAMIC_OPTIONS,
        "target": "llava-1.5-7b-shaped (random weights)" if not args.tiny else "tiny llava (random)",
        "draft": "llava-68m-shaped (random weights)" if not args.tiny else "tiny draft (random)",
        "self_draft": f"the target's first {k} layers (shared weights)", "plan": plan(dtype, shapes, args.new_tokens, k),
        "parts_s": {},
    }

    def save(part: str | None = None, since: float | None = None):
        if part:
            result["parts_s"][part] = time.perf_counter() - since
        result["seconds"] = time.perf_counter() - t0
        result["peak_gpu_memory_gib"] = memory.peaks
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))

    if not args.skip_tests:
        print("== 1. CUDA tests (pytest -m cuda)", flush=True)
        t = time.perf_counter()
        result["tests"] = run_tests(args.out, args.tests_timeout)
        save("tests", t)

    print("== 2. models", flush=True)
    text, vision, draft_text = SHAPES[shapes]
    t = time.perf_counter()
    memory.start()
    target = llava(text, vision, dtype, device)
    draft = llava(draft_text, vision, dtype, device)
    draft.model.vision_tower.load_state_dict(target.model.vision_tower.state_dict())  # shares the tower
    selfd = self_draft(target, k)
    memory.record("models")
    result["params"] = {"target": params(target), "draft": params(draft)}
    inputs = [prompt(target, seed, device) for seed in range(args.prompts)]
    result["prompt_tokens"] = int(inputs[0]["input_ids"].shape[1])
    path = exact_backend(target)
    result["target_lean_path"] = path is not None
    print(f"   target {result['params']['target'] / 1e9:.2f} B params, draft {result['params']['draft'] / 1e6:.0f} M, "
          f"self-draft {k} of {text['num_hidden_layers']} layers, prompt {result['prompt_tokens']} tokens, "
          f"lean path {path is not None}", flush=True)
    save("models", t)

    print("== 3. verification cost against tree size", flush=True)
    t = time.perf_counter()
    memory.start()
    result["verify_ms"] = {}
    if path is not None:
        result["verify_ms"]["target, lean exact path"] = forward_costs(target, inputs[0], TREE_SIZES, device,
                                                                      args.repeats, path)
    result["verify_ms"]["target, transformers forward"] = forward_costs(target, inputs[0], TREE_SIZES, device,
                                                                        args.repeats)
    result["draft_ms"] = {"68M-shaped": forward_costs(draft, inputs[0], FRONTIER_SIZES, device, args.repeats),
                          f"self-draft ({k} layers)": forward_costs(selfd, inputs[0], FRONTIER_SIZES, device,
                                                                     args.repeats)}
    memory.record("verify_cost")
    for label, series in {**result["verify_ms"], **result["draft_ms"]}.items():
        print(f"   {label}: " + ", ".join(f"{n}: {ms:.2f} ms" for n, ms in series.items()), flush=True)
    save("verify_cost", t)

    print("== 4. methods, random draft (overhead; greedy)", flush=True)
    t = time.perf_counter()
    verify_curve = next(iter(result["verify_ms"].values()))  # the path the decoder takes (lean when it can)
    result["random_draft"] = compare_methods(target, draft, inputs, device, args.new_tokens, args.tie_ulps, memory,
                                             "random_draft", verify_curve, result["draft_ms"]["68M-shaped"])
    save("random_draft", t)

    print(f"== 4b. many requests at once, random draft: concurrency {args.concurrency}", flush=True)
    t = time.perf_counter()
    result["many_random_draft"] = many_requests(target, draft, device, args.new_tokens, args.tie_ulps,
                                                args.concurrency, memory, "many_random_draft")
    save("many_random_draft", t)

    print(f"== 5. methods, self-draft (layers {k}.. scaled by {args.upper_scale}; the envelope)", flush=True)
    t = time.perf_counter()
    silence_upper_layers(target, k, args.upper_scale)
    result["self_draft"] = compare_methods(target, selfd, inputs, device, args.new_tokens, args.tie_ulps, memory,
                                           "self_draft", verify_curve, result["draft_ms"][f"self-draft ({k} layers)"])
    save("self_draft", t)

    print(f"== 5b. many requests at once, self-draft: concurrency {args.concurrency}", flush=True)
    t = time.perf_counter()
    result["many_self_draft"] = many_requests(target, selfd, device, args.new_tokens, args.tie_ulps,
                                              args.concurrency, memory, "many_self_draft")
    save("many_self_draft", t)

    failed = [f"{part}/{name}" for part in ("random_draft", "self_draft") for name, e in result[part].items()
              if not all(x["equal"] or x.get("near_tie") for x in e["exactness"])]
    failed += [f"{part}/{f}" for part in ("many_random_draft", "many_self_draft")
               for f in result[part]["exactness_failures"]]
    result["exactness_failures"] = failed
    save()
    plot(result, args.out)
    counts = result.get("tests", {}).get("counts", {})
    print(f"wrote {args.out / 'gpu_check.json'} and plots in {time.perf_counter() - t0:.0f} s; exactness "
          f"{'ok' if not failed else 'FAILED: ' + ', '.join(failed)}", flush=True)
    return 1 if failed or counts.get("failures") or counts.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
