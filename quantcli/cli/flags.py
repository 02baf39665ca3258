"""From flags to requests: flag groups parsed into library values, and request fields named as flags.

Library errors name options by their request field (``quantcli.core.errors``); ``FLAGS`` is the one
table that turns a field into the flag a user typed, so only the CLI spells flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quantcli.compare.gates import GateThresholds
from quantcli.compare.map_thresholds import DEFAULT_MAP_THRESHOLD, MapThreshold
from quantcli.compare.output_kinds import parse_output_kinds
from quantcli.core.errors import InvalidOption, OptionConflict, QuantCliError
from quantcli.core.host import detect_host
from quantcli.core.options import AlgorithmOptions, CalibrationMethod, QuantConfig, QuantDType, StrEnum, WeightClipping
from quantcli.data.datasets import parse_batch_axes
from quantcli.data.images import ImagePreprocess
from quantcli.modes.common import ConvertMode, WeightOnlyType
from quantcli.modes.dynamic import DEFAULT_OP_TYPES, SUPPORTED_OP_TYPES, DynamicOptions
from quantcli.modes.weight_only import BLOCK_SIZES, WeightOnlyOptions
from quantcli.pipeline.request import ConvertRequest
from quantcli.search.budget import DEFAULT_MARGIN

if TYPE_CHECKING:
    from quantcli.search.accuracy_search import SearchOptions

__all__ = [
    "FLAGS",
    "AlgorithmFlags",
    "CalibrationFlags",
    "GateFlags",
    "ImageFlags",
    "ModeFlags",
    "QuantFlags",
    "RunFlags",
    "SearchFlags",
    "SourceFlags",
    "Toggle",
    "convert_request",
    "error_text",
    "flag",
    "parse_bytes",
    "split_list",
]

#: request and API fields -> the flags that set them (a field not listed is ``--`` + its name with dashes)
FLAGS: dict[str, str] = {
    "calibration": "--calibration",
    "data_path": "--data",
    "eval_data": "--eval-data",
    "random_samples": "--random",
    "search": "--max-accuracy-drop, --min-sqnr, --min-agreement, --min-cosine or --min-iou",
    "time_budget_s": "--time-budget",
    "measure_memory": "--memory",
    "batch_axes": "--batch-axis",
    "output_kinds": "--output-kind",
    "smoothquant": "--smoothquant",
    "dynamic_nodes": "--dynamic-nodes",
}


def flag(field: str) -> str:
    """The flag that sets ``field``: ``eval_data`` -> ``--eval-data``."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def error_text(exc: QuantCliError) -> str:
    """The error's message with its option fields written as flags."""
    return exc.render(flag)


class Toggle(StrEnum):
    """auto/on/off choices."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


def split_list(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated values as one list: ``["a,b", "c"]`` -> ``["a", "b", "c"]``."""
    items: list[str] = []
    for v in values or []:
        items.extend(x.strip() for x in v.split(",") if x.strip())
    return items


def parse_bytes(text: str | None) -> int | None:
    """``--max-memory``: ``512M``, ``2G``, ``1.5GiB`` -> bytes."""
    if text is None:
        return None
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1] if raw and raw[-1] in units else ""
    try:
        value = float(raw[:-1] if unit else raw)
    except ValueError:
        raise InvalidOption(f"$max_memory {text!r}: expected a size such as 512M or 2G", option="max_memory") from None
    if value <= 0:
        raise InvalidOption(f"$max_memory {text!r}: must be positive", option="max_memory")
    return int(value * units[unit])


