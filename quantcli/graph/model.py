"""Compatibility re-exports of ``quantcli.graph.model_io`` for ``api.py`` and ``cli/``, until their rewrite merges.

Every other module imports from ``model_io`` (load, save, checks) or ``index`` (``GraphIndex``).
The integrator points ``api.py``, ``cli/app.py`` and ``cli/report.py`` at ``model_io`` after the
merge and deletes this module.
"""

from __future__ import annotations

from quantcli.graph.model_io import (
    atomic_output,
    file_sha256,
    infer_shapes,
    known_shapes,
    load_model,
    model_opset,
    save_model,
)

__all__ = [
    "atomic_output",
    "file_sha256",
    "infer_shapes",
    "known_shapes",
    "load_model",
    "model_opset",
    "save_model",
]
