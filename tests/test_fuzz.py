"""The generative differential fuzzer (``sqr_fx.testing``) in CI.

* a fixed-seed slice of random pruned models (every argument form, both front ends): no wrong output,
  no raw error, the original untouched, a fixpoint reached; deterministic, well under 2 minutes on
  one core. ``make fuzz N=10000`` runs the long version.
* coverage: every rule family in ``RULES`` and every non-aten target (function, ``Method``, module
  type) is produced by some generator, or listed below with the reason it is not. A rule registered
  without a generator fails here: add its forms to ``sqr_fx/testing/gen_*.py``.
"""
from __future__ import annotations

import operator
import time

import pytest
import torch
import torch.nn.functional as F
from torch.fx._symbolic_trace import _assert_is_none
from torchvision.ops import StochasticDepth
from torchvision.ops.misc import Permute

from sqr_fx.rules import RULES
from sqr_fx.rules.registry import Method
from sqr_fx.rules.weighted import ones_map
from sqr_fx.testing import Case, build, check_case, generate_case, run_case
from sqr_fx.testing.core import Op
from sqr_fx.testing.coverage import STATES, all_variants, export_keys, is_aten, produced_keys
from sqr_fx.testing.fuzz import FAILURES, SLOW_EXPORT, fuzz, regression_file, summary

# Swin blocks are left to `make fuzz`: when a graph falls back to torch.export, its dynamic-shape trace of
# the window partition alone takes 15-40 s (they are covered below, and by every long run)
CI_SEED, CI_N = 20251126, 100


def test_ci_slice_has_no_wrong_output_and_no_raw_error():
    """No wrong output, no raw error; also no modified original, no missed fixpoint, no generator error
    (each listed with its recipe and the ``Case(...)`` that rebuilds it)."""
    t0 = time.perf_counter()
    results, _, _ = fuzz(CI_N, seed=CI_SEED, shrink_per_class=0, log=lambda *a: None, exclude=SLOW_EXPORT)
    table = summary(results, time.perf_counter() - t0)
    bad = [r for r in results if r.status in FAILURES]
    assert len(results) == CI_N
    assert not bad, f"{len(bad)} failing graphs:\n{table}\n\n" + "\n\n".join(
        f"{r.status}: {r.detail}\n  recipe: {r.case.recipe()}\n  rebuild: {r.case!r}" for r in bad[:8])
    # the slice exercises what it claims to: removals, the export dialect, the export fallback
    assert sum(r.removed for r in results) >= CI_N // 4, table
    assert {r.case.frontend for r in results} == {"fx", "export", "fallback"}, table
    assert any(r.frontend == "export" for r in results), table


def test_cases_are_plain_data_that_rebuild_exactly():
    case = generate_case(7)
    again = eval(repr(case), {"Case": Case, "Op": type(case.ops[0]), "slice": slice})  # noqa: S307
    assert repr(again) == repr(case) and again.recipe() == case.recipe()
    x = case.example()
    with torch.no_grad():
        torch.testing.assert_close(build(case).model(x.clone()), build(again).model(x.clone()), rtol=0, atol=0)
    text = regression_file(run_case(case))
    namespace: dict = {}
    exec(compile(text, "regression.py", "exec"), namespace)  # noqa: S102 - the file --save writes
    assert namespace["CASE"].recipe() == case.recipe() and namespace["check_case"] is check_case


# ---- coverage --------------------------------------------------------------------------------------------
# Tensor-method names registered in RULES that torch.Tensor does not have in this torch version: no
# call_method node can carry them (the pointwise rule registers Method(name) for every name it knows).
NO_SUCH_METHOD = (
    "alpha_dropout", "celu", "dropout", "dropout1d", "dropout2d", "dropout3d", "elu", "elu_",
    "feature_alpha_dropout", "gelu", "hardsigmoid", "hardsigmoid_", "hardswish", "hardswish_", "hardtanh",
    "hardtanh_", "leaky_relu", "leaky_relu_", "logsigmoid", "mish", "native_dropout", "relu6", "selu", "silu",
    "silu_", "softplus", "softshrink", "softsign", "tanhshrink", "threshold", "_to_copy",
)

