"""The ``quantcli`` command line: parse options, call ``quantcli.api``, render with ``quantcli.cli.report``.

Exit codes: 0 success; 1 a ``compare`` gate failed or the ``convert`` search missed its budget;
2 usage error; 3 bad input (a file, data or option quantcli cannot use; one line on stderr, no
traceback); 4 internal error (a bug: traceback).
"""

from __future__ import annotations

import functools
import signal
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from tqdm import tqdm

from quantcli import __version__, api
from quantcli.cli import html_report, report
from quantcli.compare.gates import GateThresholds, evaluate_gates
from quantcli.compare.metrics import MetricSpec, parse_metric
from quantcli.core.errors import NotFasterError, QuantCliError
from quantcli.core.host import detect_host
from quantcli.core.options import AlgorithmOptions, CalibrationMethod, QuantConfig, QuantDType, StrEnum, WeightClipping
from quantcli.data.datasets import model_input_specs, open_dataset, parse_batch_axes
from quantcli.data.images import ImagePreprocess
from quantcli.graph.model import load_model
from quantcli.modes.common import ConvertMode, WeightOnlyType
from quantcli.modes.dynamic import DEFAULT_OP_TYPES, SUPPORTED_OP_TYPES, DynamicOptions
from quantcli.modes.weight_only import BLOCK_SIZES, WeightOnlyOptions
from quantcli.search.accuracy_search import AGREEMENT, Budget, BudgetNotMetError, SearchOptions
from quantcli.stats.artifact import write_calibration
from quantcli.verify.audit import audit_fusion

EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_INTERNAL = 4

HELP = """Quantize an FP32 ONNX model to a fast INT8 model for this CPU, and prove it is still right.

Workflow (each step is one command, each writes one file):

\b
  quantcli calibrate model.onnx --data calib.npz -o model.calib.json
  quantcli convert   model.onnx --calibration model.calib.json -o model.int8.onnx
  quantcli compare   model.onnx model.int8.onnx --data eval.npz --max-accuracy-drop 1

Exit codes: 0 ok, 1 a compare gate failed or convert's budget was not met, 2 usage error, 3 bad input, 4 internal error.
"""

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)
out = Console(highlight=False, soft_wrap=False)
if not out.is_terminal:  # CI logs: wide enough that tables do not wrap
    out = Console(highlight=False, soft_wrap=False, width=140)
err = Console(stderr=True, highlight=False)


class ActivationType(StrEnum):
    """Choices for --activation-type."""

    AUTO = "auto"
    UINT8 = "uint8"
    INT8 = "int8"
    UINT16 = "uint16"
    INT16 = "int16"


class Toggle(StrEnum):
    """auto/on/off choices."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class WeightType(StrEnum):
    """Choices for --weight-type (4-bit types: --mode weight-only only)."""

    INT8 = "int8"
    UINT8 = "uint8"
    INT4 = "int4"
    UINT4 = "uint4"


class UsageError(Exception):
    """Options that contradict each other: one line and exit code 2."""


def _user_errors(func: Callable[..., None]) -> Callable[..., None]:
    """Turn QuantCliError into one red line and exit code 3 (1 for an unmet budget or a model not
    faster than FP32), Ctrl-C into exit 130."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> None:
        try:
            func(*args, **kwargs)
        except BudgetNotMetError as exc:
            err.print(f"[red]budget not met:[/] {exc}", soft_wrap=True)
            raise typer.Exit(EXIT_GATE_FAILED) from None
        except NotFasterError as exc:
            err.print(f"[red]not faster than FP32:[/] {exc}", soft_wrap=True)
            raise typer.Exit(EXIT_GATE_FAILED) from None
        except QuantCliError as exc:
            err.print(f"[red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except UsageError as exc:
            err.print(f"[red]usage error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/]; no output was written")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"quantcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Quantize an FP32 ONNX model to a fast INT8 model for this CPU, and prove it is still right."""


def _progress(quiet: bool):
    def wrap(it: Iterable[dict[str, np.ndarray]], total: int, desc: str, size: int) -> Iterable[dict[str, np.ndarray]]:
        disable = quiet or not sys.stderr.isatty()
        return tqdm(
            it, total=total, desc=desc, unit="sample", unit_scale=size, disable=disable, leave=False,
            dynamic_ncols=True,
        )  # fmt: skip

    return wrap


def _search_log(quiet: bool) -> Callable[[str], None]:
    """Each search step as one stderr line (the table on stdout keeps only the steps kept)."""
    if quiet:
        return lambda _: None
    return lambda line: err.print(f"search: {escape(line)}", highlight=False, soft_wrap=True)


def _parse_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1] if raw and raw[-1] in units else ""
    try:
        value = float(raw[:-1] if unit else raw)
    except ValueError:
        raise QuantCliError(f"--max-memory {text!r}: expected a size such as 512M or 2G") from None
    if value <= 0:
        raise QuantCliError(f"--max-memory {text!r}: must be positive")
    return int(value * units[unit])


