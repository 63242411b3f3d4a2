"""Hardware-aware tree budget (`--budget auto`): pick the dynamic tree's `node_budget` that
maximises the expected decoding speed on this machine.

Model. One decoding step with a budget of B draft nodes emits tau(B) tokens (the mean accepted
length) and costs

    t_step(B) = t_verify(min(B, n) + 1) + t_rest

where n is the number of nodes the step's tree grew before the budget cut it (growth stops early
when the frontier's confidence runs out, so a large budget is often not filled), t_verify(k) is
the target's forward over k tree tokens (root included) on a cached prefix,
and t_rest is the rest of a step (drafting and loop overhead; acceptance and cache compaction are
counted with verification and are a fraction of a millisecond), taken as independent of B (the
draft's work depends on max_depth and frontier, not on the budget). The chosen budget maximises
tau(B) / t_step(B), t_step averaged over the recorded steps. (Charging t_verify(B + 1), as if
every tree filled its budget, would overcharge large budgets, which trees seldom fill, and choose
too small a tree.)

- t_verify comes from `verify_cost_curve`: timed target forwards of 1, 2, 4, ..., 96 tree tokens on
  a cached prefix of realistic length, on this machine. It depends on the architecture, dtype, CPU
  and thread count (and GPU), not on the weights, and is cached under ~/.cache/specllava/calibration/
  keyed by (architecture fingerprint, CPU model, threads, dtype, torch version, and the name of every
  GPU the target sits on). Every forward is timed between two device synchronizations, so a GPU's
  queued work is counted where it runs. On every use a cached curve is checked against a fresh
  timing of a one-token forward and measured again when the two differ by more than 3x (a curve
  taken while other jobs shared the machine).
- tau(B) comes from `acceptance_profile`: one greedy decoding run with a large budget, recording
  every step's tree and accepted path. The dynamic tree with budget B keeps the B nodes of highest
  path confidence (an ancestor-closed set, `Drafter._finalize`), and greedy verification accepts
  the target's argmax path, so with budget B that step would have accepted the leading part of the
  recorded path that lies inside the top B: tau(B) is replayed exactly per step, for every B at
  once. (Steps then fall at different places in the text; the profile assumes acceptance is
  stationary over the text. At T>0 the greedy profile is used as an approximation.) t_rest is
  measured in the same run (decode time minus verification time, per step). The profile depends
  on the weights of both models and is cached per (target weights, draft weights, tree options,
  machine), and measured again when the cost curve in use no longer matches the one it was
  measured beside (the same 3x rule).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.cache import crop
from ..core.config import TreeConfig
from ..core.decoder import SpeculativeDecoder
from ..core.backends import target_backend, unsupported_exact
from ..core.runner import ModelRunner
from ..core.tree import attention_bias

CACHE_DIR = Path.home() / ".cache" / "specllava" / "calibration"
SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96)
# A cached measurement whose one-token forward is off from a fresh timing by more than this
# factor either way was taken under another load (a busy shared machine) and is measured again;
# timings under NOISE_FLOOR seconds are not compared (timer noise, and nothing to choose).
STALE = 3.0
NOISE_FLOOR = 0.002
log = logging.getLogger(__name__)


def agrees(cached: float, fresh: float) -> bool:
    """Whether a cached one-token forward time still describes this machine (`STALE`)."""
    if max(cached, fresh) < NOISE_FLOOR:
        return True
    return 1.0 / STALE <= cached / max(fresh, 1e-9) <= STALE


# ---------------------------------------------------------------------------------------------
# keys


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(dtype: torch.dtype, threads: int | None = None, model=None) -> dict:
    """What a timing depends on besides the model: CPU, threads, dtype, torch; and, for a model
    on accelerators, their names (`accelerators`): a curve measured on one GPU is not another's."""
    key = {"cpu": cpu_model(), "threads": threads or torch.get_num_threads(),
           "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__}
    gpus = accelerators(model) if model is not None else []
    if gpus:  # absent on the CPU, so CPU keys (and their cached curves) stay as they were measured
        key["accelerators"] = gpus
    return key


def model_devices(model) -> list[torch.device]:
    """Every device the model's weights sit on (a dispatched model's several), meta excluded."""
    found = {p.device for p in model.parameters() if p.device.type != "meta"}
    hook = getattr(model.get_input_embeddings(), "_hf_hook", None) if hasattr(model, "get_input_embeddings") else None
    if getattr(hook, "execution_device", None) is not None:  # offloaded: where accelerate runs it
        run_on = hook.execution_device
        found.add(torch.device(f"cuda:{run_on}" if isinstance(run_on, int) else run_on))
    return sorted(found, key=str)


def accelerators(model) -> list[str]:
    """'cuda:0 NVIDIA H100 80GB HBM3' for each non-CPU device the model uses, in device order."""
    out = []
    for dev in model_devices(model):
        if dev.type == "cuda":
            out.append(f"{dev} {torch.cuda.get_device_name(dev)}")
        elif dev.type != "cpu":
            out.append(str(dev))
    return out


def synchronize(devices) -> None:
    """Wait until every accelerator in `devices` has finished its queued work (a no-op on the
    CPU), so a wall-clock time covers the work itself, not only its launch."""
    for dev in devices:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elif dev.type != "cpu" and hasattr(getattr(torch, dev.type, None), "synchronize"):
            getattr(torch, dev.type).synchronize()


def architecture_fingerprint(model) -> str:
    """Hash of the model's config (shapes and kinds), without paths or version stamps: the cost of
    a forward depends on these, not on the weights."""
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_fingerprint(model) -> str:
    """Architecture plus a sample of every parameter (first and last 256 values): cheap, and it
    changes when trained weights replace untrained ones."""
    h = hashlib.sha256(architecture_fingerprint(model).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(name.encode())
            h.update(torch.cat([flat[:256], flat[-256:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_file(kind: str, key: dict, cache_dir: Path | None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(CACHE_DIR if cache_dir is None else cache_dir) / f"{kind}-{digest}.json"


def _load_cached(path: Path, key: dict) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("key") == key else None


def _store(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# the verification cost curve


def isotonic(ys: list[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators). A forward over more tokens
    never costs less; on a shared machine single points jump, and the budget choice should not
    chase that noise.  Example: [1, 3, 2, 4] -> [1, 2.5, 2.5, 4]."""
    blocks: list[list[float]] = []  # [mean, weight]
    for y in ys:
        blocks.append([y, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, w1), (m2, w2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2]
    return [m for m, w in blocks for _ in range(int(w))]


@dataclass
class CostCurve:
    sizes: list[int]  # tree tokens per forward (root included)
    seconds: list[float]  # median wall time of one target forward (as measured)
    prefix_len: int
    key: dict

    def at(self, n: float) -> float:
        """Linear interpolation (and extrapolation past the ends) of the monotone fit."""
        xs, ys = self.sizes, isotonic(self.seconds)
        if n <= xs[0]:
            return ys[0]
        for i in range(1, len(xs)):
            if n <= xs[i]:
                w = (n - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + w * (ys[i] - ys[i - 1])
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + slope * (n - xs[-1])


@torch.inference_mode()
def measure_verify_cost(target, sizes=SIZES, prefix_len: int = 160, repeats: int = 7, seed: int = 0) -> list[float]:
    """Median seconds of one target forward over n tree tokens on a cached `prefix_len` prefix.

    The prefix is random text tokens (the cost of attention depends on its length, not its
    content); the n tokens get a causal mask (any tree mask costs the same: it is an additive
    [n, prefix + n] tensor either way). The cache is cropped back after every forward. Sizes are
    interleaved (one forward of every size per round, after a warm-up round), so a drift in the
    machine's load spreads over all sizes instead of bending the curve. Every input is built on
    the target's input device beforehand, and each forward is timed between synchronizations of
    every device the target uses.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)  # random ids drawn on the CPU, then moved
    vocab = target.get_output_embeddings().weight.shape[0]
    runner = ModelRunner(target, target_backend(target))  # the backend SpeculativeDecoder takes by default
    dev = runner.device
    devices = model_devices(target)
    runner.prefill(torch.randint(3, vocab, (1, prefix_len), generator=g, device="cpu").to(dev))
    inputs = []
    for n in sizes:
        tokens = torch.randint(3, vocab, (n,), generator=g, device="cpu").to(dev)
        positions = torch.arange(prefix_len, prefix_len + n, device=dev)
        bias = attention_bias(torch.ones(n, n, dtype=torch.bool, device=dev).tril(), prefix_len, runner.dtype)
        inputs.append((tokens, positions, bias))
    times: list[list[float]] = [[] for _ in sizes]
    for r in range(repeats + 1):  # round 0 is a warm-up
        for i, (tokens, positions, bias) in enumerate(inputs):
            synchronize(devices)
            t = time.perf_counter()
            runner.forward(tokens, positions, bias)
            synchronize(devices)
            dt = time.perf_counter() - t
            crop(runner.cache, prefix_len)
            if r:
                times[i].append(dt)
    return [statistics.median(ts) for ts in times]


def verify_cost_curve(target, sizes=SIZES, prefix_len: int = 160, repeats: int = 7,
                      cache_dir: Path | None = None, refresh: bool = False) -> CostCurve:
    """The cached cost curve for this (architecture, machine); measured on a cache miss."""
    key = {"arch": architecture_fingerprint(target), **machine_key(target.dtype, model=target),
           "sizes": list(sizes), "prefix_len": prefix_len, "target_path": "transformers" if unsupported_exact(target) else "lean"}
    path = _cache_file("verify", key, cache_dir)
    cached = None if refresh else _load_cached(path, key)
    if cached is not None:
        curve = CostCurve(**cached["curve"])
        if agrees(curve.at(1), measure_verify_cost(target, (1,), prefix_len, repeats=3)[0]):
            return curve
        log.info("the cached verification cost curve %s is off by more than %gx from a fresh timing "
                 "(measured under another load?): measuring it again", path, STALE)
    curve = CostCurve(list(sizes), measure_verify_cost(target, sizes, prefix_len, repeats), prefix_len, key)
    _store(path, {"key": key, "curve": asdict(curve), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return curve


# ---------------------------------------------------------------------------------------------
# the acceptance profile


def record_step(steps: list):
    """An `on_step` callback that appends, per verified tree, its size and the rank of every
    accepted node in the budget order (the same stable sort by path confidence as
    `Drafter._finalize`). Computed on the tree's device; one read back (the ranks)."""

    def on_step(tree, verdict) -> None:
        dev = tree.score.device
        order = torch.sort(-tree.score[1:], stable=True).indices + 1
        rank = torch.empty(len(tree), dtype=torch.long, device=dev)
        rank[0] = -1
        rank[order] = torch.arange(order.numel(), device=dev)
        path = torch.tensor(verdict.path[1:], dtype=torch.long, device=dev)
        steps.append({"nodes": len(tree) - 1, "path_ranks": rank[path].tolist()})

    return on_step


@dataclass
class AcceptanceProfile:
    budgets: list[int]  # B = 1 .. max_budget
    tau: list[float]  # replayed mean accepted length (bonus included) per budget
    rest_s: float  # seconds per step besides the verification forward
    steps: int
    key: dict
    # draft nodes each recorded step's tree grew (root excluded). With budget B a step verifies
    # min(B, nodes) of them, not B: growth stops early (min_feed_mass, max_depth, min_path_conf).
    # None: every tree filled its budget.
    step_nodes: list[int] | None = None

    def verified_tokens(self, budget: int) -> list[int]:
        """Tree tokens (root included) each recorded step would verify with this budget."""
        if not self.step_nodes:
            return [budget + 1]
        return [min(budget, n) + 1 for n in self.step_nodes]


def replay_tau(steps: list[dict], budget: int) -> float:
    """Mean accepted length had the tree kept only its `budget` most confident nodes.

    A step's accepted path is cut at its first node outside the top `budget` (path_ranks holds
    each accepted node's rank in that order); every step also emits its bonus token.
    Example: path_ranks [0, 2, 7], budget 4 -> nodes of rank 0 and 2 kept, 7 cut -> 3 tokens.
    """
    total = 0
    for s in steps:
        kept = 0
        for rank in s["path_ranks"]:
            if rank >= budget:
                break
            kept += 1
        total += kept + 1
    return total / max(len(steps), 1)


@torch.inference_mode()
def measure_acceptance(target, draft, inputs: list[dict], tree_options: dict, cost: CostCurve,
                       max_budget: int = 96, max_new_tokens: int = 96, draft_vocab: int | None = None,
                       draft_quant: str = "auto") -> AcceptanceProfile:
    opts = {**tree_options, "node_budget": max_budget, "draft_quant": draft_quant, "draft_vocab": draft_vocab or None}
    steps, rest = [], []
    for inp in inputs:
        dec = SpeculativeDecoder(target, draft, method="dynamic", **opts)
        out = dec.generate(**inp, max_new_tokens=max_new_tokens, on_step=record_step(steps))
        st = out.stats
        if st["steps"]:
            # drafting and loop overhead per step, measured directly (not as the step time minus
            # the cost curve, which may have been measured under another load on a shared machine)
            rest.append((st["time_decode_s"] - st["time_verify_s"]) / st["steps"])
    budgets = list(range(1, max_budget + 1))
    return AcceptanceProfile(budgets, [replay_tau(steps, b) for b in budgets],
                             max(statistics.median(rest), 0.0) if rest else 0.0, len(steps), {},
                             [s["nodes"] for s in steps])


def acceptance_profile(target, draft, inputs: list[dict], tree_options: dict | None = None, cost: CostCurve | None = None,
                       max_budget: int = 96, max_new_tokens: int = 96, cache_dir: Path | None = None,
                       refresh: bool = False, draft_vocab: int | None = None,
                       draft_quant: str = "auto") -> AcceptanceProfile:
    """The cached acceptance profile of this (target, draft, tree options, machine)."""
    tree_options = {k: v for k, v in (tree_options or {}).items() if k != "node_budget"}
    TreeConfig.from_options(**tree_options)  # validate
    cost = cost or verify_cost_curve(target, cache_dir=cache_dir)
    key = {"target": weights_fingerprint(target), "draft": weights_fingerprint(draft),
           "tree_options": json.loads(json.dumps(tree_options, sort_keys=True, default=list)),
           **machine_key(target.dtype, model=target), "max_budget": max_budget, "max_new_tokens": max_new_tokens,
           "n_prompts": len(inputs), "draft_vocab": draft_vocab, "draft_quant": draft_quant,
           "profile_version": 3}  # 2: records each step's tree size; 3: and the cost curve beside it
    path = _cache_file("acceptance", key, cache_dir)
    cached = None if refresh else _load_cached(path, key)
    # the profile's step times (`rest_s`) were taken beside the cost curve of that moment: when
    # the curve now in use disagrees with it, both were measured under another load
    if cached is not None and agrees(cached["verify_1_s"], cost.at(1)):
        return AcceptanceProfile(**cached["profile"])
    prof = measure_acceptance(target, draft, inputs, tree_options, cost, max_budget, max_new_tokens, draft_vocab,
                              draft_quant)
    prof.key = key
    _store(path, {"key": key, "profile": asdict(prof), "verify_1_s": cost.at(1)})
    return prof


# ---------------------------------------------------------------------------------------------
# the choice


def expected_speed(cost: CostCurve, profile: AcceptanceProfile) -> list[float]:
    """Expected tokens per second for every budget in `profile.budgets`: replayed tau over the
    mean step time, where each recorded step verifies min(B, the nodes it grew) + 1 tokens."""
    speeds = []
    for b, tau in zip(profile.budgets, profile.tau):
        sizes = profile.verified_tokens(b)
        speeds.append(tau / (statistics.fmean(cost.at(n) for n in sizes) + profile.rest_s))
    return speeds


def choose_node_budget(cost: CostCurve, profile: AcceptanceProfile) -> int:
    speed = expected_speed(cost, profile)
    return profile.budgets[max(range(len(speed)), key=speed.__getitem__)]


def auto_node_budget(target, draft, inputs: list[dict], tree_options: dict | None = None,
                     cache_dir: Path | None = None, refresh: bool = False, max_new_tokens: int = 96,
                     draft_vocab: int | None = None, draft_quant: str = "auto") -> tuple[int, dict]:
    """The node budget that maximises expected speed here, and a report of how it was chosen
    (the cost curve, the acceptance profile, the expected tokens/s of every budget, and the
    seconds this call took).

    inputs: prepared model inputs (dicts with input_ids and, for a VLM, pixel_values, which are
    cast to the target's dtype here) to profile acceptance on; one or two representative prompts
    suffice. Both measurements are cached, so `specllava generate --budget auto` and
    `specllava bench --budget auto` call this on every run, cheaply after the first.
    """
    start = time.perf_counter()
    inputs = [{k: v.to(target.dtype) if k == "pixel_values" and v is not None else v for k, v in inp.items()}
              for inp in inputs]
    cost = verify_cost_curve(target, cache_dir=cache_dir, refresh=refresh)
    prof = acceptance_profile(target, draft, inputs, tree_options, cost, cache_dir=cache_dir,
                              refresh=refresh, max_new_tokens=max_new_tokens, draft_vocab=draft_vocab,
                              draft_quant=draft_quant)
    budget = choose_node_budget(cost, prof)
    speed = expected_speed(cost, prof)
    return budget, {"node_budget": budget, "cost_curve": asdict(cost), "profile": asdict(prof),
                    "expected_tokens_per_s": speed, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# load-aware budgets: the node budget per sequence for a batch of B sequences


def batch_speed(cost: CostCurve, profile: AcceptanceProfile, batch: int, budget: int,
                rest_s: float | None = None) -> float:
    """Expected aggregate tokens/s of `batch` sequences stepped together (`core.batch`), each tree
    with `budget` draft nodes; budget 0 = plain batched decoding (one token per sequence, no draft).

    Model: one batched verification over B trees of k tokens each costs about one forward over
    B * k tokens (the same rows through the same weights: `cost.at(B * k)`); drafting and the loop
    cost `rest_s` per step: what `measure_batch_rest` measured at this batch size (the draft's
    forwards over B frontiers and the per-row work grow with B where they are compute, as on a
    CPU), or without it `profile.rest_s`, the lone sequence's. As B grows the verification turns
    from reading weights to computing, each tree node costs real time, and the best budget falls."""
    if budget == 0:
        return batch / cost.at(batch)
    tau = profile.tau[budget - 1]
    rest = profile.rest_s if rest_s is None else rest_s
    step = statistics.fmean(cost.at(batch * n) for n in profile.verified_tokens(budget)) + rest
    return batch * tau / step


def batch_node_budgets(cost: CostCurve, profile: AcceptanceProfile, batch_sizes=(1, 2, 4, 8, 16),
                       rest_by_batch: dict[int, float] | None = None) -> dict[int, int]:
    """For each batch size, the per-sequence node budget (0 = plain batched decoding) with the
    highest expected aggregate speed (`batch_speed`, with `rest_by_batch[B]` as a step's drafting
    and loop time when given: `measure_batch_rest`); for `SpeculativeDecoder(batch_budgets=...)`."""
    out = {}
    for batch in batch_sizes:
        rest = None if rest_by_batch is None else rest_by_batch.get(int(batch))
        candidates = [0] + list(profile.budgets)
        out[int(batch)] = max(candidates, key=lambda b: batch_speed(cost, profile, batch, b, rest))
    return out


@torch.inference_mode()
def measure_batch_rest(target, draft, inputs: dict, profile: AcceptanceProfile, tree_options: dict | None = None,
                       batch_sizes=(1, 2, 4, 8), steps: int = 6, max_budget: int = 96, draft_vocab: int | None = None,
                       draft_quant: str = "auto") -> dict[int, float]:
    """A step's time besides the verification forward (drafting and the loop) with B sequences
    stepped together, for every B in `batch_sizes`, in the units of `profile.rest_s`: that lone
    time scaled by how much longer the same step takes with B rows.

    B copies of one prompt (`inputs`, prepared) are decoded together by the acceptance profile's
    dynamic tree (budget `max_budget`), drafting at every step (`calibrate=false`: a batch's
    calibrated rows may take plain steps, which draft nothing); per step, the wall time less the
    verification's (`Sequence.stats`), median over `steps` steps after one untimed step. Identical
    rows grow identical trees, so B changes nothing but the batch. A few seconds on a CPU."""
    opts = {**(tree_options or {}), "node_budget": max_budget, "calibrate": False, "draft_quant": draft_quant,
            "draft_vocab": draft_vocab or None}
    inputs = {k: v.to(target.dtype) if k == "pixel_values" and v is not None else v for k, v in inputs.items()}
    decoder = SpeculativeDecoder(target, draft, method="dynamic", **opts)
    measured = {}
    for batch in sorted(set(int(b) for b in batch_sizes) | {1}):
        seqs = [decoder.start(**inputs, max_new_tokens=8 * (steps + 2)) for _ in range(batch)]
        decoder.step(seqs)
        rest = []
        for _ in range(steps):
            live = [s for s in seqs if not s.finished]
            if not live:
                break
            verify = live[0].stats.t_verify  # a batched step charges every row the same verification
            t = time.perf_counter()
            decoder.step(live)
            rest.append(time.perf_counter() - t - (live[0].stats.t_verify - verify))
        measured[batch] = statistics.median(rest) if rest else float("nan")
    lone = measured[1]
    wanted = set(int(x) for x in batch_sizes)
    if not lone > 0:  # nothing measured alone (every copy ended at once): the lone time everywhere
        return {}
    return {b: profile.rest_s * r / lone for b, r in measured.items() if b in wanted and r == r}
