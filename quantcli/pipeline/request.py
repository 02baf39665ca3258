"""What a command is asked to do, as one frozen value checked once: ``ConvertRequest``,
``CalibrateRequest``, ``CompareRequest``.

The command line parses its flags into a request; Python callers build one directly (or call
``quantcli.api.convert_model`` with keywords, which builds it). Every rule about which options go
together lives in ``ConvertRequest.__post_init__``, so the CLI and the API refuse the same requests
with the same error (an ``OptionConflict`` or ``MissingInput`` naming request fields; the CLI
renders the fields as its flags).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from quantcli.compare.map_thresholds import DEFAULT_MAP_THRESHOLD, MapThreshold, MapThresholds, as_thresholds
from quantcli.core.errors import InvalidOption, MissingInput, OptionConflict
from quantcli.core.options import DEFAULT_PERCENTILE, AlgorithmOptions, CalibrationMethod, QuantConfig
from quantcli.modes.common import ConvertMode

if TYPE_CHECKING:
    from quantcli.compare.metrics import MetricSpec
    from quantcli.compare.output_kinds import OutputKind
    from quantcli.data.images import ImagePreprocess
    from quantcli.modes.dynamic import DynamicOptions
    from quantcli.modes.weight_only import WeightOnlyOptions
    from quantcli.search.accuracy_search import SearchOptions
    from quantcli.search.recipe import Recipe
    from quantcli.stats.calibration import CalibrationResult

__all__ = ["CalibrateRequest", "CompareRequest", "ConvertRequest"]


@dataclass(frozen=True, slots=True)
class ConvertRequest:
    """Quantize ``model_path`` and write the result to ``output_path``.

    Attributes:
        model_path: the FP32 model (never modified).
        output_path: where the converted model goes.
        calibration: a calibration result or file (static mode); or give ``data_path``.
        data_path: data to calibrate on the fly (static mode), also used by the algorithms.
        config: what to quantize and how (None: this host's defaults).
        method: calibration method; with a calibration, ranges are re-chosen from its histograms.
        percentile: for the percentile method.
        force: overwrite outputs; with a search, write a model that is not faster than FP32.
        require_fused: fail if a quantized Conv/MatMul/Gemm did not become an integer kernel.
        require_speedup: time both models at batch 1 and write nothing unless quantized is faster.
        upgrade_opset: upgrade an opset < 13 in memory with onnx's version converter (False: refuse it).
        timeout: seconds calibration may take.
        search: an accuracy budget to search for (with ``eval_data``).
        eval_data: held-out data the search measures on, and the verdict checks.
        recipe: a saved search's decisions to replay (object or file).
        save_recipe: where the search writes its decisions.
        algorithms: CLE, SmoothQuant, bias correction (need ``data_path``).
        mode: static QDQ, or dynamic, weight-only, fp16.
        mode_options: the choices of the dynamic and weight-only modes.
        batch_axes: inputs not batched on axis 0 (``quantcli.data.datasets.open_dataset``).
        images: how image folders become input.
        verdict: end with a verdict (``quantcli.pipeline.verdict``): fidelity on samples not calibrated
            on (``eval_data``, or the held-back share of ``data_path``) and batch-1 speed.
        output_kinds: output name -> kind for the verdict, overriding detection (``quantcli.compare.output_kinds``).
        map_threshold: where the verdict (and a search whose options keep the default) cuts map outputs into
            masks (every map's, or per output: ``quantcli.compare.map_thresholds``).
        verdict_share: the share of ``data_path`` (static mode, no ``eval_data``) held back from
            calibration for the verdict, at most 64 samples (0: calibrate on all of it).

    Raises:
        OptionConflict: options that cannot go together.
        MissingInput: an option that needs another one that is missing.
    """

    model_path: Path
    output_path: Path
    calibration: CalibrationResult | Path | None = None
    data_path: Path | None = None
    config: QuantConfig | None = None
    method: CalibrationMethod | None = None
    percentile: float = DEFAULT_PERCENTILE
    force: bool = False
    require_fused: bool = False
    require_speedup: bool = False
    upgrade_opset: bool = True
    timeout: float | None = None
    search: SearchOptions | None = None
    eval_data: Path | None = None
    recipe: Recipe | Path | None = None
    save_recipe: Path | None = None
    algorithms: AlgorithmOptions = field(default_factory=AlgorithmOptions)
    mode: ConvertMode = ConvertMode.STATIC
    mode_options: DynamicOptions | WeightOnlyOptions | None = None
    batch_axes: Mapping[str, int | None] | None = None
    images: ImagePreprocess | None = None
    verdict: bool = True
    verdict_share: float = 0.2
    output_kinds: Mapping[str, OutputKind] | None = None
    map_threshold: MapThreshold = DEFAULT_MAP_THRESHOLD

    def map_thresholds(self) -> MapThreshold:
        """Where the verdict and the search cut map outputs: the request's, or the search options' when the
        request keeps the default (the Python API may set either)."""
        if as_thresholds(self.map_threshold) == MapThresholds() and self.search is not None:
            return self.search.map_threshold
        return self.map_threshold

    def __post_init__(self) -> None:
        as_thresholds(self.map_threshold).check("map_threshold")
        if not 0.0 <= self.verdict_share <= 0.5:
            raise InvalidOption(f"$verdict_share {self.verdict_share}: must be in [0, 0.5]", option="verdict_share")
        for name in ("model_path", "output_path", "data_path", "eval_data", "save_recipe"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.algorithms is None:  # the keyword API accepted None for "no algorithms"
            object.__setattr__(self, "algorithms", AlgorithmOptions())
        if self.mode != ConvertMode.STATIC:
            self._check_other_mode()
        else:
            self._check_static()
        self._check_search()

    def _check_other_mode(self) -> None:
        given = tuple(name for name in ("calibration", "data_path") if getattr(self, name) is not None)
        if given:
            raise OptionConflict(
                f"{', '.join('$' + g for g in given)} cannot be used with $mode {self.mode}; it needs no calibration",
                options=(*given, "mode"),
            )
        if self.search is not None or self.recipe is not None:
            raise OptionConflict(
                f"$mode {self.mode} has no accuracy search or recipe; they are for the static mode",
                options=("mode", "search" if self.search is not None else "recipe"),
            )

    def _check_static(self) -> None:
        if self.calibration is not None and self.data_path is not None:
            raise OptionConflict(
                "give either $calibration or $data_path, not both", options=("calibration", "data_path")
            )
        if self.calibration is None and self.data_path is None:
            raise MissingInput(
                "convert needs $calibration or $data_path to calibrate on the fly",
                option="calibration",
                options=("data_path",),
            )

    def _check_search(self) -> None:
        if self.search is not None and self.recipe is not None:
            raise OptionConflict(
                "give either a budget to search for ($search) or $recipe, not both", options=("search", "recipe")
            )
        if self.search is not None and self.eval_data is None:
            raise MissingInput(
                "the accuracy search needs $eval_data (held-out data, with labels for top-1)", option="eval_data"
            )
        if self.save_recipe is not None and self.search is None:
            raise MissingInput(
                "$save_recipe records a search's decisions: give $search", option="search", options=("save_recipe",)
            )

    @property
    def wants_histograms(self) -> bool:
        """The search and recipes re-choose methods per tensor: their calibration keeps histograms."""
        return self.search is not None or self.recipe is not None


@dataclass(frozen=True, slots=True)
class CalibrateRequest:
    """Measure activation ranges of ``model_path`` on ``data_path`` (or ``random_samples`` random inputs).

    ``quantcli.api.calibrate`` runs it; ``calibrate_model`` takes its fields as keywords.

    Raises:
        OptionConflict: both or neither of ``data_path`` and ``random_samples``.
        InvalidOption: ``percentile`` outside (50, 100].
    """

    model_path: Path
    data_path: Path | None = None
    method: CalibrationMethod = CalibrationMethod.MINMAX
    percentile: float = DEFAULT_PERCENTILE
    batch_size: int = 32
    max_samples: int | None = None
    threads: int = 0
    max_memory: int | None = None
    shuffle: bool = False
    seed: int = 0
    timeout: float | None = None
    upgrade_opset: bool = True
    images: ImagePreprocess | None = None
    random_samples: int | None = None
    batch_axes: Mapping[str, int | None] | None = None

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise InvalidOption(f"$percentile {self.percentile}: must be in (50, 100]", option="percentile")
        if (self.data_path is None) == (self.random_samples is None):
            raise OptionConflict(
                "give either $data_path PATH or $random_samples N (smoke tests only)",
                options=("data_path", "random_samples"),
            )


@dataclass(frozen=True, slots=True)
class CompareRequest:
    """Compare ``candidate_path`` (quantized) against ``reference_path`` (FP32) on ``data_path``.

    Attributes:
        batch_size: samples per run of the accuracy pass.
        max_samples: use at most this many samples (None: all).
        threads: onnxruntime threads for both models.
        latency_batch_sizes: batch sizes to time (those larger than the data are skipped).
        warmup: untimed runs first.
        runs: timed runs per model and batch size.
        per_layer: rank layers by error.
        metric: the task metric (None: top-1).
        time_budget_s: stop timing a batch size after this many seconds.
        measure_memory: measure each session's peak memory.
        batch_axes: inputs not batched on axis 0 (``quantcli.data.datasets.open_dataset``).
        images: how image folders become input.
        output_kinds: output name -> kind, overriding detection (``quantcli.compare.output_kinds``).
        map_threshold: where a probability map is cut into a mask for IoU (every map's, or per output:
            ``quantcli.compare.map_thresholds``).
        ray: measure accuracy in shard tasks on Ray (``"local"``: start Ray on this machine; else a
            cluster address, e.g. ``"auto"``); latency stays on this host (``quantcli.distributed``).
        shards: with ``ray``, the number of shards (None: one per CPU of the cluster).
        max_memory: with ``per_layer``, bytes of exposed activations held at once (None: 512 MiB,
            ``quantcli.compare.layers.DEFAULT_MEMORY_BUDGET``); Ray shards share it. It decides how many
            passes over the data the per-layer errors take, never their values.

    Raises:
        InvalidOption: a ``map_threshold`` outside (0, 1), ``shards`` below 1, or ``max_memory`` below 1.
    """

    reference_path: Path
    candidate_path: Path
    data_path: Path
    batch_size: int = 32
    max_samples: int | None = None
    threads: int = 1
    latency_batch_sizes: tuple[int, ...] = (1, 32)
    warmup: int = 10
    runs: int = 50
    per_layer: bool = False
    metric: MetricSpec | None = None
    time_budget_s: float | None = None
    measure_memory: bool = False
    batch_axes: Mapping[str, int | None] | None = None
    images: ImagePreprocess | None = None
    output_kinds: Mapping[str, OutputKind] | None = None
    map_threshold: MapThreshold = DEFAULT_MAP_THRESHOLD
    ray: str | None = None
    shards: int | None = None
    max_memory: int | None = None

    def __post_init__(self) -> None:
        for name in ("reference_path", "candidate_path", "data_path"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        as_thresholds(self.map_threshold).check("map_threshold")
        if self.shards is not None and self.shards < 1:
            raise InvalidOption(f"$shards {self.shards}: must be at least 1", option="shards")
        if self.max_memory is not None and self.max_memory < 1:
            raise InvalidOption(f"$max_memory {self.max_memory}: must be positive", option="max_memory")
