"""The ``quantcli`` command line: parse flags into a request, call ``quantcli.api``, render (``cli.report``).

Exit codes: 0 success; 1 a ``compare`` gate failed or the ``convert`` search missed its budget;
2 the command line does not parse (an unknown flag, a missing or malformed value: Typer's usage
errors); 3 bad input (a file, data, or options quantcli cannot use, alone or together; one line
on stderr, no traceback); 4 internal error (a bug: traceback).
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

from quantcli import __version__, api, schemas
from quantcli.cli import report
from quantcli.cli.flags import (
    AlgorithmFlags,
    CalibrationFlags,
    GateFlags,
    ImageFlags,
    ModeFlags,
    QuantFlags,
    RunFlags,
    SearchFlags,
    SourceFlags,
    Toggle,
    convert_request,
    error_text,
    flag,
    parse_bytes,
    split_list,
)
from quantcli.compare.gates import GateResult, evaluate_gates
from quantcli.compare.map_thresholds import parse_map_thresholds
from quantcli.compare.metrics import parse_metric
from quantcli.compare.output_kinds import DEFAULT_MAP_THRESHOLD, parse_output_kinds
from quantcli.core.errors import NotFasterError, OutputPathError, QuantCliError
from quantcli.core.options import (
    ACTIVATION_TYPES,
    DEFAULT_PERCENTILE,
    WEIGHT_TYPES,
    CalibrationMethod,
    QuantDType,
    WeightClipping,
)
from quantcli.core.process import tune_malloc
from quantcli.data.datasets import parse_batch_axes
from quantcli.modes.common import ConvertMode
from quantcli.pipeline.request import CalibrateRequest, CompareRequest
from quantcli.search.accuracy_search import BudgetNotMetError
from quantcli.search.budget import DEFAULT_MARGIN
from quantcli.stats.artifact import write_calibration
from quantcli.stats.shards import write_statistics

EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_INTERNAL = 4

HELP = """Quantize an FP32 ONNX model to a fast INT8 model for this CPU, and prove it is still right.

Workflow (each step is one command, each writes one file):

  quantcli calibrate model.onnx --data calib.npz -o model.calib.json
  quantcli convert   model.onnx --calibration model.calib.json -o model.int8.onnx
  quantcli compare   model.onnx model.int8.onnx --data eval.npz --max-accuracy-drop 1

