"""The one training loop (`specllava.training.loop`) on a toy regression: schedule, resume, budget."""

import json
from types import SimpleNamespace

import pytest
import torch

from specllava.training.loop import lr_at, train_loop


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    assert [lr_at(s, 1.0, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 1.0, 4, 20) == pytest.approx(1.0)
    assert lr_at(12, 1.0, 4, 20) == pytest.approx(0.55)  # half way: 0.1 + 0.9 / 2
    assert lr_at(20, 1.0, 4, 20) == pytest.approx(0.1) and lr_at(50, 1.0, 4, 20) == pytest.approx(0.1)


def _run(out, steps=6, resume=False, max_minutes=None, **kw):
    torch.manual_seed(0)
    examples = [SimpleNamespace(input_ids=[0] * (1 + i % 3), x=torch.randn(3), y=torch.randn(())) for i in range(10)]
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=0.1)
    seen = []

    def loss_fn(batch):
        seen.append(len(batch))
        x = torch.stack([e.x for e in batch])
        y = torch.stack([e.y for e in batch])
        loss = ((model(x).squeeze(-1) - y) ** 2).mean() + 0.01 * torch.randn(())  # draws from torch's RNG
        return loss, {"loss": loss.item()}

    run = train_loop(examples, params, opt, loss_fn, out, steps=steps, batch_size=4, warmup=2, seed=0,
                     checkpoint_every=2, max_minutes=max_minutes, resume=resume, log=lambda *a: None, **kw)
    return run, {k: v.detach().clone() for k, v in params.items()}, opt, seen


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    full, full_params, full_opt, _ = _run(tmp_path / "full")
    assert full.steps == 6 and full.stopped_by == "steps"
    assert [h["step"] for h in full.history] == [1, 2, 3, 4, 5, 6]
    assert full_opt.param_groups[0]["lr"] == pytest.approx(lr_at(5, 0.1, 2, 6))
    _run(tmp_path / "part", steps=6, max_minutes=0)  # the budget stops it after one step, with a checkpoint
    part = json.loads((tmp_path / "part" / "history.json").read_text())
    assert [h["step"] for h in part] == [1]
    resumed, params, _, _ = _run(tmp_path / "part", resume=True)
    assert resumed.steps == 6 and [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    for name in params:
        torch.testing.assert_close(params[name], full_params[name], rtol=0, atol=0)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_the_hooks_see_every_step_and_every_checkpoint(tmp_path):
    steps_seen, saved = [], []

    def after_step(step, history):
        steps_seen.append(step)
        if step == 3:
            history.append({"step": step, "eval_loss": 1.0})

    run, _, _, seen = _run(tmp_path, steps=5, after_step=after_step, on_checkpoint=saved.append)
    assert steps_seen == [1, 2, 3, 4, 5] and saved == [2, 4, 5]
    assert {"step": 3, "eval_loss": 1.0} in run.history
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 5 and {"step": 3, "eval_loss": 1.0} in state["history"]
    assert sum(seen[:3]) == 10  # an epoch of 10 examples in batches of 4: 4 + 4 + 2 (in some order)


def test_loss_plot_draws_the_running_mean_the_raw_steps_and_held_out_points(tmp_path, monkeypatch):
    import specllava.training.loop as loop

    drawn = {}
    monkeypatch.setattr(loop, "plot_history", lambda points, path, title, keys: drawn.update(points=points, keys=keys))
    history = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 3.0}, {"step": 3, "loss": 0.0}]
    loop.plot_losses(history, tmp_path / "loss.png", "t", {"loss": "loss"}, markers={"eval_loss": "held-out loss"}, k=2)
    assert drawn["keys"] == ("loss per step", "loss (mean of 2)", "held-out loss")
    assert [p.get("loss (mean of 2)") for p in drawn["points"]] == [4.0, 3.0, 1.0, None]
    assert drawn["points"][-1] == {"step": 2, "held-out loss": 3.0}
    monkeypatch.undo()
    loop.plot_losses(history, tmp_path / "loss.png", "t", {"loss": "loss"})
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_a_grad_scaler_scales_the_backward_and_unscales_before_clipping_and_the_step():
    """With loss scaling the update is the unscaled one (a scaled gradient would be clipped, or
    make SGD's step 1024 times longer)."""
    from specllava.training.common import optimizer_step

    def step(scaler):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = 0.01 * model(torch.randn(4, 3)).pow(2).mean()  # a gradient norm well under the clip of 1
        optimizer_step(loss, opt, model.parameters(), scaler=scaler)
        return [p.detach().clone() for p in model.parameters()]

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for got, want in zip(step(scaler), step(None)):
        torch.testing.assert_close(got, want)
    assert scaler.get_scale() == 1024.0  # no inf/NaN: no step skipped, no backoff
