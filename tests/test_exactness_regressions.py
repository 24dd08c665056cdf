"""Regression tests for exactness bugs: one focused test per bug class of the issue.

Every model is tiny, float64, deterministic, and has structure planted so that ``minimize``
would remove something (a zero row, a dead unit, a constant channel), so the bug path runs.
Each test compares the original with the result on the example inputs, on another batch size
and (where the model accepts one) another spatial / sequence size.

Where the issue says no exact rewrite need exist, :func:`exact_or_clear_error` accepts either an
exact result or an ``sqr_fx.SqrFxError`` with a clear message; a raw torch / Python error, a
"does not run on example_inputs" error for inputs the original runs on, or a self-check error that
admits a wrong rewrite ("This is a bug in sqr_fx") is a failure.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sqr_fx
from sqr_fx import check_equivalence, minimize

RTOL, ATOL = 1e-9, 1e-10


# ---- helpers ----------------------------------------------------------------------------------
def batches(*shapes, seed=0):
    """One input tuple per shape (float64 randn), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g, dtype=torch.float64),) for s in shapes]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before), "minimize changed the model's state_dict keys"
    for k, v in before.items():  # bitwise, with nan == nan (class 10 plants nan weights)
        assert torch.equal(after[k].nan_to_num(0.5), v.nan_to_num(0.5)), f"{k} was mutated"


def _original_runs(model, inputs_list):
    """Test sanity: the original accepts every input (else the test, not the library, is wrong).
    Run after ``minimize``: a forward would refresh state that minimize must handle itself
    (the weight cached by the hook-based ``weight_norm``)."""
    with torch.no_grad():
        for inputs in inputs_list:
            out = model(*inputs)
            if isinstance(out, torch.Tensor):
                assert not out.isnan().all(), "test bug: the original outputs only nan"


def assert_exact(model, result, inputs_list):
    for inputs in inputs_list:
        check_equivalence(model, result, inputs, rtol=RTOL, atol=ATOL)


def minimize_exact(model, inputs_list):
    """minimize on inputs_list[0]; the result must be exact on every input; the model unchanged."""
    before = _state(model)
    result = minimize(model, inputs_list[0])
    _assert_unchanged(model, before)
    _original_runs(model, inputs_list)
    assert_exact(model, result, inputs_list)
    return result


def exact_or_clear_error(model, inputs_list):
    """Either an exact result or an SqrFxError with a clear message (returns None then)."""
    before = _state(model)
    try:
        result = minimize(model, inputs_list[0])
    except sqr_fx.SqrFxError as e:
        _original_runs(model, inputs_list)
        msg = str(e)
        assert len(msg) > 20, f"unclear error message: {msg!r}"
        assert "does not run on example_inputs" not in msg, (
            f"misleading error: the original runs on the example inputs, but minimize says: {msg}")
        assert "bug in sqr_fx" not in msg, f"not a clear limitation but a caught wrong rewrite: {msg}"
        _assert_unchanged(model, before)
        return None
    _assert_unchanged(model, before)
    _original_runs(model, inputs_list)
    assert_exact(model, result, inputs_list)
    return result


def shrinks(result):
    r = result.sqr_report
    assert r.params_after < r.params_before, f"nothing removed: {r.params_before} -> {r.params_after} params"


def dead(linear_or_conv, unit, bias=-1.0):
    """Zero the weight row of ``unit`` and set its bias: constant ``bias`` (dead after a relu if < 0)."""
    with torch.no_grad():
        linear_or_conv.weight[unit] = 0
        linear_or_conv.bias[unit] = bias


