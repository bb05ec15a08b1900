"""The deployable artifact: the optimized model as a ``torch.export`` program (``.pt2``).

The optimized GraphModule is plain torch (the fx backend writes registry ops as the torch
calls of their lowering), so ``torch.export`` captures it like any module: the program holds
ATen ops, the weights and the folded constants, and ``torch.export.load`` runs it in a
process that never imports graphopt.  Before the file is written, the program is loaded
back from its bytes and compared with the model on the example inputs; on a difference
nothing is written.
"""
from __future__ import annotations

import io

import torch

from .errors import GraphoptError, first_line


def exported_program(fast, example_inputs) -> torch.export.ExportedProgram:
    """The optimized model of ``graphopt.optimize(..., capture="export")`` as an ExportedProgram.

    Args:
        fast: the :class:`~graphopt.optimize.OptimizedModule`.
        example_inputs: its example inputs (the program's input shapes are theirs).
    """
    modules = fast.graph_modules
    if len(modules) != 1:
        raise GraphoptError(f"the model was captured as {len(modules)} graphs; a .pt2 program is one "
                            "(optimize with capture='export')")
    try:
        return torch.export.export(modules[0], tuple(example_inputs))
    except Exception as e:  # noqa: BLE001
        first = first_line(e)
        raise GraphoptError(f"torch.export could not export the optimized graph ({type(e).__name__}: {first})") from None


def write_pt2(fast, model, example_inputs, path) -> torch.export.ExportedProgram:
    """Export the optimized model, check the program against ``model``, then write ``path``
    atomically (``torch.export.save``); returns the program."""
    from .optimize import _flatten
    from .pipeline import compare_outputs
    from .rules import write_atomic
    ep = exported_program(fast, example_inputs)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    data = buf.getvalue()
    loaded = torch.export.load(io.BytesIO(data))
    with torch.no_grad():
        expected = _flatten(model(*example_inputs))
        got = _flatten(loaded.module()(*example_inputs))
    ok, _, why = compare_outputs(expected, got)
    if not ok:
        raise GraphoptError(f"{path}: not written: the exported program differs from the model ({why})")
    write_atomic(path, data)
    return ep


__all__ = ["exported_program", "write_pt2"]