EXCLUDED = {  # non-aten RULES keys no generator produces, with the reason
    **{Method(n): "not a torch.Tensor method in this torch" for n in NO_SUCH_METHOD},
    # the pointwise rule looks names up with getattr(torch, name): "float", "double", "half", "bfloat16"
    # resolve to dtype objects, which are no op's target
    torch.float32: "a dtype (torch.float), not a callable: registry artifact",
    torch.float64: "a dtype (torch.double), not a callable: registry artifact",
    torch.float16: "a dtype (torch.half), not a callable: registry artifact",
    torch.bfloat16: "a dtype, not a callable: registry artifact",
    # casts to a narrower float: exactness is defined at float64, and a last-bit difference of a fold
    # becomes a rounding flip after the cast (the generators cast float64 -> float64 only)
    Method("float"): "lossy cast, not comparable at rtol 1e-7",
    Method("half"): "lossy cast, not comparable at rtol 1e-7",
    Method("bfloat16"): "lossy cast, not comparable at rtol 1e-7",
    # Python wrappers symbolic_trace traces through (F.sigmoid(x) records x.sigmoid(); F.tanh likewise)
    F.sigmoid: "traced through by symbolic_trace (becomes Method('sigmoid'), generated)",
    F.tanh: "traced through by symbolic_trace (becomes Method('tanh'), generated)",
    F.upsample: "deprecated wrapper, traced through by symbolic_trace (becomes F.interpolate, generated)",
    # torchvision modules that are not torch.nn leaves: symbolic_trace traces through them
    StochasticDepth: "traced through (becomes torchvision stochastic_depth, generated)",
    Permute: "traced through (becomes torch.permute, generated)",
    # emitted only by minimize's own rewrite (the padded-conv constant fold); the fuzzer's fixpoint check
    # (minimize of a minimized graph) analyzes it
    ones_map: "emitted by minimize itself; covered by the fuzzer's second-minimize check",
    # a transformers custom op (exists once transformers is imported): tests/test_moe_t5_norms.py
    "transformers::grouped_mm_fallback.default": "transformers' op; tests/test_moe_t5_norms.py (float64 and HF Mixtral)",
    # Python-level checks and size arithmetic on numbers: no tensor flows through them (the generators build
    # tensor programs); tests/test_timm_patterns.py covers them
    **{t: "a check or integer arithmetic on Python numbers, no tensor op (tests/test_timm_patterns.py)"
       for t in (torch._assert, _assert_is_none, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                 operator.ge, operator.not_, operator.floordiv)},
}
EXCLUDED_FAMILIES = {
    "shape_read": "its one target is ones_map (see EXCLUDED)",
    "grouped_mm": "aten._grouped_mm has no float64 CPU kernel and the fallback is transformers' op: "
                  "tests/test_moe_t5_norms.py",
}


@pytest.fixture(scope="module")
def produced():
    cases = all_variants()
    fx_keys, untraceable = produced_keys(cases)
    first = {}
    for c in cases:  # one variant per generator, and every cast (the aten-only assert_metadata family)
        first.setdefault(c.ops[-1].kind, c)
    exported = list(first.values()) + [c for c in cases if c.ops[-1].kind == "cast"]
    ex_keys, failed = export_keys(exported)
    assert not failed, f"export failed on {len(failed)} variants, e.g. {failed[0][1]}: {failed[0][0]!r}"
    return fx_keys, ex_keys, untraceable


def test_every_rule_family_is_generated(produced):
    fx_keys, ex_keys, _ = produced
    families = {r.family for r in RULES.values()}
    covered = {RULES[k].family for k in fx_keys | ex_keys}
    missing = families - covered - set(EXCLUDED_FAMILIES)
    assert not missing, f"rule families no generator produces (add a generator or an exclusion): {sorted(missing)}"
    assert not set(EXCLUDED_FAMILIES) & covered, "an excluded family is generated now: drop its exclusion"
    aten_families = {RULES[k].family for k in ex_keys if is_aten(k)}
    assert len(aten_families) >= 20, f"the export dialect covers too little: {sorted(aten_families)}"


def test_every_non_aten_target_is_generated_or_excluded(produced):
    fx_keys, ex_keys, _ = produced
    keys = [k for k in RULES if not is_aten(k)]
    missing = [k for k in keys if k not in fx_keys and k not in ex_keys and k not in EXCLUDED]
    assert not missing, f"RULES targets no generator produces (add a form or an exclusion with a reason): {missing}"
    stale = [k for k in EXCLUDED if k in fx_keys or k in ex_keys]
    assert not stale, f"excluded targets that are generated now (drop the exclusion): {stale}"
    assert all(k in RULES for k in EXCLUDED), "an exclusion names a key RULES no longer has"
    assert not [n for n in NO_SUCH_METHOD if hasattr(torch.Tensor, n)], "a NO_SUCH_METHOD name exists now"