# ---- 1. avg pooling with divisor_override --------------------------------------------------------
class AvgPoolDivisor(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.pool = nn.AvgPool2d(2, divisor_override=3)
        dead(self.c1, 1, 0.7)  # channel 1 is the constant 0.7; after pooling it is 0.7 * 4 / 3

    def forward(self, x):
        h = self.c1(x)
        h = F.avg_pool2d(h, 2, divisor_override=3) if self.functional else self.pool(h)
        return self.c2(h)


@pytest.mark.parametrize("functional", [True, False], ids=["F.avg_pool2d", "nn.AvgPool2d"])
def test_avg_pool_divisor_override_folds_the_right_constant(functional):
    """Class 1: a constant channel through avg pooling with divisor_override is 4/3 of itself."""
    torch.manual_seed(0)
    m = AvgPoolDivisor(functional).double().eval()
    minimize_exact(m, batches((2, 3, 8, 8), (3, 3, 8, 8), (1, 3, 6, 10)))


# ---- 2. pooling on a lower-rank tensor (channels are pooled) -------------------------------------
class MaxPool3dOn4d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(2, 3, 1)
        dead(self.c1, 0, 0.0)  # zero channel
        dead(self.c1, 2, 0.3)  # constant channel

    def forward(self, x):
        # a 4-D tensor is an UNBATCHED [C, D, H, W] input to max_pool3d: it pools our channel axis
        return self.c2(F.max_pool3d(self.c1(x), 2))


class MaxPool1dOn2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(3, 2)
        dead(self.a, 1, 0.0)
        dead(self.a, 4, 0.5)

    def forward(self, x):
        # a 2-D [N, C] tensor is an UNBATCHED [C', L] input to max_pool1d: it pools across features
        return self.b(F.max_pool1d(self.a(x), 2))


def test_max_pool3d_on_a_4d_tensor_pools_channels():
    """Class 2: F.max_pool3d on [N, C, H, W] pools along C; must stay exact."""
    torch.manual_seed(0)
    m = MaxPool3dOn4d().double().eval()
    minimize_exact(m, batches((2, 3, 8, 8), (3, 3, 8, 8), (2, 3, 6, 10)))


def test_max_pool1d_on_a_2d_linear_output_pools_features():
    """Class 2: F.max_pool1d on a [N, C] Linear output pools across channels; must stay exact."""
    torch.manual_seed(0)
    m = MaxPool1dOn2d().double().eval()
    minimize_exact(m, batches((4, 5), (7, 5)))


# ---- 3. in-place statements whose value is unused ------------------------------------------------
class InPlaceStatement(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.z, self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 3)
        dead(self.z, 2, -1.0)  # upstream of the in-place op: z's unit 2 is dead, so the rewrite runs
        dead(self.a, 0, 0.0)   # and, on h itself, a zero unit and an unread unit
        with torch.no_grad():
            self.b.weight[:, 5] = 0

    def forward(self, x):
        h = self.a(torch.relu(self.z(x)))
        if self.form == "relu_":
            h.relu_()
        elif self.form == "mul_":
            h.mul_(3)
        elif self.form == "F.relu(inplace=True)":
            F.relu(h, inplace=True)
        else:
            h.masked_fill_(h < 0, 0)
        return self.b(h)


@pytest.mark.parametrize("form", ["relu_", "mul_", "F.relu(inplace=True)", "masked_fill_"])
def test_in_place_statement_is_not_dead_code(form):
    """Class 3: ``h.relu_()`` etc. as a statement changes h; the rewrite must keep it."""
    torch.manual_seed(0)
    m = InPlaceStatement(form).double().eval()
    s = minimize_exact(m, batches((3, 4), (6, 4)))
    shrinks(s)


# ---- 4. in-place ops on tensors read again / on channel-slice views ------------------------------
class InPlaceThenRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.z, self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 3)
        dead(self.z, 2, -1.0)  # upstream dead unit: the rewrite runs whatever happens to h
        dead(self.a, 0, -1.0)  # h0 = -1 before relu_, 0 after; y0 = -2 (computed before)
        dead(self.a, 3, 0.0)   # a zero unit

    def forward(self, x):
        h = self.a(torch.relu(self.z(x)))
        y = h * 2
        h.relu_()
        return self.b(y + h)


class InPlaceOnSliceView(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        dead(self.a, 1, -0.5)  # constant negative channels 1, 2: relu_ on the view makes them 0
        dead(self.a, 2, -1.5)
        dead(self.a, 4, 0.0)

    def forward(self, x):
        h = self.a(x)
        h[:, 1:3].relu_()
        return self.b(h)


def test_in_place_op_on_a_tensor_read_afterwards():
    """Class 4: ``y = h * 2; h.relu_(); y + h``: h's constants change at relu_."""
    torch.manual_seed(0)
    m = InPlaceThenRead().double().eval()
    s = minimize_exact(m, batches((3, 4), (6, 4)))
    shrinks(s)  # at least z's dead unit goes: the rewrite really ran


def test_in_place_op_on_a_channel_slice_view():
    """Class 4: ``h[:, 1:3].relu_()`` overwrites h's constant channels 1, 2 (stale constants)."""
    torch.manual_seed(0)
    m = InPlaceOnSliceView().double().eval()
    minimize_exact(m, batches((3, 4), (6, 4)))


# ---- 5. train-mode submodule of an eval-mode root -------------------------------------------------
class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.c2.weight[:, 1] = 0

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


def test_train_mode_submodule_under_eval_root_is_a_clear_error():
    """Class 5: ``model.eval(); model.bn.train()`` must raise TrainingModeError naming 'bn'."""
    torch.manual_seed(0)
    m = ConvBN().double()
    m.eval()
    m.bn.train()
    before = _state(m)
    with pytest.raises(sqr_fx.TrainingModeError, match="bn"):
        minimize(m, batches((2, 3, 6, 6))[0])
    _assert_unchanged(m, before)


# ---- 6. forward hooks, pre-hooks and hook-based weight_norm --------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)
        dead(self.a, 0, -1.0)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)
            self.c2.weight[:, 1] = 0  # channel 1 unread: removable

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


class LNHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.ln = nn.Linear(5, 6), nn.Linear(6, 4), nn.LayerNorm(4)
        dead(self.a, 0, -1.0)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.ln(self.b(torch.relu(self.a(x))))


_HOOKED = {  # case -> (model class, submodule name, inputs)
    "linear": (MLP, "a", ((3, 5), (6, 5))),
    "conv": (CNN, "c1", ((2, 3, 6, 6), (3, 3, 6, 6), (2, 3, 5, 9))),
    "batchnorm": (CNN, "bn", ((2, 3, 6, 6), (3, 3, 6, 6), (2, 3, 5, 9))),
    "layernorm": (LNHead, "ln", ((3, 5), (6, 5))),
}


@pytest.mark.parametrize("kind", ["forward_hook", "forward_pre_hook"])
@pytest.mark.parametrize("case", list(_HOOKED))
def test_hooks_are_part_of_the_function(case, kind):
    """Class 6: a forward hook ``o * 2 + 1`` / pre-hook ``(i[0] ** 2 + 1,)`` on a leaf module must be kept."""
    torch.manual_seed(0)
    cls, name, shapes = _HOOKED[case]
    m = cls().double().eval()
    mod = m.get_submodule(name)
    if kind == "forward_hook":
        mod.register_forward_hook(lambda _m, _i, o: o * 2 + 1)
    else:
        # (i[0] + 1,) as in the issue, squared so that LayerNorm (shift invariant) cannot ignore it
        mod.register_forward_pre_hook(lambda _m, i: (i[0] * i[0] + 1,))
    minimize_exact(m, batches(*shapes))


