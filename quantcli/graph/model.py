"""Compatibility re-exports of ``quantcli.graph.model_io`` and ``quantcli.graph.index``.

Kept only for modules outside the graph layer that still import from here; new code imports from
``model_io`` (load, save, checks) or ``index`` (``GraphIndex``). To be removed once they are ported.
"""

from __future__ import annotations

from quantcli.graph.index import GraphIndex
from quantcli.graph.model_io import (
    atomic_output,
    available_memory,
    file_sha256,
    infer_shapes,
    known_shapes,
    load_model,
    model_opset,
    save_model,
)

__all__ = [
    "GraphIndex",
    "atomic_output",
    "available_memory",
    "file_sha256",
    "infer_shapes",
    "known_shapes",
    "load_model",
    "model_opset",
    "save_model",
]