def test_generators_build_on_the_states_they_claim(produced):
    """Every generator builds somewhere, and symbolic_trace fails only on the forms that are meant to
    push minimize to torch.export (Python control flow / tuple unpacking torch.fx cannot follow)."""
    from sqr_fx.testing import GENS

    built = {c.ops[-1].kind for c in all_variants()}
    assert built == set(GENS), f"generators that never build: {set(GENS) - built}"
    _, _, untraceable = produced
    assert len(untraceable) <= 0.1 * len(all_variants()), untraceable[:5]
    assert {s.layout for s in STATES} >= {"vec", "seq", "hw", "sig", "img", "vol", "tok"}


# minimal recipes of what the long fuzz runs found (benchmarks/results/fuzz_long.txt), rebuilt from their
# printed Case (a seed alone regenerates another graph once generators are added)
LONG_RUN_FINDS = {
    "an in-place aten op written out of place with the overload of the same name, not the same arguments (aten.pow_.Scalar -> pow.Scalar; session 10, run 18: a contained crash)":
        "Case(seed=5050018135, layout='seq', C=3, sp=(6,), batched=True, B=2, alt_B=5, grow=3, frontend='fx', outputs=1, ops=[ Op('linear', 1826919534, {'form': 'F_bias_kw', 'out': 3, 'bias': False, 'plant': 'none'}), Op('binary', 1598296070, {'op': 'sub', 'form': 'torch_alpha', 'rhs': 'param_bcast'}), Op('unary', 1478605686, {'name': 'pow', 'form': 'stmt_'}), Op('slice', 1300523678, {'what': 'ch_step', 'step': slice(1, None, 2)}), ])",
    "an unbatched signal's time axis gathered as input channels: the axis-1 probe ran on a copy whose MHA the front end had made functional (session 10, run 17)":
        "Case(seed=2020006721, layout='sig', C=7, sp=(9,), batched=False, B=3, alt_B=6, grow=3, frontend='fx', outputs=1, ops=[ Op('slice', 1282370754, {'what': 'sp_crop', 'axis': 0, 'crop': slice(None, -1, None)}), Op('permute', 1486309561, {'form': 'torch_t'}), Op('mha', 79850387, {'heads': 1, 'form': 'unpack', 'plant': 'none'}), ])",
    "keep-one-channel chose by where get_attr nodes sit, which a result traced again changes (session 10, run 16)":
        "Case(seed=9191028019, layout='vol', C=5, sp=(4, 4, 4), batched=True, B=3, alt_B=1, grow=3, frontend='export', outputs=1, ops=[ Op('cat', 157362343, {'what': 'dense', 'form': 'cat_tuple', 'dim': -4, 'a': 5, 'branch1': 'nn3', 'plant1': 'none'}), Op('split', 1795191301, {'along': 'ch', 'form': 'with_sizes', 'c1': 4, 'dim': 1, 'then': 'cat_swapped'}), Op('batch_norm', 912750801, {'form': 'nn_noaffine', 'gamma0': False, 'eps': 1e-05}), Op('conv', 1536800697, {'form': 'nn', 'groups': 1, 'out': 5, 'k': 1, 'stride': 1, 'dil': 1, 'pad': 2, 'bias': True, 'plant': 'none', 'tuple': True, 'mask': None}), Op('conv', 1069342383, {'form': 'F', 'groups': 1, 'out': 1, 'k': 2, 'stride': 2, 'dil': 2, 'pad': 1, 'bias': True, 'plant': 'rc+rand'}), ])",
    "two functional Swin calls whose qkv tensors live in one module got one name for their q/k/v (session 9, run 14)":
        "Case(seed=8383026525, layout='hw', C=4, sp=(4, 6), batched=True, B=3, alt_B=1, grow=2, frontend='fx', outputs=1, ops=[ Op('swin', 596292991, {'heads': 1, 'form': 'F', 'window': 2, 'shift': 0, 'plant': 'k_rows'}), Op('swin', 1454608571, {'heads': 4, 'form': 'F', 'window': 4, 'shift': 1, 'plant': 'none'}), Op('linear', 1396931592, {'form': 'nn', 'out': 6, 'bias': False, 'plant': 'cols', 'mask': None}), ])",
    "sqr_fx's padded_sdpa called by position, re-emitted as sdpa with a positional scale (keyword-only) (session 9)":
        "Case(seed=4242012814, layout='seq', C=2, sp=(4,), batched=True, B=3, alt_B=6, grow=2, frontend='fx', outputs=1, ops=[ Op('linear', 1033824521, {'form': 'F_nobias', 'out': 4, 'plant': 'none'}), Op('attention', 336930894, {'heads': 4, 'core': 'sdpa_scale', 'proj': 'fused_chunk', 'split': 'unflatten', 'merge': 'flatten', 'plant': 'none', 'pads': (1, 2, 'pos')}), ])",
    "expand_as rewritten with expand's literal sizes":
        "Case(seed=515152548436, layout='seq', C=3, sp=(3,), batched=True, B=3, alt_B=1, grow=3, frontend='fx', outputs=1, ops=[ Op('attention', 510689387, {'heads': 1, 'core': 'manual_dropout', 'proj': 'fused_split', 'split': 'view', 'merge': 'flatten', 'softmax': 'method', 'matmul': 'torch', 'plant': 'o_rows'}), Op('expand', 1008692145, {'form': 'expand_as'}), Op('cat', 516697791, {'what': 'branches', 'form': 'cat_kw', 'dim': -1, 'a': 6, 'branch1': 'F_kw', 'plant1': 'none', 'b': 6, 'branch2': 'nn', 'plant2': 'none', 'mask': None}), ])",
    'MultiheadAttention over an input tracked on its sequence axis (rewrite used a frozen info)':
        "Case(seed=515152545569, layout='hw', C=4, sp=(5, 5), batched=True, B=2, alt_B=5, grow=3, frontend='fx', outputs=1, ops=[ Op('slice', 1792799003, {'what': 'sp_drop', 'axis': 1, 'index': 0, 'form': 'method'}), Op('mha', 322066572, {'heads': 2, 'form': 'kw', 'plant': 'o_rows'}), Op('attention', 877601316, {'heads': 1, 'core': 'sdpa_mask', 'proj': 'fused_split', 'split': 'view', 'merge': 'reshape', 'plant': 'none'}), ])",
    'a view after a rewritten attention whose new kernel returns other strides (fuzz run 5)':
        "Case(seed=727274185508, layout='seq', C=6, sp=(4,), batched=False, B=2, alt_B=5, grow=2, frontend='fx', "
        "outputs=1, ops=[ Op('linear', 621494377, {'form': 'addmm', 'out': 7, 'plant': 'none'}), "
        "Op('pad', 1879385888, {'what': 'ch', 'amount': (2, 0), 'value': None, 'form': 'F'}), "
        "Op('binary', 1326692713, {'op': 'div', 'form': 'method_', 'rhs': 'branch', 'branch': 'F_kw', 'plant': 'none'}), "
        "Op('attention', 1882446266, {'heads': 3, 'core': 'sdpa_causal', 'proj': 'fused_split', 'split': 'unflatten', "
        "'merge': 'flatten', 'plant': 'k_rows'}), ])",
    'a written-out LayerNorm reading another one (the second match read the replaced output of the first; fuzz run 6)':
        "Case(seed=838385517705, layout='vec', C=5, sp=(), batched=False, B=2, alt_B=5, grow=2, frontend='fx', "
        "outputs=1, ops=[ Op('rms_norm', 1815422673, {'form': 'compensated', 'eps': 1e-06, 'gamma0': False, 'removed': 2}), "
        "Op('reduce', 394329628, {'what': 'center', 'op': 'mean', 'form': 'method_kw', 'dim': 0}), "
        "Op('reduce', 94414678, {'what': 'manual_rms', 'op': 'mean', 'form': 'method_kw', 'dim': 0}), "
        "Op('layer_norm', 22456532, {'form': 'written_var', 'eps': 1e-05, 'gamma0': False}), ])",
    'an input the model takes wider (a slice) but the exported program fixes (not a fixpoint; fuzz run 8)':
        "Case(seed=515152547035, layout='vec', C=6, sp=(), batched=True, B=2, alt_B=5, grow=2, frontend='fallback', "
        "outputs=1, ops=[ Op('slice', 1493386655, {'what': 'ellipsis', 'start': 0, 'stop': 6}), "
        "Op('split', 2035123368, {'along': 'ch', 'form': 'chunk', 'c1': 3, 'dim': 1, 'then': 'cat_back', 'branch': 'F_kw', "
        "'plant': 'rc+rand'}), Op('binary', 1703520854, {'op': 'mul', 'form': 'unbound', 'rhs': 'scalar', 'swap': False, "
        "'value': -0.75}), Op('dropout', 528751029, {'name': 'alpha_dropout', 'form': 'nn'}), "
        "Op('linear', 535553821, {'form': 'F', 'out': 2, 'bias': True, 'plant': 'all'}), "
        "Op('binary', 188489530, {'op': 'add', 'form': 'method_', 'rhs': 'param_full', 'zeros': True}), "
        "Op('save', 997667005, {'clone': True}), Op('unary', 1160024177, {'name': 'clip', 'form': 'stmt_'}), "
        "Op('linear', 2052970153, {'form': 'nn_kw', 'out': 1, 'plant': 'cols', 'mask': None}), "
        "Op('linear', 216476221, {'form': 'F_kw', 'out': 6, 'bias': False, 'plant': 'cols'}), "
        "Op('linear', 249047854, {'form': 'matmul', 'out': 2, 'plant': 'rc+rand'}), ])",
    'one Linear called twice, first with input= (stayed a module call) and its weight cut for the second call (fuzz run 10)':
        "Case(seed=848486546330, layout='tok', C=6, sp=(5,), batched=True, B=2, alt_B=1, grow=2, frontend='fx', "
        "outputs=1, ops=[ Op('embedding', 51489001, {'form': 'nn', 'dim': 5, 'plant': 'none'}), "
        "Op('linear', 1454499151, {'form': 'nn_kw', 'out': 5, 'plant': 'none', 'mask': None}), "
        "Op('tie', 1403631290, {'back': 1, 'form': 'module'}), "
        "Op('index_select', 1095019938, {'along': 'ch', 'k': 5, 'order': 'repeats', 'form': 'torch', 'dim': -1}), ])",
    'detach_ of a linear the rewrite gave a bias (a 3-D linear with a bias returns a view; fuzz run 12)':
        "Case(seed=393940184966, layout='seq', C=2, sp=(4,), batched=True, B=3, alt_B=6, grow=3, frontend='fx', "
        "outputs=1, ops=[ Op('mha', 388666209, {'heads': 2, 'form': 'pos3', 'plant': 'o_rows'}), "
        "Op('linear', 1760569324, {'form': 'F', 'out': 6, 'bias': False, 'plant': 'none'}), "
        "Op('unary', 1004688960, {'name': 'detach', 'form': 'stmt_'}), ])",
    'aten.group_norm restored as nn.GroupNorm, which refuses one value per group':
        "Case(seed=424243273244, layout='sig', C=3, sp=(6,), batched=True, B=3, alt_B=1, grow=3, frontend='export', outputs=1, ops=[ Op('stochastic_depth', 1935230331, {'form': 'nn', 'branch': 'nn3', 'plant': 'none'}), Op('reduce', 792607168, {'what': 'keepdim', 'op': 'mean', 'form': 'method', 'dims': 2, 'as_int': True}), Op('group_norm', 1572284788, {'form': 'nn', 'groups': 3, 'gamma0': False}), ])",
}