@pytest.mark.parametrize("case", ["linear", "conv"])
def test_hook_based_weight_norm_is_exact(case):
    """Class 6: ``torch.nn.utils.weight_norm`` recomputes the weight from g, v in a pre-hook."""
    torch.manual_seed(0)
    cls, name, shapes = _HOOKED[case]
    m = cls().double().eval()
    mod = m.get_submodule(name)
    with torch.no_grad():  # no zero row in v (0 / 0 = nan): the zero row is planted through g below
        mod.weight.copy_(torch.randn_like(mod.weight) * 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.nn.utils.weight_norm(mod)
    with torch.no_grad():  # plant after weight_norm, through its own parameters (g row 0 -> weight row 0)
        mod.weight_g[0] = 0
        mod.bias[0] = -1.0
        mod.weight_g.mul_(1.5)  # the cached ``weight`` attribute is stale until the next forward
    minimize_exact(m, batches(*shapes))


# ---- 7. augmented assignment on an aliased tensor -------------------------------------------------
class AliasIadd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        dead(self.a, 0, -1.0)  # relu -> 0 ... but += 1 makes it 1, through the alias too

    def forward(self, x):
        h = torch.relu(self.a(x))
        ident = h
        h += 1  # in place in eager: ident sees it; symbolic_trace records an out-of-place add
        return self.b(ident)


def test_augmented_assignment_through_an_alias():
    """Class 7: ``ident = h; h += 1; return f(ident)``: exact or a clear SqrFxError."""
    torch.manual_seed(0)
    m = AliasIadd().double().eval()
    exact_or_clear_error(m, batches((3, 4), (6, 4)))


# ---- 8. squeeze() traced at batch 1, then split / chunk on the channel axis ---------------------
class SqueezeSplit(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(3, 2), nn.Linear(3, 2)
        dead(self.a, 1, -1.0)
        dead(self.a, 4, -1.0)

    def forward(self, x):
        h = torch.relu(self.a(x)).squeeze()  # [6] at batch 1, [N, 6] otherwise
        p, q = torch.split(h, 3, dim=-1) if self.how == "split" else torch.chunk(h, 2, dim=-1)
        return self.b(p) + self.c(q)


@pytest.mark.parametrize("how", ["split", "chunk"])
def test_squeeze_traced_at_batch_one_then_split_runs_at_batch_three(how):
    """Class 8: traced at batch 1 the squeezed tensor has no batch axis; batch 3 must still be exact."""
    torch.manual_seed(0)
    m = SqueezeSplit(how).double().eval()
    s = minimize_exact(m, batches((1, 4), (3, 4), (5, 4)))
    # squeeze() without axes drops the batch axis only at batch 1, so the channel axis has no fixed
    # position: the front end keeps what it touches (exact, nothing removed through it)
    assert s.sqr_report.params_after == s.sqr_report.params_before


# ---- 9. keyword forms of binary ops -------------------------------------------------------------
class KeywordBinary(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)
        dead(self.a, 0, -1.0)  # dead in a only
        dead(self.b, 1, -1.0)  # dead in b only
        dead(self.a, 3, -1.0)  # dead in both
        dead(self.b, 3, -1.0)
        dead(self.a, 4, 0.5)   # constant in a only
        dead(self.b, 5, 0.25)  # constant in b only

    def forward(self, x):
        h1, h2 = torch.relu(self.a(x)), torch.relu(self.b(x))
        return self.c(self.op(input=h1, other=h2))


@pytest.mark.parametrize("op", [torch.add, torch.mul, torch.maximum], ids=["add", "mul", "maximum"])
def test_keyword_binary_ops(op):
    """Class 9: ``torch.add(input=a, other=b)`` and friends: both operands count."""
    torch.manual_seed(0)
    m = KeywordBinary(op).double().eval()
    minimize_exact(m, batches((3, 4), (6, 4)))


# ---- 10. a zero channel read through an inf / nan weight ----------------------------------------
class ZeroTimesInfLinear(nn.Module):
    def __init__(self, bad):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        dead(self.a, 2, 0.0)  # exactly zero
        with torch.no_grad():
            self.b.weight[0, 2] = bad  # 0 * inf = 0 * nan = nan in the original

    def forward(self, x):
        return self.b(self.a(x))


class ZeroTimesInfConv(nn.Module):
    def __init__(self, bad):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 3, 1)
        dead(self.c1, 2, 0.0)
        with torch.no_grad():
            self.c2.weight[0, 2] = bad

    def forward(self, x):
        return self.c2(self.c1(x))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("case", ["linear", "conv"])
def test_zero_channel_times_inf_or_nan_weight_stays_nan(case, bad):
    """Class 10: a zero channel read by an inf/nan weight gives nan in the original; keep it."""
    torch.manual_seed(0)
    if case == "linear":
        m, shapes = ZeroTimesInfLinear(bad).double().eval(), ((3, 4), (6, 4))
    else:
        m, shapes = ZeroTimesInfConv(bad).double().eval(), ((2, 3, 4, 4), (3, 3, 4, 4), (2, 3, 5, 7))
    inputs = batches(*shapes)
    with torch.no_grad():
        assert m(*inputs[0]).isnan().any()  # test sanity: the original does output nan
    minimize_exact(m, inputs)


# ---- 11. raw internal errors -> exact results or clear SqrFxErrors ------------------------------
class IndexSelectBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("idx", torch.tensor([1, 0]))
        dead(self.a, 2, -1.0)

    def forward(self, x):
        return self.b(torch.index_select(torch.relu(self.a(x)), 0, self.idx))  # rows, not channels


class Conv1dThenAxes(nn.Module):
    """Conv1d on [N, C, L], then an axis permutation written with keyword arguments, then Linear."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.c, self.lin = nn.Conv1d(3, 6, 1), nn.Linear(6, 3)
        dead(self.c, 1, -1.0)
        dead(self.c, 4, 0.0)

    def forward(self, x):
        h = torch.relu(self.c(x))
        if self.how == "permute":
            h = torch.permute(h, dims=(0, 2, 1))
        elif self.how == "transpose":
            h = torch.transpose(h, dim0=1, dim1=2)
        else:
            h = torch.movedim(h, (1, 2), (2, 1))
        return self.lin(h)


class KeywordMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.lin = nn.Conv1d(3, 6, 3), nn.Linear(6, 3)
        dead(self.c, 1, -1.0)
        dead(self.c, 4, 0.5)

    def forward(self, x):
        return self.lin(torch.mean(input=torch.relu(self.c(x)), dim=2))


class KeywordReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        dead(self.a, 1, -1.0)
        dead(self.a, 4, 0.5)

    def forward(self, x):  # [B, T, 4]
        return self.b(torch.reshape(input=torch.relu(self.a(x)), shape=(-1, 6)))


class KeywordMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.W = nn.Parameter(torch.randn(6, 3))
        dead(self.a, 1, -1.0)
        dead(self.a, 4, 0.5)

    def forward(self, x):
        return torch.matmul(input=torch.relu(self.a(x)), other=self.W)


class MixerTokenMixing(nn.Module):
    """MLP-Mixer: token mixing is a Linear over the token axis, between two transposes."""

    def __init__(self, tokens=5, channels=4):
        super().__init__()
        self.tok = nn.Linear(tokens, tokens)
        self.ch, self.out = nn.Linear(channels, 6), nn.Linear(6, 3)
        dead(self.tok, 2, 0.0)  # mixed token 2 is zero
        dead(self.ch, 1, -1.0)  # a dead channel

    def forward(self, x):  # [B, T, C]
        x = self.tok(x.transpose(1, 2)).transpose(1, 2)
        return self.out(torch.relu(self.ch(x)))


class Wav2VecFront(nn.Module):
    def __init__(self, unsqueeze: bool = False):
        super().__init__()
        self.unsqueeze = unsqueeze
        self.c, self.lin = nn.Conv1d(1, 6, 3, stride=2), nn.Linear(6, 3)
        dead(self.c, 1, -1.0)
        dead(self.c, 4, 0.3)

    def forward(self, x):  # [B, L] raw audio -> [B, 1, L]
        h = x.unsqueeze(1) if self.unsqueeze else x[:, None]
        return self.lin(torch.relu(self.c(h)).mean(-1))


class MaskedWeightConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)
        self.b = nn.Parameter(torch.randn(4) * 0.1)
        mask = torch.ones(4, 3, 3, 3)
        mask[1] = 0
        self.register_buffer("mask", mask)
        self.c2 = nn.Conv2d(4, 5, 1)
        with torch.no_grad():
            self.b[1] = -1.0  # channel 1 is dead after relu

    def forward(self, x):
        return self.c2(torch.relu(F.conv2d(x, self.w * self.mask, self.b, padding=1)))


class TransposedWeightLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 6))  # stored [in, out]
        self.bias = nn.Parameter(torch.randn(6))
        self.out = nn.Linear(6, 3)
        with torch.no_grad():
            self.W[:, 2] = 0
            self.bias[2] = -1.0

    def forward(self, x):
        return self.out(torch.relu(F.linear(x, self.W.t(), self.bias)))


class WSConv(nn.Module):
    """Weight standardization computed in forward; a zero filter standardizes to zero."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.b = nn.Parameter(torch.randn(4) * 0.1)
        self.c2 = nn.Conv2d(4, 5, 1)
        with torch.no_grad():
            self.w[1] = 0
            self.b[1] = 0.7  # channel 1 is the constant 0.7

    def forward(self, x):
        w = self.w
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self.c2(torch.relu(F.conv2d(x, w, self.b, padding=1)))


_RAW = {  # case -> (model factory, input shapes)
    "index_select_batch_axis": (IndexSelectBatch, ((2, 4), (3, 4))),
    "permute_dims_kw": (lambda: Conv1dThenAxes("permute"), ((2, 3, 5), (3, 3, 5), (2, 3, 7))),
    "transpose_dim0_dim1_kw": (lambda: Conv1dThenAxes("transpose"), ((2, 3, 5), (3, 3, 5), (2, 3, 7))),
    "movedim_tuples": (lambda: Conv1dThenAxes("movedim"), ((2, 3, 5), (3, 3, 5), (2, 3, 7))),
    "mean_input_kw": (KeywordMean, ((2, 3, 8), (3, 3, 8), (2, 3, 11))),
    "reshape_input_kw": (KeywordReshape, ((2, 5, 4), (3, 5, 4), (2, 7, 4))),
    "matmul_input_kw": (KeywordMatmul, ((3, 4), (6, 4))),
    "mlp_mixer_token_mixing": (MixerTokenMixing, ((2, 5, 4), (3, 5, 4))),
    "wav2vec_x_none_conv1d": (Wav2VecFront, ((2, 16), (3, 16), (2, 21))),
    "wav2vec_unsqueeze_conv1d": (lambda: Wav2VecFront(unsqueeze=True), ((2, 16), (3, 16), (2, 21))),
    "conv_weight_times_mask": (MaskedWeightConv, ((2, 3, 6, 6), (3, 3, 6, 6), (2, 3, 5, 9))),
    "linear_weight_t": (TransposedWeightLinear, ((3, 4), (6, 4))),
    "weight_standardized_conv": (WSConv, ((2, 3, 6, 6), (3, 3, 6, 6), (2, 3, 5, 9))),
}


@pytest.mark.parametrize("case", list(_RAW))
def test_no_raw_internal_errors(case):
    """Class 11: each of these used to raise a raw KeyError/IndexError/ValueError/TypeError inside
    the pass; it must give an exact result or a clear SqrFxError."""
    torch.manual_seed(0)
    factory, shapes = _RAW[case]
    m = factory().double().eval()
    exact_or_clear_error(m, batches(*shapes))


# ---- 12. misleading "does not run" errors -------------------------------------------------------
class PerChannelClampPow(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.P = nn.Parameter(torch.rand(6) * 0.3 + 0.5)  # one value per channel
        dead(self.a, 1, -1.0)
        with torch.no_grad():
            self.b.weight[:, 4] = 0  # unit 4 unread

    def forward(self, x):
        if self.op == "clamp":
            h = torch.clamp(torch.relu(self.a(x)), min=self.P)
        else:
            h = torch.pow(torch.sigmoid(self.a(x)), self.P)
        return self.b(h)


class ExpandAsGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Linear(4, 6), nn.Linear(4, 1), nn.Linear(6, 3)
        dead(self.a, 1, -1.0)
        with torch.no_grad():
            self.b.weight[:, 4] = 0

    def forward(self, x):
        y = torch.relu(self.a(x))
        g = torch.sigmoid(self.g(x))  # [N, 1]
        return self.b(y * g.expand_as(y))


class UnbatchedMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.mha = nn.MultiheadAttention(8, 2)
        dead(self.inp, 1, 0.0)

    def forward(self, x):  # [L, 4]: no batch axis
        h = self.inp(x)
        return self.out(self.mha(h, h, h, need_weights=False)[0])


class UnbatchedConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 6, 3), nn.Conv1d(6, 4, 1)
        dead(self.c1, 1, -1.0)
        dead(self.c1, 4, 0.5)

    def forward(self, x):  # [C, L]
        return self.c2(torch.relu(self.c1(x)))


class UnbatchedConv2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3, padding=1)  # padded: constants need a correction
        dead(self.c1, 1, -1.0)
        dead(self.c1, 4, 0.5)

    def forward(self, x):  # [C, H, W]
        return self.c2(torch.relu(self.c1(x)))


