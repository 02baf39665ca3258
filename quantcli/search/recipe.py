"""Recipes: the decisions of an accuracy-driven search, saved so that ``convert --recipe`` replays them.

A recipe is a small JSON document that a person can read and edit (schema ``quantcli.recipe/1``;
``quantcli.recipe/2`` when it also fixes algorithms, ``quantcli.recipe/3`` when it runs nodes with
run-time activation quantization, ``quantcli.recipe/4`` when its search held samples back from calibration,
so that an older quantcli refuses it instead of replaying it without them):

* ``model_sha256``: the FP32 model it was made for (replaying on another model is refused);
* ``config``: integer types and options (activation/weight type, per-channel, reduce-range, ...);
* ``method`` and ``percentile``: how every activation's clip range is chosen from the calibration;
* ``tensor_methods``: per-tensor exceptions to ``method`` (tensor name -> method);
* ``float_nodes``: nodes kept in float by the search, exactly by name;
* ``dynamic_nodes`` (schema 3): MatMul/Gemm run with run-time activation quantization, exactly by name;
* ``algorithms`` (schema 2, or 3): CLE, SmoothQuant alpha and bias correction, applied before ``method``
  (``config.weight_clipping`` holds the fourth algorithm);
* ``held_back`` (schema 4): ``{"samples": h, "of": n}`` when the search scored on ``h`` of the ``n``
  ``--data`` samples, held back from calibration (its ``--eval-data`` was its ``--data``:
  ``quantcli.pipeline.holdout``); a replay on the same ``n`` samples holds back the same ones;
* ``search``: what was measured when the recipe was made (budget, metric, latency); informative only.

Replaying needs the same calibration (file or data) that the search used: with it, the written
model is byte-identical to the one the search wrote. A recipe with algorithms needs the data
itself (they transform the graph and read per-channel statistics).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantcli.core.errors import ArtifactMismatchError
from quantcli.core.options import (
    DEFAULT_PERCENTILE,
    AlgorithmOptions,
    CalibrationMethod,
    QuantConfig,
    QuantDType,
    WeightClipping,
)
from quantcli.graph.model_io import atomic_output

__all__ = [
    "RECIPE_SCHEMA",
    "RECIPE_SCHEMA_ALGORITHMS",
    "RECIPE_SCHEMA_DYNAMIC",
    "RECIPE_SCHEMA_HELD_BACK",
    "Recipe",
    "read_recipe",
    "write_recipe",
]

RECIPE_SCHEMA = "quantcli.recipe/1"
#: written when the recipe fixes algorithms; both are read
RECIPE_SCHEMA_ALGORITHMS = "quantcli.recipe/2"
#: written when the recipe runs nodes with run-time activation quantization (with or without algorithms)
RECIPE_SCHEMA_DYNAMIC = "quantcli.recipe/3"
#: written when the search held samples of ``--data`` back from calibration (whatever else it has)
RECIPE_SCHEMA_HELD_BACK = "quantcli.recipe/4"
_SCHEMAS = (RECIPE_SCHEMA, RECIPE_SCHEMA_ALGORITHMS, RECIPE_SCHEMA_DYNAMIC, RECIPE_SCHEMA_HELD_BACK)


@dataclass(frozen=True, slots=True)
class Recipe:
    """Everything that decides the bytes of a quantized model, given its calibration."""

    model_sha256: str
    config: QuantConfig
    method: CalibrationMethod
    percentile: float = DEFAULT_PERCENTILE
    tensor_methods: tuple[tuple[str, CalibrationMethod], ...] = ()
    float_nodes: tuple[str, ...] = ()
    search: dict[str, Any] = field(default_factory=dict)
    algorithms: AlgorithmOptions = field(default_factory=AlgorithmOptions)
    dynamic_nodes: tuple[str, ...] = ()
    #: (h, n): calibration read all of the ``n`` data samples but ``h`` spread through them (None: all)
    held_back: tuple[int, int] | None = None


def _config_to_json(config: QuantConfig) -> dict[str, Any]:
    return {
        "activation_type": str(config.activation_type),
        "weight_type": str(config.weight_type),
        "per_channel": config.per_channel,
        "symmetric_activations": config.symmetric_activations,
        "reduce_range": config.reduce_range,
        "op_types": sorted(config.op_types),
        "exclude_op_types": sorted(config.exclude_op_types),
        "exclude_nodes": list(config.exclude_nodes),
        "fold_relu": config.fold_relu,
        "weight_clipping": str(config.weight_clipping),
        **({"dynamic_nodes": list(config.dynamic_nodes)} if config.dynamic_nodes else {}),
    }


def _config_from_json(data: dict[str, Any]) -> QuantConfig:
    return QuantConfig(
        activation_type=QuantDType(data["activation_type"]),
        weight_type=QuantDType(data["weight_type"]),
        per_channel=bool(data["per_channel"]),
        symmetric_activations=bool(data["symmetric_activations"]),
        reduce_range=bool(data["reduce_range"]),
        op_types=frozenset(data.get("op_types", [])),
        exclude_op_types=frozenset(data.get("exclude_op_types", [])),
        exclude_nodes=tuple(data.get("exclude_nodes", [])),
        fold_relu=bool(data.get("fold_relu", True)),
        weight_clipping=WeightClipping(data.get("weight_clipping", "absmax")),
        dynamic_nodes=tuple(data.get("dynamic_nodes", [])),
    )


def _algorithms_from_json(data: dict[str, Any]) -> AlgorithmOptions:
    alpha = data.get("smoothquant")
    return AlgorithmOptions(
        cle=bool(data.get("cle", False)),
        smoothquant=None if alpha is None else float(alpha),
        bias_correction=bool(data.get("bias_correction", False)),
    )


def recipe_to_json(recipe: Recipe) -> dict[str, Any]:
    """The JSON document of ``recipe`` (keys in a fixed order, so files are reproducible)."""
    a = recipe.algorithms
    doc: dict[str, Any] = {
        "schema": RECIPE_SCHEMA_HELD_BACK
        if recipe.held_back is not None
        else RECIPE_SCHEMA_DYNAMIC
        if recipe.dynamic_nodes
        else RECIPE_SCHEMA_ALGORITHMS
        if a.needs_data
        else RECIPE_SCHEMA,
        "model_sha256": recipe.model_sha256,
        "config": _config_to_json(recipe.config),
    }
    if a.needs_data:
        doc["algorithms"] = {"cle": a.cle, "smoothquant": a.smoothquant, "bias_correction": a.bias_correction}
    doc.update(
        method=str(recipe.method),
        percentile=recipe.percentile,
        tensor_methods={name: str(m) for name, m in recipe.tensor_methods},
        float_nodes=list(recipe.float_nodes),
        **({"dynamic_nodes": list(recipe.dynamic_nodes)} if recipe.dynamic_nodes else {}),
        **({"held_back": {"samples": recipe.held_back[0], "of": recipe.held_back[1]}} if recipe.held_back else {}),
        search=recipe.search,
    )
    return doc


def write_recipe(recipe: Recipe, path: Path, *, force: bool = False) -> None:
    """Write ``recipe`` to ``path`` atomically."""
    text = json.dumps(recipe_to_json(recipe), indent=2, allow_nan=False) + "\n"
    with atomic_output(Path(path), force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_recipe(path: Path, *, expected_sha256: str | None = None) -> Recipe:
    """Read a recipe file.

    Raises:
        ArtifactMismatchError: unreadable, not a recipe, another schema version, malformed, or made
            for another model.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactMismatchError(f"{path}: recipe file does not exist") from None
    except IsADirectoryError:
        raise ArtifactMismatchError(f"{path}: is a directory, not a recipe file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactMismatchError(f"{path}: not a quantcli recipe (not JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("schema") not in _SCHEMAS:
        found = data.get("schema") if isinstance(data, dict) else None
        raise ArtifactMismatchError(
            f"{path}: not a {RECIPE_SCHEMA} recipe (schema {found!r}); write it with 'quantcli convert --save-recipe'"
        )
    try:
        recipe = Recipe(
            model_sha256=str(data["model_sha256"]),
            config=_config_from_json(data["config"]),
            method=CalibrationMethod(data["method"]),
            percentile=float(data.get("percentile", DEFAULT_PERCENTILE)),
            tensor_methods=tuple((str(k), CalibrationMethod(v)) for k, v in data.get("tensor_methods", {}).items()),
            float_nodes=tuple(str(n) for n in data.get("float_nodes", [])),
            search=dict(data.get("search", {})),
            algorithms=_algorithms_from_json(data["algorithms"])
            if data["schema"] == RECIPE_SCHEMA_ALGORITHMS or "algorithms" in data
            else AlgorithmOptions(),
            dynamic_nodes=tuple(str(n) for n in data.get("dynamic_nodes", [])),
            held_back=(int(data["held_back"]["samples"]), int(data["held_back"]["of"]))
            if "held_back" in data
            else None,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactMismatchError(f"{path}: malformed recipe ({type(exc).__name__}: {exc})") from None
    if expected_sha256 is not None and recipe.model_sha256 != expected_sha256:
        raise ArtifactMismatchError(f"{path}: the recipe was made for another model (sha256 differs)")
    return recipe
