"""The decoding loop: `SpeculativeDecoder.generate` (draft -> verify -> accept -> compact -> emit).

Contract: for batch size 1, `generate(...)` returns the same `sequences` as
`target.generate(...)` would with the same arguments at T=0 (token for token, in float32), and
sequences distributed exactly as the target's own sampling at T>0. `method="ar"` is plain
autoregressive decoding through the same loop (the root-only tree), the in-loop baseline.

Stats (`out.stats`):
  new_tokens       tokens emitted (prompt excluded)
  target_forwards  target forward passes, the prefill included
  draft_forwards   draft forward passes, its prefill included
  mean_accepted    tokens emitted per target forward (bonus included; plain decoding = 1)
  accept_hist      accept_hist[k] = verification steps that accepted k draft tokens
  accept_by_depth  accept_by_depth[d-1] = steps whose accepted path reached depth >= d
  tree_nodes_mean  mean draft nodes per verified tree (root excluded)
  time_*_s         wall time: prefill (target + draft), decode (after prefill), draft, verify
"""

from __future__ import annotations

import numbers
import operator
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .backends import Backend, draft_backend, head_backend, target_backend
from .cache import compact
from .checks import CHECKS
from .config import METHODS, TreeConfig
from .drafting import Drafter
from .eagle import EagleDrafter, EagleHead
from .model_info import image_token_id, input_device, is_vlm, unsupported_attention, vocab_size
from .quant import resolve_quant
from .runner import ModelRunner
from .sampling import SamplingParams, processed_probs
from .tree import ancestor_mask, attention_bias, position_ids, root_only
from .verify import draw, verify_greedy, verify_sampling
from .vocab import default_draft_vocab, draft_ranking, draft_vocab_ids
from .vision import capture_projector_input, draft_image_inputs, shares_vision_tower


@dataclass
class SpecOutput:
    sequences: torch.Tensor  # [1, prompt_len + new_tokens]
    stats: dict = field(default_factory=dict)