_MISLEADING = {
    "clamp_min_per_channel_param": (lambda: PerChannelClampPow("clamp"), ((3, 4), (6, 4))),
    "pow_per_channel_param": (lambda: PerChannelClampPow("pow"), ((3, 4), (6, 4))),
    "expand_as": (ExpandAsGate, ((3, 4), (6, 4))),
    "mha_unbatched": (UnbatchedMHA, ((5, 4), (7, 4), (2, 4))),
    "conv1d_unbatched": (UnbatchedConv1d, ((3, 10), (3, 7))),
    "conv2d_unbatched": (UnbatchedConv2d, ((3, 8, 8), (3, 6, 10))),
}


@pytest.mark.parametrize("case", list(_MISLEADING))
def test_no_misleading_does_not_run_error(case):
    """Class 12: the original runs on the example inputs, so 'does not run on example_inputs'
    (raised on minimize's own broken rewrite) is wrong: exact result or a clear SqrFxError."""
    torch.manual_seed(0)
    factory, shapes = _MISLEADING[case]
    m = factory().double().eval()
    exact_or_clear_error(m, batches(*shapes))


# ---- 13. lost removals ---------------------------------------------------------------------------
class ZeroHead(nn.Module):
    def __init__(self, mid: str):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.mid = nn.LayerNorm(6) if mid == "layernorm" else nn.ReLU()
        with torch.no_grad():
            self.b.weight.zero_()  # the output is b's bias whatever comes in

    def forward(self, x):
        return self.b(self.mid(self.a(x)))


