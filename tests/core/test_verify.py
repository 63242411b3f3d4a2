"""The verification rules as pure functions, on hand-made trees and distributions."""

from collections import Counter

import torch

from random_models import chi2_pvalue, wrong_verify_sampling
from specllava.core.tree import Tree, ancestor_mask
from specllava.core.verify import draw, verify_greedy, verify_sampling

V = 6


def tree_of(parents, tokens):
    parents = torch.tensor(parents)
    depth = torch.zeros_like(parents)
    for i, p in enumerate(parents.tolist()):
        depth[i] = 0 if p < 0 else depth[p] + 1
    return Tree(torch.tensor(tokens), parents, depth, torch.ones(len(parents)))


def one_hot_logits(argmaxes):
    logits = torch.zeros(len(argmaxes), V)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 5.0
    return logits


def test_greedy_walks_the_matching_branch():
    #        0(root)
    #       /      \
    #     1:tok3  2:tok4        target argmax at root = 4  -> take node 2
    #     |        |   \
    #   3:tok1   4:tok0 5:tok2  argmax at node 2 = 2        -> take node 5
    tree = tree_of([-1, 0, 0, 1, 2, 2], [9, 3, 4, 1, 0, 2])
    logits = one_hot_logits([4, 1, 2, 0, 0, 5])  # argmax at node 5 = 5 -> bonus
    v = verify_greedy(tree, logits, ancestor_mask(tree.parents))
    assert v.path == [0, 2, 5] and v.bonus == 5
    assert v.emitted(tree) == [4, 2, 5]


def test_greedy_nothing_accepted_gives_bonus_only():
    tree = tree_of([-1, 0, 0], [9, 3, 4])
    v = verify_greedy(tree, one_hot_logits([1, 0, 0]), ancestor_mask(tree.parents))
    assert v.path == [0] and v.bonus == 1 and v.emitted(tree) == [1]


def test_greedy_does_not_accept_child_of_rejected_node():
    # node 3 matches the argmax at its parent 1, but 1 itself was rejected
    tree = tree_of([-1, 0, 1], [9, 3, 1])
    v = verify_greedy(tree, one_hot_logits([2, 1, 0]), ancestor_mask(tree.parents))
    assert v.path == [0] and v.bonus == 2


# --- sampling ------------------------------------------------------------------------------

def sample_first_two(rule, tree, p, n, seed):
    gen = torch.Generator().manual_seed(seed)
    counts = Counter()
    for _ in range(n):
        emitted = rule(tree, p, gen).emitted(tree)
        counts[tuple(emitted[:2])] += 1
    return counts


def exact_first_two(tree, p):
    """P(first two emitted tokens): token 1 ~ p[root]; token 2 ~ p[child carrying token 1] when
    that child is in the tree (otherwise the step ends after the bonus, a 1-token outcome)."""
    child_of = {int(tree.tokens[i]): i for i in range(1, len(tree)) if int(tree.parents[i]) == 0}
    out = {}
    for a in range(V):
        pa = float(p[0][a])
        if a in child_of:
            for b in range(V):
                out[(a, b)] = pa * float(p[child_of[a]][b])
        else:
            out[(a,)] = pa
    return out


def skewed_p(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(7, V, generator=g) * 1.5, dim=-1)


def test_sampling_rule_is_lossless_and_wrong_rule_is_caught():
    # root with candidates 2, 0, 5 (draft order); node 1 (token 2) has children of its own
    tree = tree_of([-1, 0, 0, 0, 1, 1, 2], [9, 2, 0, 5, 1, 3, 4])
    p = skewed_p(0)
    exact = exact_first_two(tree, p)
    ok = chi2_pvalue(sample_first_two(verify_sampling, tree, p, 20000, seed=1), exact)
    bad = chi2_pvalue(sample_first_two(wrong_verify_sampling, tree, p, 20000, seed=1), exact)
    assert ok > 1e-3, f"lossless rule rejected by the chi-square test (p-value {ok:.2e})"
    assert bad < 1e-6, f"the check failed to catch a wrong rule (p-value {bad:.2e})"


def test_sampling_zero_probability_candidate_is_never_accepted():
    tree = tree_of([-1, 0], [9, 3])
    p = torch.full((2, V), 1.0 / (V - 1))
    p[0, 3] = 0.0
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        v = verify_sampling(tree, p, gen)
        assert v.path == [0] and v.bonus != 3


def drawn_tree(q_root, k, gen):
    """Root + k children drawn from q_root without replacement (Gumbel-top-k), in draw order."""
    keys = q_root.log() - torch.empty(V).exponential_(generator=gen).log()
    toks = keys.topk(k).indices
    return tree_of([-1] + [0] * k, [9] + toks.tolist())


def naive_drawn_rule(tree, p, gen, q):
    """Wrong on purpose: accepts each drawn child with min(1, p/q) against the *unchanged* p and q,
    and draws the bonus from p itself (no residual)."""
    from specllava.core.verify import Verdict

    for child in range(1, len(tree)):
        tok = int(tree.tokens[child])
        if torch.rand((), generator=gen) < min(1.0, float(p[0][tok] / q[0][tok])):
            return Verdict(path=[0, child], bonus=0)
    return Verdict(path=[0], bonus=int(torch.multinomial(p[0], 1, generator=gen)))


