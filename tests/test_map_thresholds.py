"""One map threshold for every map output, or one per output (``--map-threshold [NAME=]VALUE``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from quantcli.api import convert_model
from quantcli.cli.app import app
from quantcli.cli.flags import SearchFlags
from quantcli.compare.map_thresholds import MapThresholds, as_thresholds, parse_map_thresholds
from quantcli.compare.output_kinds import OutputKind, kind_metrics
from quantcli.core.errors import InvalidOption
from quantcli.pipeline.request import ConvertRequest
from quantcli.search.accuracy_search import Budget, SearchOptions
from tests.test_output_kinds import tiny  # noqa: F401  (the fixture: a model with a map and a classifier)

runner = CliRunner()


def test_a_plain_value_is_every_maps_and_a_named_one_is_its_own():
    t = parse_map_thresholds(["0.4", "onsets=0.5", "notes=0.3"])
    assert t.default == 0.4 and t.of("onsets") == 0.5 and t.of("notes") == 0.3 and t.of("contours") == 0.4
    assert t.named() == ["onsets", "notes"]
    assert parse_map_thresholds(None) == MapThresholds() and MapThresholds().of("x") == 0.5
    assert as_thresholds(0.3) == MapThresholds(0.3) and as_thresholds(t) is t
    for bad in (["x"], ["notes=1.5"], ["0"], ["a=b"]):
        with pytest.raises(InvalidOption, match="map_threshold"):
            parse_map_thresholds(bad)


def _two_maps() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two maps whose quantized scores sit at 0.4 where FP32 reads 0.9 (on half of one sample's pixels)."""
    ref = np.zeros((2, 1, 8, 8), dtype=np.float32)
    ref[:, :, :4] = 0.9
    cand = ref.copy()
    cand[0, :, :2] = 0.4
    return [ref, ref.copy()], [cand, cand.copy()]


def test_each_map_is_cut_at_its_own_threshold():
    ref, cand = _two_maps()
    at_half = kind_metrics(["frames", "onsets"], ref, cand)
    assert [k.iou for k in at_half] == pytest.approx([0.75, 0.75])
    mixed = kind_metrics(["frames", "onsets"], ref, cand, map_threshold=parse_map_thresholds(["frames=0.3"]))
    assert all(k.kind == OutputKind.MAP for k in mixed)
    assert [k.iou for k in mixed] == pytest.approx([1.0, 0.75])  # 0.4 is on at 0.3, off at 0.5
    with pytest.raises(InvalidOption, match="map_threshold names notes, not outputs of the model"):
        kind_metrics(["frames", "onsets"], ref, cand, map_threshold=parse_map_thresholds(["notes=0.3"]))


def test_compare_and_convert_take_a_threshold_per_output(tiny, tmp_path):  # noqa: F811
    model, quantized, data = tiny
    args = ["compare", str(model), str(quantized), "--data", str(data), "--runs", "2", "--no-memory"]
    ious = {}
    for value in ("0.5", "mask=0.05"):
        report = tmp_path / f"r{value}.json"
        result = runner.invoke(app, [*args, "--map-threshold", value, "--json", str(report)])
        assert result.exit_code == 0, result.output
        ious[value] = next(k["iou"] for k in json.loads(report.read_text())["output_kinds"] if k["name"] == "mask")
    assert ious["0.5"] != ious["mask=0.05"]  # the named output was cut elsewhere
    bad = runner.invoke(app, [*args, "--map-threshold", "nomask=0.3"])
    assert bad.exit_code != 0 and "--map-threshold names nomask, not outputs of the model" in bad.output
    options = SearchFlags(min_iou=0.9, map_threshold=parse_map_thresholds(["mask=0.3"])).options()
    assert options is not None and as_thresholds(options.map_threshold).of("mask") == 0.3


def test_the_convert_verdict_cuts_each_map_at_its_threshold(tiny, tmp_path):  # noqa: F811
    model, _, data = tiny
    ious = []
    for thresholds in (MapThresholds(), parse_map_thresholds(["mask=0.05"])):
        result = convert_model(model, tmp_path / "q.onnx", data_path=data, map_threshold=thresholds, force=True)
        assert result.verdict is not None
        ious.append(next(k.iou for k in result.verdict.kinds if k.name == "mask"))
    assert ious[0] != ious[1]
    flags = ["convert", str(model), "-o", str(tmp_path / "c.onnx"), "--data", str(data), "--force"]
    said = runner.invoke(app, [*flags, "--map-threshold", "mask=0.05"])
    assert said.exit_code == 0, said.output
    assert f"mask map IoU {ious[1]:.3f}" in " ".join(said.output.split())  # the CLI's verdict, at 0.05


def test_the_request_and_the_search_options_agree_on_one_threshold(tmp_path):
    """The Python API may set thresholds on the request or on the search's options: the request's win, the
    options' count when the request keeps the default; the search and the verdict both read that one."""
    own = parse_map_thresholds(["mask=0.3"])
    search = SearchOptions(Budget(min_iou=0.9), map_threshold=own)
    paths, data = (tmp_path / "m.onnx", tmp_path / "q.onnx"), tmp_path / "d.npz"
    assert ConvertRequest(*paths, data_path=data, eval_data=data, search=search).map_thresholds() == own
    # the CLI always hands over parsed thresholds: none given is the default too
    kept = ConvertRequest(*paths, data_path=data, eval_data=data, search=search, map_threshold=MapThresholds())
    assert kept.map_thresholds() == own
    given = ConvertRequest(*paths, data_path=data, eval_data=data, search=search, map_threshold=0.2)
    assert given.map_thresholds() == 0.2
    assert ConvertRequest(*paths, data_path=data).map_thresholds() == 0.5
    with pytest.raises(InvalidOption, match=r"map_threshold 1\.2"):
        ConvertRequest(*paths, data_path=data, map_threshold=1.2)
