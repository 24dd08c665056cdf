"""The rules table reads arguments by the op's schema: every rule's argument names line up, slot by
slot, with the schema of every target it is registered for (after ``normalize_args`` puts each call in
that positional layout). A renamed slot is allowed only through the role table below."""
from __future__ import annotations

import torch
from torch.fx.operator_schemas import get_signature_for_torch_op

from sqr_fx.normalize import _python_signature
from sqr_fx.rules import RULES
from sqr_fx.rules.registry import Method

# role name used by a rule -> schema spellings of that slot (the tensor being read is "input")
ROLES = {
    "input": {"input", "x", "a", "self", "indices", "mat1"},
    "other": {"other", "b", "mat2"},
    "index": {"b"},
    "sections": {"split_size", "split_sizes", "chunks", "indices_or_sections", "split_size_or_sections"},
    "bias": {"input"},  # addmm(bias, x, W): the added tensor
    "weight": {"mat2"},
}


def _schemas(key):
    if isinstance(key, Method):
        fn = getattr(torch, key.name, None)
        return list(get_signature_for_torch_op(fn) or []) if fn is not None else []
    try:
        sigs = get_signature_for_torch_op(key)
    except Exception:  # noqa: BLE001 - not a torch builtin
        sigs = None
    if sigs:
        return list(sigs)
    sig = _python_signature(key)
    return [sig] if sig is not None else []


def test_every_rule_names_its_arguments_by_schema_slot():
    bad = []
    for key, r in RULES.items():
        if isinstance(key, (str, type)):
            continue  # graph interface nodes and module types (their forward takes the input only)
        names = r.names[key]
        schemas = _schemas(key)
        if not schemas:
            continue
        ok = False
        for sig in schemas:
            slots = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            kw = [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY]
            if all(i < len(slots) and (n == slots[i] or slots[i] in ROLES.get(n, ())) or (i >= len(slots) and n in kw)
                   for i, n in enumerate(names)):
                ok = True
                break
        if not ok:
            bad.append(f"{r.family}: {key} names {names}")
    assert not bad, "rules whose argument names do not match the schema slots:\n" + "\n".join(bad)


def test_in_place_aten_ops_map_to_the_functional_overload_with_the_same_arguments():
    """``aten.foo_.X`` is read (and written out of place) as the functional overload whose arguments have the same
    names AND types, whatever its overload name: ``pow_.Scalar`` is ``pow_(Tensor self, Scalar exponent)``, whose
    functional form is ``pow.Tensor_Scalar`` (``pow.Scalar`` takes a Scalar base)."""
    from sqr_fx.rules.registry import _functional_overload

    aten = torch.ops.aten
    assert _functional_overload(aten.pow_.Scalar) is aten.pow.Tensor_Scalar
    assert _functional_overload(aten.add_.Tensor) is aten.add.Tensor
    assert _functional_overload(aten.relu_.default) is aten.relu.default
    for name in ("pow_", "add_", "mul_", "sub_", "div_", "clamp_", "hardtanh_", "fill_", "masked_fill_", "relu_"):
        packet = getattr(aten, name)
        for overload in packet.overloads():
            op = getattr(packet, overload)
            f = _functional_overload(op)
            if f is not None:
                assert [(a.name, str(a.type)) for a in f._schema.arguments] == \
                    [(a.name, str(a.type)) for a in op._schema.arguments], (op, f)
