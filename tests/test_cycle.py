"""The Squeeze-Release cycle on small data: it shrinks the model, keeps accuracy, stays trainable,
rebuilds optimizers, and writes a history that round-trips through JSON and plots."""
from __future__ import annotations

import json

import pytest
import torch
from torch import fx, nn

from sqr_fx.cli import main as cli_main
from sqr_fx.cycle import History, SqueezeRelease, squeeze_release
from sqr_fx.recipes import classifier_loops, get_recipe, run_recipe


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and fair to the other worker
    try:
        out = tmp_path_factory.mktemp("digits")
        recipe = get_recipe("digits-fc")
        model, history = run_recipe(recipe, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return recipe, model, history, out


def test_two_cycles_on_digits(digits_run, tmp_path):
    """One digits run, checked from every side (one test: xdist would run a shared fixture twice)."""
    _check_shrinks_and_keeps_accuracy(digits_run)
    _check_trainable_graph_module(digits_run)
    _check_history_json_and_png(digits_run, tmp_path)


def _check_shrinks_and_keeps_accuracy(digits_run):
    recipe, model, history, _ = digits_run
    assert [r.cycle for r in history.records] == [1, 2]
    sizes = [r.stored_floats for r in history.records]
    assert sizes[0] < history.dense_floats and sizes[1] <= sizes[0]
    for r in history.records:
        assert r.ratio == pytest.approx(history.dense_floats / r.stored_floats)
        assert r.accuracy > 0.88 and 0 < r.sparsity < 1 and r.wall_time > 0
    # release ran between the cycles (measured, small) but not after the last one
    first, last = history.records
    assert first.released > 0 and 0 < first.release_change < 0.2 and first.release_agreement > 0.9
    assert last.released == 0 and last.release_change is None
    from sqr_fx.size import count_stored_floats

    assert count_stored_floats(model) == sizes[-1]
    _, evaluate = classifier_loops(recipe.load_data(), lr=recipe.lr)
    assert evaluate(model) == last.accuracy


def _check_trainable_graph_module(digits_run):
    _, model, _, _ = digits_run
    assert isinstance(model, fx.GraphModule)
    params = dict(model.named_parameters())
    assert params and all(type(p) is nn.Parameter and p.requires_grad for p in params.values())
    model = __import__("copy").deepcopy(model).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(16, 64)
    nn.functional.cross_entropy(model(x), torch.arange(16) % 10).backward()
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def _check_history_json_and_png(digits_run, tmp_path):
    _, _, history, out = digits_run
    data = json.loads((out / "digits-fc.json").read_text())
    assert data["dense_floats"] == history.dense_floats and len(data["records"]) == 2
    assert History.from_json(out / "digits-fc.json").to_dict() == history.to_dict()
    history.baselines["dense"] = {"stored_floats": history.dense_floats, "accuracy": 0.95}
    png = history.plot(tmp_path / "h.png")
    for p in (png, out / "digits-fc.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    assert "baseline dense" in str(history)


def _toy(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(128, 12)
    y = (x[:, :3].sum(1) > 0).long()
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 2)), x, y


def test_optimizer_is_rebuilt_for_every_phase_and_input_is_not_mutated():
    net, x, y = _toy()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    seen: list[tuple[torch.optim.Optimizer, set[int], set[int]]] = []

    def train(model, epochs, optimizer):
        seen.append((optimizer, {id(p) for g in optimizer.param_groups for p in g["params"]},
                     {id(p) for p in model.parameters()}))
        for _ in range(epochs * 5):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    evaluate = lambda m: float((m(x).argmax(1) == y).float().mean())  # noqa: E731
    small, hist = squeeze_release(net, train, evaluate, (x[:4],), cycles=2, amount=0.7, epochs=1,
                                  finetune_epochs=1, progress=False,
                                  optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())  # caller's model intact
    assert len(seen) == 4 and len({id(o) for o, _, _ in seen}) == 4  # fresh optimizer per phase
    assert all(opt_ids == model_ids for _, opt_ids, model_ids in seen)  # on the current parameters
    assert seen[2][2].isdisjoint(seen[0][2])  # cycle 2 trains the minimized model's new parameters
    assert hist.records[-1].stored_floats < hist.dense_floats


def test_schedules_and_errors():
    net, x, _ = _toy()
    with pytest.raises(ValueError):
        SqueezeRelease(lambda m, e: None, lambda m: 0.0, (x,), cycles=3, amount=[0.5, 0.5])
    r = get_recipe("mnist-fc", cycles=2)
    assert r.cycles == 2 and len(r.schedule("amount")) == 2
    assert get_recipe("digits-fc", cycles=4).schedule("epochs")[-2:] == [6, 6]
    with pytest.raises(KeyError):
        get_recipe("imagenet")


def test_cli_runs_a_recipe(tmp_path, capsys):
    assert cli_main(["squeeze-release", "--recipe", "digits-fc", "--cycles", "1", "--epochs", "4",
                     "--finetune-epochs", "1", "--threads", "1", "--out", str(tmp_path), "--no-progress",
                     "--target-ratio", "1.02", "--target-sparsity", "0.6", "--final-epochs", "1"]) == 0
    assert (tmp_path / "digits-fc.json").exists() and (tmp_path / "digits-fc.png").exists()
    saved = json.loads((tmp_path / "digits-fc.json").read_text())
    assert saved["config"]["target_ratio"] == 1.02 and saved["records"][-1]["ratio"] >= 1.02
    assert saved["config"]["target_sparsity"] == [0.6] and saved["records"][-1]["phase"] == "final"
    assert "digits-fc: dense" in capsys.readouterr().out


def test_later_cycle_drops_newly_unused_inputs():
    """Cycle 2 minimizes cycle 1's output, gather included: newly unused inputs must go too."""
    import sqr_fx

    net, x, _ = _toy()
    with torch.no_grad():
        net[0].weight[:, :2] = 0  # cycle 1: two inputs unused -> gathered away
    small = sqr_fx.minimize(net.eval(), (x[:4],))
    assert small.sqr_report.input_features_dropped == 2
    with torch.no_grad():
        small.get_parameter("0.weight")[:, :3] = 0  # cycle 2: three more columns become zero
    smaller = sqr_fx.minimize(small.eval(), (x[:4],))
    sqr_fx.check_equivalence(small, smaller, (x,))
    assert smaller.get_parameter("0.weight").shape[1] == 12 - 5


def test_target_sparsity_is_cumulative_over_the_dense_count():
    net, x, y = _toy()
    dense = 12 * 24 + 24 * 2
    small, hist = squeeze_release(net, lambda m, e: None, lambda m: 0.0, (x[:4],), cycles=2,
                                  target_sparsity=[0.5, 0.8], progress=False)
    assert hist.records[0].amount == 0.5
    for rec, s in zip(hist.records, (0.5, 0.8)):
        # pruning leaves (1 - s) of the dense count; minimize may drop more (the inputs of dead units)
        assert 0 < rec.nonzeros <= (1 - s) * dense + 1
    # cycle 2 starts from released (dense) compacted tensors: it prunes more than 0.6 of them
    assert hist.records[1].amount > 1 - 0.2 / 0.5


def test_amount_override_replaces_the_schedule_and_group_lasso_penalty():
    from sqr_fx.recipes import group_lasso_penalty

    assert get_recipe("mnist-fc").target_sparsity is not None
    assert get_recipe("mnist-fc", amount=0.5).target_sparsity is None
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]]))
    # rows: 5 + 0, columns: 3 + 0 + 4 (plus the 1e-12 guards that keep the gradient finite at 0)
    assert float(group_lasso_penalty(lin).detach()) == pytest.approx(12.0, abs=1e-5)
    assert float(group_lasso_penalty(lin, inputs=2.0).detach()) == pytest.approx(19.0, abs=1e-5)