class SpeculativeDecoder:
    """Lossless speculative decoding of `target` with `draft`.

    target: a Hugging Face causal LM or LLaVA-style `...ForConditionalGeneration` (unmodified).
    draft:  a smaller model with the same vocabulary: a LLaVA-style VLM (gets the image too) or a
            text-only causal LM (gets the prompt without image tokens); or an `EagleHead`
            (`core.eagle`), a one-layer head that drafts from the target's own hidden states
            (Llama-style targets). May be None for "ar".
    method: "ar" | "chain" | "static" | "dynamic".
    tree_options: fields of `TreeConfig` (or pass `config=TreeConfig(...)`).
    draft_vocab: restrict the draft's proposals to a reduced vocabulary, which makes a small draft
            much cheaper (its LM head is most of its cost): an int K takes the draft's token
            ranking first (`config.token_ranking`, the ids its training answers used, most frequent
            first; `core.vocab`), then the lowest remaining ids (BPE and SentencePiece vocabularies
            put frequent tokens first); or pass a LongTensor of ids; None = the full vocabulary.
            "auto" (default): for a draft with a token ranking, `core.vocab.default_draft_vocab`'s
            K, one for greedy and one for sampled requests (2048 and 4096 for the default pair);
            the full vocabulary for a draft without one. Lossless either way: it only changes what
            is proposed.
    draft_quant: "auto" (default) runs the draft's decode steps with int8 linears when the draft
            is on a CPU that has torch's quantized kernels (docs/benchmarks.md), "int8"
            insists on it, "none" keeps the draft as given. Lossless either way, like draft_vocab:
            the draft's numerics change only what is proposed, never what is emitted.
    draft_lean: with a reduced vocabulary or int8, run a Llama-style draft's decode steps on
            the lean path, `backends.LeanBackend` (default: a small draft's step is mostly transformers'
            per-forward overhead, docs/benchmarks.md) rather than through transformers'
            decoder. Lossless too.
    target_lean: run the target's decode steps on the exact lean path (default): the same
            operations as transformers' forward, so the same logits bit for bit (tested), minus
            its per-forward overhead (module stack, mask building, a cache concatenated per layer
            and step). Llama-style targets with sdpa attention, checked bitwise against
            transformers' forward on the target itself once (`backends.target_backend`); any other
            keeps its own forward (a failed check warns), as does target_lean=False. The prefill
            always runs through generate() itself.

    Each model's backend (`core.backends`) is chosen here, once: `target_backend`,
    `draft_backend` (and `sampled_draft_backend` when sampled requests use another vocabulary).
    """

    def __init__(
        self,
        target,
        draft=None,
        method: str = "dynamic",
        config: TreeConfig | None = None,
        draft_vocab: int | torch.Tensor | str | None = "auto",
        draft_quant: str | None = "auto",
        draft_lean: bool = True,
        target_lean: bool = True,
        **tree_options,
    ):
        _check_model(target, "target")
        if draft is not None:
            _check_model(draft, "draft")
        with CHECKS.stamp_window():  # each model's weights fingerprinted once for the cached checks
            self._build(target, draft, method, config, draft_vocab, draft_quant, draft_lean, target_lean, tree_options)

    def _build(self, target, draft, method, config, draft_vocab, draft_quant, draft_lean, target_lean, tree_options):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method != "ar" and draft is None:
            raise ValueError(f"method {method!r} needs a draft model (only 'ar' runs without one)")
        if config is not None and tree_options:
            raise ValueError("pass either config=TreeConfig(...) or tree options, not both")
        self.config = config or TreeConfig.from_options(**tree_options)
        self.eagle = isinstance(draft, EagleHead)
        if self.eagle:
            draft.check_target(target)
        if draft is not None:
            vt, vd = vocab_size(target), vocab_size(draft)
            if vt != vd:
                raise ValueError(
                    f"draft/target vocabulary mismatch: the target predicts {vt} tokens, the draft {vd}; "
                    "the draft must share the target's tokenizer and output vocabulary"
                )
            if is_vlm(draft) and not is_vlm(target):
                raise ValueError("a vision-language draft needs a vision-language target (the target is text-only)")
        if method != "ar":  # anything a tree forward cannot take is refused here, not mid-generation
            for role, model in (("target", target), ("draft", None if self.eagle else draft)):
                why = model is not None and unsupported_attention(model)
                if why:
                    raise ValueError(f"the {role} ({type(model).__name__}) cannot verify token trees: {why}")
        self.target, self.draft, self.method = target, draft, method
        self.target_backend = target_backend(target, lean=target_lean)
        sampled = draft_vocab
        if isinstance(draft_vocab, str):
            if draft_vocab != "auto":
                raise ValueError(f"draft_vocab must be 'auto', None, an int or a LongTensor of ids, got {draft_vocab!r}")
            # from the draft's token ranking, one K per kind of request (None: a draft without one)
            draft_vocab, sampled = default_draft_vocab(draft, 0.0), default_draft_vocab(draft, 1.0)
        self.draft_vocab = self._draft_vocab_ids(draft_vocab)
        self.draft_backend = self._draft_backend(draft_quant, draft_lean, self.draft_vocab)
        self.sampled_draft_vocab, self.sampled_draft_backend = self.draft_vocab, self.draft_backend
        if isinstance(sampled, int) and sampled != draft_vocab:  # only "auto" gives two sizes
            self.sampled_draft_vocab = self._draft_vocab_ids(sampled)
            self.sampled_draft_backend = self._draft_backend(draft_quant, draft_lean, self.sampled_draft_vocab)
        if method == "static":  # a rank the draft cannot propose would fail only mid-decode
            rank = max(max(c) for c in self.config.choices)
            sizes = [vocab_size(target) if v is None else len(v) for v in (self.draft_vocab, self.sampled_draft_vocab)]
            if rank >= min(sizes):
                raise ValueError(f"static tree choices use draft rank {rank}, but the draft proposes from {min(sizes)} "
                                 "tokens; use smaller ranks or a larger draft_vocab")
        # the draft's prefill reuses the target's vision features (identical vision towers)
        self.shares_vision = method != "ar" and not self.eagle and draft is not None and CHECKS.get(
            target, ("shares_vision", id(draft)), lambda: shares_vision_tower(target, draft), draft)

    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        seed: int | None = None,
        streamer=None,
        on_step=None,
        **model_inputs,
    ) -> SpecOutput:
        """Decode up to `max_new_tokens` tokens after the prompt (batch size 1).

        model_inputs: every other tensor the target's processor returns (LLaVA-NeXT's
                  `image_sizes`, ...), passed on to the target's prefill as generate() takes them
                  (and to a vision-language draft's). Call it as `generate(**processor(...))`.
        streamer: an HF-style streamer (`put`/`end`), fed the prompt then each step's tokens.
        on_step:  optional callback `on_step(tree, verdict)` after every verification step, with
                  the verified `Tree` (its tokens, parents, depth and draft scores) and the
                  `Verdict` (accepted path of node indices, bonus token). For profiling and
                  calibration; it must not modify them.
        """
        max_new_tokens = self._check_inputs(input_ids, pixel_values, attention_mask, max_new_tokens)
        _check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        params = SamplingParams(do_sample, temperature, top_k, top_p)
        eos = self._eos_set(eos_token_id)
        # The verification's uniforms are drawn on the CPU on purpose (`verify._uniform`); the
        # draft's Gumbel noise with a generator on the draft's device, seeded from the CPU one.
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(mix_seed(int(seed)))
        else:
            gen.seed()
        target = ModelRunner(self.target, self.target_backend, keep_hidden=self.eagle and self.method != "ar")
        input_ids = input_ids.to(target.device)
        if pixel_values is not None:  # the processor gives float32; a bf16 model wants bf16
            pixel_values = pixel_values.to(target.device, self.target.dtype)
        model_inputs = {k: v.to(target.device) if torch.is_tensor(v) else v for k, v in model_inputs.items()}
        if streamer is not None:
            streamer.put(input_ids.cpu())

        t0 = time.perf_counter()
        # 0. prefill: the first token comes from generate()'s own prefill logits. The draft then
        #    reuses the target's vision features when it has the same vision tower (core.vision).
        share = self.shares_vision and pixel_values is not None
        with capture_projector_input(self.target) if share else nullcontext([]) as seen:
            first_logits = target.prefill_like_generate(input_ids, pixel_values, attention_mask, **model_inputs)
        if self.eagle:
            drafter = self._eagle_drafter(target, input_ids, params, gen)
        else:
            drafter = self._prefill_draft(input_ids, pixel_values, params, self._draft_generator(gen),
                                          seen[0] if len(seen) == 1 else None, model_inputs)
        root = self._choose(first_logits, params, gen)
        t_prefill = time.perf_counter() - t0

        out_tokens = [root]
        stats = _Stats()
        done = root in eos or max_new_tokens == 1
        if streamer is not None:
            streamer.put(torch.tensor([root]))
        while not done:
            # 1. draft a tree rooted at the last emitted token (plain decoding: the root alone)
            t = time.perf_counter()
            tree = drafter.draft(root) if drafter else root_only(root, device=target.device)
            stats.t_draft += time.perf_counter() - t
            # 2. verify: one target forward over the whole tree, on top of the cached prefix
            t = time.perf_counter()
            prefix = target.length
            seen_tree = tree.to(target.device)  # drafted on the draft's device
            anc = ancestor_mask(seen_tree.parents)  # [N, N]
            positions = position_ids(seen_tree, prefix)  # [N]
            # A lone root needs no mask: the model's own causal path is the one generate() takes.
            bias = None
            if len(tree) > 1:
                window = dict(window=target.window, query_pos=positions, key_pos=positions) if target.window else {}
                bias = attention_bias(anc, prefix, target.dtype, **window)
            logits = target.forward(seen_tree.tokens, positions, bias)  # [N, V], on the target's last device
            # 3. accept: the accepted path and the bonus token
            if params.do_sample:
                drawn = _DraftQ(drafter, logits.shape[-1], logits.device) if drafter and drafter.sampled else None
                verdict = verify_sampling(seen_tree, _LazyProbs(logits, params), gen, drawn)
            else:
                verdict = verify_greedy(seen_tree.to(logits.device), logits, anc.to(logits.device))
            # 4. compact both caches to the accepted path
            compact(target.cache, prefix, verdict.path, verdict.index)
            if drafter:
                drafter.commit(tree, verdict.path)
            stats.t_verify += time.perf_counter() - t
            stats.record(tree, verdict)
            if on_step is not None:
                on_step(tree, verdict)
            # 5. emit, cutting exactly where generate() stops (EOS or max_new_tokens)
            new, done = _cut(verdict.emitted(tree), eos, max_new_tokens - len(out_tokens))
            out_tokens += new
            if streamer is not None:
                streamer.put(torch.tensor(new))
            root = verdict.bonus
        t_total = time.perf_counter() - t0
        if streamer is not None:
            streamer.end()

        sequences = torch.cat([input_ids, torch.tensor([out_tokens], device=input_ids.device)], dim=1)
        return SpecOutput(
            sequences=sequences,
            stats=stats.summary(
                new_tokens=len(out_tokens),
                target_forwards=target.forwards,
                draft_forwards=drafter.runner.forwards if drafter else 0,
                time_prefill_s=t_prefill,
                time_total_s=t_total,
            ),
        )

    # ------------------------------------------------------------------------------------------
    def _draft_generator(self, gen: torch.Generator) -> torch.Generator:
        """The request's generator for the draft's draws: `gen` itself for a draft on the CPU, else
        a generator on the draft's device seeded from `gen` (one CPU draw)."""
        if self.draft is None or self.eagle:
            return gen
        device = input_device(self.draft)
        if device.type == "cpu":
            return gen
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        return torch.Generator(device=device).manual_seed(seed)

    def _prefill_draft(self, input_ids, pixel_values, params, generator=None, vision=None,
                       model_inputs=None) -> Drafter | None:
        """vision: the target's selected vision features for this image, when the draft can reuse them.
        model_inputs: the processor's other tensors, for a vision-language draft's prefill."""
        if self.method == "ar":
            return None
        runner = ModelRunner(self.draft, self.sampled_draft_backend if params.do_sample else self.draft_backend)
        extra = {k: v.to(runner.device) if torch.is_tensor(v) else v for k, v in (model_inputs or {}).items()}
        if is_vlm(self.draft) and vision is not None:
            image = draft_image_inputs(self.draft, vision, extra.pop("image_sizes", None))
            runner.prefill(input_ids.to(runner.device), mm_encoder_outputs=image, **extra)
        elif is_vlm(self.draft) and pixel_values is not None:
            runner.prefill(input_ids.to(runner.device), pixel_values=pixel_values.to(runner.device, self.draft.dtype),
                           **extra)
        elif is_vlm(self.draft):  # a text-only prompt: the VLM draft reads it as its language model would
            runner.prefill(input_ids.to(runner.device))
        else:
            ids = input_ids
            img = image_token_id(self.target) if is_vlm(self.target) else None
            if img is not None:  # a text-only draft reads the prompt without the image tokens
                ids = ids[:, ids[0] != img]
            runner.prefill(ids.to(runner.device))
        # The draft cache now holds the whole prompt; the first step feeds it the root.
        if not params.do_sample:
            return Drafter(runner, self.method, self.config)
        # sampling: the dynamic tree draws its candidates from q with the request's generator
        return Drafter(runner, self.method, self.config, temperature=params.temperature, generator=generator)

    def _eagle_drafter(self, target: ModelRunner, input_ids, params, generator) -> EagleDrafter | None:
        """The head reads the prompt with the target's prefill features at its first draft()."""
        if self.method == "ar":
            return None
        runner = ModelRunner(self.draft, self.sampled_draft_backend if params.do_sample else self.draft_backend,
                             keep_hidden=True)
        runner.start()
        sampled = dict(temperature=params.temperature, generator=generator) if params.do_sample else {}
        return EagleDrafter(runner, target, self.method, self.config, input_ids[0].tolist(), target.hidden, **sampled)

    def _draft_backend(self, draft_quant, lean: bool, vocab: torch.Tensor | None) -> Backend | None:
        """How the draft's decode steps run (`core.backends`); None for "ar" (no draft)."""
        if self.draft is None or self.method == "ar":
            return None
        if self.eagle:
            return head_backend(self.draft, self.target, vocab, resolve_quant(draft_quant, self.target.device))
        quant = resolve_quant(draft_quant, self.draft.device)
        try:
            return draft_backend(self.draft, vocab, quant, lean)
        except ValueError:
            if draft_quant != "auto" or vocab is not None:
                raise
            return draft_backend(self.draft)  # "auto" on a draft whose head does not allow it: run it as given

    def _draft_vocab_ids(self, draft_vocab) -> torch.Tensor | None:
        if draft_vocab is None or self.draft is None:
            return None
        size = vocab_size(self.draft)
        if isinstance(draft_vocab, bool) or isinstance(draft_vocab, float) or (
            torch.is_tensor(draft_vocab) and (draft_vocab.is_floating_point() or draft_vocab.dtype == torch.bool)
        ):  # a float would silently become one token id
            raise ValueError(f"draft_vocab must be 'auto', None, an int or a LongTensor of ids, got {draft_vocab!r}")
        if isinstance(draft_vocab, int):
            ids = CHECKS.get(self.draft, ("vocab", draft_vocab),
                             lambda: draft_vocab_ids(draft_vocab, size, draft_ranking(self.draft)))
        else:
            ids = torch.as_tensor(draft_vocab, dtype=torch.long).flatten().unique()
            if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= size:
                raise ValueError(f"draft_vocab ids must be non-empty and in [0, {size})")
        img = image_token_id(self.target) if is_vlm(self.target) else None
        if img is not None:  # never worth proposing: the target never emits it after the prompt
            ids = ids[ids != img]
        return ids

    @staticmethod
    def _choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
        if not params.do_sample:
            return int(logits.argmax())
        p = processed_probs(logits[None], params)[0]
        return draw(p, gen)

    def _eos_set(self, eos_token_id) -> set[int]:
        if eos_token_id is None:
            eos_token_id = self.target.generation_config.eos_token_id
        if eos_token_id is None:
            return set()
        if isinstance(eos_token_id, int):
            return {eos_token_id}
        return {int(e) for e in (eos_token_id.tolist() if torch.is_tensor(eos_token_id) else eos_token_id)}

    def _check_inputs(self, input_ids, pixel_values, attention_mask, max_new_tokens) -> int:
        """Refuse what the target cannot decode, naming it; returns max_new_tokens, capped (with a
        warning) so that prompt + new tokens fit the target's context. A prompt that alone fills
        the context is an error: the target has no position left to predict from."""
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a LongTensor of shape [1, prompt_len]")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids (a LongTensor), got dtype {input_ids.dtype}")
        if input_ids.shape[0] != 1:
            raise ValueError(f"batch size {input_ids.shape[0]} is not supported: specllava decodes one sequence at a time (batch size 1)")
        if input_ids.shape[1] == 0:
            raise ValueError("empty prompt: input_ids has no tokens")
        n_embed = self.target.get_input_embeddings().num_embeddings
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= n_embed:
            raise ValueError(f"input_ids out of range: token ids must be in [0, {n_embed}) for this target, got "
                             f"{lo if lo < 0 else hi}; tokenize with the target's own tokenizer")
        try:  # ints, numpy ints and 0-d integer tensors; not floats, strings or bools
            if isinstance(max_new_tokens, bool):
                raise TypeError
            max_new_tokens = operator.index(max_new_tokens)
        except TypeError:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}") from None
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise ValueError("attention_mask with padding (zeros) is not supported for batch size 1; pass the unpadded prompt")
        if pixel_values is not None:
            if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point() or pixel_values.dim() not in (4, 5):
                shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
                raise ValueError(f"pixel_values must be a float tensor [1, channels, height, width] (the processor's "
                                 f"output; add the batch dimension with pixel_values[None]), got {shape}")
            if pixel_values.shape[0] != 1:
                raise ValueError(f"pixel_values has batch size {pixel_values.shape[0]}; specllava supports batch size 1")
        context = _context_length(self.target)
        if context is not None:
            prompt = input_ids.shape[1]
            if prompt >= context:
                raise ValueError(f"the prompt has {prompt} tokens, but the target's context holds {context} "
                                 "(max_position_embeddings): shorten the prompt")
            if prompt + max_new_tokens > context:
                warnings.warn(f"max_new_tokens={max_new_tokens} with a {prompt}-token prompt runs past the target's "
                              f"context of {context} tokens; generating at most {context - prompt}", stacklevel=3)
                max_new_tokens = context - prompt
        if not is_vlm(self.target):
            if pixel_values is not None:
                raise ValueError("pixel_values given, but the target is a text-only model; drop the image or use a vision-language target")
            return max_new_tokens
        n_img = int((input_ids == image_token_id(self.target)).sum())
        if n_img and pixel_values is None:
            raise ValueError(f"the prompt has {n_img} image tokens but no pixel_values were given; pass the processor's pixel_values")
        if pixel_values is not None and not n_img:
            raise ValueError("pixel_values given, but the prompt has no image tokens; build the prompt with the processor so <image> is expanded")
        return max_new_tokens


