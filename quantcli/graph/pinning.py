"""Planning's view of the sizes a model with dynamic input dims computes on: its data's sample sizes pinned in.

Shape inference gives a symbol (or nothing) for every size that follows a dynamic input dim, like
the height and width of an OCR crop, so the rules that ask how large a map is (``rules.depthwise``,
``rules.pooling``, ``rules.stem``) cannot tell, and measure at a guessed size. ``pinned_shapes``
writes a sample's sizes into the input dims that are not fixed (a symbol, no value, or a
non-positive value such as Paddle's -1) of a weightless skeleton of the model
(``model_io.split_weights``: no weight is copied, at any model size), runs shape inference on it
and returns the main graph's shapes. Planning reads them instead of the recorded ones; the model
is not touched, so the written model keeps its dynamic dims.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import onnx

from quantcli.graph.index import recorded_shapes
from quantcli.graph.model_io import infer_shapes, split_weights

__all__ = ["dynamic_input_dims", "pinned_shapes"]

log = logging.getLogger(__name__)


def _fixed(dim: onnx.TensorShapeProto.Dimension) -> bool:
    return dim.HasField("dim_value") and dim.dim_value > 0


def dynamic_input_dims(model: onnx.ModelProto, sample_shapes: Mapping[str, Sequence[int]]) -> dict[str, dict[int, int]]:
    """Per graph input, the sizes ``sample_shapes`` gives its dims that are not fixed (axis -> size).

    Inputs with no sample shape, a sample of another rank or no recorded shape are left out, as are
    sample sizes that are not positive.
    """
    inits = {t.name for t in model.graph.initializer}
    pins: dict[str, dict[int, int]] = {}
    for vi in model.graph.input:
        sample = sample_shapes.get(vi.name)
        if vi.name in inits or sample is None or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(sample):
            continue
        pairs = enumerate(zip(dims, sample, strict=True))
        found = {axis: int(size) for axis, (dim, size) in pairs if not _fixed(dim) and size > 0}
        if found:
            pins[vi.name] = found
    return pins


def pinned_shapes(
    model: onnx.ModelProto, sample_shapes: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int | str | None, ...]]:
    """The main graph's tensor shapes with the dynamic input dims at ``sample_shapes``'s sizes.

    Empty when no input dim is dynamic and sampled, or when shape inference fails on the pinned
    skeleton (planning then reads the shapes the model records). ``model`` is never changed.
    """
    pins = dynamic_input_dims(model, sample_shapes)
    if not pins:
        return {}
    skeleton, _ = split_weights(model)  # a new message holding no large weight
    for vi in skeleton.graph.input:
        for axis, size in pins.get(vi.name, {}).items():
            dim = vi.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_value = size
    # recorded shapes carry the symbols; inference writes them again from the pinned inputs
    del skeleton.graph.value_info[:]
    for out in skeleton.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    inferred, error = infer_shapes(skeleton)
    if error is not None:
        log.info("planning keeps the recorded shapes: inference failed with the input dims pinned: %s", error)
        return {}
    return recorded_shapes(inferred.graph)
