"""GPU check: specllava's CUDA exactness tests, then timings of a LLaVA-1.5-7B-shaped target.

    PYTHONPATH=src python tools/gpu_check.py --out runs/gpu-check      # `make gpu-check`, one GPU, < 8 min
    PYTHONPATH=src python tools/gpu_check.py --tiny --out runs/gpu-check-tiny   # rehearsal: small shapes, any device

Three parts, each written to `<out>/gpu_check.json` as it finishes (plus two plots):

1. tests: `pytest -m cuda` (tests/core/test_devices.py: greedy exactness against `generate()` in
   float32, float16 and bfloat16, target and draft on different devices, an accelerate-dispatched
   target, sampling, a sliding window), with the pass/fail/skip counts;
2. verification cost against tree size: one target forward over N tree nodes on top of a
   LLaVA-1.5 prompt (576 image tokens), on the exact lean path and through transformers' forward,
   for N = 1 .. 128; and the LLaVA-68M-shaped draft's forward over F frontier nodes;
3. every method's speed (hf `generate()`, ar, chain, static, dynamic) with a LLaVA-68M-shaped draft
   (Llama, 2 layers, hidden 768, 12 heads, intermediate 3072) sharing the target's vision tower,
   and the host syncs per decoding step (`torch.cuda.set_sync_debug_mode`).

The target has the shape of llava-hf/llava-1.5-7b-hf (Vicuna-7B: 32 layers, hidden 4096, 32 heads,
intermediate 11008, vocabulary 32064; CLIP ViT-L/14 at 336 px) with random weights: the timings are
real, acceptance is not (a random draft proposes what a random target rarely takes, so the mean
accepted length stays near 1 and part 3 measures each method's overhead; with a trained draft,
speedup ~ tau * t_verify(1) / (t_verify(N) + depth * t_draft), from part 2's costs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from specllava import SpeculativeDecoder  # noqa: E402
from specllava.core.cache import crop  # noqa: E402
from specllava.core.backends import exact_backend  # noqa: E402
from specllava.core.runner import ModelRunner  # noqa: E402
from specllava.core.tree import ancestor_mask, attention_bias  # noqa: E402

IMAGE_TOKEN = 32000
VOCAB = 32064
SHAPES = {  # (target text, target vision, draft text)
    "full": (
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14),
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=12),
    ),
    "tiny": (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=336, patch_size=14),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
    ),
}
TREE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
FRONTIER_SIZES = (1, 2, 4, 8, 16)
METHODS = ("ar", "chain", "static", "dynamic")


def llava(text: dict, vision: dict, dtype: torch.dtype, device: str) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model with random weights, built in `dtype` directly on `device`."""
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision, projection_dim=768),
        text_config=LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0, **text),
        image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None  # random weights: decode the full length every time
    model.generation_config.pad_token_id = 0
    return model.eval()