def _check_sampling(**values) -> None:
    """Types of the sampling arguments (their ranges: `SamplingParams`); seed None or an integer."""
    for name, value in values.items():
        integral = name in ("top_k", "seed")
        kind = numbers.Integral if integral else numbers.Real
        if (value is None and name == "seed") or (isinstance(value, kind) and not isinstance(value, bool)):
            continue
        raise ValueError(f"{name} must be {'an integer' if integral else 'a number'}"
                         f"{' or None' if name == 'seed' else ''}, got {value!r}")


def _check_model(model, role: str) -> None:
    """A loaded model (or EAGLE head) with real weights, or a clear error."""
    if model is None or not isinstance(model, torch.nn.Module):
        raise ValueError(f"{role} must be a loaded model (a torch.nn.Module such as transformers' "
                         f"...ForConditionalGeneration), got {type(model).__name__}")
    if role == "target" and not hasattr(model, "generate"):
        raise ValueError(f"the target must be a generative Hugging Face model with generate(), got {type(model).__name__}")
    # accelerate's offload keeps weights on the meta device until its hooks load them (hf_device_map)
    if not getattr(model, "hf_device_map", None) and any(p.is_meta for p in model.parameters()):
        raise ValueError(f"the {role}'s weights are on the meta device (not loaded): load it with real weights, "
                         "e.g. from_pretrained() without device_map='meta', or move it with .to_empty() and load them")


