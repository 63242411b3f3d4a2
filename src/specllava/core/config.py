"""Every decoding knob in one place, with documented defaults."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields

METHODS = ("ar", "chain", "static", "dynamic")

# A Medusa/SpecInfer-style static tree of 25 nodes: wide near the root, where the draft is least
# sure of the exact continuation, thin at depth. Each tuple is a path of draft ranks.
DEFAULT_STATIC_CHOICES: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0), (1, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
    (0, 0, 0, 0, 0, 0),
    (0, 0, 0, 0, 0, 0, 0),
)


GREEDY_NODE_BUDGET = 32  # TreeConfig.node_budget=None at T=0
SAMPLED_NODE_BUDGET = 8  # ... and when sampling


INT_FIELDS = ("max_depth", "node_budget", "max_children", "frontier", "chain_length")
# float field -> (the range check, the range in words)
FLOAT_RANGES = {
    "child_mass": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "min_path_conf": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "min_feed_mass": (lambda v: v >= 0.0, ">= 0"),
    "score_temperature": (lambda v: v > 0.0 and v != float("inf"), "> 0"),
    "draft_cost": (lambda v: 0.0 <= v < float("inf"), ">= 0"),
}


@dataclass
class TreeConfig:
    """Tree-shape knobs. Defaults suit a draft about a tenth of the target's cost.

    Dynamic tree (method="dynamic", the Spec-LLaVA method):
      max_depth      deepest draft level (= draft forwards per step, at most).
      node_budget    most draft nodes verified per step (root excluded); the final tree is the
                     `node_budget` nodes of highest path confidence (an ancestor-closed set).
                     None (default): 32 at T=0 and 8 when sampling, where each node is accepted
                     less often so a smaller tree pays (docs/benchmarks.md, "Why these
                     defaults"). An int applies to both.
      max_children   cap on the children of one node.
      child_mass     a node gets children in order of draft probability until their cumulative
                     probability reaches this mass: a sure draft gives one child, an unsure one
                     several (up to `max_children`).
      min_path_conf  prune any node whose path confidence (product of draft probabilities along
                     its root path) falls below this floor.
      frontier       most nodes expanded (fed to the draft) per depth, the most confident first.
      min_feed_mass  stop growing deeper once the frontier's path confidences sum to less than
                     this: the next depth's children can add at most that many expected accepted
                     tokens, while the draft forward that makes them costs the same regardless.
                     0 = always grow to max_depth (or until nothing can enter the budget).
                     Default 0.3: it saves draft forwards that are unlikely to be accepted,
                     which pays when a draft forward costs a noticeable share of the target's
                     (docs/benchmarks.md, "Why these defaults").
      score_temperature  at T=0, path confidences are products of softmax(draft logits /
                     score_temperature). A draft distilled on the target's full distribution
                     copies its flatness: its top guess is the target's argmax far more often
                     than its probability says (paths of 5 accepted guesses with confidence
                     0.007-0.13, tools/tree_steps.py), so at 1 the tree spends its budget on shallow
                     siblings and stops deepening too early. Below 1 sharpens the confidences.
                     Greedy verification never reads q, so the output does not depend on it.
                     When sampling, q is the draft's distribution at the sampling temperature
                     and this knob is not used.
      calibrate      read the draft's confidences through the acceptance measured so far in
                     this generation (`core.calibration`): per depth, sibling rank and
                     confidence bucket, so a confidently wrong draft gets small trees and an
                     underconfidently right one deep trees; the node budget then maximises
                     expected tokens per cost (capped by `node_budget`), and steps where
                     drafting does not pay verify the root alone (plain decoding), with
                     periodic probes. Default True; False uses the draft's q as it is.
      draft_cost     with `calibrate`: what one draft forward (with its share of the loop's
                     work) costs, as a fraction of a plain step's target forward, in the
                     calibrator's cost model (`calibration.CostModel`).
    When sampling (T>0) the dynamic tree draws each node's children from the draft instead of
    taking its top ranks, fills `node_budget` while growing (most confident parents first) and
    uses `min_path_conf` to choose which nodes to expand, never to prune a drawn child: the
    conditions under which recursive rejection sampling is exact (docs/algorithms.md).
    Chain (method="chain"): `chain_length` guesses in a row, each the draft's top token (at T=0)
    or one draw from q (when sampling, as standard speculative sampling does).
    Static tree (method="static"): `choices`, paths of draft ranks (Medusa notation).
    """

    max_depth: int = 6
    node_budget: int | None = None
    max_children: int = 4
    child_mass: float = 0.8
    min_path_conf: float = 0.02
    frontier: int = 8
    min_feed_mass: float = 0.3
    score_temperature: float = 1.0
    calibrate: bool = True
    draft_cost: float = 0.05
    chain_length: int = 5
    choices: tuple[tuple[int, ...], ...] = field(default=DEFAULT_STATIC_CHOICES)

    def __post_init__(self):
        """Every field typed and in range, or a ValueError naming it (`TreeConfig.<field> ...`)."""
        for name in INT_FIELDS:
            value = getattr(self, name)
            if value is None and name == "node_budget":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"TreeConfig.{name} must be an integer >= 1, got {value!r}")
            if value < 1:
                raise ValueError(f"TreeConfig.{name} must be >= 1, got {value}")
        for name, (ok, rule) in FLOAT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"TreeConfig.{name} must be a number {rule}, got {value!r}")
            if not ok(float(value)):  # NaN fails every range
                raise ValueError(f"TreeConfig.{name} must be {rule}, got {value}")
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"TreeConfig.calibrate must be true or false, got {self.calibrate!r}")
        from .tree import validate_choices

        try:
            ok = len(self.choices) > 0 and all(
                len(c) > 0 and all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in c)
                for c in self.choices)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError("TreeConfig.choices must be a non-empty list of paths of draft ranks, e.g. "
                             f"[[0], [1], [0, 0]], got {self.choices!r}")
        self.choices = tuple(tuple(int(r) for r in c) for c in self.choices)
        try:
            validate_choices(self.choices)  # every prefix present, no negative rank
        except ValueError as err:
            raise ValueError(f"TreeConfig.choices: {err}") from None

    def budget(self, sampled: bool) -> int:
        """The dynamic tree's node budget for greedy (`sampled=False`) or sampled decoding."""
        if self.node_budget is not None:
            return int(self.node_budget)
        return SAMPLED_NODE_BUDGET if sampled else GREEDY_NODE_BUDGET

    @classmethod
    def from_options(cls, **options) -> TreeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown tree option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)