def prompt(model, seed: int, device: str, text_len: int = 24) -> dict:
    g = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2
    text = torch.randint(3, IMAGE_TOKEN, (text_len,), generator=g)
    ids = torch.cat([torch.tensor([1]), text[:4], torch.full((n_image,), IMAGE_TOKEN), text[4:]])[None]
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=g)
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device, model.dtype)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median wall time of fn() in ms over `repeats` runs, after one warm-up."""
    fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(1000 * (time.perf_counter() - t))
    return statistics.median(out)


@torch.inference_mode()
def forward_costs(model, inputs, sizes, device: str, repeats: int, backend=None) -> dict:
    """ms of one forward over n tree nodes (a random tree) on top of the prefilled prompt."""
    runner = ModelRunner(model, backend)
    runner.prefill(inputs["input_ids"], pixel_values=inputs["pixel_values"])
    prefix = runner.length
    g = torch.Generator().manual_seed(0)
    out = {}
    for n in sizes:
        parents = torch.tensor([-1] + [int(torch.randint(0, i, (), generator=g)) for i in range(1, n)])
        anc = ancestor_mask(parents).to(device)
        depth = anc.sum(1) - 1
        tokens = torch.randint(3, IMAGE_TOKEN, (n,), generator=g).to(device)
        bias = attention_bias(anc, prefix, runner.dtype) if n > 1 else None

        def step():
            runner.forward(tokens, prefix + depth, bias)
            crop(runner.cache, prefix)

        out[n] = timed(step, device, repeats)
    return out


@torch.inference_mode()
def method_speeds(target, draft, inputs_list, device: str, new_tokens: int) -> dict:
    """tokens/s of hf generate() and of every specllava method (greedy), the mean accepted length,
    and (on CUDA) the host syncs per decoding step."""
    res = {}

    def hf(inp):
        target.generate(**inp, max_new_tokens=new_tokens, do_sample=False)

    decoders = {m: SpeculativeDecoder(target, None if m == "ar" else draft, method=m) for m in METHODS}
    for name in ("hf", *METHODS):
        times, stats = [], []
        for inp in inputs_list:
            run = (lambda i=inp: hf(i)) if name == "hf" else (lambda i=inp: stats.append(decoders[name].generate(**i, max_new_tokens=new_tokens).stats))
            times.append(timed(run, device, 1))
        entry = {"ms_per_request": statistics.median(times), "tokens_per_s": 1000 * new_tokens / statistics.median(times)}
        if stats:
            entry["mean_accepted"] = statistics.mean(s["mean_accepted"] for s in stats)
            entry["tree_nodes_mean"] = statistics.mean(s["tree_nodes_mean"] for s in stats)
            entry["decode_ms_per_token"] = 1000 * statistics.mean(s["time_decode_s"] / s["new_tokens"] for s in stats)
        if name != "hf" and device.startswith("cuda"):
            entry["host_syncs_per_step"] = syncs_per_step(decoders[name], inputs_list[0], new_tokens)
        res[name] = entry
        print(f"  {name:8s} {entry['tokens_per_s']:8.1f} tok/s  {entry}", flush=True)
    return res


def syncs_per_step(decoder, inputs, new_tokens: int) -> float:
    """Mean count of synchronizing CUDA calls between two verification steps (prefill excluded)."""
    marks = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            decoder.generate(**inputs, max_new_tokens=new_tokens, on_step=lambda tree, verdict: marks.append(len(seen)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    if len(marks) < 2:
        return float("nan")
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def run_tests(out: Path, timeout_s: int) -> dict:
    """pytest -m cuda, with a JUnit report; counts of passed, failed and skipped tests."""
    report = out / "pytest-cuda.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={report}",
           str(ROOT / "tests" / "core" / "test_devices.py")]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})
        tail, code = (proc.stdout + proc.stderr)[-4000:], proc.returncode
    except subprocess.TimeoutExpired as err:
        tail, code = f"timed out after {timeout_s} s: {err}", None
    counts = {}
    if report.exists():
        import xml.etree.ElementTree as ET

        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    print(tail[-1500:], flush=True)
    return {"command": " ".join(cmd), "returncode": code, "seconds": time.perf_counter() - t, "counts": counts,
            "output_tail": tail}


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = result.get("verify_ms")
    if costs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, series in costs.items():
            ax.plot([int(n) for n in series], list(series.values()), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tree nodes verified in one forward")
        ax.set_ylabel("ms per target forward")
        ax.set_title(f"{result['target']} on {result['device_name']}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "verify_cost.png", dpi=120)
        plt.close(fig)
    speeds = result.get("methods")
    if speeds:
        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(speeds)
        ax.bar(names, [speeds[n]["tokens_per_s"] for n in names])
        ax.set_ylabel("tokens/s (random weights: overhead, not acceptance)")
        ax.set_title(f"{result['target']} + {result['draft']} on {result['device_name']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "methods.png", dpi=120)
        plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    ap.add_argument("--tiny", action="store_true", help="small shapes: a rehearsal that runs in a minute on a CPU")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu (--tiny only)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--tests-timeout", type=int, default=240, help="seconds for the pytest part")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not args.tiny:
        ap.error("no CUDA device visible: the full check needs a GPU (use --tiny to rehearse on the CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "dtype": args.dtype, "target": "llava-1.5-7b-shaped (random weights)" if not args.tiny else "tiny llava (random)",
        "draft": "llava-68m-shaped (random weights)" if not args.tiny else "tiny draft (random)",
    }

    def save():
        result["seconds"] = time.perf_counter() - t0
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))

    if not args.skip_tests:
        print("== 1. CUDA tests (pytest -m cuda)", flush=True)
        result["tests"] = run_tests(args.out, args.tests_timeout)
        save()

    print("== 2. models", flush=True)
    text, vision, draft_text = SHAPES["tiny" if args.tiny else "full"]
    t = time.perf_counter()
    target = llava(text, vision, dtype, device)
    draft = llava(draft_text, vision, dtype, device)
    draft.model.vision_tower.load_state_dict(target.model.vision_tower.state_dict())  # shares the tower
    result["build_s"] = time.perf_counter() - t
    result["params"] = {"target": sum(p.numel() for p in target.parameters()),
                        "draft": sum(p.numel() for p in draft.parameters())}
    inputs = [prompt(target, seed, device) for seed in range(2)]
    result["prompt_tokens"] = int(inputs[0]["input_ids"].shape[1])
    path = exact_backend(target)
    result["target_lean_path"] = path is not None
    print(f"   target {result['params']['target'] / 1e9:.2f} B params, draft {result['params']['draft'] / 1e6:.0f} M, "
          f"prompt {result['prompt_tokens']} tokens, lean path {path is not None} ({result['build_s']:.0f} s)", flush=True)

    print("== 3. verification cost against tree size", flush=True)
    result["verify_ms"] = {}
    if path is not None:
        result["verify_ms"]["lean exact path"] = forward_costs(target, inputs[0], TREE_SIZES, device, args.repeats, path)
    result["verify_ms"]["transformers forward"] = forward_costs(target, inputs[0], TREE_SIZES, device, args.repeats)
    result["draft_ms"] = forward_costs(draft, inputs[0], FRONTIER_SIZES, device, args.repeats)
    for label, series in result["verify_ms"].items():
        print(f"   {label}: " + ", ".join(f"{n}: {ms:.1f} ms" for n, ms in series.items()), flush=True)
    print("   draft: " + ", ".join(f"{n}: {ms:.2f} ms" for n, ms in result["draft_ms"].items()), flush=True)
    save()

    print("== 4. methods (greedy, random weights)", flush=True)
    result["methods"] = method_speeds(target, draft, inputs, device, args.new_tokens)
    save()
    plot(result, args.out)
    print(f"wrote {args.out / 'gpu_check.json'} and plots in {time.perf_counter() - t0:.0f} s", flush=True)
    failed = result.get("tests", {}).get("counts", {})
    return 1 if failed.get("failures") or failed.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
