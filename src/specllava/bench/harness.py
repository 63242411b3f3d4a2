"""The measurement loop: same prompts and settings for every method, warmed up, interleaved.

Fairness rules (DESIGN.md, "speedup"):
  - every method decodes the same prepared inputs with the same max_new_tokens and sampling knobs;
    at T>0 a (prompt, repeat) pair gets the same seed for every method;
  - before timing, every method runs `warmup` times on the first prompt (up to `warmup_tokens`
    new tokens: enough to reach steady state; lazy initialisation, allocator growth and oneDNN
    kernel selection happen in the first steps), so none of that is timed;
  - methods are interleaved per prompt, and their order rotates by one per (prompt, repeat), so
    slow drifts of this shared machine (other jobs, thermal) spread over all methods;
  - the torch thread count is set once by the caller and recorded.

Exact match (T=0): a run matches when its tokens equal `hf`'s tokens for the same prompt and
repeat. Every mismatch is explained by `divergence`: the first differing position and the target's
own top-2 logit margin there (from a plain forward over the prompt and `hf`'s tokens before it),
so a bf16 near-tie can be told from a bug.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .methods import ALL_METHODS, MethodRunner, Run, Sampling
from .prompts import BenchPrompt


@dataclass
class BenchSettings:
    methods: tuple[str, ...] = ALL_METHODS
    max_new_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)
    repeats: int = 1
    warmup: int = 1
    warmup_tokens: int = 16
    seed: int = 0
    tree_options: dict = field(default_factory=dict)
    draft_vocab: int | None = None  # SpeculativeDecoder(draft_vocab=K) for chain/static/dynamic
    draft_quant: str = "auto"  # SpeculativeDecoder(draft_quant=...) for chain/static/dynamic
    # extra named methods: {name: (base method, tree options over tree_options, and optionally
    # "draft_vocab" / "draft_quant" / "draft_lean" / "target_lean")}, e.g. {"dynamic-shallow": ("dynamic", {"max_depth": 3})}; list the names in
    # `methods` too
    variants: dict = field(default_factory=dict)
    eagle: object = None  # an EagleHead (`core.eagle`) for variants with the option draft="eagle"
    other_draft: object = None  # a second draft model for variants with the option draft="other"

    def __post_init__(self):
        for name, (base, _) in self.variants.items():
            if name in ALL_METHODS or base not in ("ar", "chain", "static", "dynamic"):
                raise ValueError(f"variant {name!r}: needs a new name and a base method of ar, chain, static or dynamic, got {base!r}")
        unknown = [m for m in self.methods if m not in ALL_METHODS and m not in self.variants]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)} or a variant")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods listed twice: {list(self.methods)}")
        for name in ("max_new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def prepare_inputs(processor, prompt: BenchPrompt, dtype: torch.dtype, device: torch.device | str = "cpu") -> dict:
    """Tokenised chat prompt (+ pixel_values in the model dtype), on the target's input device,
    built before any timing."""
    from ..images import open_image
    from ..models.hf import chat_inputs

    image = open_image(prompt.image) if prompt.image is not None else None
    inputs = chat_inputs(processor, prompt.prompt, image)
    out = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
    if inputs.get("pixel_values") is not None:
        out["pixel_values"] = inputs["pixel_values"].to(dtype)
    if out["attention_mask"] is None:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    if inputs.get("image_sizes") is not None:  # LLaVA-NeXT
        out["image_sizes"] = inputs["image_sizes"]
    return {k: v.to(device) for k, v in out.items()}


def method_order(methods: tuple[str, ...], turn: int) -> list[str]:
    """Methods rotated left by `turn`: each method takes each slot equally often."""
    k = turn % len(methods)
    return list(methods[k:] + methods[:k])


class PeakRSS:
    """Peak resident set size of this process during a call (Linux: reset VmHWM through
    /proc/self/clear_refs, read it back after). It counts everything resident: both models'
    weights, caches, activations, the allocator's retained memory. Where the reset is not
    allowed it falls back to the process-lifetime peak (ru_maxrss) and says so in `kind`."""

    def __init__(self):
        self.kind = "VmHWM (reset per run)"
        try:
            self.reset()
            self.peak_mb()
        except OSError:
            self.kind = "ru_maxrss (process lifetime)"

    def reset(self) -> None:
        if self.kind.startswith("VmHWM"):
            Path("/proc/self/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        if self.kind.startswith("VmHWM"):
            kb = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)
            return int(kb) / 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_benchmark(target, draft, processor, prompts: list[BenchPrompt], settings: BenchSettings,
                  progress: bool = True, label: str = "") -> dict:
    """Run every method on every prompt; returns {"settings", "records", "exact_match", ...}."""
    from tqdm.auto import tqdm

    from ..core.model_info import input_device

    inputs = [prepare_inputs(processor, p, target.dtype, input_device(target)) for p in prompts]
    runners = {}
    for m in settings.methods:
        base, extra = settings.variants.get(m, (m, {}))
        extra = dict(extra)
        this_draft = draft
        which = extra.pop("draft", None)
        if which is not None:
            this_draft = {"eagle": settings.eagle, "other": settings.other_draft}.get(which)
            if this_draft is None:
                flag = "--eagle PATH" if which == "eagle" else "--other-draft DIR"
                raise ValueError(f"variant {m!r} drafts with draft={which}: pass {flag}")
            extra.setdefault("draft_vocab", "auto")  # its own token ranking
        draft_vocab = extra.pop("draft_vocab", settings.draft_vocab)
        draft_quant = extra.pop("draft_quant", settings.draft_quant)
        lean = {flag: bool(extra.pop(flag, True)) for flag in ("draft_lean", "target_lean")}
        runners[m] = MethodRunner(base, target, this_draft, {**settings.tree_options, **extra}, draft_vocab, draft_quant,
                                  **lean)
    sampling, n_new = settings.sampling, settings.max_new_tokens
    for _ in range(settings.warmup):
        for m in settings.methods:
            runners[m](inputs[0], min(n_new, settings.warmup_tokens), sampling, settings.seed)

    mem = PeakRSS()
    records = []
    bar = tqdm(total=len(prompts) * settings.repeats * len(settings.methods), desc=label or "bench",
               disable=not progress, unit="run")
    for i, (prompt, inp) in enumerate(zip(prompts, inputs)):
        for r in range(settings.repeats):
            seed = settings.seed + 1000 * i + r  # the same for every method
            for m in method_order(settings.methods, i * settings.repeats + r):
                bar.set_postfix_str(f"{prompt.id[-24:]} {m}")  # what is running now
                mem.reset()
                run = runners[m](inp, n_new, sampling, seed)
                records.append(_record(prompt, inp, m, r, seed, run, mem.peak_mb()))
                bar.update()
    bar.close()

    result = {"settings": _settings_dict(settings), "memory_measure": mem.kind, "records": records}
    if not sampling.do_sample and "hf" in settings.methods:
        result["exact_match"], result["divergences"] = exact_match(target, inputs, prompts, records)
    return result


def _record(prompt: BenchPrompt, inp: dict, method: str, repeat: int, seed: int, run: Run, peak_mb: float) -> dict:
    return {
        "prompt_id": prompt.id,
        "method": method,
        "repeat": repeat,
        "seed": seed,
        "prompt_tokens": int(inp["input_ids"].shape[1]),
        "new_tokens": run.new_tokens,
        "prefill_s": run.prefill_s,
        "decode_s": run.decode_s,
        "e2e_s": run.e2e_s,
        "decode_cpu_s": run.decode_cpu_s,
        "e2e_cpu_s": run.e2e_cpu_s,
        "decode_tokens": run.new_tokens - run.first_put_tokens,  # emitted after the prefill
        # target forwards after the prefill; tokens emitted per target forward, prefill included
        "target_forwards_after_prefill": run.target_forwards,
        "mean_accepted": run.new_tokens / (run.target_forwards + 1),
        "peak_rss_mb": peak_mb,
        "stats": run.stats,
        "tokens": run.tokens,
    }


def _settings_dict(s: BenchSettings) -> dict:
    d = asdict(s)
    d["methods"] = list(s.methods)
    return d


# ---------------------------------------------------------------------------------------------
# exact match


def exact_match(target, inputs: list[dict], prompts: list[BenchPrompt], records: list[dict]) -> tuple[dict, list]:
    """Per method: share of (prompt, repeat) runs whose tokens equal hf's; and every divergence."""
    ref = {(r["prompt_id"], r["repeat"]): r["tokens"] for r in records if r["method"] == "hf"}
    by_id = {p.id: inp for p, inp in zip(prompts, inputs)}
    share, divergences = {}, []
    for method in dict.fromkeys(r["method"] for r in records):
        runs = [r for r in records if r["method"] == method]
        same = [r["tokens"] == ref[(r["prompt_id"], r["repeat"])] for r in runs]
        share[method] = {"matched": sum(same), "runs": len(runs), "rate": sum(same) / len(runs)}
        for r, ok in zip(runs, same):
            if not ok:
                hf_tokens = ref[(r["prompt_id"], r["repeat"])]
                divergences.append({"method": method, "prompt_id": r["prompt_id"], "repeat": r["repeat"],
                                    **divergence(target, by_id[r["prompt_id"]], hf_tokens, r["tokens"])})
    return share, divergences


