"""Streaming rule: the compute node that feeds a recurrent cell's input stays float.

A recurrent cell (LSTM, GRU, RNN) integrates its input ``x_t`` into a state it feeds back to itself:
for an LSTM, ``c_t = f_t * c_{t-1} + i_t * g(W x_t + R h_{t-1})``. A static activation quantizer on
``x_t`` adds an error ``e_t`` (rounding to the grid, clipping to the range calibration saw), and
the cell carries it on: with forget gates near one the state error after ``T`` steps of a stream
holds ``e_1 .. e_T``, not just ``e_T``. A one-run comparison (outputs from a state recorded from
FP32) does not see it; a model run on its own state does.

Silero VAD 6.2.3 shows it (``benchmarks/bench_silero.py``, 240 chunks at 16 kHz): with its last
encoder Conv quantized, the state SQNR is 26 dB after one step from the FP32 state but falls from
15.7 dB (first 50 chunks) to 6.6 dB (last 50); with that Conv float, 38 dB for one step and
19.4 -> 16.0 dB over the stream, at 1.22x FP32 speed instead of 1.25x. It is not enough where the
error comes from before the feed: Silero's 8 kHz branch (state 15 dB after one step, 6.2 -> 4.6 dB
over the stream) and Silero v6 are no better with the rule.

The walk starts at each recurrent node's ``X`` input and goes back through data-movement ops,
Relu/Clip (folded into the producer's output range) and control-flow boundaries (an ``If`` output is
the matching output of each branch; a subgraph reads outer tensors by name) until it reaches the
producer: a Conv/MatMul/Gemm there is kept float. Recurrent state inputs are not walked: they come
from graph inputs (the fed-back state) and are never quantized.
"""

from __future__ import annotations

import onnx

from quantcli.graph.scopes import node_subgraphs, walk_graphs

__all__ = ["RECURRENT_CELLS", "recurrent_input_producers"]

#: ops whose input 0 is integrated into a state carried across steps (and, in a stream, across runs)
RECURRENT_CELLS = ("LSTM", "GRU", "RNN")
_PRODUCERS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
#: ops whose output is their input 0 moved, reshaped or clipped: the walk passes through them
_PASS_THROUGH = (
    "Identity", "Relu", "Clip", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice",
    "Gather", "Expand", "Tile", "Split", "Concat", "Cast",
)  # fmt: skip

REASON = "feeds a recurrent cell's input: its rounding error would accumulate in the state over a stream"


def recurrent_input_producers(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> reason, for every Conv/MatMul/Gemm whose output reaches a recurrent cell's input
    through data-movement ops and If boundaries only (in any graph or subgraph of ``model``)."""
    producer: dict[str, onnx.NodeProto] = {}
    cells: list[onnx.NodeProto] = []
    for _, graph in walk_graphs(model.graph):
        for node in graph.node:
            for out in node.output:
                if out:
                    producer[out] = node
            if node.op_type in RECURRENT_CELLS and node.input and node.input[0]:
                cells.append(node)
    found: dict[str, str] = {}
    seen: set[str] = set()
    stack = [cell.input[0] for cell in cells]
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        node = producer.get(tensor)
        if node is None:
            continue
        if node.op_type in _PRODUCERS:
            found[node.name] = REASON
        elif node.op_type == "If":
            index = list(node.output).index(tensor)
            stack.extend(sub.output[index].name for _, sub in node_subgraphs(node) if index < len(sub.output))
        elif node.op_type == "Concat":
            stack.extend(i for i in node.input if i)
        elif node.op_type in _PASS_THROUGH and node.input and node.input[0]:
            stack.append(node.input[0])
    return found