@pytest.mark.parametrize("mid", ["relu", "layernorm"])
def test_all_zero_reader_after_layer_norm_removes_upstream(mid):
    """Class 13: Linear -> LayerNorm -> Linear(weight 0): everything upstream can go (as with ReLU)."""
    torch.manual_seed(0)
    m = ZeroHead(mid).double().eval()
    s = minimize_exact(m, batches((3, 4), (6, 4)))
    shrinks(s)


class ReadsMetadata(nn.Module):
    def __init__(self, read: str):
        super().__init__()
        self.read = read
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.c2.weight[:, 1] = 0  # channel 1 unread: c1 row 1 and bn entry 1 can go

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        if self.read == "ndim":
            torch._assert(h.ndim == 4, "expected NCHW")
        elif self.read == "dtype":
            h = h * torch.ones((), dtype=h.dtype)
        elif self.read == "device":
            h = h + torch.zeros((), device=h.device)
        return self.c2(h)


@pytest.mark.parametrize("read", ["none", "ndim", "dtype", "device"])
def test_reading_ndim_dtype_device_does_not_freeze_channels(read):
    """Class 13: ``h.ndim`` / ``h.dtype`` / ``h.device`` do not depend on the channel count: still shrinks."""
    torch.manual_seed(0)
    m = ReadsMetadata(read).double().eval()
    s = minimize_exact(m, batches((2, 3, 6, 6), (3, 3, 6, 6), (2, 3, 5, 9)))
    shrinks(s)


