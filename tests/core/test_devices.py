"""Device-agnostic decoding: what runs on the CPU proves the placement rules (no host read in the
per-step tree maths: they run on the meta device, which has no data to read; static plans and
trees follow the model's device; construction checks cached per model); the `cuda` tests run the
decoder on a GPU in float32, float16 and bfloat16, with the target and the draft on different
devices and with an accelerate-dispatched target, and are skipped with a reason without one."""

from contextlib import nullcontext

import pytest
import torch

from random_models import IMAGE_TOKEN, llava_prompt, perturbed_copy, text_prompt, tiny_lm, tiny_llava
from specllava import SpeculativeDecoder
from specllava.core import backends
from specllava.core import decoder as decoder_module
from specllava.core.checks import CHECKS
from specllava.core.config import TreeConfig
from specllava.core.drafting import _StaticPlan
from specllava.core.tree import Tree, ancestor_mask, attention_bias

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none visible)")
METHODS = ["chain", "static", "dynamic"]


# -- CPU: placement rules ---------------------------------------------------------------------------
def test_tree_maths_read_nothing_back_to_the_host():
    """Meta tensors have no data: any .item()/bool()/tolist() on them raises. The ancestor mask and
    the (windowed) attention bias are built from them all the same."""
    parents = torch.tensor([-1, 0, 0, 1, 2, 3, 5], device="meta")
    anc = ancestor_mask(parents)
    assert anc.device.type == "meta" and anc.shape == (7, 7)
    pos = torch.arange(7, device="meta") + 10
    bias = attention_bias(anc, 10, torch.bfloat16, window=8, query_pos=pos, key_pos=pos)
    assert bias.device.type == "meta" and bias.shape == (1, 1, 7, 17)


def test_ancestor_mask_by_doubling_matches_a_walk():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7, 33, 64):
        parents = torch.tensor([-1] + [int(torch.randint(0, i, (), generator=g)) for i in range(1, n)])
        walk = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                walk[i, j] = True
                j = int(parents[j])
        assert torch.equal(ancestor_mask(parents), walk)
    chain = torch.arange(-1, 63)  # the deepest tree of 64 nodes: 63 levels
    assert torch.equal(ancestor_mask(chain), torch.ones(64, 64, dtype=torch.bool).tril())


def test_static_plans_and_trees_follow_the_device():
    plan = _StaticPlan([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)], device="meta")
    assert all(t.device.type == "meta" for pair in plan.by_depth for t in pair)
    assert all(t.device.type == "meta" for t in plan.frontiers)
    tree = Tree(torch.tensor([5, 6]), torch.tensor([-1, 0]), torch.tensor([0, 1]), torch.ones(2))
    assert tree.to("cpu") is tree
    assert all(t.device.type == "meta" for t in vars(tree.to("meta")).values())


def test_construction_checks_run_once_per_model(monkeypatch):
    target = tiny_llava(0).to(torch.bfloat16)
    draft = tiny_llava(3, hidden=32, layers=1).to(torch.bfloat16)
    draft.model.vision_tower.load_state_dict(target.model.vision_tower.state_dict())
    CHECKS.forget(target)
    calls = {"lean": 0, "vision": 0}
    lean_check, vision_check = backends.lean.matches_transformers, decoder_module.shares_vision_tower

    def counted_lean(model, backend):
        calls["lean"] += 1
        return lean_check(model, backend)

    def counted_vision(t, d):
        calls["vision"] += 1
        return vision_check(t, d)

    monkeypatch.setattr(backends.lean, "matches_transformers", counted_lean)
    monkeypatch.setattr(decoder_module, "shares_vision_tower", counted_vision)
    first = SpeculativeDecoder(target, draft, method="dynamic")
    second = SpeculativeDecoder(target, draft, method="chain")
    assert calls == {"lean": 1, "vision": 1}
    assert first.target_backend is second.target_backend and first.target_backend.kind == "exact"
    assert first.shares_vision and second.shares_vision
    with torch.no_grad():  # new weights: the checks run again
        target.model.language_model.layers[0].mlp.up_proj.weight.mul_(1.5)
    SpeculativeDecoder(target, draft, method="dynamic")
    assert calls == {"lean": 2, "vision": 2}
    with torch.no_grad():
        draft.model.vision_tower.post_layernorm.weight.add_(1.0)  # the draft's tower differs now
    assert not SpeculativeDecoder(target, draft, method="dynamic").shares_vision
    assert calls == {"lean": 2, "vision": 3}