@pytest.mark.parametrize("why", sorted(LONG_RUN_FINDS))
def test_long_run_finds_stay_fixed(why):
    """Exact, and no rule crash contained, on each case a long fuzz run found."""
    case = eval(LONG_RUN_FINDS[why], {"Case": Case, "Op": Op})  # noqa: S307 - the fuzzer's own printed recipe
    r = run_case(case)
    assert r.status == "ok", f"{why}: {r.status} {r.detail}"
    assert not r.rule_crashes, f"{why}: {r.rule_crashes}"


def test_a_size_branch_that_a_norm_nearly_divides_out_is_still_guarded():
    """Fuzz run 12: ``h * 2 if h.shape[0] == 1 else h`` then RMS and layer norms, which divide the factor out up
    to their eps: the exported program (branch of sizes >= 2) and the model differed at batch 1 by 6e-7 of the
    output, which the front end's probe took for rounding (the self-check's tolerance). The probe compares at
    rounding level now (float64 1e-12), so the result refuses batch 1 ("guard") instead of answering it."""
    case = Case(seed=404041215495, layout='seq', C=4, sp=(6,), batched=True, B=3, alt_B=1, grow=2, frontend='fx',
                outputs=1, ops=[
                    Op('mha', 1719080239, {'heads': 1, 'form': 'seq_first', 'plant': 'none'}),
                    Op('size_branch', 983713832, {'form': 'double_if_one'}),
                    Op('rms_norm', 669216446, {'form': 'compensated', 'eps': 1e-06, 'gamma0': False, 'removed': 2}),
                    Op('layer_norm', 744647790, {'form': 'F_shape', 'eps': 1e-06, 'gamma0': False}),
                    Op('reduce', 161057351, {'what': 'global', 'op': 'sum', 'form': 'method', 'dims': -2,
                                             'as_int': False}),
                ])
    r = run_case(case)
    assert r.status == "guard" and "size()[0] >= 2" in r.detail, (r.status, r.detail)