# ---- identity index_select on the channel axis: its index tensor must follow the kept channels -----
class IdentityGather(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
        self.register_buffer("idx", torch.arange(6))
        with torch.no_grad():
            self.a.weight[2], self.a.bias[2] = 0, -1.0  # dead after relu

    def forward(self, x):
        return self.b(torch.index_select(torch.relu(self.a(x)), 1, self.idx))


def test_identity_index_select_follows_removed_channels():
    torch.manual_seed(0)
    m = IdentityGather().double().eval()
    s = minimize_exact(m, batches((3, 4), (5, 4)))
    shrinks(s)
    s2 = minimize_exact(s, batches((3, 4), (5, 4)))  # and again: no stale index in a later round
    assert s2.sqr_report.rounds == 0


# ---- a channels-last graph input: its axis 1 is spatial, never gathered (found by the fuzzer) ------
class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):  # x: [B, H, W, C]; the last row of H is cropped away
        return self.fc(x[:, :-1])


def test_channels_last_input_axis_is_not_gathered():
    torch.manual_seed(0)
    m = ChannelsLast().double().eval()
    minimize_exact(m, [(torch.randn(2, 4, 4, 5, dtype=torch.float64),), (torch.randn(2, 7, 8, 5, dtype=torch.float64),)])



class SignalAttention(nn.Module):
    """An unbatched [C, L] signal, its last step cropped, attended over time and averaged: the output's shape
    does not depend on L, its value does."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(7, 1)

    def forward(self, x):
        y = x[:, :-1].t()
        return self.mha(y, y, y)[0].mean(0)


def test_signal_axis_is_not_gathered_when_the_front_end_rewrites_a_module():
    """Input axis 1 of a [C, L] signal is time, which the model takes at any length: the front end probes that
    on its copy of the model. It used to probe after making the attention functional, which takes
    ``in_proj_weight`` off the copy's module: the probe failed, axis 1 counted as channels, and the unread last
    step was gathered away by position: at another length the result averaged 8 fixed steps (silently wrong
    with ``verify=False``; fuzz run 17, case 2020006721)."""
    torch.manual_seed(0)
    m = SignalAttention().double().eval()
    x9, x12 = (torch.randn(7, n, dtype=torch.float64) for n in (9, 12))
    s = minimize(m, (x9,), verify=False)
    assert s.sqr_report.input_features_dropped == 0
    check_equivalence(m, s, (x12,))
    check_equivalence(m, minimize(m, (x9,)), (x12,))


# ---- found by the long fuzz run ---------------------------------------------------------------------
class DimRead(nn.Module):
    """x.dim() reads the graph input: the input gather must still be recognized (no new gather per round)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            self.fc.weight[:, 2] = 0  # input feature 2 unread

    def forward(self, x):
        return self.fc(x.unsqueeze(x.dim()).squeeze(-1))


def test_input_read_by_dim_reaches_a_fixpoint():
    m = DimRead().double().eval()
    s = minimize_exact(m, batches((3, 6), (5, 6)))
    assert s.sqr_report.rounds == 1 and s.sqr_report.input_features_dropped == 1


class FlatSlice(nn.Module):
    """The last 15 features of a flattened conv map: positions move with the spatial size."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(15, 2)
        with torch.no_grad():
            self.conv.weight[1], self.conv.bias[1] = 0, -1.0

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1)[:, -15:])


def test_slice_of_a_flattened_channel_axis_is_declined():
    m = FlatSlice().double().eval()
    minimize_exact(m, [(torch.randn(2, 3, 4, 4, dtype=torch.float64),), (torch.randn(2, 3, 6, 7, dtype=torch.float64),)])


class LiteralReshape(nn.Module):
    """``reshape(-1, 6)`` of a [B, 6, 1, 1, 1] conv map keeps channels on axis 1 at the traced size
    only: at another spatial size each row holds 6 positions of one channel (fuzz seed 31337097166)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.conv, self.fc = nn.Conv3d(4, 6, 2, stride=2, dilation=2), nn.Linear(6, 3)
        dead(self.conv, 1, 0.5)  # constant channel 1: folded into fc at the traced size

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = h.reshape(-1, 6) if self.form == "literal" else h.view(h.size(0), -1)
        return self.fc(h)


@pytest.mark.parametrize("form", ["literal", "size_read"])
def test_reshape_whose_channel_layout_depends_on_the_input_size(form):
    m = LiteralReshape(form).double().eval()
    inputs = batches((3, 4, 3, 4, 3), (2, 4, 5, 6, 5), (1, 4, 3, 4, 3))
    if form == "literal":  # the original accepts the larger size; channel 1 must stay
        s = minimize_exact(m, inputs)
        assert s.sqr_report.params_after == s.sqr_report.params_before
    else:  # view(B, -1) feeding a 6-wide linear accepts the traced spatial size only: removal is exact
        shrinks(minimize_exact(m, [inputs[0], inputs[2]]))


class ClipInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        dead(self.a, 2, -1.0)  # clips to the constant -0.6: folded into b
        with torch.no_grad():
            self.b.weight[:, 5] = 0  # unit 5 unread

    def forward(self, x):
        h = self.a(x)
        h.clip_(-0.6, 0.4)
        return self.b(h)


