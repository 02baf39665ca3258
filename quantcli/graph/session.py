"""The onnxruntime session factory: every session quantcli builds comes from here.

``make_session`` builds a CPU session from a model in memory (no temporary file) and turns a load
failure into an ``UnsupportedModelError`` that says why (``explain_load_failure``); ``augmented``
copies a model with chosen tensors added as graph outputs, so a session returns them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import onnx
import onnxruntime as ort

from quantcli.core.errors import UnsupportedModelError
from quantcli.graph.editor import ModelEditor
from quantcli.graph.names import NameAllocator

__all__ = ["Session", "augmented", "explain_load_failure", "is_out_of_memory", "make_session"]


class Session(Protocol):
    """What quantcli uses of an onnxruntime session (so modules that only run one need not import it)."""

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any], /) -> list[Any]:
        """Run the model; the named outputs, in order."""
        ...

    def get_outputs(self) -> list[Any]:
        """The graph outputs (``.name``, ``.type``)."""
        ...


def explain_load_failure(exc: BaseException, source: str) -> str:
    """One line saying why onnxruntime refused a model, and what to do."""
    text = " ".join(str(exc).split())
    newer = re.search(r"Opset (\d+) is under development.*?till opset (\d+)", text)
    if newer:
        return (
            f"{source}: opset {newer.group(1)} is newer than onnxruntime {ort.__version__} supports "
            f"(up to {newer.group(2)}); export with an older opset or upgrade onnxruntime"
        )
    custom = re.search(r"([\w.]+:\w+)\(-?\d+\) is not a registered function/op", text) or re.search(
        r"Could not find an implementation for (\w+\(\d+\)) node with name '([^']*)'", text
    )
    if custom:
        return (
            f"{source}: onnxruntime has no kernel for op {custom.group(1)}; register its custom-op library "
            "or replace the op before quantizing"
        )
    first = text[:300] if text else type(exc).__name__
    return f"{source}: onnxruntime cannot load the model: {first}"


def make_session(
    model: onnx.ModelProto, *, threads: int = 0, optimize: bool = True, source: str = "model"
) -> ort.InferenceSession:
    """An onnxruntime CPU session built from memory (no temporary file)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UnsupportedModelError(explain_load_failure(exc, source)) from exc


def augmented(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` with ``names`` added as graph outputs (so onnxruntime returns them)."""
    edit = ModelEditor(model, names=NameAllocator())  # adds no names: nothing to reserve
    existing = set(edit.graph.output_names)
    for name in names:
        if name not in existing:
            edit.graph.add_output(name)
    return edit.build()


_OOM_MARKERS = ("bad_alloc", "bfc_arena", "failed to allocate", "out of memory", "memoryerror", "cannot allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception from onnxruntime or numpy is an allocation failure."""
    return isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in _OOM_MARKERS)