def _triple(text: str, name: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise InvalidOption(f"${name} {text!r}: expected three numbers, e.g. 0.485,0.456,0.406", option=name)
    return values


@dataclass(frozen=True, slots=True)
class ImageFlags:
    """The image-folder flags every command that reads data shares."""

    size: str | None
    resize: int | None
    scale: float
    mean: str
    std: str
    channel_order: str
    layout: str

    def parse(self) -> ImagePreprocess:
        """Check the flags and build the preprocessing they describe."""
        hw = None
        if self.size is not None:
            parts = self.size.lower().split("x")
            try:
                hw = (int(parts[0]), int(parts[-1]))
            except ValueError:
                raise QuantCliError(f"--image-size {self.size!r}: expected HxW, e.g. 224x224") from None
        if self.channel_order not in ("rgb", "bgr") or self.layout not in ("auto", "nchw", "nhwc"):
            raise QuantCliError("--channel-order must be rgb or bgr; --layout auto, nchw or nhwc")
        stds = _triple(self.std, "std")
        if any(v == 0 for v in stds) or self.scale == 0:
            raise QuantCliError("--std and --scale must not be zero")
        means = _triple(self.mean, "mean")
        return ImagePreprocess(self.resize, hw, self.scale, means, stds, self.channel_order, self.layout)


@dataclass(frozen=True, slots=True)
class QuantFlags:
    """What to quantize and how (``--activation-type`` ... ``--weight-clipping``); None means auto/default."""

    activation_type: QuantDType | None = None
    weight_type: QuantDType | None = None
    per_tensor: bool = False
    symmetric_activations: bool = False
    reduce_range: Toggle = Toggle.AUTO
    op_types: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    weight_clipping: WeightClipping = WeightClipping.ABSMAX
    dynamic_nodes: tuple[str, ...] = ()

    def static_config(self) -> QuantConfig:
        """The static mode's config; ``auto`` choices follow this host."""
        host = detect_host()
        return QuantConfig(
            activation_type=self.activation_type or host.activation_type,
            weight_type=self.weight_type or QuantDType.INT8,
            per_channel=not self.per_tensor,
            symmetric_activations=self.symmetric_activations,
            reduce_range=host.reduce_range if self.reduce_range == Toggle.AUTO else self.reduce_range == Toggle.ON,
            op_types=frozenset(self.op_types),
            exclude_op_types=frozenset(self.exclude_op_types),
            exclude_nodes=self.exclude_nodes,
            weight_clipping=self.weight_clipping,
            dynamic_nodes=self.dynamic_nodes,
        )

    def exclusions(self) -> QuantConfig:
        """The other modes read only the exclusions from the config."""
        return QuantConfig(exclude_op_types=frozenset(self.exclude_op_types), exclude_nodes=self.exclude_nodes)


@dataclass(frozen=True, slots=True)
class ModeFlags:
    """``--mode`` and ``--block-size`` (weight-only)."""

    mode: ConvertMode
    block_size: int | None = None

    def check(self, quant: QuantFlags, *, method: CalibrationMethod | None, require_fused: bool) -> None:
        """Refuse flags that mean nothing in this mode (calibration and data: ``ConvertRequest``)."""
        mode, q = self.mode, quant
        given = {
            "--method": method is not None,
            "--symmetric-activations": q.symmetric_activations,
            "--activation-type": q.activation_type is not None,
            "--block-size": self.block_size is not None,
            "--per-tensor": q.per_tensor,
            "--weight-type": q.weight_type is not None,
            "--reduce-range": q.reduce_range != Toggle.AUTO,
            "--op-types": bool(q.op_types),
            "--require-fused": require_fused,
            "--dynamic-nodes": bool(q.dynamic_nodes),
        }
        allowed = {
            ConvertMode.STATIC: set(given) - {"--block-size"},
            ConvertMode.DYNAMIC: {"--weight-type", "--per-tensor", "--reduce-range", "--op-types", "--require-fused"},
            ConvertMode.WEIGHT_ONLY: {"--weight-type", "--block-size", "--op-types", "--require-fused"},
            ConvertMode.FP16: set(),
        }[mode]
        refused = [name for name, present in given.items() if present and name not in allowed]
        if refused:
            raise OptionConflict(f"{', '.join(refused)} cannot be used with --mode {mode}", options=("mode",))
        if q.weight_type in (QuantDType.INT4, QuantDType.UINT4) and mode != ConvertMode.WEIGHT_ONLY:
            raise OptionConflict(f"--weight-type {q.weight_type} needs --mode weight-only", options=("mode",))
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            raise InvalidOption(
                f"--block-size {self.block_size}: must be one of {', '.join(map(str, BLOCK_SIZES))}",
                option="block_size",
            )
        supported = {ConvertMode.DYNAMIC: SUPPORTED_OP_TYPES, ConvertMode.WEIGHT_ONLY: frozenset({"MatMul", "Gemm"})}
        unknown = sorted(set(q.op_types) - supported[mode]) if mode in supported else []
        if unknown:
            raise InvalidOption(
                f"--op-types {','.join(unknown)}: --mode {mode} rewrites only {', '.join(sorted(supported[mode]))}",
                option="op_types",
            )

    def options(self, q: QuantFlags) -> DynamicOptions | WeightOnlyOptions | None:
        """The dynamic or weight-only mode's choices (None for the other modes)."""
        excluded = set(q.exclude_op_types)
        if self.mode == ConvertMode.DYNAMIC:
            wt = q.weight_type or QuantDType.INT8
            # the int16 saturation of AVX2 u8*s8 kernels concerns int8 weights only (uint8 runs u8*u8)
            auto = detect_host().reduce_range and wt == QuantDType.INT8
            rr = auto if q.reduce_range == Toggle.AUTO else q.reduce_range == Toggle.ON
            ops = frozenset(q.op_types or DEFAULT_OP_TYPES) - excluded
            return DynamicOptions(weight_type=wt, per_channel=not q.per_tensor, reduce_range=rr, op_types=ops)
        if self.mode == ConvertMode.WEIGHT_ONLY:
            ops = frozenset(q.op_types or ("MatMul", "Gemm")) - excluded
            wot = WeightOnlyType(str(q.weight_type or QuantDType.INT4))
            return WeightOnlyOptions(weight_type=wot, block_size=self.block_size or 32, op_types=ops)
        return None


@dataclass(frozen=True, slots=True)
class SearchFlags:
    """The accuracy search's flags; a budget (``--max-accuracy-drop``, ``--min-sqnr``, ``--min-agreement``,
    ``--min-cosine``, ``--min-iou``) turns it on."""

    max_accuracy_drop: float | None = None
    min_sqnr: float | None = None
    max_fallback: int = 24
    metric: str | None = None
    algorithms: bool = False
    min_agreement: float | None = None
    min_cosine: float | None = None
    min_iou: float | None = None
    map_threshold: MapThreshold = DEFAULT_MAP_THRESHOLD
    max_memory: int | None = None
    ray: str | None = None
    margin: float = DEFAULT_MARGIN  # standard errors (``Budget.margin``)

    def options(self) -> SearchOptions | None:
        """``SearchOptions`` for the budget, or None without one."""
        from quantcli.compare.metrics import MetricSpec, parse_metric
        from quantcli.search.accuracy_search import AGREEMENT, Budget, SearchOptions

        budget = Budget(
            self.max_accuracy_drop, self.min_sqnr, self.min_agreement, self.min_cosine, self.min_iou, self.margin
        )
        searching = not budget.is_empty()
        metric_spec = None
        if self.metric is not None:
            if self.max_accuracy_drop is None:
                raise QuantCliError(
                    "--search-metric is what --max-accuracy-drop is measured on: give --max-accuracy-drop"
                )
            metric_spec = MetricSpec(AGREEMENT, topk=0) if self.metric == AGREEMENT else parse_metric(self.metric)
            if metric_spec.function is None and metric_spec.name not in ("top1", AGREEMENT):
                raise QuantCliError(
                    f"--search-metric {self.metric!r}: use top1, agreement, module:function or file.py:function"
                )
        if self.algorithms and not searching:
            raise QuantCliError(
                "--search-algorithms is a search stage: also give a budget ($search)", options=("search",)
            )
        if self.max_memory is not None and not searching:
            raise QuantCliError(
                "--max-memory bounds the accuracy search's batches: also give a budget ($search)", options=("search",)
            )
        if self.ray is not None and not searching:
            raise QuantCliError(
                "--ray runs the accuracy search's candidates on Ray: also give a budget ($search)", options=("search",)
            )
        if not searching:
            return None
        return SearchOptions(
            budget,
            max_fallback=self.max_fallback,
            try_algorithms=self.algorithms,
            metric=metric_spec,
            map_threshold=self.map_threshold,
            max_memory=self.max_memory,
            ray=self.ray,
        )


@dataclass(frozen=True, slots=True)
class SourceFlags:
    """The files ``convert`` reads and writes (``--batch-axis`` says how its data is batched)."""

    model: Path
    output: Path
    calibration: Path | None = None
    data: Path | None = None
    eval_data: Path | None = None
    recipe: Path | None = None
    save_recipe: Path | None = None
    batch_axis: list[str] | None = None


@dataclass(frozen=True, slots=True)
class CalibrationFlags:
    """``--method``, ``--percentile``, ``--timeout``."""

    method: CalibrationMethod | None
    percentile: float
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class AlgorithmFlags:
    """``--cle``, ``--smoothquant`` (with ``--smoothquant-alpha``), ``--bias-correction``."""

    cle: bool = False
    smoothquant: bool = False
    smoothquant_alpha: float = 0.5
    bias_correction: bool = False

    def options(self) -> AlgorithmOptions:
        """The algorithms asked for."""
        return AlgorithmOptions(self.cle, self.smoothquant_alpha if self.smoothquant else None, self.bias_correction)


@dataclass(frozen=True, slots=True)
class GateFlags:
    """``compare``'s gates as typed (``--min-agreement`` takes a fraction; above 1 it is read as percent,
    the unit it had before output kinds)."""

    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    min_sqnr: float | None = None
    min_speedup: float | None = None
    max_size_ratio: float | None = None
    min_cosine: float | None = None
    min_iou: float | None = None

    def thresholds(self) -> GateThresholds:
        """The gates' bounds, ``--min-agreement`` as a fraction."""
        agreement = self.min_agreement
        if agreement is not None and agreement > 1.0:
            agreement /= 100.0
        return GateThresholds(
            self.max_accuracy_drop,
            agreement,
            self.min_sqnr,
            self.min_speedup,
            self.max_size_ratio,
            self.min_cosine,
            self.min_iou,
        )


@dataclass(frozen=True, slots=True)
class RunFlags:
    """``--force``, ``--require-fused``, ``--require-speedup``, ``--upgrade-opset``, ``--verdict(-share)``."""

    force: bool = False
    require_fused: bool = False
    require_speedup: bool = False
    upgrade_opset: bool = True
    verdict: bool = True
    verdict_share: float = 0.2
    output_kinds: tuple[str, ...] = ()


def convert_request(
    sources: SourceFlags,
    quant: QuantFlags,
    modes: ModeFlags,
    calib: CalibrationFlags,
    search: SearchFlags,
    algorithms: AlgorithmFlags,
    run: RunFlags,
    images: ImageFlags,
) -> ConvertRequest:
    """The request ``convert``'s flags describe (the request checks how its options go together)."""
    searching = search.options()
    modes.check(quant, method=calib.method, require_fused=run.require_fused)
    static = modes.mode == ConvertMode.STATIC
    return ConvertRequest(
        sources.model,
        sources.output,
        calibration=sources.calibration,
        data_path=sources.data,
        config=quant.static_config() if static else quant.exclusions(),
        method=calib.method,
        percentile=calib.percentile,
        force=run.force,
        require_fused=run.require_fused,
        require_speedup=run.require_speedup,
        upgrade_opset=run.upgrade_opset,
        timeout=calib.timeout,
        search=searching,
        eval_data=sources.eval_data,
        recipe=sources.recipe,
        save_recipe=sources.save_recipe,
        algorithms=algorithms.options(),
        mode=modes.mode,
        mode_options=modes.options(quant),
        batch_axes=parse_batch_axes(sources.batch_axis),
        images=images.parse(),
        verdict=run.verdict,
        verdict_share=run.verdict_share,
        output_kinds=parse_output_kinds(run.output_kinds),
        map_threshold=search.map_threshold,
    )