def _context_length(model) -> int | None:
    """The target's context in tokens: max_position_embeddings of its (text) config, if it says."""
    for cfg in (model.config, model.config.get_text_config()):
        n = getattr(cfg, "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def mix_seed(seed: int) -> int:
    """SplitMix64 of the seed. torch's CPU generator seeded with consecutive integers (seed=0, 1,
    2, ... as users and benchmarks do) gives measurably biased first draws; mixing the seed first
    removes that (`tools/seed_bias.py`, docs/algorithms.md)."""
    x = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


class _LazyProbs:
    """Rows of the processed target distribution p, computed only for the nodes the sampler visits
    (processing all N rows would sort N full-vocabulary rows for top-p on every step)."""

    def __init__(self, logits: torch.Tensor, params: SamplingParams):
        self.logits, self.params, self.rows = logits, params, {}

    def __getitem__(self, node: int) -> torch.Tensor:
        if node not in self.rows:
            self.rows[node] = processed_probs(self.logits[node : node + 1], self.params)[0]
        return self.rows[node]


class _DraftQ:
    """node -> the full-vocabulary draft row its children were drawn from (sampled drafting)."""

    def __init__(self, drafter: Drafter, vocab: int, device: torch.device):
        self.drafter, self.vocab, self.device = drafter, vocab, device  # device: where p lives

    def __contains__(self, node: int) -> bool:
        return node in self.drafter.q

    def __getitem__(self, node: int) -> torch.Tensor:
        return self.drafter.full_q(node, self.vocab).to(self.device)


def _cut(tokens: list[int], eos: set[int], room: int) -> tuple[list[int], bool]:
    """Emitted tokens up to the first EOS (kept, as generate() keeps it) and at most `room`."""
    for i, tok in enumerate(tokens[:room]):
        if tok in eos:
            return tokens[: i + 1], True
    return tokens[:room], len(tokens) >= room


class _Stats:
    def __init__(self):
        self.t_draft = self.t_verify = 0.0
        self.hist: list[int] = []
        self.nodes: list[int] = []

    def record(self, tree, verdict) -> None:
        k = len(verdict.path) - 1
        if k >= len(self.hist):
            self.hist += [0] * (k + 1 - len(self.hist))
        self.hist[k] += 1
        self.nodes.append(len(tree) - 1)

    def summary(self, new_tokens, target_forwards, draft_forwards, time_prefill_s, time_total_s) -> dict:
        by_depth = [sum(self.hist[d:]) for d in range(1, len(self.hist))]
        return {
            "new_tokens": new_tokens,
            "target_forwards": target_forwards,
            "draft_forwards": draft_forwards,
            "mean_accepted": new_tokens / max(target_forwards, 1),
            "accept_hist": self.hist,
            "accept_by_depth": by_depth,
            "steps": len(self.nodes),
            "tree_nodes_mean": sum(self.nodes) / len(self.nodes) if self.nodes else 0.0,
            "time_prefill_s": time_prefill_s,
            "time_decode_s": time_total_s - time_prefill_s,
            "time_draft_s": self.t_draft,
            "time_verify_s": self.t_verify,
            "time_total_s": time_total_s,
        }