def test_final_phase_releases_the_last_model_and_trains_it_without_pruning():
    net, x, y = _toy()
    calls: list[tuple[str, int]] = []

    def trainer(tag):
        def train(model, epochs):
            calls.append((tag, epochs))
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(epochs * 5):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        return train

    evaluate = lambda m: float((m(x).argmax(1) == y).float().mean())  # noqa: E731
    small, hist = squeeze_release(net, trainer("cycle"), evaluate, (x[:4],), cycles=2,
                                  target_sparsity=[0.6, 0.8], epochs=1, final_epochs=2,
                                  final_train=trainer("final"), progress=False)
    assert [r.phase for r in hist.records] == ["cycle", "cycle", "final"]
    last, final = hist.records[1], hist.records[2]
    assert calls[-1] == ("final", 2) and ("final", 2) not in calls[:-1]
    # the last cycle's deliverable was released (its zeros trained again), the size did not grow
    assert last.released > 0 and last.release_change is not None
    assert final.cycle == 3 and final.amount == 0.0 and final.stored_floats <= last.stored_floats
    assert final.nonzeros > last.nonzeros and final.released == 0
    assert hist.config["final_epochs"] == 2 and "3F" in str(hist)
    r = get_recipe("digits-fc", final_epochs=3, distill=0.5, teacher_epochs=4)
    assert r.budget_epochs == get_recipe("digits-fc").budget_epochs + 3 + 4


