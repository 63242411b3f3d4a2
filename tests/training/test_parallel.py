"""Data-parallel draft training: `accelerate launch` with 2 CPU processes (gloo) takes the steps one
process takes, on the published llava_v1_5_mix665k format (text-only records and a missing image
included)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mix665k import make_mix665k

import specllava
from specllava.training.distill import DistillConfig, train_draft

ARGS = dict(steps=3, batch_size=4, lr=1e-3, warmup=1, checkpoint_every=3, eval_prompts=0, held_out_fraction=0.0,
            bf16=False, device="cpu", seed=0)


def _fresh_draft_config(target_dir: Path, folder: Path) -> Path:
    """A one-layer draft of the target's shape, initialised at random (far from the target: its
    gradients stand well above rounding, which Adam's first, sign-like step would amplify)."""
    config = json.loads((target_dir / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 1
    config["text_config"].pop("layer_types", None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "draft.json").write_text(json.dumps(config))
    return folder / "draft.json"


def _cli(cfg: dict) -> list[str]:
    args = []
    for key, value in cfg.items():
        if key == "bf16":
            args += [] if value else ["--no-bf16"]
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _trained(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=False)["tensors"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_two_processes_train_the_draft_one_process_trains(tmp_path, assembled_pair):
    data = make_mix665k(tmp_path / "d", copies=2)  # 16 answered records (4 text-only), 2 missing images
    args = {**ARGS, "draft_init": _fresh_draft_config(assembled_pair.target_dir, tmp_path / "init")}
    one = tmp_path / "one"
    train_draft(DistillConfig(target=assembled_pair.target_dir, data=data, out=one, **args), log=lambda *a: None)
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(Path(specllava.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "specllava.training", "train-draft", "--target", str(assembled_pair.target_dir), "--data", str(data),
           "--out", str(two), *_cli(args)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[:3000] + "\n[...]\n" + run.stderr[-3000:]
    log = (two / "train.log").read_text()
    assert "2 data-parallel processes" in log and "4 of 16 training records are text-only" in log
    assert "skipping 2 of 20 records whose image is missing" in log
    diff = _max_diff(_trained(one), _trained(two))
    assert diff < 1e-5, diff
    # the bound can fail: half the batch in one process is another run
    half = tmp_path / "half"
    train_draft(DistillConfig(target=assembled_pair.target_dir, data=data, out=half, **{**args, "batch_size": 2}),
                log=lambda *a: None)
    assert _max_diff(_trained(one), _trained(half)) > 100 * max(diff, 1e-7)