@torch.inference_mode()
def divergence(target, inputs: dict, hf_tokens: list[int], tokens: list[int]) -> dict:
    """First position where `tokens` leaves `hf_tokens`, with the target's top-2 margin there.

    margin = logit(top-1) - logit(top-2) of the target at that position; a near-tie (margin of a
    few bf16 ulps) is the expected cause in reduced precision, a large margin is a bug.
    """
    j = next((i for i, (a, b) in enumerate(zip(hf_tokens, tokens)) if a != b), min(len(hf_tokens), len(tokens)))
    out = {"position": j,
           "hf_token": hf_tokens[j] if j < len(hf_tokens) else None,
           "method_token": tokens[j] if j < len(tokens) else None}
    prefix = torch.tensor([hf_tokens[:j]], dtype=torch.long, device=inputs["input_ids"].device)
    ids = torch.cat([inputs["input_ids"], prefix], dim=1)
    kwargs = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
    logits = target(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, **kwargs).logits[0, -1].float()
    top = logits.topk(2)
    out.update(top1=int(top.indices[0]), top2=int(top.indices[1]),
               margin=float(top.values[0] - top.values[1]),
               logit_hf_token=float(logits[out["hf_token"]]) if out["hf_token"] is not None else None,
               logit_method_token=float(logits[out["method_token"]]) if out["method_token"] is not None else None)
    return out