Exit codes: 0 ok, 1 a compare gate failed or convert's budget was not met, 2 usage error, 3 bad input, 4 internal error.
"""

# --help groups each command's options into these panels
DATA, IMAGES, QUANT, MODES, ALGORITHMS = "Data", "Images", "Quantization", "Modes", "Algorithms"
SEARCH, OUTPUT, MEASURE, GATES = "Search", "Output", "Measurement", "Gates"

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)
# as wide as the terminal (COLUMNS, else its size, else 120 columns when not a terminal): report.console_width,
# re-read at the start of each command
out = report.make_console()
err = report.make_console(stderr=True)


def _user_errors(func: Callable[..., None]) -> Callable[..., None]:
    """Turn QuantCliError into one red line and exit code 3 (1 for an unmet budget or a model not
    faster than FP32), Ctrl-C into exit 130. Option fields in messages are written as flags."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> None:
        try:
            func(*args, **kwargs)
        except BudgetNotMetError as exc:
            err.print(f"[red]budget not met:[/] {escape(error_text(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_GATE_FAILED) from None
        except NotFasterError as exc:
            err.print(f"[red]not faster than FP32:[/] {escape(error_text(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_GATE_FAILED) from None
        except QuantCliError as exc:
            err.print(f"[red]error:[/] {escape(error_text(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/]; no output was written")
            raise typer.Exit(130) from None
        except MemoryError:  # the machine's (or ulimit's) limit, not a bug: say what lowers the need
            err.print(
                "[red]error:[/] out of memory (this machine or its limits); nothing was written. Lower "
                "--max-memory or --batch-size, or give fewer samples (--max-samples, a smaller --eval-data)",
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_BAD_INPUT) from None

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
    report.fit_width(out)
    report.fit_width(err)
    tune_malloc()  # a process-wide setting: the command line's to make, not the library's


def _progress(quiet: bool):
    def wrap(it: Iterable[dict[str, np.ndarray]], total: int, desc: str, size: int) -> Iterable[dict[str, np.ndarray]]:
        disable = quiet or not sys.stderr.isatty()
        return tqdm(
            it,
            total=total,
            desc=desc,
            unit="sample",
            unit_scale=size,
            disable=disable,
            leave=False,
            dynamic_ncols=True,
        )

    return wrap


def _search_log(quiet: bool) -> Callable[[str], None]:
    """Each search step as one stderr line (the table on stdout keeps only the steps kept)."""
    if quiet:
        return lambda _: None
    return lambda line: err.print(f"search: {escape(line)}", highlight=False, soft_wrap=True)


def _choice(choices: Iterable[str]) -> Callable[[str | None], str | None]:
    """A Typer callback accepting only ``choices`` (the domain's types; a wrong one is a usage error)."""
    allowed = tuple(str(c) for c in choices)

    def check(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return check


def _dtype(value: str | None) -> QuantDType | None:
    return None if value in (None, "auto") else QuantDType(value)


# options shared by several commands, each in its --help panel
DataOpt = Annotated[
    Path | None,
    typer.Option("--data", "-d", help=".npz/.npy file, a directory of them, or of images.", rich_help_panel=DATA),
]
BatchAxes = Annotated[
    list[str] | None,
    typer.Option(
        "--batch-axis",
        help="NAME=AXIS: input NAME's samples are stacked on AXIS, e.g. state=1; NAME=none: the array is one feed, "
        "given unchanged with every batch (repeatable; scalar inputs are unbatched anyway).",
        rich_help_panel=DATA,
    ),
]
ImageSize = Annotated[str | None, typer.Option(help="HxW when the model's are dynamic.", rich_help_panel=IMAGES)]
Resize = Annotated[int | None, typer.Option(help="Shorter side before the centre crop.", rich_help_panel=IMAGES)]
Scale = Annotated[float, typer.Option(help="Divide pixel values by this.", rich_help_panel=IMAGES)]
Mean = Annotated[str, typer.Option(help="Per-channel mean, e.g. 0.485,0.456,0.406.", rich_help_panel=IMAGES)]
Std = Annotated[str, typer.Option(help="Per-channel std, e.g. 0.229,0.224,0.225.", rich_help_panel=IMAGES)]
ChannelOrder = Annotated[str, typer.Option(help="rgb or bgr.", rich_help_panel=IMAGES)]
Layout = Annotated[str, typer.Option(help="auto, nchw or nhwc.", rich_help_panel=IMAGES)]
UpgradeOpset = Annotated[
    bool,
    typer.Option(
        "--upgrade-opset/--no-upgrade-opset",
        help="Upgrade opset < 13 models in memory with onnx's version converter (the default); "
        "--no-upgrade-opset refuses them.",
        rich_help_panel=DATA,
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel=OUTPUT)]
JsonOpt = Annotated[
    Path | None,
    typer.Option(
        "--json",
        metavar="PATH",
        help="Also write the result as a JSON document (schema-versioned, see README); '-' for stdout, "
        "the report then goes to stderr.",
        rich_help_panel=OUTPUT,
    ),
]


def _report_console(json_path: Path | None) -> Console:
    """Where the human report goes: stdout, or stderr when the JSON document takes stdout (``--json -``)."""
    return err if json_path == report.STDOUT else out


@app.command()
@_user_errors
def calibrate(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Calibration file to write (JSON).", rich_help_panel=OUTPUT)
    ],
    data: DataOpt = None,
    random: Annotated[
        int | None,
        typer.Option(
            "--random", min=1, help="SMOKE TEST ONLY: N random samples instead of --data.", rich_help_panel=DATA
        ),
    ] = None,
    image_size: ImageSize = None,
    resize: Resize = None,
    scale: Scale = 255.0,
    mean: Mean = "0,0,0",
    std: Std = "1,1,1",
    channel_order: ChannelOrder = "rgb",
    layout: Layout = "auto",
    batch_axis: BatchAxes = None,
    method: Annotated[
        CalibrationMethod, typer.Option(help="How clip ranges are chosen.", rich_help_panel=QUANT)
    ] = CalibrationMethod.MINMAX,
    percentile: Annotated[
        float, typer.Option(help="For --method percentile: upper percentile kept.", rich_help_panel=QUANT)
    ] = DEFAULT_PERCENTILE,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per onnxruntime run.", rich_help_panel=DATA)] = 32,
    max_samples: Annotated[
        int | None, typer.Option(min=1, help="Use at most this many samples.", rich_help_panel=DATA)
    ] = None,
    threads: Annotated[int, typer.Option(min=0, help="onnxruntime threads (0: its default).")] = 0,
    max_memory: Annotated[
        str | None, typer.Option(help="Budget for one batch of activations, e.g. 512M or 2G (default: 512M).")
    ] = None,
    shuffle: Annotated[
        bool, typer.Option("--shuffle", help="Visit samples in random order (see --seed).", rich_help_panel=DATA)
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for --shuffle.", rich_help_panel=DATA)] = 0,
    timeout: Annotated[float | None, typer.Option(min=0, help="Give up after this many seconds.")] = None,
    upgrade_opset: UpgradeOpset = True,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.", rich_help_panel=OUTPUT)
    ] = False,
    quiet: Quiet = False,
    json_path: JsonOpt = None,
    shard: Annotated[
        str | None,
        typer.Option(
            metavar="K/N",
            help="Calibrate shard K of N (a block of the batches) and write its statistics to -o FILE.stats.npz "
            "for 'quantcli merge'.",
            rich_help_panel=DATA,
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            metavar="ADDRESS",
            help="Calibrate in shards as Ray tasks and merge them ('local': start Ray on this machine; else a "
            "cluster address, e.g. auto). Needs pip install 'quantcli\\[ray]'.",
            rich_help_panel=DATA,
        ),
    ] = None,
    shards: Annotated[
        int | None, typer.Option(min=1, help="With --ray: shards (default: one per CPU).", rich_help_panel=DATA)
    ] = None,
) -> None:
    """Run calibration data through the model and record activation ranges."""
    request = CalibrateRequest(
        model,
        data,
        method=method,
        percentile=percentile,
        batch_size=batch_size,
        max_samples=max_samples,
        threads=threads,
        max_memory=parse_bytes(max_memory),
        shuffle=shuffle,
        seed=seed,
        timeout=timeout,
        upgrade_opset=upgrade_opset,
        random_samples=random,
        batch_axes=parse_batch_axes(batch_axis),
        images=ImageFlags(image_size, resize, scale, mean, std, channel_order, layout).parse(),
    )
    if random is not None:
        err.print(
            "[yellow]warning:[/] --random: ranges from random data say nothing about real inputs; smoke tests only"
        )
    if shard is not None or ray is not None:
        _calibrate_split(request, output, shard=shard, ray=ray, shards=shards, force=force, quiet=quiet)
        return
    result = api.calibrate(request, progress=_progress(quiet), log=lambda line: err.print(f"note: {escape(line)}"))
    write_calibration(result, output, model_path=model.name, force=force)
    console = _report_console(json_path)
    report.render_calibration(console, result, output)
    report.emit_json(console, schemas.calibrate_document(result, model_path=model, output_path=output), json_path)


def _calibrate_split(
    request: CalibrateRequest,
    output: Path,
    *,
    shard: str | None,
    ray: str | None,
    shards: int | None,
    force: bool,
    quiet: bool,
) -> None:
    """``calibrate --shard K/N`` (the shard's statistics to ``output``) or ``--ray`` (shards on Ray, merged)."""
    if ray is not None:
        if shard is not None:
            raise QuantCliError("--shard and --ray do not go together: --ray runs every shard itself (see --shards)")
        from quantcli.distributed import calibrate_on_ray

        merged = calibrate_on_ray(request, address=None if ray == "local" else ray, shards=shards)
        write_calibration(merged.result, output, model_path=merged.model_name, force=force)
        report.render_calibration(out, merged.result, output)
        return
    assert shard is not None
    if output.suffix != ".npz":
        raise OutputPathError(
            f"{output}: with --shard, -o names the shard's statistics file, e.g. -o {output.stem}.stats.npz; "
            "'quantcli merge' then writes the calibration file"
        )
    stats = api.calibrate_shard(request, shard, progress=_progress(quiet))
    write_statistics(stats, output, force=force)
    out.print(
        f"shard {stats.shard}: observed {len(stats.tracked)} activations on {stats.num_samples} samples "
        f"(batches {stats.first_batch}..{stats.stop_batch - 1} of {stats.batches}); wrote [bold]{output}[/]"
    )


@app.command()
@_user_errors
def merge(
    stats: Annotated[
        list[Path], typer.Argument(help="Statistics files of shards 1..N (from 'calibrate --shard K/N').")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Calibration file to write (JSON).", rich_help_panel=OUTPUT)
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.", rich_help_panel=OUTPUT)
    ] = False,
) -> None:
    """Merge the statistics of a sharded calibration into the calibration file one run would write."""
    merged = api.merge_statistics(stats)
    write_calibration(merged.result, output, model_path=merged.model_name, force=force)
    report.render_calibration(out, merged.result, output)


CONVERT_HELP = (
    "Write a QDQ model that onnxruntime runs with integer kernels (or another --mode's model).\n\n"
    "With --eval-data and a budget (--max-accuracy-drop, --min-sqnr, --min-agreement, --min-cosine, --min-iou), "
    "search for the model with the fewest float MACs "
    "that meets it; --save-recipe keeps the decisions for --recipe."
)


@app.command(help=CONVERT_HELP)
@_user_errors
def convert(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model (never modified).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Quantized model to write.", rich_help_panel=OUTPUT)],
    calibration: Annotated[
        Path | None, typer.Option("--calibration", "-c", help="File from 'calibrate'.", rich_help_panel=DATA)
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            "-d",
            help="Calibrate on the fly from this data (.npz/.npy, a directory, or images).",
            rich_help_panel=DATA,
        ),
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
            help="With --data: calibration method (minmax). With --calibration: re-choose from its histograms.",
            rich_help_panel=QUANT,
        ),
    ] = None,
    percentile: Annotated[
        float, typer.Option(help="For --method percentile.", rich_help_panel=QUANT)
    ] = DEFAULT_PERCENTILE,
    activation_type: Annotated[
        str,
        typer.Option(
            callback=_choice(("auto", *ACTIVATION_TYPES)),
            metavar="<auto|uint8|int8|uint16|int16>",
            help="auto: uint8 on x86, int8 on ARM.",
            rich_help_panel=QUANT,
        ),
    ] = "auto",
    mode: Annotated[
        ConvertMode,
        typer.Option(
            help="static: calibrated int8 QDQ; dynamic: int8 weights, activations at run time; "
            "weight-only: 4/8-bit MatMul weights (MatMulNBits); fp16: float16 weights and compute.",
            rich_help_panel=MODES,
        ),
    ] = ConvertMode.STATIC,
    weight_type: Annotated[
        str | None,
        typer.Option(
            callback=_choice(WEIGHT_TYPES),
            metavar="<int8|uint8|int4|uint4>",
            rich_help_panel=QUANT,
            help="Weight type: int8 (default) or uint8; weight-only: int4 (default), uint4, int8, uint8.",
        ),
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(
            help="--mode weight-only: weights per block along K (16..256, default 32).", rich_help_panel=MODES
        ),
    ] = None,
    per_tensor: Annotated[
        bool, typer.Option("--per-tensor", help="One weight scale per tensor.", rich_help_panel=QUANT)
    ] = False,
    symmetric_activations: Annotated[bool, typer.Option("--symmetric-activations", rich_help_panel=QUANT)] = False,
    reduce_range: Annotated[
        Toggle,
        typer.Option("--reduce-range", help="7-bit weights; auto: on for x86 without VNNI.", rich_help_panel=QUANT),
    ] = Toggle.AUTO,
    op_types: Annotated[
        list[str] | None, typer.Option("--op-types", help="Only quantize these op types.", rich_help_panel=QUANT)
    ] = None,
    exclude_op_types: Annotated[list[str] | None, typer.Option("--exclude-op-types", rich_help_panel=QUANT)] = None,
    exclude_nodes: Annotated[
        list[str] | None,
        typer.Option("--exclude-nodes", help="Node names to keep float: glob, or re:REGEX.", rich_help_panel=QUANT),
    ] = None,
    dynamic_nodes: Annotated[
        list[str] | None,
        typer.Option(
            "--dynamic-nodes",
            help="MatMul/Gemm names (glob, or re:REGEX) whose input is quantized at run time, in the static plan.",
            rich_help_panel=QUANT,
        ),
    ] = None,
    require_fused: Annotated[
        bool,
        typer.Option(
            "--require-fused", help="Fail if a quantized Conv/MatMul/Gemm did not fuse.", rich_help_panel=OUTPUT
        ),
    ] = False,
    require_speedup: Annotated[
        bool,
        typer.Option(
            "--require-speedup",
            help="Time both models at batch 1 first; write nothing unless quantized is faster.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="With --data: give up calibrating after N s.", rich_help_panel=DATA)
    ] = None,
    cle: Annotated[
        bool,
        typer.Option(
            "--cle",
            help="Cross-layer equalization of Conv->(Relu)->Conv pairs (needs --data).",
            rich_help_panel=ALGORITHMS,
        ),
    ] = False,
    smoothquant: Annotated[
        bool,
        typer.Option(
            "--smoothquant", help="SmoothQuant MatMul/Gemm inputs (needs --data).", rich_help_panel=ALGORITHMS
        ),
    ] = False,
    smoothquant_alpha: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="SmoothQuant migration strength alpha.", rich_help_panel=ALGORITHMS)
    ] = 0.5,
    bias_correction: Annotated[
        bool,
        typer.Option(
            "--bias-correction",
            help="Fold the mean shift of weight quantization into biases (needs --data).",
            rich_help_panel=ALGORITHMS,
        ),
    ] = False,
    weight_clipping: Annotated[
        WeightClipping,
        typer.Option(
            help="Weight ranges: absmax, or mse (per-channel clip of least weight MSE).", rich_help_panel=ALGORITHMS
        ),
    ] = WeightClipping.ABSMAX,
    upgrade_opset: UpgradeOpset = True,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval-data",
            help="Held-out data (with labels) for the accuracy search; the same as --data: it scores on two shares "
            "of --data, each held back from one of two calibrations, and confirms on the rest.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Fall back the fewest nodes until top-1 drops at most this many points.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    min_sqnr: Annotated[
        float | None,
        typer.Option(help="Until every output's SQNR is at least this (dB).", rich_help_panel=SEARCH),
    ] = None,
    min_agreement_budget: Annotated[
        float | None,
        typer.Option(
            "--min-agreement",
            min=0.0,
            max=1.0,
            help="Until every classifier/sequence/binary output agrees with FP32 on this share of samples.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    min_cosine_budget: Annotated[
        float | None,
        typer.Option(
            "--min-cosine",
            min=-1.0,
            max=1.0,
            help="Until every embedding output's mean cosine to FP32 is this.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    min_iou_budget: Annotated[
        float | None,
        typer.Option(
            "--min-iou",
            min=0.0,
            max=1.0,
            help="Until every map output's mean IoU with FP32 is this.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    search_map_threshold: Annotated[
        list[str] | None,
        typer.Option(
            "--map-threshold",
            metavar="[NAME=]VALUE",
            help=f"Where --min-iou cuts a map into a mask, in the search and its verdict (default "
            f"{DEFAULT_MAP_THRESHOLD}); NAME=VALUE for one output (repeatable).",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    search_max_fallback: Annotated[
        int,
        typer.Option(
            min=0,
            help="Most nodes the single moves return to float (0: none, and no float region either).",
            rich_help_panel=SEARCH,
        ),
    ] = 24,
    search_margin: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Standard errors of the scored samples by which --min-agreement/--min-cosine/--min-iou, "
            "--min-sqnr and --max-accuracy-drop must hold (0.95 on 64 samples needs 0.977): a budget met at its "
            "edge on few samples reads lower on new data.",
            rich_help_panel=SEARCH,
        ),
    ] = DEFAULT_MARGIN,
    search_metric: Annotated[
        str | None,
        typer.Option(
            help="Measure --max-accuracy-drop on top1 (default), agreement (share of top-1 changed vs FP32, labels "
            "ignored: stricter, less noisy) or module:function / file.py:function (outputs, labels -> 0..1; "
            "with a third parameter `reference` it also gets FP32's outputs and needs no labels, e.g. a "
            "detector's F1 against FP32's boxes: FP32 reads 1, so --max-accuracy-drop 5 asks 0.95).",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    search_max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            help="Budget for one batch of activations while the search scores and ranks candidates, e.g. 512M or "
            "2G (default: 512M); the batch shrinks to fit, down to 1.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    search_ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Score the search's independent candidates as Ray tasks, with the same result ('local': start Ray "
            "on this machine; else a cluster address, e.g. auto). Needs pip install 'quantcli\\[ray]'.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    search_algorithms: Annotated[
        bool,
        typer.Option(
            "--search-algorithms",
            help="Also try CLE + SmoothQuant + bias correction + MSE weight clipping (needs --data).",
            rich_help_panel=SEARCH,
        ),
    ] = False,
    save_recipe: Annotated[
        Path | None,
        typer.Option("--save-recipe", help="Write the search's decisions here (JSON).", rich_help_panel=SEARCH),
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option("--recipe", help="Replay a saved recipe (types, methods, float nodes).", rich_help_panel=SEARCH),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Overwrite OUTPUT if it exists; with a budget, write the model even when it is not faster than FP32.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    verdict: Annotated[
        bool,
        typer.Option(
            "--verdict/--no-verdict",
            help="End with a verdict: agreement/cosine/IoU/SQNR to FP32 on samples not calibrated on (--eval-data, "
            "or the held-back share of --data) and batch-1 speed; warns below agreement 0.98, cosine 0.99, IoU 0.9.",
            rich_help_panel=OUTPUT,
        ),
    ] = True,
    verdict_share: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.5,
            help="Share of --data held back from calibration for the verdict (at most 64 samples; 0: none).",
            rich_help_panel=DATA,
        ),
    ] = 0.2,
    output_kind: Annotated[
        list[str] | None,
        typer.Option(
            "--output-kind",
            help="NAME=KIND for the verdict and the search's budget: output NAME is a classifier, sequence, ctc "
            "(a sequence read as decoded CTC strings, blank 0), binary, embedding, map or raw "
            "output (default: detected; repeatable).",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    quiet: Quiet = False,
    json_path: JsonOpt = None,
) -> None:
    """Write a QDQ model that onnxruntime runs with integer kernels (or another --mode's model)."""
    quant = QuantFlags(
        _dtype(activation_type),
        _dtype(weight_type),
        per_tensor,
        symmetric_activations,
        reduce_range,
        tuple(split_list(op_types)),
        tuple(split_list(exclude_op_types)),
        tuple(split_list(exclude_nodes)),
        weight_clipping,
        tuple(split_list(dynamic_nodes)),
    )
    budgets = (min_agreement_budget, min_cosine_budget, min_iou_budget, parse_map_thresholds(search_map_threshold))
    how = (parse_bytes(search_max_memory), search_ray, search_margin)  # the search's batches, Ray, margin
    request = convert_request(
        SourceFlags(model, output, calibration, data, eval_data, recipe, save_recipe, batch_axis),
        quant,
        ModeFlags(mode, block_size),
        CalibrationFlags(method, percentile, timeout),
        SearchFlags(max_accuracy_drop, min_sqnr, search_max_fallback, search_metric, search_algorithms, *budgets, *how),
        AlgorithmFlags(cle, smoothquant, smoothquant_alpha, bias_correction),
        RunFlags(
            force, require_fused, require_speedup, upgrade_opset, verdict, verdict_share, tuple(output_kind or ())
        ),
        ImageFlags(image_size, resize, scale, mean, std, channel_order, layout),
    )
    result = api.convert(request, progress=_progress(quiet), log=_search_log(quiet))
    console = _report_console(json_path)
    report.render_convert(console, result)
    report.emit_json(console, schemas.convert_document(result, model_path=model, name=flag), json_path)


@app.command()
@_user_errors
def compare(
    reference: Annotated[Path, typer.Argument(help="FP32 ONNX model.")],
    candidate: Annotated[Path, typer.Argument(help="Quantized ONNX model.")],
    data: Annotated[
        Path,
        typer.Option(
            "--data", "-d", help="Evaluation data (.npz with optional 'labels', or images).", rich_help_panel=DATA
        ),
    ],
    batch_axis: BatchAxes = None,
    image_size: ImageSize = None,
    resize: Resize = None,
    scale: Scale = 255.0,
    mean: Mean = "0,0,0",
    std: Std = "1,1,1",
    channel_order: ChannelOrder = "rgb",
    layout: Layout = "auto",
    batch_size: Annotated[
        int, typer.Option(min=1, help="Batch size for the accuracy pass.", rich_help_panel=DATA)
    ] = 32,
    max_samples: Annotated[int | None, typer.Option(min=1, rich_help_panel=DATA)] = None,
    threads: Annotated[
        int, typer.Option(min=0, help="onnxruntime threads for both models.", rich_help_panel=MEASURE)
    ] = 1,
    latency_batch: Annotated[
        list[int] | None,
        typer.Option("--latency-batch", help="Batch sizes to time (repeatable).", rich_help_panel=MEASURE),
    ] = None,
    runs: Annotated[
        int, typer.Option(min=1, help="Timed runs per model and batch size.", rich_help_panel=MEASURE)
    ] = 50,
    time_budget: Annotated[
        float | None,
        typer.Option(min=0, help="Stop timing a batch size after this many seconds.", rich_help_panel=MEASURE),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            help="Task metric: top1, top5, none, module:function or file.py:function (outputs, labels -> 0..1; "
            "a third parameter `reference` gets the first model's outputs).",
            rich_help_panel=MEASURE,
        ),
    ] = "top1",
    memory: Annotated[
        bool, typer.Option("--memory/--no-memory", help="Measure each session's peak memory.", rich_help_panel=MEASURE)
    ] = True,
    warmup: Annotated[int, typer.Option(min=0, rich_help_panel=MEASURE)] = 10,
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="Rank layers by error, with hints.", rich_help_panel=MEASURE)
    ] = False,
    top: Annotated[
        int, typer.Option(min=1, help="With --per-layer: how many layers to show.", rich_help_panel=OUTPUT)
    ] = 10,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the comparison as JSON.", rich_help_panel=OUTPUT)
    ] = None,
    markdown_path: Annotated[
        Path | None, typer.Option("--markdown", help="Write a pull-request comment.", rich_help_panel=OUTPUT)
    ] = None,
    html_path: Annotated[
        Path | None, typer.Option("--html", help="Write a self-contained HTML report.", rich_help_panel=OUTPUT)
    ] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(help="Percentage points.", rich_help_panel=GATES)] = None,
    min_agreement: Annotated[
        float | None,
        typer.Option(
            help="Share of samples whose decision equals FP32's (argmax; the whole argmax sequence; the thresholded "
            "sigmoid), on every classifier, sequence, ctc and binary output, e.g. 0.98 (a value above 1 is read as "
            "percent).",
            rich_help_panel=GATES,
        ),
    ] = None,
    min_cosine: Annotated[
        float | None,
        typer.Option(help="Mean per-sample cosine to FP32, on every embedding output.", rich_help_panel=GATES),
    ] = None,
    min_iou: Annotated[
        float | None,
        typer.Option(help="Mean per-sample IoU of thresholded maps, on every map output.", rich_help_panel=GATES),
    ] = None,
    min_sqnr: Annotated[float | None, typer.Option(help="Output SQNR, dB.", rich_help_panel=GATES)] = None,
    min_speedup: Annotated[
        float | None, typer.Option(help="Speed-up at the largest timed batch.", rich_help_panel=GATES)
    ] = None,
    max_size_ratio: Annotated[
        float | None, typer.Option(help="Quantized / FP32 file size.", rich_help_panel=GATES)
    ] = None,
    output_kind: Annotated[
        list[str] | None,
        typer.Option(
            "--output-kind",
            help="NAME=KIND: output NAME is a classifier, sequence, ctc (a sequence read as decoded CTC strings, "
            "blank 0), binary, embedding, map or raw output (default: detected from its shape and FP32 values; "
            "repeatable).",
            rich_help_panel=MEASURE,
        ),
    ] = None,
    map_threshold: Annotated[
        list[str] | None,
        typer.Option(
            metavar="[NAME=]VALUE",
            help=f"Where map outputs are cut into masks for IoU (default {DEFAULT_MAP_THRESHOLD}); NAME=VALUE for "
            "one output (repeatable).",
            rich_help_panel=MEASURE,
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            metavar="ADDRESS",
            help="Measure accuracy in shards as Ray tasks, merged into the same result; latency stays on this "
            "host ('local': start Ray on this machine; else a cluster address, e.g. auto). "
            "Needs pip install 'quantcli\\[ray]'.",
            rich_help_panel=MEASURE,
        ),
    ] = None,
    shards: Annotated[
        int | None, typer.Option(min=1, help="With --ray: shards (default: one per CPU).", rich_help_panel=MEASURE)
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="With --per-layer: budget for the activations held at once, e.g. 512M or 2G (default: 512M; "
            "Ray shards share it). A smaller budget takes more passes, never other numbers.",
            rich_help_panel=MEASURE,
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Measure accuracy, error and latency of the quantized model against the FP32 one."""
    request = CompareRequest(
        reference,
        candidate,
        data,
        batch_size=batch_size,
        max_samples=max_samples,
        threads=threads,
        latency_batch_sizes=tuple(latency_batch or (1, 32)),
        warmup=warmup,
        runs=runs,
        per_layer=per_layer or html_path is not None,
        metric=parse_metric(metric),
        time_budget_s=time_budget,
        measure_memory=memory,
        batch_axes=parse_batch_axes(batch_axis),
        images=ImageFlags(image_size, resize, scale, mean, std, channel_order, layout).parse(),
        output_kinds=parse_output_kinds(output_kind),
        map_threshold=parse_map_thresholds(map_threshold), ray=ray, shards=shards, max_memory=parse_bytes(max_memory),
    )  # fmt: skip
    result = api.compare_models(request, progress=_progress(quiet), log=lambda line: err.print(f"note: {escape(line)}"))
    thresholds = GateFlags(
        max_accuracy_drop, min_agreement, min_sqnr, min_speedup, max_size_ratio, min_cosine, min_iou
    ).thresholds()
    gates = evaluate_gates(result, thresholds)
    console = _report_console(json_path)
    report.render_comparison(console, result, gates, top=top)
    report.write_comparison(
        console, result, gates, top=top, json_path=json_path, markdown_path=markdown_path, html_path=html_path
    )
    _exit_on_failed_gates(gates)


def _exit_on_failed_gates(gates: list[GateResult]) -> None:
    """One line per failed gate on stderr, then exit code 1."""
    failed = [g for g in gates if not g.passed]
    for g in failed:
        err.print(f"[red]gate failed:[/] {g.name}: {g.describe()}")
    if failed:
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
    json_path: JsonOpt = None,
) -> None:
    """Show what onnxruntime runs for a model: integer kernels, float compute and why, MACs, op histogram."""
    summary = api.inspect_model(model, data_path=data, batch_axes=parse_batch_axes(batch_axis))
    console = _report_console(json_path)
    report.render_inspect(console, summary, verbose=verbose)
    report.emit_json(console, schemas.inspect_document(summary), json_path)


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
