"""One timed generation per method, every method measured the same way.

Methods:
  hf           target.generate(): greedy at T=0, sampling at T>0 (the baseline)
  hf-assisted  target.generate(assistant_model=draft): transformers' assisted generation with the
               same draft, at its default settings (20 assistant tokens, constant schedule,
               confidence threshold 0.4)
  ar, chain, static, dynamic   specllava's `SpeculativeDecoder` (with `draft_vocab`, if given, for
               the three draft methods; hf-assisted always uses the full draft, transformers has
               no such option)

Timing: every method gets the same `TimingStreamer` (an HF streamer), whose `put` is called by
generate() -- ours and transformers' alike -- first with the prompt, then with each batch of
emitted tokens. The first emitted token marks the end of the prefill (image encoding + prompt
forward + first token; for hf-assisted also the draft's prefill and first candidates, since HF
verifies them inside its prefill forward), so

    prefill = t(first token) - t(call)        decode = t(return) - t(first token)
    end-to-end = t(return) - t(call)

with one call per measurement. Every `put` after the prompt is one target forward, so the number
of puts also gives transformers' assisted generation a mean accepted length.

CPU time (`time.process_time`, all threads of this process) is recorded beside wall time: on a
shared, oversubscribed machine wall time includes the time other jobs held the cores, CPU time
does not, so CPU-time ratios are the load-robust check on the wall-time speedups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..core.config import METHODS as OUR_METHODS
from ..core.decoder import SpeculativeDecoder

HF_METHODS = ("hf", "hf-assisted")
ALL_METHODS = HF_METHODS + OUR_METHODS


class TimingStreamer:
    """Records when generate() emits tokens (HF streamer protocol: put / end)."""

    def __init__(self):
        self.t_put: list[float] = []  # time of each put after the prompt
        self.cpu_put: list[float] = []  # process CPU time at each put after the prompt
        self.n_put: list[int] = []  # tokens in each put
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True  # the first put is the prompt
            return
        self.t_put.append(time.perf_counter())
        self.cpu_put.append(time.process_time())
        self.n_put.append(int(value.numel()))

    def end(self) -> None:
        pass


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


@dataclass
class Run:
    """One timed generation."""

    tokens: list[int]  # emitted tokens (prompt excluded)
    prefill_s: float
    decode_s: float
    e2e_s: float
    decode_cpu_s: float  # process CPU time (all threads) after the first token
    e2e_cpu_s: float
    target_forwards: int  # after the prefill forward (one per streamer put after the first token)
    first_put_tokens: int  # tokens emitted by the prefill (1, except HF assisted generation)
    stats: dict = field(default_factory=dict)  # specllava's own stats (ours only)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)


class MethodRunner:
    """Runs `method` on prepared inputs; decoders are built once, outside the timed region."""

    def __init__(self, method: str, target, draft, tree_options: dict | None = None, draft_vocab: int | None = None,
                 draft_quant: str = "auto", draft_lean: bool = True, target_lean: bool = True):
        if method not in ALL_METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
        if method not in ("hf", "ar") and draft is None:
            raise ValueError(f"method {method!r} needs a draft model")
        if method == "hf-assisted" and not hasattr(draft, "generate"):
            raise ValueError("hf-assisted needs a draft model: an EAGLE head cannot be transformers' assistant "
                             "(drop hf-assisted, or bench the head as a variant with --eagle)")
        self.method, self.target, self.draft = method, target, draft
        self.decoder = None
        if method in OUR_METHODS:
            if method == "ar":
                self.decoder = SpeculativeDecoder(target, None, method="ar", target_lean=target_lean)
            else:
                # draft_vocab and draft_quant only ever change what the draft proposes, never the output
                # None: the full vocabulary (the CLI resolves defaults); "auto": the draft's own default
                extra = {"draft_vocab": draft_vocab or None}
                extra["draft_quant"] = draft_quant
                extra["draft_lean"] = draft_lean
                extra["target_lean"] = target_lean
                self.decoder = SpeculativeDecoder(target, draft, method=method, **extra, **(tree_options or {}))

    @torch.inference_mode()
    def __call__(self, inputs: dict, max_new_tokens: int, sampling: Sampling, seed: int) -> Run:
        streamer = TimingStreamer()
        prompt_len = inputs["input_ids"].shape[1]
        t0, c0 = time.perf_counter(), time.process_time()
        if self.decoder is not None:
            out = self.decoder.generate(
                **inputs,  # input_ids, attention_mask, pixel_values, image_sizes (LLaVA-NeXT)
                max_new_tokens=max_new_tokens, do_sample=sampling.do_sample,
                temperature=sampling.temperature if sampling.do_sample else 1.0,
                top_k=sampling.top_k, top_p=sampling.top_p, seed=seed, streamer=streamer,
            )
            sequences, stats = out.sequences, out.stats
        else:
            sequences, stats = self._hf_generate(inputs, max_new_tokens, sampling, seed, streamer), {}
        t_end, c_end = time.perf_counter(), time.process_time()
        t_first = streamer.t_put[0] if streamer.t_put else t_end
        c_first = streamer.cpu_put[0] if streamer.cpu_put else c_end
        return Run(
            tokens=sequences[0, prompt_len:].tolist(),
            prefill_s=t_first - t0,
            decode_s=t_end - t_first,
            e2e_s=t_end - t0,
            decode_cpu_s=c_end - c_first,
            e2e_cpu_s=c_end - c0,
            target_forwards=max(len(streamer.t_put) - 1, 0),
            first_put_tokens=streamer.n_put[0] if streamer.n_put else 0,
            stats=stats,
        )

    def _hf_generate(self, inputs, max_new_tokens, sampling, seed, streamer) -> torch.Tensor:
        gen_cfg = self.target.generation_config
        pad = gen_cfg.pad_token_id
        if pad is None:
            eos = gen_cfg.eos_token_id
            pad = eos[0] if isinstance(eos, list) else eos
        if sampling.do_sample:
            torch.manual_seed(seed)  # transformers samples from torch's global generator
            knobs = dict(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        else:
            knobs = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        extra = {"assistant_model": self.draft} if self.method == "hf-assisted" else {}
        return self.target.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, streamer=streamer, **knobs, **extra
        )
