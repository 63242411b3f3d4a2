"""The node-budget calibration (specllava.tuning.budget): cache keying, the acceptance replay, and the budget choice."""

import pytest
import torch

from random_models import llava_prompt, tiny_llava
from specllava import SpeculativeDecoder
from specllava.tuning import budget as calibrate
from specllava.tuning.budget import (
    AcceptanceProfile,
    CostCurve,
    choose_node_budget,
    expected_speed,
    isotonic,
    record_step,
    replay_tau,
    verify_cost_curve,
)

SIZES = (1, 2, 4)


def _counting(monkeypatch):
    """Counts the measurements of whole curves (not the one-token check of a cached curve)."""
    calls = []
    real = calibrate.measure_verify_cost

    def counted(target, sizes=calibrate.SIZES, *args, **kwargs):
        if tuple(sizes) != (1,):
            calls.append(1)
        return real(target, sizes, *args, **kwargs)

    monkeypatch.setattr(calibrate, "measure_verify_cost", counted)
    return calls


def test_cost_curve_is_cached_per_architecture_dtype_and_threads(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    monkeypatch.setattr(calibrate, "agrees", lambda cached, fresh: True)  # the keys alone (staleness: below)
    model = tiny_llava(0)
    kw = dict(sizes=SIZES, prefix_len=8, repeats=1, cache_dir=tmp_path)
    first = verify_cost_curve(model, **kw)
    assert len(calls) == 1 and len(first.seconds) == 3 and all(s > 0 for s in first.seconds)
    assert verify_cost_curve(model, **kw).seconds == first.seconds and len(calls) == 1  # cache hit
    verify_cost_curve(tiny_llava(5), **kw)  # other weights, same architecture: still a hit
    assert len(calls) == 1
    verify_cost_curve(tiny_llava(0, layers=3), **kw)  # other architecture
    assert len(calls) == 2
    verify_cost_curve(tiny_llava(0).to(torch.bfloat16), **kw)  # other dtype
    assert len(calls) == 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        verify_cost_curve(model, **kw)  # other thread count
        assert len(calls) == 4
    finally:
        torch.set_num_threads(threads)
    verify_cost_curve(model, **kw, refresh=True)
    assert len(calls) == 5
    assert len(list(tmp_path.glob("verify-*.json"))) == 4


def test_weights_fingerprint_tells_trained_from_untrained():
    a, b = tiny_llava(0), tiny_llava(0)
    assert calibrate.weights_fingerprint(a) == calibrate.weights_fingerprint(b)
    with torch.no_grad():
        b.model.multi_modal_projector.linear_1.weight.add_(0.01)
    assert calibrate.weights_fingerprint(a) != calibrate.weights_fingerprint(b)
    assert calibrate.architecture_fingerprint(a) == calibrate.architecture_fingerprint(b)


def test_replay_cuts_each_accepted_path_at_the_first_node_outside_the_budget():
    steps = [{"path_ranks": [0, 2, 7]}, {"path_ranks": []}, {"path_ranks": [1]}]
    assert replay_tau(steps, 1) == pytest.approx((2 + 1 + 1) / 3)  # rank 0 only
    assert replay_tau(steps, 4) == pytest.approx((3 + 1 + 2) / 3)
    assert replay_tau(steps, 8) == pytest.approx((4 + 1 + 2) / 3)


def test_replay_at_the_recorded_budget_equals_the_run_mean_accepted_length(tiny_pair):
    target, draft = tiny_pair
    ids, px = llava_prompt(4)
    dec = SpeculativeDecoder(target, draft, method="dynamic", node_budget=16, min_path_conf=0.0)
    steps = []
    out = dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=30, on_step=record_step(steps))
    hist = out.stats["accept_hist"]
    per_step = sum((k + 1) * n for k, n in enumerate(hist)) / sum(hist)
    assert len(steps) == out.stats["steps"]
    assert replay_tau(steps, 16) == pytest.approx(per_step)
    assert replay_tau(steps, 1) <= replay_tau(steps, 4) <= replay_tau(steps, 16)


def test_budget_choice_trades_acceptance_against_verification_cost():
    # verification: flat to 16 tokens, then steep; acceptance saturates
    cost = CostCurve([1, 16, 32, 64], [0.010, 0.010, 0.030, 0.070], 100, {})
    budgets = list(range(1, 64))
    tau = [1 + 2 * (1 - 0.8 ** b) for b in budgets]
    prof = AcceptanceProfile(budgets, tau, rest_s=0.002, steps=10, key={})
    assert choose_node_budget(cost, prof) == 15  # the largest budget whose root+B tokens stay on the flat part
    flat = AcceptanceProfile(budgets, [1.0] * len(budgets), 0.002, 10, {})
    assert choose_node_budget(cost, flat) == 1  # a useless draft: the smallest tree