def test_an_in_place_aten_op_without_its_own_entry_reads_as_its_functional_op():
    """``aten.clip_`` in an exported graph: after the front end re-points its readers it is ``aten.clip`` on a
    fresh tensor, and the pointwise rule follows it (fuzz case 515152547035 froze everything upstream)."""
    m = ClipInPlace().double().eval()
    ep = torch.export.export(m, (torch.randn(2, 6, dtype=torch.float64),)).module()
    assert any("clip_" in str(n.target) for n in ep.graph.nodes)
    s = minimize_exact(ep, batches((2, 6)))
    assert s.sqr_report.params_after == s.sqr_report.params_before - 2 * (6 + 1) - 2 * 3


class ParamExpandAs(nn.Module):
    """A position table broadcast with ``expand_as`` to a layer output whose channels shrink (fuzz run 3:
    the rewrite wrote expand sizes into expand_as and the op was set aside)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
        self.pos = nn.Parameter(torch.randn(1, 6))
        dead(self.a, 3, -1.0)
        with torch.no_grad():
            self.b.weight[:, 1] = 0

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h + self.pos.expand_as(h))


def test_a_parameter_expanded_as_a_shrinking_tensor():
    m = ParamExpandAs().double().eval()
    s = minimize_exact(m, batches((3, 4), (5, 4)))
    shrinks(s)
    assert not s.sqr_report.set_aside and not [f for f in s.sqr_report.frozen_ops if "failed" in f]


# ---- a module called more than once (fuzz run 10) ------------------------------------------------
class _TwiceCalled(nn.Module):
    """One ``Linear`` applied twice, ``lin(lin(x))``, the output's odd units never read.

    ``first``: how the first call is written (``input=`` keyword or positional). ``hook``: the module
    has a forward hook, so it stays a ``call_module`` while ``F.linear`` reads its weight elsewhere."""

    def __init__(self, first: str, hook: bool):
        super().__init__()
        self.first, self.hook = first, hook
        self.lin = nn.Linear(5, 5)
        self.register_buffer("idx", torch.tensor([0, 2, 4, 4, 4]))
        if hook:
            self.lin.register_forward_hook(lambda _m, _i, o: o * 2 + 1)

    def forward(self, x):
        h = self.lin(input=x) if self.first == "keyword" else self.lin(x)
        h = F.linear(h, self.lin.weight, self.lin.bias) if self.hook else self.lin(h)
        return torch.index_select(h, -1, self.idx)


@pytest.mark.parametrize("first", ["keyword", "positional"])
@pytest.mark.parametrize("hook", [False, True], ids=["plain", "hooked"])
def test_a_module_called_twice_keeps_one_weight_for_both_calls(first, hook):
    """Fuzz run 10 (case 848486546330): ``lin(input=x)`` stayed a module call (the keyword form was not
    functionalized) while the second call read the weight through ``get_attr``; the rewrite cut the
    weight's unread rows for the second call, and the module call kept reading the cut weight. A weight
    read by a module call and by any other op is tied now (kept whole), and the keyword call is
    functionalized like the positional one."""
    torch.manual_seed(0)
    m = _TwiceCalled(first, hook).double().eval()
    result = minimize_exact(m, batches((3, 5), (1, 5), (2, 4, 5)))
    assert result.sqr_report.params_after == result.sqr_report.params_before  # both calls read all of it
    from sqr_fx.trace import to_graph

    gm, _ = to_graph(m, (torch.randn(3, 5, dtype=torch.float64),))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == (["lin"] if hook else []), calls  # a hooked module stays a module; else both are F.linear


def test_the_rewrite_never_writes_into_a_module_it_carries_over():
    """``minimize`` goes back to the previous graph when a round fails; the rewrite must not have put a
    tensor into one of that graph's modules (it copies a carried module before installing under it)."""
    from sqr_fx.analysis import Analysis
    from sqr_fx.rewrite import rewrite
    from sqr_fx.trace import to_graph

    m = _TwiceCalled("positional", hook=True).double().eval()
    gm, _ = to_graph(m, (torch.randn(3, 5, dtype=torch.float64),))
    mod = gm.get_submodule("lin")
    before = {k: v for k, v in mod._parameters.items()}
    new = rewrite(gm, Analysis(gm).run().plan())
    assert {k: v for k, v in mod._parameters.items()} == before
    assert all(a is b for a, b in zip(mod._parameters.values(), before.values()))
    assert new.get_submodule("lin") is not mod


