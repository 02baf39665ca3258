"""Load, check and save ONNX models; their sha256, opset and shape inference."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantcli.core.digest import file_sha256
from quantcli.core.errors import ModelLoadError
from quantcli.graph.atomic import atomic_files, atomic_output, checkpoint, write_bytes
from quantcli.graph.scopes import walk_graphs

__all__ = [
    "EXTERNAL_BASE_KEY",
    "PROTOBUF_LIMIT",
    "STUB_LOCATION",
    "above_protobuf_limit",
    "atomic_output",
    "available_memory",
    "check_model",
    "external_base",
    "file_sha256",
    "graph_only",
    "has_external_data",
    "holds_spillable_weights",
    "in_memory",
    "in_memory_size",
    "infer_shapes",
    "known_shapes",
    "left_in_file",
    "load_model",
    "model_opset",
    "save_model",
    "spill_weights",
    "split_weights",
    "stored_above_limit",
    "tensor_array",
    "upgrade_opset",
]

log = logging.getLogger(__name__)

#: protobuf cannot serialize a single message above 2 GiB; bigger models keep weights outside.
PROTOBUF_LIMIT = 2**31 - 1


def above_protobuf_limit(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is too large for one protobuf message (which cannot even size itself then).

    Weights ``load_model(weights=False)`` left in their files count as if read: the answer (and
    every decision taken on it) is the same whether the weights were read or not.
    """
    if _size_bound(model) < PROTOBUF_LIMIT:  # far below: no serialization needed to say so
        return False
    try:
        return model.ByteSize() + _unread_bytes(model) >= PROTOBUF_LIMIT
    except Exception:  # upb raises EncodeError from ByteSize above 2 GB
        return True


#: per weight, what a serialized TensorProto may add to its values: name, dims, type, tags and lengths
_TENSOR_OVERHEAD = 1024


def _size_bound(model: onnx.ModelProto) -> int:
    """An upper bound of ``model.ByteSize()`` with every weight read, without serializing a weight.

    ``ByteSize()`` serializes the message to size it: all-MiniLM-L6 took 0.76 s and 88 MB of transient
    memory per call, and every session asks. Nodes are sized one by one (subgraphs with them, their
    weights left in files as if read); main-graph weights from their shapes.
    """
    graph = model.graph
    small = (*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.sparse_initializer)
    total = sum(m.ByteSize() for m in (*small, *model.functions, *model.metadata_props))
    total += len(model.doc_string) + len(graph.doc_string) + 64 * 1024  # names, opsets, tags
    total += sum(_tensor_bound(t) for t in graph.initializer)
    return total + sum(
        in_memory_size(t) for path, g in walk_graphs(graph) if path for t in g.initializer if left_in_file(t)
    )