# -- CPU: nothing created on the default device --------------------------------------------------
# With the default device set to `meta`, a tensor created without an explicit device lands on
# `meta`. Mixing it with a CPU model's tensors fails in most operations, but not in all (an index
# on `meta` into a CPU tensor reads garbage), so a function mode also fails the first torch call
# that returns a meta tensor, naming it. The models are on the CPU: nothing may be on `meta`. A
# decoder that runs to the end here, with the same output as without the default device, creates
# every tensor where it belongs: on a GPU it would not put a CPU tensor into a CUDA model.
class _NoMeta(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = out if isinstance(out, (tuple, list)) else (out,)
        if any(torch.is_tensor(t) and t.device.type == "meta" for t in leaves):
            raise AssertionError(f"{getattr(func, '__qualname__', func)} made a tensor on the default device (meta)")
        return out


@pytest.fixture
def meta_default():
    """`meta_default()`: a context manager in which torch's default device is `meta` and any torch
    call that returns a meta tensor fails (models are built outside it)."""
    from contextlib import contextmanager

    @contextmanager
    def on_meta():
        torch.set_default_device("meta")
        try:
            with _NoMeta():
                yield
        finally:
            torch.set_default_device(None)

    yield on_meta
    torch.set_default_device(None)


def test_the_meta_default_device_catches_a_stray_tensor(meta_default):
    """The check can fail: a tensor made without a device, even one only used as an index."""
    model = tiny_lm(0)
    with meta_default(), pytest.raises(AssertionError, match="default device"):
        model(input_ids=torch.tensor([[1, 5, 7]]))
    with meta_default():  # an explicit device passes
        model(input_ids=torch.tensor([[1, 5, 7]], device="cpu"))


def _eagle_head(target):
    from specllava.core.eagle import EagleHead

    torch.manual_seed(5)
    head = EagleHead.from_target(target, token_ranking=list(range(40)))
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return head.eval()


def _sharing_draft(target):
    draft = tiny_llava(3, hidden=32, layers=1)
    draft.model.vision_tower.load_state_dict(target.model.vision_tower.state_dict())
    return draft


DRAFTS = {  # name -> (target, draft) builder
    "vlm-perturbed": lambda t: perturbed_copy(t, 0.05, seed=1),
    "vlm-sharing-tower": _sharing_draft,
    "text-only": lambda t: tiny_lm(7, hidden=32, layers=1),
    "eagle-head": _eagle_head,
}


def _decode_on_meta_and_off(meta_default, target, draft, method, inputs, options=None, **gen):
    """The same request decoded with the default device on `meta` (decoder built there too, with
    every per-model construction check redone) and normally; both outputs, which must agree."""
    options = options or {}
    outs = []
    for on_meta in (True, False):
        CHECKS.forget(target)
        if draft is not None:
            CHECKS.forget(draft)
        with meta_default() if on_meta else nullcontext():
            dec = SpeculativeDecoder(target, draft, method=method, **options)
            outs.append(dec.generate(**inputs, **gen).sequences)
    assert outs[0].device.type == "cpu"
    assert torch.equal(outs[0], outs[1])
    return outs[0]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("draft_kind", list(DRAFTS))
def test_decoder_creates_no_tensor_on_the_default_device(meta_default, draft_kind, method, sampled):
    target = tiny_llava(0)
    draft = DRAFTS[draft_kind](target)
    ids, px = llava_prompt(2)
    gen = dict(do_sample=True, temperature=0.9, top_p=0.95, seed=5) if sampled else {}
    options = {"draft_vocab": 40} if draft_kind == "text-only" else {}  # a reduced draft vocabulary too
    out = _decode_on_meta_and_off(meta_default, target, draft, method, {"input_ids": ids, "pixel_values": px},
                                  options, max_new_tokens=14, **gen)
    if not sampled:
        assert torch.equal(out, _reference(target, ids, px, 14))


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_plain_decoding_creates_no_tensor_on_the_default_device(meta_default, sampled):
    target = tiny_llava(0)
    ids, px = llava_prompt(1)
    gen = dict(do_sample=True, temperature=0.8, seed=2) if sampled else {}
    _decode_on_meta_and_off(meta_default, target, None, "ar", {"input_ids": ids, "pixel_values": px},
                            max_new_tokens=10, **gen)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_llava_next_creates_no_tensor_on_the_default_device(meta_default, sampled):
    from test_architectures import next_inputs, sharing_next_draft, tiny_llava_next

    target = tiny_llava_next(0)
    inputs = next_inputs(target, 20, 40)
    gen = dict(do_sample=True, temperature=0.9, seed=3) if sampled else {}
    for draft in (sharing_next_draft(target), tiny_lm(77, hidden=32, layers=1)):
        for method in ("chain", "dynamic"):
            _decode_on_meta_and_off(meta_default, target, draft, method, inputs, max_new_tokens=10, **gen)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_sliding_window_creates_no_tensor_on_the_default_device(meta_default, sampled):
    from test_architectures import tiny_mistral

    target = tiny_mistral(0, 8)
    draft = perturbed_copy(target, 0.05, seed=1)
    ids = text_prompt(10, 10)
    gen = dict(do_sample=True, temperature=0.9, seed=4) if sampled else {}
    for method in METHODS:
        _decode_on_meta_and_off(meta_default, target, draft, method, {"input_ids": ids}, max_new_tokens=16, **gen)


def test_auto_node_budget_creates_no_tensor_on_the_default_device(meta_default, tmp_path):
    """The calibration behind `--budget auto`: the cost curve's timed forwards, the acceptance
    profile's decoding runs and the weights' fingerprints, with nothing on the default device."""
    from specllava.tuning import budget as calibrate

    target = tiny_llava(0)
    draft = perturbed_copy(target, 0.05, seed=1)
    ids, px = llava_prompt(0)
    kw = dict(tree_options={"min_path_conf": 0.0}, max_new_tokens=12)
    with meta_default():
        chosen, report = calibrate.auto_node_budget(target, draft, [{"input_ids": ids, "pixel_values": px}],
                                                    cache_dir=tmp_path / "meta", **kw)
        fingerprint = calibrate.weights_fingerprint(target)
    again, _ = calibrate.auto_node_budget(target, draft, [{"input_ids": ids, "pixel_values": px}],
                                          cache_dir=tmp_path / "cpu", **kw)
    assert fingerprint == calibrate.weights_fingerprint(target)
    assert report["profile"]["tau"] == _["profile"]["tau"]  # the same replay, device or not
    assert 1 <= chosen <= report["profile"]["budgets"][-1] and 1 <= again


def test_every_cuda_test_has_its_arguments(request):
    """Without a GPU the CUDA tests are skipped before pytest looks up their arguments, so an
    argument that names no fixture would only fail on the first GPU: look each one up here."""
    import inspect
    import sys

    tests = {n: f for n, f in vars(sys.modules[__name__]).items() if n.startswith("test_cuda")}
    assert len(tests) >= 5
    for name, fn in tests.items():
        params = set()
        for mark in getattr(fn, "pytestmark", []):
            if mark.name == "parametrize":
                names = mark.args[0]
                params |= {a.strip() for a in (names.split(",") if isinstance(names, str) else names)}
        assert "cuda" in {m.name for m in getattr(fn, "pytestmark", [])}, f"{name} lacks @pytest.mark.cuda"
        for arg in inspect.signature(fn).parameters:
            if arg not in params:
                request.getfixturevalue(arg)  # FixtureLookupError names a missing one


# -- CUDA -------------------------------------------------------------------------------------------
def _reference(model, ids, px, n):
    kwargs = {} if px is None else {"pixel_values": px}
    with torch.inference_mode():
        return model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, **kwargs)