# ---- review of session 8: export's size-1 assumption, global module hooks ----------------------------------
class _BranchOnSize(nn.Module):
    """A dead unit (removable), and a branch on a size: ``symbolic_trace`` fails, so the model goes through
    ``torch.export``, whose ``Dim.AUTO`` assumes that size is at least 2 and keeps only that branch."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis
        self.a, self.o = nn.Linear(6, 5), nn.Linear(5, 4)
        with torch.no_grad():
            self.a.weight[2] = 0
            self.a.bias[2] = -1.0

    def forward(self, x):
        h = self.o(torch.relu(self.a(x)))
        if x.shape[self.axis] > 1:
            h = h - h.mean(self.axis, keepdim=True)
        return h


@pytest.mark.parametrize("axis", [0, 1], ids=["batch", "sequence"])
@pytest.mark.parametrize("verify", [True, False])
def test_a_size_the_exported_program_assumed_away_is_refused_not_answered(axis, verify):
    """The result of the export front end answered batch 1 with the branch of batch >= 2 (0 instead of the
    model's outputs), and the self-check never tried size 1. Now the front end runs model and program at
    size 1 of each dynamic axis: where they differ, the program (and the result) refuse that size with a
    "Guard failed" error, and the self-check (which tries batch 1 too) lists it in ``fixed_shapes``."""
    torch.manual_seed(0)
    m = _BranchOnSize(axis).double().eval()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    r = minimize(m, (x,), verify=verify)
    assert r.sqr_report.frontend == "export"
    assert r.sqr_report.params_after < r.sqr_report.params_before
    assert_exact(m, r, batches((4, 5, 6), (3, 7, 6)))
    one = list(x.shape)
    one[axis] = 1
    with pytest.raises(AssertionError, match="Guard failed"):
        r(torch.randn(*one, dtype=torch.float64))
    if verify and axis == 0:
        assert "batch 1" in r.sqr_report.fixed_shapes


def test_an_exported_model_that_does_not_branch_keeps_batch_one():
    """No guard where the program agrees with the model at size 1 (export's assumption is harmless there)."""
    torch.manual_seed(0)

    class NoBranch(_BranchOnSize):
        def forward(self, x):
            h = self.o(torch.relu(self.a(x)))
            return h * x.shape[0]  # a size read as a number: symbolic_trace cannot, export can

    m = NoBranch(0).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    r = minimize(m, (x,))
    assert r.sqr_report.params_after < r.sqr_report.params_before
    assert "batch 1" not in r.sqr_report.fixed_shapes
    assert_exact(m, r, batches((4, 6), (1, 6), (3, 6)))


@pytest.mark.parametrize("front", ["fx", "export"])
def test_global_module_hooks_run_once(front):
    """A hook for every module (``register_module_forward_hook``) ran inside the exported graph and again in
    the Linear modules the result is made of. Global hooks now make every module hooked: kept a module
    (frozen), never functionalized nor made back from a functional call."""
    import torch.nn.modules.module as module

    torch.manual_seed(0)
    m = _BranchOnSize(0).double().eval() if front == "export" else nn.Sequential(
        nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double().eval()
    handle = module.register_module_forward_hook(lambda mod, i, o: o + 0.1 if isinstance(mod, nn.Linear) else None)
    try:
        r = minimize(m, (torch.randn(4, 6, dtype=torch.float64),), verify=False)
        assert_exact(m, r, batches((4, 6), (3, 6)))
    finally:
        handle.remove()


@pytest.mark.parametrize("op", ["detach_", "relu_", "iadd", "F_inplace"])
def test_an_in_place_op_on_a_rewritten_producer_that_now_returns_a_view(op):
    """Fuzz run 12: ``h = F.linear(x, W); h.detach_()`` where the rewrite gave the linear a bias (a folded
    constant input channel): a 3-D linear with a bias returns a view, and ``detach_`` of a view raises. The
    rewritten graph writes such in-place ops (no other tensor argument) out of place, which the front end's
    data flow makes exact."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.w = nn.Linear(4, 3), nn.Parameter(torch.randn(6, 3))
            with torch.no_grad():
                self.a.weight[1] = 0
                self.a.bias[1] = 0.5  # a constant channel: folded into a new bias of the second linear

        def forward(self, x):
            h = F.linear(self.a(x), self.w)  # no bias: not a view; the rewrite adds one
            if op == "detach_":
                h.detach_()
            elif op == "relu_":
                h.relu_()
            elif op == "iadd":
                h += 1.0
            else:
                F.relu(h, inplace=True)
            return h

    m = M().double().eval()
    r = minimize_exact(m, batches((2, 5, 4), (3, 2, 4)))
    assert r.sqr_report.params_after < r.sqr_report.params_before


def test_an_in_place_op_with_a_second_tensor_stays_in_place():
    """The guard of ``rewrite._out_of_place``: ``h.mul_(s)`` with a float64 ``s`` on a float32 ``h`` keeps h's
    dtype in place; written out of place it would promote to float64. Such ops (another tensor argument)
    stay in place, so the result's dtype and values are the model's."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)
            self.register_buffer("s", torch.tensor([1.5, 2.0, 0.5], dtype=torch.float64))
            with torch.no_grad():
                self.a.weight[1] = 0
                self.a.bias[1] = -1.0

        def forward(self, x):
            h = torch.relu(self.a(x))
            h.mul_(self.s)
            return self.b(h)

    m = M().eval()
    x = torch.randn(5, 4)
    r = minimize(m, (x,))
    assert r.sqr_report.params_after < r.sqr_report.params_before
    assert "mul_" in r.code
    out = r(torch.randn(3, 4))
    assert out.dtype == torch.float32
    check_equivalence(m, r, (torch.randn(3, 4),), rtol=1e-5, atol=1e-6)


def test_a_name_bound_to_two_live_tensors_is_a_rule_failure():
    """Rewriter.attr: a later rule writing a name supersedes the earlier tensor, which is right only where the
    earlier reader is dead (an unchanged get_attr a rule re-emits). Two live readers of one name given two
    tensors (fuzz run 14's Swin naming bug) raise RuleFailure, which minimize contains (the round is redone with
    the node frozen), instead of sharing one tensor silently."""
    import numpy as np
    from torch import fx

    from sqr_fx.analysis import Plan
    from sqr_fx.rewrite import Rewriter, RuleFailure

    gm = fx.symbolic_trace(torch.nn.Identity())
    for both_live in (True, False):
        R = Rewriter(gm, Plan(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)))
        x = R.graph.placeholder("x")
        R._current = "first"
        a = R.attr("w", torch.ones(2))
        R._current = "second"
        b = R.attr("w", torch.zeros(2))
        out = (R.graph.call_function(torch.add, (x, a)), R.graph.call_function(torch.add, (x, b))) if both_live \
            else R.graph.call_function(torch.add, (x, b))
        R.graph.output(out)
        R.graph.eliminate_dead_code()
        if both_live:
            with pytest.raises(RuleFailure, match="node first"):
                R._check_names()
        else:
            R._check_names()
