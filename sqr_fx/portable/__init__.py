"""The last step of ``minimize``: make the result an ordinary module (docs/design.md, "The returned module").

The rounds work in a functional dialect: ``F.linear`` / ``F.conv2d`` / ``F.batch_norm(training=False)`` on
``get_attr`` tensors, and sqr_fx's own helpers where no torch op expresses a shrunk layer
(``ones_map``, the compensated norms, ``self_attention``, ``window_attention``, the rotary forms). That dialect is what
the rules read, but as a deliverable it has four defects: module-based tools (quantization, hooks,
PEFT, ``torch.nn.utils.prune``) find no module; ``.train()`` changes nothing (BatchNorm is frozen in
its eval form); a constant folded into a layer that had no bias becomes a new trainable tensor; and
the graph calls sqr_fx functions, so loading it needs sqr_fx (and ``pickle`` / ``torch.load`` fail:
unpickling re-traces the generated code, and a ``torch.fx.wrap``-ped helper then runs on a Proxy).

:func:`finish` repairs all four, on the result of the last round, in place:

1. **Fold biases are buffers.** A bias created by a fold (``<layer>.weight_bias``: the layer had no
   bias) is a buffer, not a parameter; where a Linear/Conv becomes a module again (2.) it is that
   module's ``bias``, registered as a buffer (one fused kernel, still not trainable); after another
   module it is added (``sqr_fx_<layer>_folded_bias``, shaped to broadcast over the channel axis).
2. **Modules come back.** A functional ``linear`` / ``conv{1,2,3}d`` / ``batch_norm`` / ``layer_norm`` /
   ``group_norm`` / ``embedding`` call whose tensors are ``<path>.weight`` etc. of ONE plain container is
   a module again at that path (``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d`` ...; the same
   Parameter objects, so ties stay ties), with the original module's settings where the original
   model has a module of that type there (BatchNorm ``momentum`` and ``num_batches_tracked``, an
   embedding's ``padding_idx``). BatchNorm modules normalize with batch statistics and update their
   running statistics in train mode. torchvision's ``stochastic_depth`` traced in eval form becomes the
   ``StochasticDepth`` module it came from. A fold that changes a layer's math (a ones-map correction,
   a compensated norm) stays functional next to the module.
3. **sqr_fx leaves the graph** (``portable=True``): every sqr_fx helper call is replaced by its body
   written in torch ops (the ``*_ops`` functions below, traced into the graph with the call's
   constant arguments). They are written branch-free where the helper branches on sizes (the shifted
   window's padding, shift and mask), compute in the helper's dtypes whatever dtype the module is
   later cast to, and equal the helpers bit for bit (``tests/test_portable.py``). A
   ``self_attention``'s q/k/v projections are one ``in_proj_weight`` / ``in_proj_bias`` again and a
   window attention's one ``qkv.weight`` / ``qkv.bias``, sliced in the graph, so the trainable
   tensors are the original's.
4. ``torch.export``'s input guard (a function made with ``exec``) is traced into a GraphModule, so a
   result of the export front end pickles too. (The report pickles as a ``types.SimpleNamespace``:
   ``MinimizeReport.__reduce__``.)

``portable=False`` skips 3: the helpers stay, so a second ``minimize`` recognizes the compensated norms
and attention forms and can shrink them again (the Squeeze-Release cycle minimizes its own results
this way). Steps 1, 2 and 4 always run. Each rewrite is local and checked: a node whose pattern does not
match exactly is left as it was (exact, only less ordinary), and ``minimize``'s self-check runs on
the module this returns. :func:`sqr_fx_references` lists what still needs sqr_fx.

Layout: ``modules.py`` (steps 1-2), ``ops.py`` + ``inline.py`` (step 3), ``guards.py`` (step 4),
``common.py`` (paths, names, :func:`sqr_fx_references`).
"""
from __future__ import annotations

import types
from typing import Optional

from torch import fx, nn

from ..trace import compiled
from .common import _original_params, sqr_fx_references
from .guards import _picklable_guards
from .inline import inline_helpers
from .modules import _fold_biases_to_buffers, restore_modules
from .ops import (group_norm_ops, layer_norm_ops, ones_map_ops, rms_norm_ops, rotary_interleaved_ops, rotary_ops,
                  self_attention_ops, window_attention_ops)

__all__ = ["finish", "restore_modules", "inline_helpers", "sqr_fx_references", "layer_norm_ops", "rms_norm_ops",
           "group_norm_ops", "ones_map_ops", "self_attention_ops", "window_attention_ops", "rotary_ops",
           "rotary_interleaved_ops"]


# ---- entry point --------------------------------------------------------------------------------------------
def finish(gm: fx.GraphModule, model: Optional[nn.Module] = None, *, portable: bool = True) -> fx.GraphModule:
    """Make ``gm`` (a fresh minimize result, edited in place) an ordinary module; see the module docstring.

    ``model``: the module minimize was given (its modules' settings are copied where they match)."""
    for name in ("train", "eval"):  # ``ExportedProgram.module()`` disables both per instance: mode now matters
        if isinstance(vars(gm).get(name), types.MethodType):
            delattr(gm, name)
    originals = _original_params(model)
    _fold_biases_to_buffers(gm, originals)
    restore_modules(gm, model, recompile=False)
    if portable:
        inline_helpers(gm, model, recompile=False)
    _picklable_guards(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm = compiled(gm)  # (the pass's graph modules compile lazily: this is the result's one compile)
    # the function minimize preserves is the eval-mode one (a graph from torch.export may say
    # training=True: it was traced in eval form): the result is returned in eval mode
    return gm.eval()
