"""The graph layer, the only code that builds or edits ONNX protobuf (a ruff banned-api rule keeps it so).

* ``model_io``: load, check, save; sha256, opset, opset upgrade, shape inference.
* ``index``: ``GraphIndex``, read-only lookups (producers, consumers, constants, types, shapes).
* ``scopes``: walks over control-flow subgraphs and what they read from outside.
* ``names``: ``NameAllocator``, unique names for what a rewrite adds.
* ``editor``: ``ModelEditor``/``GraphEditor``, the one functional graph editor, and ``make_node``/``make_tensor``.
* ``session``: ``make_session`` (every onnxruntime session) and ``augmented`` (tensors exposed as outputs).
* ``subgraphs``: subgraph tensors carried out as main-graph outputs (for calibration).
* ``reductions``: tensors summarized inside the graph as [min, max, nans, size] (min-max, opt-in).
* ``model``: re-exports of ``model_io`` for api.py and cli/ until their rewrite merges (to be removed).
"""