def test_isotonic_fit_never_decreases():
    assert isotonic([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    ys = isotonic([5.0, 1.0, 2.0, 8.0, 7.0])
    assert all(a <= b for a, b in zip(ys, ys[1:]))


def test_auto_node_budget_measures_once_then_reads_the_cache(tiny_pair, tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    monkeypatch.setattr(calibrate, "agrees", lambda cached, fresh: True)  # timer noise never re-measures here
    target, draft = tiny_pair
    ids, px = llava_prompt(5)
    inputs = [{"input_ids": ids, "pixel_values": px}]
    budget, report = calibrate.auto_node_budget(target, draft, inputs, {"min_path_conf": 0.0},
                                                cache_dir=tmp_path, max_new_tokens=16)
    assert 1 <= budget <= 96 and report["node_budget"] == budget
    assert len(report["expected_tokens_per_s"]) == 96 and report["profile"]["steps"] > 0
    assert report["seconds"] > 0
    monkeypatch.setattr(calibrate, "measure_acceptance", lambda *a, **k: pytest.fail("not cached"))
    again, _ = calibrate.auto_node_budget(target, draft, inputs, {"min_path_conf": 0.0},
                                          cache_dir=tmp_path, max_new_tokens=16)
    assert again == budget and len(calls) == 1
    assert {p.name.split("-")[0] for p in tmp_path.glob("*.json")} == {"verify", "acceptance"}


def test_cost_measurement_gives_one_median_per_size_with_sizes_interleaved():
    target = tiny_llava(0)
    seconds = calibrate.measure_verify_cost(target, sizes=(1, 3, 6), prefix_len=5, repeats=2)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)


def test_budget_choice_charges_the_nodes_a_tree_actually_grew():
    """A budget a tree never fills costs only the nodes it grew: with trees of at most 8 nodes,
    every budget >= 8 verifies the same 9 tokens, so acceptance decides, not the budget's size."""
    cost = CostCurve([1, 8, 16, 32, 64], [0.010, 0.012, 0.020, 0.040, 0.080], 100, {})
    budgets = list(range(1, 33))
    steps = [{"nodes": 8, "path_ranks": [0, 1, 2, 3, 4, 5, 6, 7]}] * 4
    tau = [replay_tau(steps, b) for b in budgets]
    grown = AcceptanceProfile(budgets, tau, 0.002, 4, {}, [s["nodes"] for s in steps])
    speeds = expected_speed(cost, grown)
    assert speeds[7] == pytest.approx(speeds[31])  # budgets 8 and 32 verify the same 9 tokens
    assert choose_node_budget(cost, grown) == 8
    filled = AcceptanceProfile(budgets, tau, 0.002, 4, {})  # no tree sizes: charged as B + 1 tokens
    assert expected_speed(cost, filled)[31] < speeds[31]


def test_auto_node_budget_takes_an_eagle_head(tmp_path, monkeypatch):
    from specllava.core.eagle import EagleHead

    _counting(monkeypatch)
    target = tiny_llava(0)
    head = EagleHead.from_target(target, token_ranking=list(range(40)))
    ids, px = llava_prompt(5)
    budget, report = calibrate.auto_node_budget(target, head, [{"input_ids": ids, "pixel_values": px}],
                                                {"min_path_conf": 0.0}, cache_dir=tmp_path, max_new_tokens=16)
    assert 1 <= budget <= 96 and report["profile"]["steps"] > 0


def test_cache_keys_name_the_gpu_a_model_sits_on(monkeypatch):
    """A curve measured on one GPU is not another's: the key names every accelerator the target
    uses (a CPU model's key has none, so CPU caches keep their keys)."""
    model = tiny_llava(0)
    assert "accelerators" not in calibrate.machine_key(torch.float32, model=model)
    monkeypatch.setattr(calibrate, "model_devices", lambda m: [torch.device("cuda", 0), torch.device("cuda", 1)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: {0: "GPU A", 1: "GPU B"}[torch.device(d).index])
    key = calibrate.machine_key(torch.float32, model=model)
    assert key["accelerators"] == ["cuda:0 GPU A", "cuda:1 GPU B"]
    assert calibrate._cache_file("verify", key, None) != calibrate._cache_file(
        "verify", calibrate.machine_key(torch.float32), None)


def test_model_devices_lists_where_the_weights_are():
    model = tiny_llava(0)
    assert calibrate.model_devices(model) == [torch.device("cpu")]



def test_a_cached_curve_taken_under_another_load_is_measured_again(tmp_path, monkeypatch):
    import json

    calls = _counting(monkeypatch)
    model = tiny_llava(0)
    kw = dict(sizes=SIZES, prefix_len=8, repeats=1, cache_dir=tmp_path)
    first = verify_cost_curve(model, **kw)
    (path,) = tmp_path.glob("verify-*.json")
    data = json.loads(path.read_text())
    # a curve 50x slower than this machine, with its 1-token forward above the noise floor
    slow = [max(s, calibrate.NOISE_FLOOR) * 50 for s in first.seconds]
    data["curve"]["seconds"] = slow
    path.write_text(json.dumps(data))
    again = verify_cost_curve(model, **kw)
    assert len(calls) == 2 and again.seconds != slow  # measured again, and stored
    assert json.loads(path.read_text())["curve"]["seconds"] == again.seconds
    assert calibrate.agrees(0.1, 0.12) and not calibrate.agrees(0.3, 0.02) and not calibrate.agrees(0.005, 0.1)
    assert calibrate.agrees(0.0005, 0.0015)  # both under the noise floor: not compared


def test_an_acceptance_profile_measured_beside_another_curve_is_measured_again(tiny_pair, tmp_path, monkeypatch):
    target, draft = tiny_pair
    ids, px = llava_prompt(5)
    inputs = [{"input_ids": ids, "pixel_values": px}]
    measured = []
    real = calibrate.measure_acceptance
    monkeypatch.setattr(calibrate, "measure_acceptance", lambda *a, **k: measured.append(1) or real(*a, **k))
    curve = CostCurve([1, 2], [0.02, 0.03], 8, {})
    kw = dict(cache_dir=tmp_path, max_new_tokens=8)
    calibrate.acceptance_profile(target, draft, inputs, {}, curve, **kw)
    calibrate.acceptance_profile(target, draft, inputs, {}, CostCurve([1, 2], [0.025, 0.03], 8, {}), **kw)
    assert len(measured) == 1  # the same machine: read from the cache
    calibrate.acceptance_profile(target, draft, inputs, {}, CostCurve([1, 2], [0.3, 0.4], 8, {}), **kw)
    assert len(measured) == 2  # the curve moved 15x: the profile's step times are stale too
