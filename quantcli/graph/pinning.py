"""Planning's view of a model whose inputs have dynamic dims: a copy with the data's sample sizes pinned in.

Shape inference gives a symbol (or nothing) for every size that follows a dynamic input dim, like
the height and width of an OCR crop, so the rules that ask how large a map is (``rules.depthwise``,
``rules.pooling``, ``rules.stem``) cannot tell, and measure at a guessed size. ``pin_input_dims``
copies the model, writes a sample's sizes into the input dims that are not fixed (a symbol, no
value, or a non-positive value such as Paddle's -1), and runs shape inference on the copy.
Planning reads the copy; the lowering rewrites the model itself, so the written model keeps its
dynamic dims. Node and tensor names are the copy's too, so a plan made on it applies unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import onnx

from quantcli.graph.model_io import above_protobuf_limit, infer_shapes

__all__ = ["dynamic_input_dims", "pin_input_dims"]

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


def pin_input_dims(model: onnx.ModelProto, sample_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose dynamic input dims hold ``sample_shapes``'s sizes, shapes inferred again.

    ``model`` itself (no copy) when no input dim is dynamic or sampled, above protobuf's 2 GB (no
    shape inference there), or when inference fails on the pinned copy. ``model`` is never changed.
    """
    pins = dynamic_input_dims(model, sample_shapes)
    if not pins or above_protobuf_limit(model):
        return model
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    for vi in pinned.graph.input:
        for axis, size in pins.get(vi.name, {}).items():
            dim = vi.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_value = size
    # recorded shapes carry the symbols; inference writes them again from the pinned inputs
    del pinned.graph.value_info[:]
    for out in pinned.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    inferred, error = infer_shapes(pinned)
    if error is not None:
        log.info("planning keeps the dynamic input dims: shape inference failed on the pinned copy: %s", error)
        return model
    return inferred