def _tensor_bound(tensor: onnx.TensorProto) -> int:
    """At most the serialized size of ``tensor`` with its bytes read: raw bytes take the itemsize per
    value, typed fields at most 10 (a varint; int8 and float16 values live in ``int32_data``)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return tensor.ByteSize()
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):  # an undefined or packed type
        itemsize = 8
    raw = tensor.HasField("raw_data") or tensor.data_location == onnx.TensorProto.EXTERNAL
    per_value = itemsize if raw else max(itemsize, 10)
    return math.prod(tensor.dims) * per_value + len(tensor.name) + _TENSOR_OVERHEAD


def _unread_bytes(model: onnx.ModelProto) -> int:
    """What reading the weights left in their files would add to ``model.ByteSize()``."""
    return sum(
        in_memory_size(t) - t.ByteSize() for _, g in walk_graphs(model.graph) for t in g.initializer if left_in_file(t)
    )


def _check_readable_file(path: Path, what: str) -> None:
    if not path.exists():
        raise ModelLoadError(f"{path}: {what} not found; check the path")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an {what} file")


def load_model(path: Path, *, weights: bool = True) -> onnx.ModelProto:
    """Read and validate an ONNX model, with its external data if it has any.

    ``weights=False``: external data is not read; its initializers keep pointing to their files
    (with the model's directory recorded in them: ``left_in_file``), so that
    ``graph.session.make_session`` lets onnxruntime read them from there, ``tensor_array`` (and
    ``GraphIndex.constant``) reads one when its values are needed, and ``save_model`` copies them
    from there: no copy of those weights in this process's protobuf. Copies of such a model (an
    editor's) are small. Read initializer values only through those functions.

    Raises:
        ModelLoadError: the file is missing, a directory, not ONNX, truncated, or invalid.
    """
    path = Path(path)
    _check_readable_file(path, "ONNX model")
    available = available_memory()
    if available is not None and path.stat().st_size > available:
        raise ModelLoadError(
            f"{path}: the model ({path.stat().st_size / 2**30:.1f} GiB) is larger than the free memory "
            f"({available / 2**30:.1f} GiB); free memory or use a larger machine"
        )
    checked = _passes_checker(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError, ...
        raise ModelLoadError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}); is the file truncated?"
        ) from exc
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph found); is this the right file?")
    external = _uses_external_data(model)
    if external:
        _check_external_locations(model, path)
    try:  # failed from the file: again, to say why (with external data from the file: any size, no copy)
        if not checked:
            onnx.checker.check_model(str(path) if external else model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"{path}: fails ONNX validation: {first}") from exc
    except (UnicodeDecodeError, ValueError, RuntimeError) as exc:  # corrupted strings inside the protobuf
        raise ModelLoadError(f"{path}: fails ONNX validation ({type(exc).__name__}); is the file corrupted?") from exc
    if external and weights:
        _load_external_data(model, path)
    elif external:
        _record_external_base(model, path)
    return model


def _passes_checker(path: Path) -> bool:
    """Whether the file at ``path`` passes onnx's checker, checked from the file before the model is loaded.

    The file-based checker parses its own copy of the model (external data not read); run before
    ``onnx.load``, that copy is the only one in memory. Checking the loaded proto instead serializes
    it first: the model three times over (proto, bytes, the checker's copy). all-MiniLM-L6 (87 MB),
    peak RSS of loading and checking: +172 MB vs +314 MB. False for any failure: ``load_model``
    then finds what is wrong and says it as before.
    """
    try:
        onnx.checker.check_model(str(path))
    except Exception:
        return False
    return True


#: the key ``load_model(weights=False)`` adds to a tensor's external data: the directory it is relative to
EXTERNAL_BASE_KEY = "quantcli_base_dir"


def _record_external_base(model: onnx.ModelProto, path: Path) -> None:
    """Initializers left in their files record the directory; a tensor in a node attribute (a Constant's
    value, rare and small) is read, since nothing but an initializer is read lazily."""
    base = str(path.resolve().parent)
    for _, graph in walk_graphs(model.graph):
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                tensor.external_data.add(key=EXTERNAL_BASE_KEY, value=base)
        for node in graph.node:
            for attr in node.attribute:
                for tensor in [attr.t, *attr.tensors] if attr.HasField("t") else attr.tensors:
                    if tensor.data_location == onnx.TensorProto.EXTERNAL:
                        onnx.external_data_helper.load_external_data_for_tensor(tensor, base)


def external_base(model: onnx.ModelProto) -> Path | None:
    """The directory the unread external data of ``model`` is in (``load_model(weights=False)``), or None."""
    for _, graph in walk_graphs(model.graph):
        for tensor in graph.initializer:
            for entry in tensor.external_data:
                if entry.key == EXTERNAL_BASE_KEY:
                    return Path(entry.value)
    return None


def left_in_file(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` is a weight ``load_model(weights=False)`` left in its file (its bytes not read)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == EXTERNAL_BASE_KEY for e in tensor.external_data
    )


def _file_slice(tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    """(file, offset, length) of a tensor left in its file; a length not recorded is read to the end."""
    info = {e.key: e.value for e in tensor.external_data}
    path = Path(info[EXTERNAL_BASE_KEY]) / info["location"]
    offset = int(info.get("offset", "0"))
    length = int(info["length"]) if "length" in info else path.stat().st_size - offset
    return path, offset, length


def _read_slice(tensor: onnx.TensorProto) -> bytes:
    path, offset, length = _file_slice(tensor)
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(length)
    if len(data) != length:
        raise ValueError(f"external data of '{tensor.name}' in {path} is truncated")
    return data


def in_memory(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """``tensor`` as ``load_model`` reads it: a weight left in its file becomes a copy holding its bytes
    (the fields onnx's loader sets, so the bytes written are the same); any other tensor is returned as is."""
    if not left_in_file(tensor):
        return tensor
    loaded = onnx.TensorProto()
    loaded.CopyFrom(tensor)  # small: the stub holds no weight
    loaded.raw_data = _read_slice(tensor)
    loaded.data_location = onnx.TensorProto.DEFAULT
    del loaded.external_data[:]
    return loaded


def in_memory_size(tensor: onnx.TensorProto) -> int:
    """``tensor.ByteSize()`` once its bytes are read (``in_memory``), without reading them."""
    if not left_in_file(tensor):
        return tensor.ByteSize()
    stub = onnx.TensorProto()
    stub.CopyFrom(tensor)
    stub.data_location = onnx.TensorProto.DEFAULT
    del stub.external_data[:]
    length = _file_slice(tensor)[2]
    return stub.ByteSize() + 1 + _varint_size(length) + length  # raw_data: tag, length, bytes


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The value of an initializer, read from its file when ``load_model(weights=False)`` left it there
    (one weight at a time: nothing else of the file is read, nothing is kept)."""
    if not left_in_file(tensor):
        return numpy_helper.to_array(tensor)
    item = _ITEM_BYTES.get(tensor.data_type)
    if item is None or tensor.data_type == onnx.TensorProto.BFLOAT16 or sys.byteorder != "little":
        return numpy_helper.to_array(in_memory(tensor))
    path, offset, length = _file_slice(tensor)
    count = length // item
    values = np.fromfile(path, dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type), count=count, offset=offset)
    if values.size != count or count * item != length:
        raise ValueError(f"external data of '{tensor.name}' in {path} does not hold {length} bytes")
    return values.reshape(tuple(tensor.dims))


#: ``spill_weights`` moves initializers at least this large (well above ``_EXTERNAL_ABOVE``: a spilled
#: tensor is written to external data as it would have been from memory)
_SPILL_ABOVE = 1 << 20


def spill_weights(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """``model`` with its large weights moved to a file in ``folder`` and left there as
    ``load_model(weights=False)`` leaves weights (``left_in_file``): sessions read them from there,
    ``save_model`` copies them (the same bytes), and the model returned holds none of them.

    ``model`` itself loses them (moved, not copied): drop it and keep the model returned, a compact
    copy (protobuf gives a message's memory back only when the whole message goes). Weights already
    left in another file are copied to ``folder`` too (one directory for onnxruntime); small ones
    (under 1 MiB) are read into the model, as ``load_model`` reads them. For a model saved with
    external data (``save_model(external_data=True)``): the weights moved (1 MiB or more) go there.
    """
    _spill(model, Path(folder))
    compact = onnx.ModelProto()
    compact.CopyFrom(model)
    return compact


def holds_spillable_weights(model: onnx.ModelProto) -> bool:
    """Whether ``spill_weights`` would move weights ``model`` holds in memory and nothing else: one of
    them is 1 MiB or more, none is left in its file already (``load_model(weights=False)``: those
    would be copied), and together they are below protobuf's 2 GB (above, sessions take the weights
    in place, ``quantcli.graph.session``, and writing them out would cost more than it saves).

    Sizes come from shapes and types: nothing is serialized or copied to tell.
    """
    total, large = 0, False
    for _, graph in walk_graphs(model.graph):
        for tensor in graph.initializer:
            if left_in_file(tensor):
                return False
            size = _raw_size(tensor)
            total += size
            large = large or size >= _SPILL_ABOVE
    return large and total < PROTOBUF_LIMIT


def _spill(model: onnx.ModelProto, folder: Path) -> None:
    path = folder / "weights.bin"
    with open(path, "ab") as fh:
        for _, graph in walk_graphs(model.graph):
            for tensor in graph.initializer:
                if left_in_file(tensor):
                    if _file_slice(tensor)[2] < _SPILL_ABOVE:
                        tensor.CopyFrom(in_memory(tensor))
                        continue
                    offset = _align(fh, _SPILL_ABOVE)  # aligned: onnxruntime maps it instead of reading it
                    length = _copy_slice(tensor, fh)
                    del tensor.external_data[:]
                elif tensor.data_location != onnx.TensorProto.EXTERNAL and _raw_size(tensor) >= _SPILL_ABOVE:
                    offset = _align(fh, _SPILL_ABOVE)
                    fh.write(tensor.raw_data)
                    length = fh.tell() - offset
                    tensor.ClearField("raw_data")
                else:
                    continue
                _point_at(tensor, path.name, offset, length)
                tensor.external_data.add(key=EXTERNAL_BASE_KEY, value=str(Path(folder).resolve()))


def _copy_slice(tensor: onnx.TensorProto, fh: Any) -> int:
    """Append the bytes of a tensor left in its file to ``fh`` in chunks; their length."""
    source, start, length = _file_slice(tensor)
    with open(source, "rb") as src:
        src.seek(start)
        left = length
        while left:
            chunk = src.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise ValueError(f"external data of '{tensor.name}' in {source} is truncated")
            fh.write(chunk)
            left -= len(chunk)
    return length


def stored_above_limit(path: Path) -> bool:
    """Whether the model at ``path`` with its external data files is above protobuf's 2 GB (reads no weight)."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable: the caller's own load reports it
        return False
    files = {
        e.value
        for _, g in walk_graphs(model.graph)
        for t in g.initializer
        for e in t.external_data
        if e.key == "location"
    }
    base = path.resolve().parent
    return path.stat().st_size + sum((base / f).stat().st_size for f in files if (base / f).is_file()) >= PROTOBUF_LIMIT


def has_external_data(path: Path) -> bool:
    """Whether the model file at ``path`` keeps initializers in external data (reads no weights)."""
    try:
        return _uses_external_data(onnx.load(str(path), load_external_data=False))
    except Exception:  # unreadable: the caller's own load reports it
        return False


#: initializers at least this large are left out of ``split_weights``'s skeleton
_SPLIT_ABOVE = 1 << 16
#: where ``split_weights``'s skeleton says its large weights are (a file name no one reads)
STUB_LOCATION = "quantcli-weights-in-memory"


def _copy_field(target: Any, name: str, value: Any) -> None:
    if hasattr(value, "extend"):  # a repeated field
        getattr(target, name).extend(value)
    elif hasattr(value, "CopyFrom"):
        getattr(target, name).CopyFrom(value)
    else:
        setattr(target, name, value)


#: bytes per element of the tensor types whose raw data is one element per item (not packed)
_ITEM_BYTES: dict[int, int] = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
    onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2,
    onnx.TensorProto.INT32: 4, onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BOOL: 1,
}  # fmt: skip


def _raw_size(tensor: onnx.TensorProto) -> int:
    """Bytes of ``tensor.raw_data``, from its shape and type (reading ``raw_data`` would copy it)."""
    if not tensor.HasField("raw_data"):
        return 0
    if tensor.data_type not in _ITEM_BYTES:  # packed or variable-size types: read the length
        return len(tensor.raw_data)
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * _ITEM_BYTES[tensor.data_type]


def split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A skeleton of ``model`` whose large raw initializers (main graph) are external stubs, and those tensors.

    The skeleton is small whatever the model's size (it copies no weight): it is what a checker or
    onnxruntime reads above protobuf's 2 GB, the weights then handed over separately.
    ``model`` is not modified; the tensors returned are its own (not copies).
    """
    stub = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(stub, field.name, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(stub.graph, field.name, value)
    big: list[onnx.TensorProto] = []
    for tensor in model.graph.initializer:
        size = _raw_size(tensor)
        if size < _SPLIT_ABOVE:
            stub.graph.initializer.add().CopyFrom(tensor)
            continue
        entry = stub.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        entry.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", STUB_LOCATION), ("offset", "0"), ("length", str(size))):
            entry.external_data.add(key=key, value=value)
        big.append(tensor)
    return stub, big


def graph_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """Above protobuf's 2 GB: ``split_weights``'s skeleton of ``model`` (its graph, no large weight),
    so that a caller done with the weights (its sessions hold their own) drops that copy; below: ``model``."""
    return split_weights(model)[0] if above_protobuf_limit(model) else model


def check_model(model: onnx.ModelProto) -> None:
    """onnx's checker at any size: above protobuf's 2 GB, on ``split_weights``'s skeleton (from a temporary file).

    Raises:
        onnx.checker.ValidationError: as onnx's checker does.
    """
    if not above_protobuf_limit(model) and external_base(model) is None:
        onnx.checker.check_model(model)
        return
    import tempfile

    stub, _ = split_weights(model)
    _point_at_stub_file(stub)
    with tempfile.TemporaryDirectory(prefix="quantcli-check-") as tmp:
        (Path(tmp) / STUB_LOCATION).touch()  # the checker asks that the data file exists, not its bytes
        (Path(tmp) / "model.onnx").write_bytes(stub.SerializeToString())
        onnx.checker.check_model(str(Path(tmp) / "model.onnx"))


def _point_at_stub_file(stub: onnx.ModelProto) -> None:
    """Weights left in their files point at ``STUB_LOCATION`` too (the checker reads no weight bytes)."""
    for _, graph in walk_graphs(stub.graph):
        for tensor in graph.initializer:
            if left_in_file(tensor):
                length = _file_slice(tensor)[2]
                del tensor.external_data[:]
                for key, value in (("location", STUB_LOCATION), ("offset", "0"), ("length", str(length))):
                    tensor.external_data.add(key=key, value=value)


def available_memory() -> int | None:
    """Bytes of memory this process can still use, or None when unknown.

    The smallest of: the machine's ``MemAvailable`` (Linux), the cgroup's limit minus its usage
    (containers, CI runners), and the address-space limit (``ulimit -v``) minus what the process
    has mapped already.
    """
    limits: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            limits.append(max(0, int(limit) - usage))
        break
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm", encoding="ascii") as fh:
                mapped = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limits.append(max(0, soft - mapped))
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _check_external_locations(model: onnx.ModelProto, path: Path) -> None:
    """Every external data file is inside the model's directory and exists."""
    base = path.resolve().parent
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if Path(location).is_absolute() or base not in target.parents:
            raise ModelLoadError(
                f"{path}: initializer '{tensor.name}' points to external data '{location}' outside the "
                "model's directory; refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{path}: external data file '{location}' for initializer '{tensor.name}' is missing; "
                "keep it beside the model"
            )


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    base = path.resolve().parent
    try:
        onnx.load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read external data ({exc})") from exc


def model_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports (0 if none)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """A copy of ``model`` converted to default-domain opset ``version`` by onnx's version converter.

    The converter gets ``split_weights``'s skeleton (large weights as external stubs, which its
    adapters carry through: they rewrite attributes and small constants), and the weights are put
    back into its result: one copy of them, not the six of a conversion through serialized bytes.
    ddddocr OCR recognizer (54 MB, opset 12 to 13): peak RSS above the loaded model +305 -> +56 MB.

    Raises whatever the converter raises (callers turn it into their own error).
    """
    import onnx.version_converter  # loaded only when a model needs it

    stub, weights = split_weights(model)  # the converter serializes, parses, converts, serializes: 6 copies
    if not weights:
        return onnx.version_converter.convert_version(model, version)
    converted = onnx.version_converter.convert_version(stub, version)
    by_name = {t.name: t for t in weights}
    external = onnx.TensorProto.EXTERNAL
    kept = [t for t in converted.graph.initializer if t.name in by_name and t.data_location == external]
    if len(kept) != len(weights):  # an adapter rewrote a large weight: convert it with its values
        return onnx.version_converter.convert_version(model, version)
    for tensor in kept:
        tensor.CopyFrom(by_name[tensor.name])
    return converted


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """ONNX shape inference that never blocks: returns the model and why inference failed, if it did."""
    try:
        if not above_protobuf_limit(model):
            return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True), None
        return model, "model above 2 GB: shape inference skipped"
    except Exception as exc:
        log.info("shape inference failed: %s", exc)
        return model, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def known_shapes(model: onnx.ModelProto) -> set[str]:
    """Tensors (in any graph, subgraphs included) whose rank the model records."""
    known: set[str] = set()
    for _, g in walk_graphs(model.graph):
        known |= {t.name for t in g.initializer}
        for vi in [*g.input, *g.value_info, *g.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                known.add(vi.name)
    return known


def save_model(model: onnx.ModelProto, path: Path, *, force: bool = False, external_data: bool | None = None) -> None:
    """Write a model atomically (``quantcli.graph.atomic``); ``model`` is left as it was.

    With ``external_data`` (None: when the model is above protobuf's 2 GB), initializers of 1 KiB
    or more go to ``<name>.data`` beside the model (onnx's external data, tensors of 1 MiB or more
    at offsets that are multiples of 64 KiB so onnxruntime can map them). The model and its data
    file are committed together: a kill leaves the old pair or no model, never a mismatched pair.
    Weights ``load_model(weights=False)`` left in their files are copied from there in chunks (never
    whole in memory), and the bytes written are those of the same model loaded with its weights.

    Raises:
        OutputPathError: ``path`` exists without ``force``, cannot be written, or the disk is full.
    """
    path = Path(path)
    if external_data is None:
        external_data = above_protobuf_limit(model)
    if not external_data:
        with atomic_output(path, force=force) as tmp:
            swapped = [(t, _swap_in(t, in_memory(t))) for _, g in walk_graphs(model.graph) for t in g.initializer
                       if left_in_file(t)]  # fmt: skip
            try:
                write_bytes(tmp, model.SerializeToString(deterministic=True))
            finally:
                for tensor, stub in swapped:
                    tensor.CopyFrom(stub)
        return
    data_path = path.with_name(path.name + ".data")
    with atomic_files(path, [data_path], force=force) as (tmp, data_tmp):
        moved = _write_external_data(model, data_tmp, data_path.name)
        try:
            write_bytes(tmp, model.SerializeToString(deterministic=True))
        finally:
            _restore_external_data(moved, data_tmp)


def _swap_in(tensor: onnx.TensorProto, replacement: onnx.TensorProto) -> onnx.TensorProto:
    """Make ``tensor`` a copy of ``replacement``; returns a copy of what it was (to put back)."""
    saved = onnx.TensorProto()
    saved.CopyFrom(tensor)
    tensor.CopyFrom(replacement)
    return saved


#: initializers at least this large go to the external data file; from _ALIGN_ABOVE on, aligned
_EXTERNAL_ABOVE, _ALIGN_ABOVE, _ALIGNMENT = 1024, 1 << 20, 1 << 16
#: a weight left in its file is copied to the data file in pieces of this size
_COPY_CHUNK = 1 << 24

#: a tensor ``_write_external_data`` changed, and the stub it was (None: its bytes are in the data file)
_Moved = tuple[onnx.TensorProto, onnx.TensorProto | None]


def _write_external_data(model: onnx.ModelProto, data_tmp: Path, location: str) -> list[_Moved]:
    """Move every large raw initializer's bytes to ``data_tmp``, pointing the model at ``location``.

    A weight left in its file (``left_in_file``) is written as if it had been read: copied in chunks
    when large, its bytes put in the model when small.
    """
    moved: list[_Moved] = []
    with open(data_tmp, "wb") as fh:
        for _, graph in walk_graphs(model.graph):
            for tensor in graph.initializer:
                if left_in_file(tensor):
                    moved.append(_write_unread(tensor, fh, location))
                    continue
                if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
                    continue
                raw = tensor.raw_data
                if len(raw) < _EXTERNAL_ABOVE:
                    continue
                offset = _align(fh, len(raw))
                fh.write(raw)
                del raw
                checkpoint("wrote a tensor")
                tensor.ClearField("raw_data")
                _point_at(tensor, location, offset, fh.tell() - offset)
                moved.append((tensor, None))
    return moved


def _align(fh: Any, size: int) -> int:
    """Pad ``fh`` so that a tensor of ``size`` bytes starts aligned (from _ALIGN_ABOVE on); its offset."""
    if size >= _ALIGN_ABOVE and fh.tell() % _ALIGNMENT:
        fh.write(b"\0" * (_ALIGNMENT - fh.tell() % _ALIGNMENT))
    return int(fh.tell())


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def _write_unread(tensor: onnx.TensorProto, fh: Any, location: str) -> _Moved:
    """Write a weight left in its file as ``_write_external_data`` writes one read: returns what to put back."""
    length = _file_slice(tensor)[2]
    if length < _EXTERNAL_ABOVE:  # stays in the model, as its bytes
        return tensor, _swap_in(tensor, in_memory(tensor))
    offset = _align(fh, length)
    _copy_slice(tensor, fh)
    checkpoint("wrote a tensor")
    stub = onnx.TensorProto()
    stub.CopyFrom(tensor)
    del tensor.external_data[:]
    _point_at(tensor, location, offset, length)
    return tensor, stub


def _restore_external_data(moved: list[_Moved], data_tmp: Path) -> None:
    """Put back the tensors ``_write_external_data`` changed (bytes read from ``data_tmp``)."""
    with open(data_tmp, "rb") as fh:
        for tensor, stub in moved:
            if stub is not None:
                tensor.CopyFrom(stub)
                continue
            info = {e.key: int(e.value) for e in tensor.external_data if e.key in ("offset", "length")}
            fh.seek(info["offset"])
            data = fh.read(info["length"])
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
            tensor.raw_data = data
