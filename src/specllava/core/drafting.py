"""Drafting: the draft model grows a token tree from the root, one forward per depth.

The draft keeps its own KV cache across decoding steps. Its cache holds the *committed* tokens
(prompt + emitted tokens) it has seen, followed during a step by the tree nodes it was fed
("fed" nodes: those expanded to get their children). Tokens committed but not yet in the draft
cache are *pending*; they always end with the root (the last emitted token).

One step:
  1. feed the pending tokens (a causal chain) -> q at the root;
  2. per depth: turn the frontier's q into children (the policy: chain, static or dynamic), pick
     the next frontier, and feed it in one forward with a tree mask (each node sees the committed
     prefix, its fed ancestors and itself);
  3. the policy picks the final tree (dynamic: the `node_budget` most confident nodes);
  4. after verification, `commit` keeps the fed nodes of the accepted path in the draft cache
     and makes the rest of the accepted tokens (plus the bonus) pending.

q is the draft's distribution (softmax of its logits, at the sampling temperature when
sampling). Candidates never depend on the target's random draws. At T=0, and for chain/static
trees, they are chosen deterministically from q (the top ranks). When sampling with a dynamic
tree (`generator` given), each expanded node's children are *drawn* from q without replacement,
and its log q row is kept (`Drafter.q`) so that verification can use recursive rejection sampling,
which accepts a child with probability min(1, p/q) rather than p (docs/algorithms.md). For that
rule to stay exact a node's children must be a prefix of its draws, cut by decisions that never
look at the draw being cut: so in this mode children are never pruned by their own confidence
(`min_path_conf` limits which nodes are expanded instead) and the node budget is filled during
growth instead of by a final selection.
"""

from __future__ import annotations

import torch

from .cache import compact
from .calibration import Calibrator, CostModel
from .config import TreeConfig
from .runner import ModelRunner
from .tree import Tree, ancestor_mask, attention_bias, chain_choices, validate_choices


