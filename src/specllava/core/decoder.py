"""The decoding loop: `SpeculativeDecoder` (draft -> verify -> accept -> compact -> emit).

Contract: every request's output equals what `target.generate(...)` returns for it alone with the
same arguments at T=0 (token for token, in float32), and is distributed exactly as the target's
own sampling at T>0. `method="ar"` is plain autoregressive decoding through the same loop (the
root-only tree), the in-loop baseline.

The step API (for callers that interleave many requests, such as a batching server):

    seq = decoder.start(input_ids, pixel_values, max_new_tokens=..., do_sample=..., seed=...)
          # prefill + first token -> a `core.sequence.Sequence` (seq.tokens = [first token])
    results = decoder.step([seq, other, ...])
          # one step for every unfinished sequence given -> [StepResult], in that order:
          # result.tokens (emitted this step), result.tree / result.verdict (verified tree,
          # accepted path, bonus), result.finished / result.finish_reason
    seq.finish("cancelled")   # between steps: "stop", "cancelled", "time_limit"
    seq.sequences(), seq.summary()   # [1, prompt + new] tokens; the stats (`core.stats`)

Sequences may join (a new `start`) and leave (finished, or simply not passed) between steps;
`generate()` is the short driver over `start` and `step` for one prompt. Streaming, stop rules,
cancellation and time limits act between steps, never inside one.

The kind of draft sits behind one strategy chosen at construction (`core.strategy`).
"""

from __future__ import annotations

import numbers
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .batch import Batch, step_batch
from .backends import Backend, draft_backend, head_backend, target_backend
from .cache import compact
from .checks import CHECKS
from .config import METHODS, TreeConfig
from .drafting import DraftQ
from .eagle import EagleHead
from .inputs import check_inputs, check_model, check_sampling, eos_set, split_rows
from .model_info import image_token_id, is_vlm, unsupported_attention, vocab_size
from .quant import resolve_quant
from .runner import ModelRunner
from .sampling import LazyProbs, SamplingParams, processed_probs, request_generator
from .sequence import Sequence, StepResult
from .strategy import choose_strategy
from .tree import ancestor_mask, attention_bias, position_ids, root_only
from .verify import draw, verify_greedy, verify_sampling
from .vocab import default_draft_vocab, draft_ranking, draft_vocab_ids
from .vision import capture_projector_input, shares_vision_tower