def test_distillation_loss_uses_the_teacher_logits():
    from sqr_fx.data import Split, Splits

    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = x[:, :3].argmax(1)  # linearly learnable labels
    data = Splits(Split(x, y), Split(x, y), Split(x, y), 3, "toy")
    teacher = torch.zeros(64, 3)
    teacher[torch.arange(64), (y + 1) % 3] = 20.0  # a confident teacher that is always wrong
    outs = {}
    for distill in (0.0, 1.0):
        train, evaluate = classifier_loops(data, lr=5e-2, teacher_logits=teacher, distill=distill)
        torch.manual_seed(1)
        model = nn.Linear(5, 3)
        train(model, 30)
        outs[distill] = evaluate(model)
    # pure distillation learns the teacher's (wrong) labels, pure cross-entropy the true ones
    assert outs[1.0] < 0.2 < 0.5 < outs[0.0]


def test_target_ratio_stops_at_the_size_budget_without_overshooting():
    """The cycle that would overshoot the budget prunes only as much as reaches it, and is the last."""
    from sqr_fx.size import count_stored_floats

    net, x, y = _toy()
    dense = count_stored_floats(net)
    evaluate = lambda m: 0.0  # noqa: E731
    sr = SqueezeRelease(lambda m, e: None, evaluate, (x[:4],), cycles=4,
                        target_sparsity=[0.5, 0.9, 0.97, 0.99], target_ratio=4.0, progress=False)
    small, hist = sr.run(__import__("copy").deepcopy(net))
    budget = dense / 4.0
    last = hist.records[-1]
    assert last.stored_floats <= budget and count_stored_floats(small) == last.stored_floats
    assert len(hist.records) < 4 and hist.config["target_ratio"] == 4.0  # stopped early
    # without the target the same schedule's cycle overshoots the budget by more than the bisection
    _, free = squeeze_release(net, lambda m, e: None, evaluate, (x[:4],), cycles=len(hist.records),
                              target_sparsity=[0.5, 0.9, 0.97, 0.99][:len(hist.records)], progress=False)
    assert free.records[-1].stored_floats < last.stored_floats
    # the bisected amount is the smallest that meets the budget: a little less would miss it
    before = sr.amount_for_size(net, 0.0, int(budget))
    assert before == (0.0, dense)  # nothing pruned: the dense size, above the budget
    amount, size = sr.amount_for_size(net, 0.95, int(budget))
    assert size <= budget < sr.amount_for_size(net, amount * 0.97, int(budget))[1]
    with pytest.raises(ValueError, match="target_ratio"):
        SqueezeRelease(lambda m, e: None, evaluate, (x,), target_ratio=0.5)
    with pytest.raises(SystemExit):  # the CLI refuses it before any work
        cli_main(["squeeze-release", "--recipe", "digits-fc", "--target-ratio", "0.5"])
    # with a final phase: the last cycle is released, and the final record follows the cycles run
    _, fin = squeeze_release(net, lambda m, e: None, evaluate, (x[:4],), cycles=4,
                             target_sparsity=[0.5, 0.9, 0.97, 0.99], target_ratio=4.0, final_epochs=1,
                             progress=False)
    n = len(hist.records)
    assert [r.phase for r in fin.records] == ["cycle"] * n + ["final"]
    assert fin.records[-1].cycle == n + 1 and fin.records[n - 1].released > 0


def test_target_ratio_out_of_reach_warns():
    net, x, _ = _toy()
    with pytest.warns(UserWarning, match="target_ratio 50 not reached"):
        _, hist = squeeze_release(net, lambda m, e: None, lambda m: 0.0, (x[:4],), cycles=1, amount=0.5,
                                  target_ratio=50.0, progress=False)
    assert len(hist.records) == 1 and hist.records[0].ratio < 50
