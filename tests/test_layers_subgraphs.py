"""``compare --per-layer`` inside If branches, fed through the scalar (unbatched) data convention."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from quantcli.compare.layers import layer_models, layer_statistics, per_layer_errors
from quantcli.data.datasets import model_input_specs, open_dataset
from quantcli.graph.scopes import walk_graphs
from tests.test_control_flow import _if_feeds, _quantize, if_model


def _folder(tmp_path: Path, rng: np.random.Generator, flags: tuple[bool, ...]) -> Path:
    """One .npz per branch: ``x0`` stacked on axis 0 and the scalar ``flag`` fed with every batch."""
    folder = tmp_path / "data"
    folder.mkdir()
    for flag in flags:
        np.savez(folder / f"{flag}.npz", x0=rng.normal(size=(24, 32)).astype(np.float32), flag=np.array(flag))
    return folder


def _inner_names(model) -> dict[str, set[str]]:
    return {p: {o for n in g.node for o in n.output} for p, g in walk_graphs(model.graph) if p}


def test_per_layer_reaches_tensors_inside_both_branches(tmp_path, rng):
    model = if_model()
    quantized, _, _ = _quantize(model, _if_feeds(rng, (True, False)))
    dataset = open_dataset(_folder(tmp_path, rng, (True, False)), model_input_specs(model))
    layers = {e.tensor: e for e in per_layer_errors(model, quantized, dataset, batch_size=8)}
    inner = _inner_names(model)
    else_found = inner["branch/else_branch"] & set(layers)
    assert else_found == {"e_mm", "e_sig"}, sorted(layers)  # the Q/DQ pairs inside the else branch
    for t in else_found:
        assert 10 < layers[t].sqnr_db < math.inf and layers[t].local_sqnr_db is None, t
        assert layers[t].observed_max > layers[t].observed_min
    assert {"x", "h"} <= set(layers)  # main graph as before


def test_a_branch_the_data_never_takes_is_left_out(tmp_path, rng):
    model = if_model()
    quantized, _, _ = _quantize(model, _if_feeds(rng, (True, False)))
    dataset = open_dataset(_folder(tmp_path, rng, (True,)), model_input_specs(model))
    layers = {e.tensor for e in per_layer_errors(model, quantized, dataset, batch_size=8)}
    inner = _inner_names(model)
    assert {"x", "h"} <= layers
    assert not inner["branch/else_branch"] & layers


def test_tensors_inside_branches_keep_the_batch_asked_for(tmp_path, rng):
    """Which branch runs may depend on the batch: a small budget splits the tensors into groups instead."""
    model = if_model()
    quantized, _, _ = _quantize(model, _if_feeds(rng, (True, False)))
    dataset = open_dataset(_folder(tmp_path, rng, (True, False)), model_input_specs(model))
    models = layer_models(model, quantized)
    assert not set(models.names) <= models.main
    stats = layer_statistics(models, dataset, batch_size=8, max_memory=1)
    assert stats.run_batch == 8 and stats.passes == len(models.names)