@dataclass
class SpecOutput:
    sequences: torch.Tensor  # [1, prompt_len + new_tokens]
    stats: dict = field(default_factory=dict)  # `core.stats`


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

    batch_budgets: load-aware trees for method "dynamic": {B: node budget per sequence} for steps
            of B sequences (a step of b sequences takes the entry of the largest B <= b; 0 = plain
            decoding, the root alone, at that load), e.g. `tuning.budget.batch_node_budgets`'s
            choice from the calibrated cost model. None (default): the tree options' budget at
            every batch size. Lossless either way. Not for an EAGLE head.

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
        batch_budgets: dict[int, int] | None = None,
        **tree_options,
    ):
        check_model(target, "target")
        if draft is not None:
            check_model(draft, "draft")
        with CHECKS.stamp_window():  # each model's weights fingerprinted once for the cached checks
            self._build(target, draft, method, config, draft_vocab, draft_quant, draft_lean, target_lean, tree_options)
        self.batch_budgets = _check_batch_budgets(batch_budgets)

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
        self._batch: Batch | None = None  # the sequences the last step ran together (`core.batch`)
        self.strategy = choose_strategy(method, target, draft, self.config, self.eagle, self.shares_vision)

    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def start(
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
        max_time: float | None = None,
        keep_logits: bool = False,
        **model_inputs,
    ) -> Sequence:
        """One request's prefill (target, then draft) and first token: a `Sequence` to `step`.

        Arguments as `generate`'s, for one prompt (input_ids [1, prompt_len]). max_time: seconds
        after which the sequence finishes at the next step ("time_limit"); None = no limit.
        keep_logits: keep the target's raw logits behind every emitted token (`seq.first_logits`,
        `StepResult.logits`), for log-probabilities.
        The first token may already end it (EOS, or max_new_tokens=1): then `finished` is set."""
        t0 = time.perf_counter()
        max_new_tokens = check_inputs(self.target, input_ids, pixel_values, attention_mask, max_new_tokens)
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        eos = eos_set(self.target, eos_token_id)  # checked before any forward
        if max_time is not None and not (isinstance(max_time, numbers.Real) and max_time > 0):
            raise ValueError(f"max_time must be a number of seconds > 0, got {max_time!r}")
        params = SamplingParams(do_sample, temperature, top_k, top_p)
        gen = request_generator(seed)
        target = ModelRunner(self.target, self.target_backend, keep_hidden=self.strategy.keep_target_hidden)
        input_ids = input_ids.to(target.device)
        if pixel_values is not None:  # the processor gives float32; a bf16 model wants bf16
            pixel_values = pixel_values.to(target.device, self.target.dtype)
        model_inputs = {k: v.to(target.device) if torch.is_tensor(v) else v for k, v in model_inputs.items()}
        # 0. prefill: the first token comes from generate()'s own prefill logits. The draft then
        #    reuses the target's vision features when it has the same vision tower (core.vision).
        share = self.strategy.wants_vision and pixel_values is not None
        with capture_projector_input(self.target) if share else nullcontext([]) as seen:
            first_logits = target.prefill_like_generate(input_ids, pixel_values, attention_mask, **model_inputs)
        drafter = self.strategy.start(
            target=target, input_ids=input_ids, pixel_values=pixel_values, params=params, generator=gen,
            backend=self.sampled_draft_backend if params.do_sample else self.draft_backend,
            vision=seen[0] if len(seen) == 1 else None, model_inputs=model_inputs)
        seq = Sequence(input_ids, params, max_new_tokens, eos, gen, target, drafter,
                       deadline=None if max_time is None else time.monotonic() + max_time, t_start=t0,
                       keep_logits=keep_logits, first_logits=first_logits.reshape(1, -1) if keep_logits else None)
        seq.emit([_choose(first_logits, params, gen)])
        seq.t_prefill = time.perf_counter() - t0
        return seq

    @torch.inference_mode()
    def step(self, sequences: list[Sequence]) -> list[StepResult]:
        """One decoding step for each unfinished sequence; finished ones (and those past their
        time limit, finished here with "time_limit") are left out. Returns one `StepResult` per
        sequence stepped, in the order given."""
        now = time.monotonic()
        live = []
        for seq in sequences:
            if not seq.finished and seq.deadline is not None and now > seq.deadline:
                seq.finish("time_limit")
            if not seq.finished:
                live.append(seq)
        skip = self._apply_budget(live)
        if len(live) > 1 and self.strategy.batched:
            # the batch's rows follow the sequences given: new ones join, absent ones leave
            if self._batch is None or self._batch.seqs != live:
                self._batch = Batch.build(live, self._batch)
            results = step_batch(self._batch, skip_draft=skip)
            if all(seq.finished for seq in live):  # nothing left to continue: free the buffers
                self._batch = None
            return results
        if self._batch is not None:  # back to per-sequence steps: every row returns to its sequence
            self._batch.release()
            self._batch = None
        return [self._step_one(seq, skip) for seq in live]

    def _apply_budget(self, live: list[Sequence]) -> bool:
        """Load-aware trees: every calibrated drafter's cost model learns how many sequences share
        this step's target forward (`calibration.CostModel.batch`), so its tree and its choice of
        plain steps follow the load; with `batch_budgets`, every drafter's node budget for a step
        of len(live) sequences is set from the table. True when that budget is 0 (plain decoding:
        no draft this step)."""
        rows = len(live) if len(live) > 1 and self.strategy.batched else 1
        # greedy rows only: their tokens do not depend on the tree, while a seeded sampled row must
        # draw what it draws alone, so its trees never depend on the batch
        greedy = [seq for seq in live if seq.drafter is not None and seq.drafter.can_go_plain
                  and not seq.params.do_sample]
        for seq in greedy:
            seq.drafter.calib.cost.batch = rows
        if not self.batch_budgets or self.method != "dynamic" or self.eagle:
            # The greedy rows of a batched step decide together: a row that drafts pads every other
            # row's verification to its tree's width, so unless half of them find that drafting pays
            # at this batch size, all of them take a plain step (they feed the draft nothing).
            if rows > 1 and greedy and 2 * sum(seq.drafter.wants_tree(seq.root) for seq in greedy) < len(greedy):
                for seq in greedy:
                    seq.drafter.hold()
            return False
        sizes = [b for b in self.batch_budgets if b <= len(live)]
        budget = self.batch_budgets[max(sizes)] if sizes else None
        for seq in live:
            if seq.drafter is not None:
                seq.drafter.node_budget = budget or seq.drafter.default_budget
        return budget == 0

    def _step_one(self, seq: Sequence, skip_draft: bool = False) -> StepResult:
        """draft -> verify -> accept -> compact -> emit, for one sequence (skip_draft: the root
        alone, the drafter catching up at its next step)."""
        target, params, stats = seq.target, seq.params, seq.stats
        drafter = None if skip_draft else seq.drafter
        if skip_draft and seq.drafter is not None:
            seq.drafter.skip(seq.root)
        # 1. draft a tree rooted at the last emitted token (plain decoding: the root alone)
        t = time.perf_counter()
        tree = drafter.draft(seq.root) if drafter else root_only(seq.root, device=target.device)
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
            drawn = DraftQ(drafter, logits.shape[-1], logits.device) if drafter and drafter.sampled else None
            verdict = verify_sampling(seen_tree, LazyProbs(logits, params), seq.generator, drawn)
        else:
            verdict = verify_greedy(seen_tree.to(logits.device), logits, anc.to(logits.device))
        # 4. compact both caches to the accepted path
        compact(target.cache, prefix, verdict.path, verdict.index)  # greedy: the path's index is on the device
        if drafter:
            drafter.commit(tree, verdict.path)
            stats.draft_forwards = drafter.runner.forwards
        stats.t_verify += time.perf_counter() - t
        stats.record(len(tree), len(verdict.path) - 1)
        # 5. emit, cutting exactly where generate() stops (EOS or max_new_tokens)
        emitted = seq.emit(verdict.emitted(tree))
        rows = None
        if seq.keep_logits:  # row i: the distribution the i-th emitted token was chosen from
            index = verdict.index if verdict.index is not None else torch.tensor(verdict.path, device=logits.device)
            rows = logits[index[: len(emitted)].to(logits.device)]
        return StepResult(seq, emitted, tree, verdict, rows)

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
        max_time: float | None = None,
        on_logits=None,
        **model_inputs,
    ) -> SpecOutput:
        """Decode up to `max_new_tokens` tokens after the prompt: `start`, then `step` until done.

        A batch (input_ids [B, len] with B > 1, padded, and its attention_mask, as the processor
        returns them for lists of prompts and images; `inputs.split_rows`) decodes every row as
        its own request, all rows stepped together, and returns `sequences` shaped as
        transformers' batched generate() does: [B, len + longest new], the input rows as given,
        rows that stopped early padded with pad_token_id (the generation config's, else the
        first EOS id). Row b samples with seed + b. stats: the rows' stats under "rows".
        Each row equals that row decoded alone.

        model_inputs: every other tensor the target's processor returns (LLaVA-NeXT's
                  `image_sizes`, ...), passed on to the target's prefill as generate() takes them
                  (and to a vision-language draft's). Call it as `generate(**processor(...))`.
        streamer: an HF-style streamer (`put`/`end`), fed the prompt then each step's tokens.
        on_step:  optional callback `on_step(tree, verdict)` after every verification step, with
                  the verified `Tree` (its tokens, parents, depth and draft scores) and the
                  `Verdict` (accepted path of node indices, bonus token). For profiling and
                  calibration; it must not modify them.
        max_time: stop after this many seconds (between steps), as generate()'s max_time.
        on_logits: optional callback `on_logits(logits)` with the target's raw logits [k, V] behind
                  the tokens about to be streamed, row i for the i-th (`keep_logits`): the first
                  token's, then each step's. It must not modify them.
        """
        if torch.is_tensor(input_ids) and input_ids.dim() == 2 and input_ids.shape[0] > 1:
            return self._generate_rows(input_ids, pixel_values, attention_mask, streamer, on_step, model_inputs,
                                       dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                            top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, max_time=max_time),
                                       seed)
        seq = self.start(input_ids, pixel_values, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                         top_p, eos_token_id, seed, max_time, keep_logits=on_logits is not None, **model_inputs)
        if on_logits is not None:
            on_logits(seq.first_logits)
        if streamer is not None:
            streamer.put(seq.input_ids.cpu())
            streamer.put(torch.tensor(seq.tokens))
        while not seq.finished:
            for result in self.step([seq]):
                if on_step is not None:
                    on_step(result.tree, result.verdict)
                if on_logits is not None:
                    on_logits(result.logits)
                if streamer is not None and result.tokens:
                    streamer.put(torch.tensor(result.tokens))
        if streamer is not None:
            streamer.end()
        return SpecOutput(sequences=seq.sequences(), stats=seq.summary())

    def _generate_rows(self, input_ids, pixel_values, attention_mask, streamer, on_step, model_inputs, args,
                       seed) -> SpecOutput:
        """`generate` for a padded batch: one sequence per row, stepped together."""
        if streamer is not None:
            raise ValueError("a streamer takes one sequence, as transformers' streamers do: pass one prompt, or "
                             "use start()/step() to stream many")
        check_sampling(seed=seed)
        rows = split_rows(self.target, input_ids, attention_mask, pixel_values, model_inputs)
        seqs = [self.start(**row, **args, seed=None if seed is None else seed + b) for b, row in enumerate(rows)]
        while not all(s.finished for s in seqs):
            for result in self.step(seqs):
                if on_step is not None:
                    on_step(result.tree, result.verdict)
        pad = self.target.generation_config.pad_token_id
        if pad is None:  # as generate(): the first EOS id
            eos = args["eos_token_id"] if args["eos_token_id"] is not None else self.target.generation_config.eos_token_id
            eos = eos.tolist() if torch.is_tensor(eos) else eos
            pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
        width = max(len(s.tokens) for s in seqs)
        new = torch.tensor([s.tokens + [pad] * (width - len(s.tokens)) for s in seqs], dtype=input_ids.dtype)
        stats = [s.summary() for s in seqs]
        return SpecOutput(sequences=torch.cat([input_ids, new.to(input_ids.device)], dim=1),
                          stats={"rows": stats, "new_tokens": sum(s["new_tokens"] for s in stats),
                                 "time_total_s": max(s["time_total_s"] for s in stats)})

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
            ids = torch.as_tensor(draft_vocab, dtype=torch.long, device="cpu").flatten().unique()
            if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= size:
                raise ValueError(f"draft_vocab ids must be non-empty and in [0, {size})")
        img = image_token_id(self.target) if is_vlm(self.target) else None
        if img is not None:  # never worth proposing: the target never emits it after the prompt
            ids = ids[ids != img]
        return ids



def _check_batch_budgets(table) -> dict[int, int] | None:
    if table is None:
        return None
    ok = isinstance(table, dict) and table and all(
        isinstance(k, int) and not isinstance(k, bool) and k >= 1 and isinstance(v, int) and not isinstance(v, bool)
        and v >= 0 for k, v in table.items())
    if not ok:
        raise ValueError(f"batch_budgets must map batch sizes (ints >= 1) to node budgets (ints >= 0), got {table!r}")
    return dict(table)


def _choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """The first token, from the prefill's logits [V]: argmax, or a draw from p."""
    if not params.do_sample:
        return int(logits.argmax())
    p = processed_probs(logits[None], params)[0]
    return draw(p, gen)