def test_recursive_rejection_sampling_of_drawn_children_is_lossless():
    p = skewed_p(3)
    q = {0: torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(4)) * 2.0, dim=-1)}
    exact = {(a,): float(p[0][a]) for a in range(V)}
    gen = torch.Generator().manual_seed(5)
    for rule, expect_ok in ((lambda t, pp, g: verify_sampling(t, pp, g, q), True), (lambda t, pp, g: naive_drawn_rule(t, pp, g, q), False)):
        counts = Counter()
        for i in range(20000):
            tree = drawn_tree(q[0], 1 + i % 3, gen)  # 1, 2 or 3 drawn candidates
            counts[(rule(tree, p, gen).emitted(tree)[0],)] += 1
        pval = chi2_pvalue(counts, exact)
        if expect_ok:
            assert pval > 1e-3, f"recursive rejection sampling rejected by the chi-square test (p-value {pval:.2e})"
        else:
            assert pval < 1e-6, f"the check failed to catch a wrong rule for drawn candidates (p-value {pval:.2e})"


def test_drawn_child_equal_to_the_target_distribution_is_always_accepted():
    p = skewed_p(6)
    gen = torch.Generator().manual_seed(7)
    for _ in range(200):
        tree = drawn_tree(p[0], 2, gen)
        assert verify_sampling(tree, p, gen, {0: p[0].clone()}).path == [0, 1]  # min(1, p/q) = 1


def test_draw_follows_the_weights_and_never_draws_a_zero_weight():
    w = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 2.5], dtype=torch.float64)  # unnormalised
    gen = torch.Generator().manual_seed(0)
    counts = Counter(draw(w, gen) for _ in range(20000))
    assert set(counts) <= {1, 3, 4, 6}  # zero weights never drawn, first and last included
    exact = {i: float(w[i] / w.sum()) for i in (1, 3, 4, 6)}
    assert chi2_pvalue(counts, exact) > 1e-3
    skewed = {1: 0.25, 3: 0.25, 4: 0.25, 6: 0.25}  # the test can fail: a uniform claim is caught
    assert chi2_pvalue(counts, skewed) < 1e-6
    assert draw(torch.tensor([0.0, 0.0, 1.0]), gen) == 2


# --- the fast rule against its definition -----------------------------------------------------

def random_tree_and_rows(seed, vocab, support=None):
    """A random tree (2-12 nodes, distinct sibling tokens) with random p rows (peaked or flat,
    some entries exactly 0) and q rows over `support` (None: the whole vocabulary); the children
    of about half the nodes are drawn from q (Gumbel-top-k), the others fixed."""
    from specllava.core.verify import reference_verify_sampling  # noqa: F401 (import check)

    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 13, (), generator=g))
    parents = [-1] + [int(torch.randint(0, i, (), generator=g)) for i in range(1, n)]
    scale = float(torch.rand((), generator=g)) * 4
    p = torch.softmax(torch.randn(n, vocab, generator=g) * scale, dim=-1)
    p[torch.rand(n, vocab, generator=g) < 0.1] = 0.0  # top-k/top-p style zeros
    p[:, 0] += 1e-3  # never an all-zero row
    ids = torch.arange(vocab) if support is None else support
    qk = torch.softmax(torch.randn(n, ids.numel(), generator=g) * scale + 1.0, dim=-1)
    drawn = {i for i in range(n) if torch.rand((), generator=g) < 0.5}
    tokens = [int(torch.randint(0, vocab, (), generator=g))] + [0] * (n - 1)
    for node in range(n):
        kids = [i for i in range(1, n) if parents[i] == node]
        if not kids:
            continue
        if node in drawn:  # draws without replacement from q, in draw order
            keys = qk[node].log() - torch.empty(ids.numel()).exponential_(generator=g).log()
            picks = ids[keys.topk(len(kids)).indices]
        else:
            picks = torch.randperm(vocab, generator=g)[: len(kids)]
        for kid, tok in zip(kids, picks.tolist()):
            tokens[kid] = tok
        if torch.rand((), generator=g) < 0.5:  # a target that likes its candidates: walks go deeper
            p[node, picks] += torch.rand(len(kids), generator=g) * p[node].sum()
    p = p / p.sum(-1, keepdim=True)
    tree = tree_of(parents, tokens)
    if support is None:
        q = {i: qk[i] for i in drawn}
    else:
        q = {i: (support, qk[i]) for i in drawn}
    return tree, p, q


def test_fast_rule_gives_the_reference_rules_verdicts_and_draws():
    """Same uniforms in, same (path, bonus) out, and the generator left in the same state, on
    random trees: full-vocabulary q rows, q over a reduced support, and fixed candidates."""
    from specllava.core.verify import reference_verify_sampling

    vocab = 300
    support = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:40].sort().values
    moved = 0
    for seed in range(600):
        tree, p, q = random_tree_and_rows(seed, vocab, support if seed % 2 else None)
        for qq in (q, None):
            g1 = torch.Generator().manual_seed(seed)
            g2 = torch.Generator().manual_seed(seed)
            fast = verify_sampling(tree, p, g1, qq)
            ref = reference_verify_sampling(tree, p, g2, qq)
            assert (fast.path, fast.bonus) == (ref.path, ref.bonus), f"seed {seed}"
            assert fast.emitted(tree) == ref.emitted(tree)
            assert torch.equal(g1.get_state(), g2.get_state()), f"seed {seed}: a different number of draws"
            moved += len(fast.path) > 1
    assert moved > 300  # the trees do accept candidates, not only bonus tokens


def test_wrong_rule_differs_from_the_reference():
    """The comparison above can fail: a rule that skips the residual update is caught."""
    from specllava.core.verify import reference_verify_sampling

    differs = 0
    for seed in range(200):
        tree, p, q = random_tree_and_rows(seed, 50)
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        differs += wrong_verify_sampling(tree, p, g1, q).path != reference_verify_sampling(tree, p, g2, q).path
    assert differs > 0