def assert_equal_or_near_tie(target, got, ref, px=None, ulps: int = 4):
    """Equal sequences, or a first divergence where the target's two candidate logits lie within
    `ulps` units of its dtype's precision: a near-tie that rounding (tree vs single-token kernels
    in float16/bfloat16) may flip, as the docs say."""
    if torch.equal(got, ref):
        return
    assert got.shape[1] >= 1 and ref.shape[1] >= 1
    n = min(got.shape[1], ref.shape[1])
    i = int((got[0, :n] != ref[0, :n]).nonzero()[0])
    kwargs = {} if px is None else {"pixel_values": px}
    with torch.inference_mode():
        logits = target(input_ids=ref[:, :i], **kwargs).logits[0, -1].float()
    a, b = logits[ref[0, i]], logits[got[0, i]]
    tol = ulps * torch.finfo(target.dtype).eps * max(abs(float(a)), abs(float(b)), 1.0)
    assert abs(float(a - b)) <= tol, f"diverged at token {i} with a logit margin {float(a - b):.4g} > {tol:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("draft_kind", ["perturbed", "text-only"])
@pytest.mark.cuda
@cuda_only
def test_cuda_greedy_equals_generate(dtype, method, draft_kind):
    target = tiny_llava(0)
    draft = perturbed_copy(target, 0.05, seed=1) if draft_kind == "perturbed" else tiny_lm(7, hidden=32, layers=1)
    target, draft = target.to("cuda", dtype), draft.to("cuda", dtype)
    dec = SpeculativeDecoder(target, draft, method=method)
    for seed in range(3):
        ids, px = llava_prompt(seed)
        ids, px = ids.cuda(), px.to("cuda", dtype)
        out = dec.generate(ids, px, max_new_tokens=24)
        ref = _reference(target, ids, px, 24)
        if dtype == torch.float32:
            assert torch.equal(out.sequences, ref)
        else:
            assert_equal_or_near_tie(target, out.sequences, ref, px)