class Drafter:
    """Grows trees with a draft model. `policy` is one of "chain", "static", "dynamic"."""

    def __init__(self, runner: ModelRunner, policy: str, cfg: TreeConfig, temperature: float = 1.0,
                 generator: torch.Generator | None = None):
        self.runner = runner
        self.policy = policy
        self.cfg = cfg
        # q's temperature: the sampling temperature when sampling; at T=0 the tree's scores use
        # `score_temperature` (only the tree's shape depends on it, never what is emitted)
        self.temperature = temperature if generator is not None else cfg.score_temperature
        # sampled mode: dynamic and chain children are draws from q (see the module docstring)
        self.sampled = generator is not None and policy in ("dynamic", "chain")
        # dynamic: the draft's confidences read through this sequence's measured acceptance
        self.calib = (Calibrator(cfg.max_depth, cost=CostModel(draft_cost=cfg.draft_cost))
                      if policy == "dynamic" and cfg.calibrate else None)
        # a draft that reads features of its pending tokens (EAGLE) cannot leave them pending
        self.can_go_plain = self.calib is not None and type(self)._pending_features is Drafter._pending_features
        self.plain = False  # this step verifies the root alone (drafting does not pay, `Calibrator.draft_pays`)
        self._wants = None  # this step's choice (`wants_tree`), made once per step
        self.node_budget = cfg.budget(self.sampled)  # dynamic: most nodes per tree, root excluded
        self.default_budget = self.node_budget  # (load-aware trees change node_budget per step)
        self.generator = generator
        self.q: dict[int, torch.Tensor] = {}  # sampled mode: node -> log q row over the draft's columns
        self.pending: list[int] = []
        self.observation = None  # a greedy step's calibrator observation, until its bonus token is known
        self.keep: tuple[int, list[int]] | None = None  # a compaction `commit` leaves to `_feed_pending`
        if policy in ("chain", "static"):
            choices = chain_choices(cfg.chain_length) if policy == "chain" else validate_choices(cfg.choices)
            self.static = _StaticPlan(choices, runner.device)

    # -- one step (one sequence: the policy below, fed through this drafter's own runner) -------
    def draft(self, root: int) -> Tree:
        pending = self.begin(root)
        if not pending:  # a plain step: nothing to feed
            return self.tree()
        logits = self._feed_pending(pending)  # [1, V] draft logits at the root
        frontier = self.grow(logits)
        while frontier is not None:
            logits = self._feed_frontier(frontier, self.tokens, self.parents, self.depth)
            frontier = self.grow(logits)
        return self.tree()

    def commit(self, tree: Tree, path: list[int]) -> None:
        """Keep the accepted fed nodes in the draft cache; the other emitted tokens become pending."""
        keep = self.accepted_fed(tree, path)
        if self.plain:
            return
        start = self.runner.length - self.fed.numel()  # committed part of the draft cache
        # compacted by the next `_feed_pending`, whose one upload carries this index and the tokens
        self.keep = (start, keep)

    def settle(self) -> None:
        """Apply the compaction `commit` left to the next `_feed_pending` now: the draft cache
        then holds exactly the committed tokens (a sequence joining a batch, `core.batch`)."""
        if self.keep is not None:
            start, keep = self.keep
            compact(self.runner.cache, start, keep)
            self.keep = None

    def skip(self, root: int) -> None:
        """A step verified without a tree (plain decoding at a high load): `root` joins the
        pending tokens, fed with the next tree's; no `commit` follows."""
        self._observe_last(root)
        self._wants = None
        self.pending.append(root)

    def wants_tree(self, root: int) -> bool:
        """Whether this step, at `root`, should draft: False when the calibrated drafter finds that
        drafting does not pay (`Calibrator.draft_pays`). Asked once per step (by `begin`, or first
        by a batched step deciding for all its rows); the answer stands until the step begins or is
        skipped."""
        self._observe_last(root)
        if self._wants is None:
            self._wants = not (self.can_go_plain and not self.calib.draft_pays())
        return self._wants

    def hold(self) -> None:
        """This step is plain whatever `wants_tree` said (a batched step's greedy rows decide together)."""
        self._wants = False

    # -- the policy of one step, apart from how the draft model is run -------------------------
    # A step: `begin(root)` gives the tokens to feed (the pending chain); its last logits go to
    # `grow`, which adds one depth of children and returns the frontier to feed next (None: the
    # tree is done); each fed frontier's logits go to `grow` again; `tree()` is the final tree;
    # after verification `accepted_fed` says which fed nodes the draft cache keeps. `draft` runs
    # this on the drafter's own runner, `core.batch` for many drafters in one forward.
    def begin(self, root: int) -> list[int]:
        """Start a step at `root`; returns the pending tokens to feed (a causal chain, root last),
        or [] for a plain step (drafting does not pay: the tree is the root alone, `tree()`, and
        the pending tokens wait for the next drafted step)."""
        self._observe_last(root)
        self.pending.append(root)
        self.d = 0
        self.q = {}
        self.tokens = None
        self.root = root
        self.kept = None
        self.budgets = None  # (nodes, draft forwards, budget now, after one more forward): `_should_stop`
        self.forwards = 1
        self.plain = not self.wants_tree(root)
        self._wants = None
        if self.plain:
            self._start_tree(self.runner.device)
            return []
        pending, self.pending = self.pending, []
        return pending

    def _observe_last(self, root: int) -> None:
        """The last greedy step's calibrator observation, completed by its bonus token (`root`)."""
        if self.observation is not None:
            self.calib.observe(*self.observation, bonus=root)
            self.observation = None

    def _start_tree(self, dev) -> None:
        self.tokens = torch.full((1,), self.root, dtype=torch.long, device=dev)  # a fill, not an upload
        self.parents = torch.full((1,), -1, dtype=torch.long, device=dev)
        self.depth = torch.zeros(1, dtype=torch.long, device=dev)
        self.score = torch.ones(1, dtype=torch.float32, device=dev)
        self.rawq = torch.ones(1, dtype=torch.float32, device=dev)  # the draft's q of each node's token
        self.fed = torch.empty(0, dtype=torch.long, device=dev)  # tree nodes in draft-cache order
        self.frontier = torch.zeros(1, dtype=torch.long, device=dev)

    def grow(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Given the draft's logits [F, V] at the current frontier (the root's at depth 0), add one
        depth of children; returns the next frontier (ascending node indices, [F']) to feed, or
        None when the tree is done."""
        dev = logits.device
        if self.tokens is None:  # the root
            self._start_tree(dev)
        else:
            self.fed = torch.cat([self.fed, self.frontier])
        self.d = d = self.d + 1
        par, tok, sc, *raw = self._expand(self.frontier, logits, self.score, d)  # [C] each
        if par.numel() == 0:
            return None
        first_new = self.tokens.numel()
        self.tokens = torch.cat([self.tokens, tok])
        self.parents = torch.cat([self.parents, par])
        self.depth = torch.cat([self.depth, torch.full_like(tok, d)])
        self.score = torch.cat([self.score, sc])
        self.rawq = torch.cat([self.rawq, raw[0] if raw else sc])
        full = self.policy == "dynamic" and self.sampled and self.score.numel() - 1 >= self.node_budget
        if d == self._max_depth() or full:
            return None
        frontier = self._next_frontier(first_new, self.score, d)
        if frontier.numel() == 0 or self._should_stop(self.score, frontier):
            return None
        self.frontier = frontier
        self.forwards += 1
        return frontier

    def tree(self) -> Tree:
        """The step's final tree (the policy's selection among the grown nodes)."""
        return self._finalize(Tree(self.tokens, self.parents, self.depth, self.score))

    def accepted_fed(self, tree: Tree, path: list[int], width: int | None = None) -> list[int]:
        """After verification: the fed nodes to keep in the draft cache, as offsets into the fed
        order (the accepted path's fed prefix); the rest of the accepted tokens become pending
        (the bonus is added by the next `begin` as its root). width: the nodes the verification
        computed for this row (a batch pads every tree to the widest), what the calibrator charges
        the step (default: the tree's own nodes)."""
        if self.plain:  # the root stays pending with the earlier ones; the bonus joins them next step
            return []
        n_fed, n = self.fed.numel(), len(tree)
        parts = [self.fed, tree.tokens.to(self.fed.device)]
        if self.kept is not None:  # the final tree is a selection: its node i is grown node kept[i]
            parts.append(self.kept.to(self.fed.device))
        if self.calib is not None:  # what the calibrator observes (every grown node), in the same sync
            parts.append(self.calib.packed(self.parents, self.depth, self.rawq, self.tokens).to(self.fed.device))
        read = torch.cat(parts).tolist()  # host sync: fed nodes, tokens (the selection, the observations)
        fed_rank = {int(n): i for i, n in enumerate(read[:n_fed])}
        tokens = read[n_fed : n_fed + n]
        rest = n_fed + n
        grown = range(n)
        if self.kept is not None:
            grown, rest = read[rest : rest + n], rest + n
        if self.calib is not None:
            observation = (*self.calib.unpack(read[rest:], self.tokens.numel()), [grown[i] for i in path],
                           self.forwards, max(n, width or 0) - 1)
            if self.sampled:  # the tree is all that was grown, and the path says what was accepted
                self.calib.observe(*observation)
            else:  # at T=0 the target's argmax decides for grown nodes left out of the tree too:
                self.observation = observation  # the path's tokens, then the bonus (the next root)
        keep = []
        for node in path[1:]:
            if grown[node] not in fed_rank:
                break
            keep.append(fed_rank[grown[node]])
        # Accepted but never fed (e.g. leaves) must still reach the draft cache.
        self.pending = [int(tokens[i]) for i in path[1 + len(keep):]]
        return keep

    # -- draft-model calls -----------------------------------------------------------------
    def _top(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most likely draft tokens per row and their q: ([F, k] probs, [F, k] ids).

        q = softmax(logits / T) is never materialised over the vocabulary: the top-k logits
        minus the row's logsumexp give the same probabilities for a fraction of the memory traffic.
        """
        k = min(k, logits.shape[-1])
        scaled = logits.float() / self.temperature if self.temperature != 1.0 else logits.float()
        vals, toks = scaled.topk(k, dim=-1)
        if self.runner.vocab_ids is not None:  # columns of a reduced draft vocabulary -> token ids
            toks = self.runner.vocab_ids[toks]
        return (vals - torch.logsumexp(scaled, dim=-1, keepdim=True)).exp(), toks

    def _feed_pending(self, pending: list[int]) -> torch.Tensor:
        dev = self.runner.device
        start, keep = self.keep or (0, [])
        # host sync: one upload, the draft cache's compaction index (the last step's accepted fed
        # nodes, left by `commit`) and the pending tokens together
        data = torch.tensor(keep + pending, dtype=torch.long, device=dev)
        if self.keep is not None:
            compact(self.runner.cache, start, keep, index=data[: len(keep)])
            self.keep = None
        n, start = len(pending), self.runner.length
        tokens = data[len(keep):]
        # A causal chain on top of the cache: the model's own causal mask is exactly right (None).
        logits = self.runner.forward(tokens, torch.arange(start, start + n, device=dev), None, logits_to_keep=1,
                                     features=self._pending_features())
        self.root_pos = start + n - 1
        return logits[-1:]  # [1, V]

    def _feed_frontier(self, frontier, tokens, parents, depth) -> torch.Tensor:
        """One draft forward over the frontier nodes; returns their logits, [F, V]."""
        fed = torch.cat([self.fed, frontier])  # the cache's tree block once these are fed
        anc = ancestor_mask(parents)  # [n, n]
        visible = anc[frontier][:, fed]  # [F, fed]: fed ancestors and the node itself
        committed = self.runner.length - self.fed.numel()
        window = {}
        if self.runner.window:  # a sliding-window draft: positions of the queries and of the fed nodes
            window = dict(window=self.runner.window, query_pos=self.root_pos + depth[frontier],
                          key_pos=self.root_pos + depth[fed])
        bias = attention_bias(visible, committed, self.runner.dtype, **window)
        # attention_bias lays the tree block right after `committed`; here that block is all fed
        # nodes so far (older fed nodes are already cached, the frontier is being fed now).
        return self.runner.forward(tokens[frontier], self.root_pos + depth[frontier], bias,
                                   features=self._frontier_features(frontier, parents))

    def _pending_features(self) -> torch.Tensor | None:
        """Input features of the pending tokens, for a draft that reads them (`core.eagle`)."""
        return None

    def _frontier_features(self, frontier, parents) -> torch.Tensor | None:
        """Input features of the frontier nodes, for a draft that reads them (`core.eagle`)."""
        return None

    # -- policies ----------------------------------------------------------------------------
    def _max_depth(self) -> int:
        return self.cfg.max_depth if self.policy == "dynamic" else self.static.max_depth

    def _expand(self, frontier, logits, score, d):
        """Children of the frontier nodes: (parent index, token, path confidence), each [C]."""
        if self.policy == "chain" and self.sampled:
            return self._expand_chain_sampled(frontier, logits, score)
        if self.policy != "dynamic":
            return self.static.expand(frontier, self._top(logits, self.static.max_rank), score, d)
        cfg = self.cfg
        if self.sampled:
            return self._expand_sampled(frontier, logits, score, d)
        vals, toks = self._top(logits, cfg.max_children)  # [F, k] q and ids, best first
        local = self._local(d, vals)  # P(accepted | parent accepted), calibrated
        mass_before = local.cumsum(-1) - local  # of the better siblings
        sc = score[frontier][:, None] * local  # [F, k]
        keep = (mass_before < cfg.child_mass) & (sc >= cfg.min_path_conf)
        rows, cols = keep.nonzero(as_tuple=True)  # host sync: how many children; row-major as keep's mask order
        return frontier[rows], toks[rows, cols], sc[rows, cols], vals[rows, cols]

    def _local(self, d: int, vals: torch.Tensor) -> torch.Tensor:
        """The children's acceptance once their parent is accepted: the draft's q read through the
        calibrator (q itself without one, or before anything is measured)."""
        return vals if self.calib is None else self.calib.local(d, vals)

    def _expand_chain_sampled(self, frontier, logits, score):
        """Chain when sampling: one draw from q per level, as standard speculative sampling does
        (verification then accepts it with min(1, p/q))."""
        scaled = logits.float() / self.temperature if self.temperature != 1.0 else logits.float()
        logq = torch.log_softmax(scaled, dim=-1)  # [1, K]
        col = (logq + _gumbel(logq, self.generator)).argmax(dim=-1)  # [1]
        val = logq.gather(-1, col[:, None])[:, 0].exp()
        tok = col if self.runner.vocab_ids is None else self.runner.vocab_ids[col]
        for j, node in enumerate(frontier.tolist()):
            self.q[node] = logq[j]
        return frontier, tok, score[frontier] * val, val

    def _expand_sampled(self, frontier, logits, score, d):
        """Sampled mode: up to `max_children` draws from q without replacement per frontier node
        (Gumbel-top-k: the order of the perturbed keys is the order of sequential draws), kept
        while the better-drawn siblings' mass is below `child_mass`, then cut to the node budget
        in order of the parents' confidence. Each cut depends only on earlier draws."""
        cfg = self.cfg
        scaled = logits.float() / self.temperature if self.temperature != 1.0 else logits.float()
        logq = torch.log_softmax(scaled, dim=-1)  # [F, K]
        gumbel = _gumbel(logq, self.generator)
        keys, cols = (logq + gumbel).topk(min(cfg.max_children, logq.shape[-1]), dim=-1)  # draw order
        vals = logq.gather(-1, cols).exp()  # [F, k] q of each draw
        toks = cols if self.runner.vocab_ids is None else self.runner.vocab_ids[cols]
        local = self._local(d, vals)  # calibrated: each draw's value reads only its own and earlier draws
        mass_before = local.cumsum(-1) - local
        keep = (mass_before < cfg.child_mass) & torch.isfinite(keys)  # a prefix of each row's draws
        room = self.node_budget - (score.numel() - 1)
        order = torch.sort(-score[frontier], stable=True).indices  # the most confident parents first
        ranked = keep[order]
        ranked &= ranked.flatten().cumsum(0).view_as(ranked) <= room
        keep = torch.empty_like(keep)
        keep[order] = ranked
        for j, node in enumerate(frontier.tolist()):  # host sync (sampled mode): the rows' node ids
            self.q[node] = logq[j]  # exponentiated only for the nodes verification visits (q_row)
        sc = score[frontier][:, None] * local
        par = frontier[:, None].expand_as(toks)
        return par[keep], toks[keep], sc[keep], vals[keep]

    def q_row(self, node: int):
        """Sampled mode: the q row that drew `node`'s children, as `verify_sampling` takes it: the
        [V] row, or (ids, values) over a reduced draft vocabulary's ascending token ids."""
        row = self.q[node].exp()
        if self.runner.vocab_ids is None:
            return row
        return self.runner.vocab_ids, row

    def _next_frontier(self, first_new: int, score, d) -> torch.Tensor:
        """Nodes to feed next: static: those with children in the plan; dynamic: the most confident."""
        if self.policy != "dynamic":
            return self.static.frontier(d).to(score.device)
        new = torch.arange(first_new, score.numel(), device=score.device)
        if self.sampled:  # prune by confidence here, where only the expansion depends on it
            new = new[score[new] >= self.cfg.min_path_conf]
        if new.numel() > self.cfg.frontier:
            top = score[new].topk(self.cfg.frontier).indices.sort().values
            new = new[top]
        return new

    def _should_stop(self, score, frontier) -> bool:
        """Dynamic only; both rules read back in one host sync.

        Cannot improve: no descendant of the frontier can enter the final tree (its best path
        confidence is at most the budget's last one). Not worth feeding: another draft forward
        adds children whose path confidences sum to at most the frontier's; for a calibrated draft
        that sum is the expected number of extra accepted tokens, and below `min_feed_mass` the
        forward costs more than it can return. A calibrated greedy tree reads its final budget
        (`_finalize`) in the same sync, for the tree as it stands: whether growth stops here, or
        after one more forward whose depth keeps no node."""
        if self.policy != "dynamic":
            return False
        flags = []
        budget = self.node_budget
        if not self.sampled and score.numel() - 1 >= budget:  # a child is never above its parent
            flags.append(score[frontier].max() <= score[1:].topk(budget).values[-1])
        if self.cfg.min_feed_mass > 0:
            flags.append(score[frontier].sum() < self.cfg.min_feed_mass)
        budgets = self.calib is not None and not self.sampled
        if not budgets:
            return bool(torch.stack(flags).any()) if flags else False  # host sync: both rules at once
        stop = torch.stack(flags).any().long() if flags else torch.zeros((), dtype=torch.long, device=score.device)
        now, after = (self.calib.budget_on_device(score[1:], f, budget) for f in (self.forwards, self.forwards + 1))
        read = torch.stack([stop, now, after]).tolist()  # host sync: both rules and the budgets at once
        self.budgets = (score.numel(), self.forwards, read[1], read[2])
        return bool(read[0])

    def _finalize(self, tree: Tree) -> Tree:
        if self.policy != "dynamic" or self.sampled or len(tree) - 1 <= 1:
            return tree
        budget = self.node_budget
        if self.calib is not None:  # as many of the best as maximise expected tokens per cost
            n, forwards, now, after = self.budgets or (-1, -1, 0, 0)
            if n == len(tree) and self.forwards in (forwards, forwards + 1):  # read at the last stop check
                budget = now if self.forwards == forwards else after
            else:  # growth ended at max_depth
                budget = int(self.calib.budget_on_device(tree.score[1:], self.forwards, budget))  # host sync
        if len(tree) - 1 <= budget:
            return tree
        # Path confidence only falls along a path, and a stable sort keeps parents (earlier
        # indices) ahead of equally scored children: the top of the order is ancestor-closed.
        order = torch.sort(-tree.score[1:], stable=True).indices[:budget] + 1
        keep = torch.cat([torch.zeros(1, dtype=torch.long, device=order.device), order]).sort().values
        self.kept = keep
        return tree.select(keep)


class _StaticPlan:
    """A static tree (chain included) as per-depth index tables over its choices."""

    def __init__(self, choices: list[tuple[int, ...]], device: torch.device | str = "cpu"):
        index = {(): 0}
        for i, c in enumerate(choices, start=1):
            index[c] = i
        self.max_depth = max(len(c) for c in choices)
        self.by_depth = []  # per depth: (parent node index [C], rank [C])
        self.frontiers = []  # per depth d: nodes at depth d that have children
        has_children = {c[:-1] for c in choices}
        for d in range(1, self.max_depth + 1):
            level = [c for c in choices if len(c) == d]
            self.by_depth.append(
                (torch.tensor([index[c[:-1]] for c in level], device=device),
                 torch.tensor([c[-1] for c in level], device=device))
            )
            self.frontiers.append(torch.tensor([index[c] for c in level if c in has_children], dtype=torch.long,
                                               device=device))
        self.max_rank = max(c[-1] for c in choices) + 1

    def expand(self, frontier, top, score, d):
        vals, toks = top  # [F, R] q and ids of the R best draft tokens per frontier node
        par, rank = self.by_depth[d - 1]
        par, rank = par.to(vals.device), rank.to(vals.device)
        if self.max_rank > vals.shape[-1]:
            raise ValueError(f"static tree uses draft rank {self.max_rank - 1} but the vocabulary has {vals.shape[-1]} tokens")
        row = torch.searchsorted(frontier, par)  # frontier is ascending
        return par, toks[row, rank], score[par] * vals[row, rank]

    def frontier(self, d: int) -> torch.Tensor:
        return self.frontiers[d - 1]


def _gumbel(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel noise shaped like `like` ([F, K]), drawn with `generator` on the generator's own
    device (the decoder gives the draft a generator on the draft's device; a draft whose logits
    land elsewhere gets noise drawn there and moved)."""
    if generator is None or generator.device == like.device:
        return -torch.empty_like(like).exponential_(generator=generator).log()
    noise = torch.empty(like.shape, dtype=like.dtype, device=generator.device).exponential_(generator=generator)
    return -noise.to(like.device).log()


class DraftQ:
    """q at the tree's nodes as sampled verification reads it: `node in q` when the node's
    children were drawn from q, `q[node]` -> the draft row they were drawn from (`Drafter.q_row`:
    the [vocab] row, or (ids, values) over a reduced draft vocabulary). `vocab` and `device` are
    accepted for the callers' convenience; verification moves the row to p's device itself."""

    def __init__(self, drafter: Drafter, vocab: int | None = None, device: torch.device | None = None):
        self.drafter = drafter

    def __contains__(self, node: int) -> bool:
        return node in self.drafter.q

    def __getitem__(self, node: int):
        return self.drafter.q_row(node)
