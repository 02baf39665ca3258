"""Sigmoid gates: whether a tensor feeds nothing but Sigmoids of itself and SiLUs ``x * Sigmoid(x)``.

Below ``logit(s / 2)`` a quantized Sigmoid writes 0, and so does a SiLU, so such a tensor's values there
do not matter: the ``sigmoid-floor`` planning rule (``quantcli.static.rules.sigmoid_floor``) starts its
grid there, and ``compare --per-layer`` (``quantcli.compare.layers``) compares it above that point. Both
ask this module which readers make the pattern.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx

__all__ = ["sigmoid_gates"]


def sigmoid_gates(tensor: str, readers: Sequence[onnx.NodeProto]) -> tuple[list[onnx.NodeProto], onnx.NodeProto | None]:
    """The Sigmoids of ``tensor`` among its ``readers``, and the first reader that is neither a Sigmoid
    nor a SiLU's ``Mul(tensor, Sigmoid(tensor))`` (None when every reader is one of those)."""
    sigmoids = [n for n in readers if n.op_type == "Sigmoid" and list(n.input) == [tensor]]
    gates = {s.output[0] for s in sigmoids}
    for reader in readers:
        other = {*reader.input} - {tensor}
        silu = reader.op_type == "Mul" and tensor in reader.input and len(other) == 1 and other <= gates
        if reader.op_type != "Sigmoid" and not silu:
            return sigmoids, reader
    return sigmoids, None