def _triple(text: str, name: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise QuantCliError(f"--{name} {text!r}: expected three numbers, e.g. 0.485,0.456,0.406") from None
    if len(values) != 3:
        raise QuantCliError(f"--{name} {text!r}: expected three numbers, e.g. 0.485,0.456,0.406")
    return values  # type: ignore[return-value]


# image-folder preprocessing, shared by every command that reads --data
ImageSize = Annotated[str | None, typer.Option(help="Images: HxW when the model's are dynamic.")]
Resize = Annotated[int | None, typer.Option(help="Images: shorter side before the centre crop.")]
Scale = Annotated[float, typer.Option(help="Images: divide pixel values by this.")]
Mean = Annotated[str, typer.Option(help="Images: per-channel mean, e.g. 0.485,0.456,0.406.")]
Std = Annotated[str, typer.Option(help="Images: per-channel std, e.g. 0.229,0.224,0.225.")]
ChannelOrder = Annotated[str, typer.Option(help="Images: rgb or bgr.")]
Layout = Annotated[str, typer.Option(help="Images: auto, nchw or nhwc.")]


def _image_options(
    size: str | None, resize: int | None, scale: float, mean: str, std: str, order: str, layout: str
) -> ImagePreprocess:
    hw = None
    if size is not None:
        parts = size.lower().split("x")
        try:
            hw = (int(parts[0]), int(parts[-1]))
        except ValueError:
            raise QuantCliError(f"--image-size {size!r}: expected HxW, e.g. 224x224") from None
    if order not in ("rgb", "bgr") or layout not in ("auto", "nchw", "nhwc"):
        raise QuantCliError("--channel-order must be rgb or bgr; --layout auto, nchw or nhwc")
    stds = _triple(std, "std")
    if any(v == 0 for v in stds) or scale == 0:
        raise QuantCliError("--std and --scale must not be zero")
    return ImagePreprocess(resize, hw, scale, _triple(mean, "mean"), stds, order, layout)


BatchAxes = Annotated[
    list[str] | None,
    typer.Option(
        "--batch-axis",
        help="NAME=AXIS: input NAME's samples are stacked on AXIS, e.g. state=1; NAME=none: the array is one feed, "
        "given unchanged with every batch (repeatable; scalar inputs are unbatched anyway).",
    ),
]


def _split(values: list[str] | None) -> list[str]:
    items: list[str] = []
    for v in values or []:
        items.extend(x.strip() for x in v.split(",") if x.strip())
    return items


@app.command()
@_user_errors
def calibrate(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Calibration file to write (JSON).")],
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help=".npz/.npy file, a directory of them, or of images.")
    ] = None,
    random: Annotated[
        int | None, typer.Option("--random", min=1, help="SMOKE TEST ONLY: N random samples instead of --data.")
    ] = None,
    image_size: ImageSize = None,
    resize: Resize = None,
    scale: Scale = 255.0,
    mean: Mean = "0,0,0",
    std: Std = "1,1,1",
    channel_order: ChannelOrder = "rgb",
    layout: Layout = "auto",
    batch_axis: BatchAxes = None,
    method: Annotated[CalibrationMethod, typer.Option(help="How clip ranges are chosen.")] = CalibrationMethod.MINMAX,
    percentile: Annotated[float, typer.Option(help="For --method percentile: upper percentile kept.")] = 99.99,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per onnxruntime run.")] = 32,
    max_samples: Annotated[int | None, typer.Option(min=1, help="Use at most this many samples.")] = None,
    threads: Annotated[int, typer.Option(min=0, help="onnxruntime threads (0: its default).")] = 0,
    max_memory: Annotated[
        str | None, typer.Option(help="Budget for one batch of activations, e.g. 512M or 2G (default: 1/4 of free).")
    ] = None,
    shuffle: Annotated[bool, typer.Option("--shuffle", help="Visit samples in random order (see --seed).")] = False,
    seed: Annotated[int, typer.Option(help="Seed for --shuffle.")] = 0,
    timeout: Annotated[float | None, typer.Option(min=0, help="Give up after this many seconds.")] = None,
    upgrade_opset: Annotated[
        bool, typer.Option("--upgrade-opset", help="Convert opset < 13 models with onnx's version converter.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Run calibration data through the model and record activation ranges."""
    if not 50.0 < percentile <= 100.0:
        raise QuantCliError(f"--percentile {percentile}: must be in (50, 100]")
    if (data is None) == (random is None):
        raise QuantCliError("give either --data PATH or --random N (smoke tests only)")
    if random is not None:
        err.print(
            "[yellow]warning:[/] --random: ranges from random data say nothing about real inputs; smoke tests only"
        )
    images = _image_options(image_size, resize, scale, mean, std, channel_order, layout)
    result = api.calibrate_model(
        model, data, images=images, random_samples=random, method=method, percentile=percentile,
        batch_size=batch_size, max_samples=max_samples, threads=threads, max_memory=_parse_bytes(max_memory),
        shuffle=shuffle, seed=seed, timeout=timeout, upgrade_opset=upgrade_opset, progress=_progress(quiet),
        batch_axes=parse_batch_axes(batch_axis),
    )  # fmt: skip
    write_calibration(result, output, model_path=model.name, force=force)
    report.render_calibration(out, result, output)


@app.command()
@_user_errors
def convert(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model (never modified).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Quantized model to write.")],
    calibration: Annotated[Path | None, typer.Option("--calibration", "-c", help="File from 'calibrate'.")] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", "-d", help="Calibrate on the fly from this data (.npz/.npy, a directory, or images)."),
    ] = None,
    batch_axis: BatchAxes = None,
    image_size: ImageSize = None,
    resize: Resize = None,
    scale: Scale = 255.0,
    mean: Mean = "0,0,0",
    std: Std = "1,1,1",
    channel_order: ChannelOrder = "rgb",
    layout: Layout = "auto",
    method: Annotated[
        CalibrationMethod | None,
        typer.Option(
            help="With --data: calibration method (minmax). With --calibration: re-choose from its histograms."
        ),
    ] = None,
    percentile: Annotated[float, typer.Option(help="For --method percentile.")] = 99.99,
    activation_type: Annotated[
        ActivationType, typer.Option(help="auto: uint8 on x86, int8 on ARM.")
    ] = ActivationType.AUTO,
    mode: Annotated[
        ConvertMode,
        typer.Option(
            help="static: calibrated int8 QDQ; dynamic: int8 weights, activations at run time; "
            "weight-only: 4/8-bit MatMul weights (MatMulNBits); fp16: float16 weights and compute."
        ),
    ] = ConvertMode.STATIC,
    weight_type: Annotated[
        WeightType | None,
        typer.Option(help="Weight type: int8 (default) or uint8; weight-only: int4 (default), uint4, int8, uint8."),
    ] = None,
    block_size: Annotated[
        int | None, typer.Option(help="--mode weight-only: weights per block along K (16..256, default 32).")
    ] = None,
    per_tensor: Annotated[bool, typer.Option("--per-tensor", help="One weight scale per tensor.")] = False,
    symmetric_activations: Annotated[bool, typer.Option("--symmetric-activations")] = False,
    reduce_range: Annotated[
        Toggle, typer.Option("--reduce-range", help="7-bit weights; auto: on for x86 without VNNI.")
    ] = Toggle.AUTO,
    op_types: Annotated[list[str] | None, typer.Option("--op-types", help="Only quantize these op types.")] = None,
    exclude_op_types: Annotated[list[str] | None, typer.Option("--exclude-op-types")] = None,
    exclude_nodes: Annotated[
        list[str] | None, typer.Option("--exclude-nodes", help="Node names to keep float: glob, or re:REGEX.")
    ] = None,
    require_fused: Annotated[
        bool, typer.Option("--require-fused", help="Fail if a quantized Conv/MatMul/Gemm did not fuse.")
    ] = False,
    require_speedup: Annotated[
        bool,
        typer.Option(
            "--require-speedup", help="Time both models at batch 1 first; write nothing unless quantized is faster."
        ),
    ] = False,
    timeout: Annotated[float | None, typer.Option(min=0, help="With --data: give up calibrating after N s.")] = None,
    cle: Annotated[
        bool, typer.Option("--cle", help="Cross-layer equalization of Conv->(Relu)->Conv pairs (needs --data).")
    ] = False,
    smoothquant: Annotated[
        bool, typer.Option("--smoothquant", help="SmoothQuant MatMul/Gemm inputs (needs --data).")
    ] = False,
    smoothquant_alpha: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="SmoothQuant migration strength alpha.")
    ] = 0.5,
    bias_correction: Annotated[
        bool,
        typer.Option(
            "--bias-correction", help="Fold the mean shift of weight quantization into biases (needs --data)."
        ),
    ] = False,
    weight_clipping: Annotated[
        WeightClipping, typer.Option(help="Weight ranges: absmax, or mse (per-channel clip of least weight MSE).")
    ] = WeightClipping.ABSMAX,
    upgrade_opset: Annotated[
        bool, typer.Option("--upgrade-opset", help="Convert opset < 13 models with onnx's version converter.")
    ] = False,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Held-out data (with labels) for the accuracy search.")
    ] = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(min=0, help="Search: fall back the fewest nodes until top-1 drops at most this many points."),
    ] = None,
    min_sqnr: Annotated[
        float | None, typer.Option(help="Search: until every output's SQNR is at least this (dB).")
    ] = None,
    search_max_fallback: Annotated[int, typer.Option(min=0, help="Search: most nodes returned to float.")] = 24,
    search_metric: Annotated[
        str | None,
        typer.Option(
            help="Search: measure --max-accuracy-drop on top1 (default), agreement (share of top-1 changed vs "
            "FP32, labels ignored: stricter, less noisy) or module:function / file.py:function "
            "(outputs, labels -> 0..1)."
        ),
    ] = None,
    search_algorithms: Annotated[
        bool,
        typer.Option(
            "--search-algorithms",
            help="Search: also try CLE + SmoothQuant + bias correction + MSE weight clipping (needs --data).",
        ),
    ] = False,
    save_recipe: Annotated[
        Path | None, typer.Option("--save-recipe", help="Search: write its decisions here (JSON).")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Replay a saved recipe (types, methods, float nodes).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Overwrite OUTPUT if it exists; with a budget, write the model even when it is not faster than FP32.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Write a QDQ model that onnxruntime runs with integer kernels (or another --mode's model).

    With --eval-data and a budget (--max-accuracy-drop, --min-sqnr), search for the model with
    the fewest float nodes that meets it; --save-recipe keeps the decisions for --recipe.
    """
    if calibration is not None and data is not None:
        raise QuantCliError("give either --calibration or --data, not both")
    budget = Budget(max_accuracy_drop, min_sqnr)
    searching = max_accuracy_drop is not None or min_sqnr is not None
    if eval_data is not None and not searching:
        raise QuantCliError("--eval-data is for the accuracy search: also give --max-accuracy-drop or --min-sqnr")
    metric_spec = None
    if search_metric is not None:
        if max_accuracy_drop is None:
            raise QuantCliError("--search-metric is what --max-accuracy-drop is measured on: give --max-accuracy-drop")
        metric_spec = MetricSpec(AGREEMENT, topk=0) if search_metric == AGREEMENT else parse_metric(search_metric)
        if metric_spec.function is None and metric_spec.name not in ("top1", AGREEMENT):
            raise QuantCliError(
                f"--search-metric {search_metric!r}: use top1, agreement, module:function or file.py:function"
            )
    if search_algorithms and not searching:
        raise QuantCliError("--search-algorithms is a search stage: also give --max-accuracy-drop or --min-sqnr")
    _check_mode_options(
        mode, calibration=calibration, data=data, method=method, weight_type=weight_type, block_size=block_size,
        per_tensor=per_tensor, symmetric_activations=symmetric_activations, activation_type=activation_type,
        reduce_range=reduce_range, op_types=op_types, require_fused=require_fused,
    )  # fmt: skip
    if mode != ConvertMode.STATIC:
        if searching or recipe is not None:
            raise UsageError(f"--mode {mode} has no accuracy search or recipe; they are for the static mode")
        result = api.convert_model(
            model, output, mode=mode, config=QuantConfig(
                exclude_op_types=frozenset(_split(exclude_op_types)), exclude_nodes=tuple(_split(exclude_nodes))
            ),
            mode_options=_mode_options(mode, weight_type, block_size, per_tensor, reduce_range, op_types,
                                       exclude_op_types),
            force=force, require_fused=require_fused, upgrade_opset=upgrade_opset,
        )  # fmt: skip
        report.render_convert(out, result)
        return
    host = detect_host()
    act = host.activation_type if activation_type == ActivationType.AUTO else QuantDType(str(activation_type))
    config = QuantConfig(
        activation_type=act,
        weight_type=QuantDType(str(weight_type or WeightType.INT8)),
        per_channel=not per_tensor,
        symmetric_activations=symmetric_activations,
        reduce_range=host.reduce_range if reduce_range == Toggle.AUTO else reduce_range == Toggle.ON,
        op_types=frozenset(_split(op_types)),
        exclude_op_types=frozenset(_split(exclude_op_types)),
        exclude_nodes=tuple(_split(exclude_nodes)),
        weight_clipping=weight_clipping,
    )
    algorithms = AlgorithmOptions(
        cle=cle, smoothquant=smoothquant_alpha if smoothquant else None, bias_correction=bias_correction
    )
    result = api.convert_model(
        model, output, calibration=calibration, data_path=data, config=config, method=method, percentile=percentile,
        force=force, require_fused=require_fused, require_speedup=require_speedup, timeout=timeout,
        algorithms=algorithms,
        upgrade_opset=upgrade_opset, progress=_progress(quiet),
        search=SearchOptions(
            budget, max_fallback=search_max_fallback, try_algorithms=search_algorithms, metric=metric_spec
        )
        if searching
        else None,
        eval_data=eval_data, recipe=recipe, save_recipe=save_recipe,
        log=_search_log(quiet), batch_axes=parse_batch_axes(batch_axis),
        images=_image_options(image_size, resize, scale, mean, std, channel_order, layout),
    )  # fmt: skip
    report.render_convert(out, result)


def _check_mode_options(
    mode: ConvertMode,
    *,
    calibration: Path | None,
    data: Path | None,
    method: CalibrationMethod | None,
    weight_type: WeightType | None,
    block_size: int | None,
    per_tensor: bool,
    symmetric_activations: bool,
    activation_type: ActivationType,
    reduce_range: Toggle,
    op_types: list[str] | None,
    require_fused: bool,
) -> None:
    """Refuse options that mean nothing in ``mode`` (UsageError: exit code 2)."""
    given = {
        "--calibration": calibration is not None, "--data": data is not None, "--method": method is not None,
        "--symmetric-activations": symmetric_activations, "--activation-type": activation_type != ActivationType.AUTO,
        "--block-size": block_size is not None, "--per-tensor": per_tensor, "--weight-type": weight_type is not None,
        "--reduce-range": reduce_range != Toggle.AUTO, "--op-types": bool(op_types), "--require-fused": require_fused,
    }  # fmt: skip
    allowed = {
        ConvertMode.STATIC: set(given) - {"--block-size"},
        ConvertMode.DYNAMIC: {"--weight-type", "--per-tensor", "--reduce-range", "--op-types", "--require-fused"},
        ConvertMode.WEIGHT_ONLY: {"--weight-type", "--block-size", "--op-types", "--require-fused"},
        ConvertMode.FP16: set(),
    }[mode]
    refused = [name for name, present in given.items() if present and name not in allowed]
    if refused:
        hint = (
            "; it needs no calibration"
            if mode != ConvertMode.STATIC and {"--calibration", "--data"} & set(refused)
            else ""
        )
        raise UsageError(f"{', '.join(refused)} cannot be used with --mode {mode}{hint}")
    four_bit = weight_type in (WeightType.INT4, WeightType.UINT4)
    if four_bit and mode != ConvertMode.WEIGHT_ONLY:
        raise UsageError(f"--weight-type {weight_type} needs --mode weight-only")
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise UsageError(f"--block-size {block_size}: must be one of {', '.join(map(str, BLOCK_SIZES))}")
    supported = {ConvertMode.DYNAMIC: SUPPORTED_OP_TYPES, ConvertMode.WEIGHT_ONLY: frozenset({"MatMul", "Gemm"})}.get(
        mode, frozenset()
    )
    unknown = sorted(set(_split(op_types)) - supported) if supported else []
    if unknown:
        raise UsageError(f"--op-types {','.join(unknown)}: --mode {mode} rewrites only {', '.join(sorted(supported))}")


def _mode_options(
    mode: ConvertMode,
    weight_type: WeightType | None,
    block_size: int | None,
    per_tensor: bool,
    reduce_range: Toggle,
    op_types: list[str] | None,
    exclude_op_types: list[str] | None,
) -> DynamicOptions | WeightOnlyOptions | None:
    excluded = set(_split(exclude_op_types))
    if mode == ConvertMode.DYNAMIC:
        wt = QuantDType(str(weight_type or WeightType.INT8))
        # the int16 saturation of AVX2 u8*s8 kernels concerns int8 weights only (uint8 runs u8*u8)
        rr = (
            detect_host().reduce_range and wt == QuantDType.INT8
            if reduce_range == Toggle.AUTO
            else reduce_range == Toggle.ON
        )
        ops = frozenset(_split(op_types) or DEFAULT_OP_TYPES) - excluded
        return DynamicOptions(weight_type=wt, per_channel=not per_tensor, reduce_range=rr, op_types=ops)
    if mode == ConvertMode.WEIGHT_ONLY:
        ops = frozenset(_split(op_types) or ("MatMul", "Gemm")) - excluded
        return WeightOnlyOptions(
            weight_type=WeightOnlyType(str(weight_type or WeightType.INT4)), block_size=block_size or 32, op_types=ops
        )
    return None


@app.command()
@_user_errors
def compare(
    reference: Annotated[Path, typer.Argument(help="FP32 ONNX model.")],
    candidate: Annotated[Path, typer.Argument(help="Quantized ONNX model.")],
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Evaluation data (.npz with optional 'labels', or images).")
    ],
    batch_axis: BatchAxes = None,
    image_size: ImageSize = None,
    resize: Resize = None,
    scale: Scale = 255.0,
    mean: Mean = "0,0,0",
    std: Std = "1,1,1",
    channel_order: ChannelOrder = "rgb",
    layout: Layout = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size for the accuracy pass.")] = 32,
    max_samples: Annotated[int | None, typer.Option(min=1)] = None,
    threads: Annotated[int, typer.Option(min=0, help="onnxruntime threads for both models.")] = 1,
    latency_batch: Annotated[
        list[int] | None, typer.Option("--latency-batch", help="Batch sizes to time (repeatable).")
    ] = None,
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per model and batch size.")] = 50,
    time_budget: Annotated[
        float | None, typer.Option(min=0, help="Stop timing a batch size after this many seconds.")
    ] = None,
    metric: Annotated[
        str, typer.Option(help="Task metric: top1, top5, none, module:function or file.py:function.")
    ] = "top1",
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Measure each session's peak memory.")] = True,
    warmup: Annotated[int, typer.Option(min=0)] = 10,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Rank layers by error, with hints.")] = False,
    top: Annotated[int, typer.Option(min=1, help="With --per-layer: how many layers to show.")] = 10,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the comparison as JSON.")] = None,
    markdown_path: Annotated[Path | None, typer.Option("--markdown", help="Write a pull-request comment.")] = None,
    html_path: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report.")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(help="Gate: percentage points.")] = None,
    min_agreement: Annotated[float | None, typer.Option(help="Gate: top-1 agreement, percent.")] = None,
    min_sqnr: Annotated[float | None, typer.Option(help="Gate: output SQNR, dB.")] = None,
    min_speedup: Annotated[float | None, typer.Option(help="Gate: speed-up at the largest timed batch.")] = None,
    max_size_ratio: Annotated[float | None, typer.Option(help="Gate: quantized / FP32 file size.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Measure accuracy, error and latency of the quantized model against the FP32 one."""
    result = api.compare_models(
        reference, candidate, data, batch_size=batch_size, max_samples=max_samples, threads=threads,
        latency_batch_sizes=tuple(latency_batch or (1, 32)), warmup=warmup, runs=runs,
        per_layer=per_layer or html_path is not None, metric=parse_metric(metric), time_budget_s=time_budget,
        measure_memory=memory, progress=_progress(quiet), batch_axes=parse_batch_axes(batch_axis),
        images=_image_options(image_size, resize, scale, mean, std, channel_order, layout),
    )  # fmt: skip
    report.render_compare(out, result)
    report.render_layers(out, result, top)
    thresholds = GateThresholds(max_accuracy_drop, min_agreement, min_sqnr, min_speedup, max_size_ratio)
    gates = evaluate_gates(result, thresholds)
    report.render_gates(out, gates)
    if json_path is not None:
        report.write_json(report.compare_to_json(result, gates), json_path)
        out.print(f"wrote [bold]{json_path}[/]")
    if markdown_path is not None:
        report.write_text(report.compare_to_markdown(result, gates, top=top), markdown_path)
        out.print(f"wrote [bold]{markdown_path}[/]")
    if html_path is not None:
        report.write_text(html_report.render_html(result, gates), html_path)
        out.print(f"wrote [bold]{html_path}[/]")
    failed = [g for g in gates if not g.passed]
    if failed:
        for g in failed:
            err.print(f"[red]gate failed:[/] {g.name}: {g.describe()}")
        raise typer.Exit(EXIT_GATE_FAILED)


@app.command()
@_user_errors
def inspect(
    model: Annotated[Path, typer.Argument(help="Any ONNX model.")],
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="A sample (.npz/.npy) to resolve dynamic shapes for MACs.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every Conv/MatMul/Gemm node.")] = False,
    batch_axis: BatchAxes = None,
) -> None:
    """Show what onnxruntime runs for a model: integer kernels, float compute and why, MACs, op histogram."""
    m = load_model(model)
    axes = parse_batch_axes(batch_axis)
    feed = next(open_dataset(data, model_input_specs(m), max_samples=1, batch_axes=axes).batches(1)) if data else None
    audit = audit_fusion(model, feed=feed)
    report.render_inspect(out, model, m, audit, verbose=verbose)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: temporary outputs are removed


def main() -> None:
    """Entry point: run the app; unexpected exceptions are bugs and exit 4 with their traceback."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:
        traceback.print_exc()
        err.print(f"[red]internal error[/] ({type(exc).__name__}); please report it with the traceback above")
        sys.exit(EXIT_INTERNAL)