@pytest.mark.parametrize("where", ["target-cuda-draft-cpu", "target-cpu-draft-cuda"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.cuda
@cuda_only
def test_cuda_target_and_draft_on_different_devices(where, method):
    target = tiny_llava(0)
    draft = perturbed_copy(target, 0.05, seed=1)
    ids, px = llava_prompt(1)
    ref = _reference(target, ids, px, 20)
    (target if where.startswith("target-cuda") else draft).cuda()
    dec = SpeculativeDecoder(target, draft, method=method)
    assert torch.equal(dec.generate(ids, px, max_new_tokens=20).sequences.cpu(), ref)
    sampled = [dec.generate(ids, px, max_new_tokens=12, do_sample=True, temperature=0.9, seed=4).sequences for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.cuda
@cuda_only
def test_cuda_sampling_runs_and_repeats_with_a_seed(method, dtype):
    target = tiny_llava(0)
    draft = perturbed_copy(target, 0.05, seed=1).to("cuda", dtype)
    target = target.to("cuda", dtype)
    ids, px = llava_prompt(2)
    dec = SpeculativeDecoder(target, draft, method=method)
    runs = [dec.generate(ids.cuda(), px.cuda(), max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9,
                         seed=11).sequences for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[1] == ids.shape[1] + 16
    assert IMAGE_TOKEN not in runs[0][0, ids.shape[1]:].tolist()


@pytest.mark.cuda
@cuda_only
def test_cuda_target_split_over_gpu_and_cpu_equals_generate():
    """accelerate's device map: the first decoder layer on the GPU, the second on the CPU."""
    from accelerate import dispatch_model

    plain = tiny_llava(0)
    draft = perturbed_copy(plain, 0.05, seed=1).cuda()
    ids, px = llava_prompt(0)
    ref = _reference(plain, ids, px, 16)
    lm = "model.language_model"
    target = dispatch_model(plain, device_map={"model.vision_tower": 0, "model.multi_modal_projector": 0,
                                               f"{lm}.embed_tokens": 0, f"{lm}.layers.0": 0, f"{lm}.layers.1": "cpu",
                                               f"{lm}.norm": "cpu", f"{lm}.rotary_emb": 0, "lm_head": "cpu"})
    for method in METHODS:
        dec = SpeculativeDecoder(target, draft, method=method)
        assert dec.target_backend.kind == "transformers"
        assert torch.equal(dec.generate(ids, px, max_new_tokens=16).sequences.cpu(), ref)


@pytest.mark.cuda
@cuda_only
def test_cuda_text_target_with_a_window_equals_generate():
    from test_architectures import tiny_mistral

    target = tiny_mistral(0, 8)
    draft = perturbed_copy(target, 0.05, seed=1).cuda()
    target = target.cuda()
    ids = text_prompt(10, 10).cuda()
    for method in METHODS:
        out = SpeculativeDecoder(target, draft, method=method, config=TreeConfig()).generate(ids, max_new_tokens=30)
        assert torch.equal(out.sequences, _reference(target, ids, None, 30))


@pytest.mark.cuda
@cuda_only
def test_cuda_auto_node_budget_calibrates_on_the_gpu(tmp_path):
    """--budget auto on CUDA: the cost curve's inputs on the GPU, synchronized timings, the GPU's
    name in both cache keys (and none in the CPU's)."""
    from specllava.tuning import budget as calibrate

    target = tiny_llava(0)
    draft = perturbed_copy(target, 0.05, seed=1)
    ids, px = llava_prompt(0)
    kw = dict(tree_options={"min_path_conf": 0.0}, max_new_tokens=12)
    _, on_cpu = calibrate.auto_node_budget(target, draft, [{"input_ids": ids, "pixel_values": px}],
                                           cache_dir=tmp_path / "cpu", **kw)
    target, draft = target.cuda(), draft.cuda()
    budget, on_gpu = calibrate.auto_node_budget(target, draft, [{"input_ids": ids, "pixel_values": px}],
                                                cache_dir=tmp_path / "gpu", **kw)
    name = torch.cuda.get_device_name(0)
    assert any(name in gpu for gpu in on_gpu["cost_curve"]["key"]["accelerators"])
    assert any(name in gpu for gpu in on_gpu["profile"]["key"]["accelerators"])
    assert "accelerators" not in on_cpu["cost_curve"]["key"]
    assert len(on_gpu["profile"]["tau"]) == len(on_cpu["profile"]["tau"]) and 1 <= budget <= len(on_gpu["profile"]["tau"])
    assert all(s > 0 for s in on_gpu["cost_curve"]["seconds"])

