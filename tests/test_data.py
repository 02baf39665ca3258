"""Data loading: formats, checks against the model's inputs, and the errors users see."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli.core.errors import CalibrationDataError
from quantcli.data.datasets import InputSpec, open_dataset
from tests.conftest import CALIBRATION_DATA

SPECS = (InputSpec("x", np.dtype("float32"), ("N", 3, 4, 4)),)


def test_npz_npy_and_directory_give_the_same_samples(tmp_path, rng):
    x = rng.normal(size=(10, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=x)
    np.save(tmp_path / "b.npy", x)
    folder = tmp_path / "dir"
    folder.mkdir()
    np.savez(folder / "0.npz", x=x[:4])
    np.save(folder / "1.npy", x[4:])
    for path in (tmp_path / "a.npz", tmp_path / "b.npy", folder):
        ds = open_dataset(path, SPECS)
        assert ds.num_samples == 10
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in ds.batches(3)]), x)


def test_single_sample_file_gets_a_batch_axis(tmp_path, rng):
    np.save(tmp_path / "one.npy", rng.normal(size=(3, 4, 4)).astype(np.float32))
    assert open_dataset(tmp_path / "one.npy", SPECS).num_samples == 1


def test_labels_are_kept_apart(tmp_path, rng):
    np.savez(tmp_path / "e.npz", x=rng.normal(size=(5, 3, 4, 4)).astype(np.float32), labels=np.arange(5))
    ds = open_dataset(tmp_path / "e.npz", SPECS)
    assert set(next(ds.batches(5))) == {"x"} and ds.labels.tolist() == [0, 1, 2, 3, 4]


def test_max_samples(tmp_path, rng):
    np.savez(tmp_path / "a.npz", x=rng.normal(size=(10, 3, 4, 4)).astype(np.float32))
    assert open_dataset(tmp_path / "a.npz", SPECS, max_samples=4).num_samples == 4


def test_float64_is_cast_but_int_is_refused(tmp_path, rng):
    np.savez(tmp_path / "f64.npz", x=rng.normal(size=(2, 3, 4, 4)))
    assert next(open_dataset(tmp_path / "f64.npz", SPECS).batches(2))["x"].dtype == np.float32
    np.savez(tmp_path / "i.npz", x=np.zeros((2, 3, 4, 4), dtype=np.int16))
    with pytest.raises(CalibrationDataError, match=r"input 'x' is int16\[2,3,4,4\] but the model expects float32"):
        open_dataset(tmp_path / "i.npz", SPECS)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"y": np.zeros((2, 3, 4, 4), np.float32)},
            r"keys do not match the model inputs \['x'\]: missing \['x'\]",
        ),
        ({"x": np.zeros((2, 3, 5, 4), np.float32)}, r"axis 2 should be 4"),
        (
            {"x": np.zeros((2, 4, 4), np.float32)[:, :, :, None, None]},
            r"but the model expects float32\[N,3,4,4\]",
        ),
        ({"x": np.zeros((0, 3, 4, 4), np.float32)}, r"holds no samples"),
    ],
)
def test_bad_data_names_file_input_and_problem(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(CalibrationDataError, match=message) as info:
        open_dataset(path, SPECS)
    assert str(path) in str(info.value)


def test_pickles_are_refused(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationDataError, match="never unpickles"):
        open_dataset(path, SPECS)


def test_missing_path_and_wrong_suffix(tmp_path):
    with pytest.raises(CalibrationDataError, match="data not found"):
        open_dataset(tmp_path / "nope.npz", SPECS)
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(CalibrationDataError, match=r"unsupported data format '\.csv'"):
        open_dataset(tmp_path / "data.csv", SPECS)


def test_nan_is_reported_with_file_and_samples(tmp_path):
    x = np.zeros((6, 3, 4, 4), np.float32)
    x[4, 0, 0, 0] = np.inf
    x[5, 1, 2, 3] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, x=x)
    ds = open_dataset(path, SPECS)
    assert next(iter(ds.batches(4)))["x"].shape == (4, 3, 4, 4)  # the first batch is clean
    with pytest.raises(CalibrationDataError, match=r"nan.npz: input 'x' contains 2 NaN/Inf values \(samples 4..5\)"):
        list(ds.batches(4))


def test_rows_are_read_on_demand_from_uncompressed_and_compressed_npz(tmp_path, rng):
    x = rng.normal(size=(9, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "plain.npz", x=x)
    np.savez_compressed(tmp_path / "packed.npz", x=x)
    for name in ("plain.npz", "packed.npz"):
        ds = open_dataset(tmp_path / name, SPECS)
        got = np.concatenate([b["x"] for b in ds.batches(4)])
        np.testing.assert_array_equal(got, x)
        shuffled = np.concatenate([b["x"] for b in ds.batches(4, shuffle=True, seed=3)])
        np.testing.assert_array_equal(shuffled, x[np.random.default_rng(3).permutation(9)])


def test_truncated_npy_is_refused(tmp_path, rng):
    path = tmp_path / "cut.npy"
    np.save(path, rng.normal(size=(10, 3, 4, 4)).astype(np.float32))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CalibrationDataError, match="truncated"):
        open_dataset(path, SPECS)


def test_image_folder_is_decoded_per_batch(tmp_path):
    from PIL import Image

    from quantcli.data.images import ImagePreprocess

    folder = tmp_path / "imgs"
    folder.mkdir()
    # the bundled digits, written as PNG files: real pictures, 16x16 grey
    with np.load(CALIBRATION_DATA / "digits_cnn_eval.npz") as npz:
        digits = npz["input"][:5, 0]
    for i, img in enumerate(digits):
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("ignored")
    specs = (InputSpec("input", np.dtype("float32"), ("N", 3, 32, 32)),)
    prep = ImagePreprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    ds = open_dataset(folder, specs, images=prep)
    assert ds.num_samples == 5
    batch = next(ds.batches(2))["input"]
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == np.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    # grey in, grey out: the three channels agree, and the bright strokes survive the resize
    np.testing.assert_allclose(batch[:, 0], batch[:, 2])
    assert batch.max() > 0.5
    nhwc = open_dataset(folder, (InputSpec("input", np.dtype("float32"), ("N", 24, 24, 3)),))
    assert next(nhwc.batches(1))["input"].shape == (1, 24, 24, 3)


def test_unreadable_image_names_the_file(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    ds = open_dataset(folder, (InputSpec("input", np.dtype("float32"), ("N", 3, 8, 8)),))
    with pytest.raises(CalibrationDataError, match=r"broken\.png: not a readable image"):
        next(ds.batches(1))


def test_random_source_needs_fixed_shapes():
    from quantcli.data.datasets import random_dataset

    ds = random_dataset(SPECS, 6, seed=1)
    assert next(ds.batches(6))["x"].shape == (6, 3, 4, 4)
    with pytest.raises(CalibrationDataError, match="dynamic axes"):
        random_dataset((InputSpec("x", np.dtype("float32"), ("N", "T")),), 2)


def _counting_open(monkeypatch):
    """Count the files ``quantcli.data.arrays`` opens."""
    import builtins

    from quantcli.data import arrays

    opened: list[str] = []

    def counting(path, *args, **kwargs):
        opened.append(str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(arrays, "open", counting, raising=False)
    return opened


def test_a_pass_opens_each_file_once_and_reads_small_members_once(tmp_path, rng, monkeypatch):
    # one sample a run with an unbatched input: before, every batch opened the file once per input
    x = rng.normal(size=(40, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=x, sr=np.array(16000, dtype=np.int64))
    specs = (*SPECS, InputSpec("sr", np.dtype("int64"), ()))
    ds = open_dataset(tmp_path / "a.npz", specs)
    opened = _counting_open(monkeypatch)
    feeds = list(ds.batches(1))
    assert len(feeds) == 40 and opened == [str(tmp_path / "a.npz")]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)
    assert all(int(f["sr"]) == 16000 and f["sr"].ndim == 0 for f in feeds)
    feeds[0]["x"][...] = 0  # a feed is its own array, not a view of what the pass keeps
    np.testing.assert_array_equal(feeds[1]["x"][0], x[1])


def test_a_large_member_is_streamed_not_kept(tmp_path, rng):
    from quantcli.data.arrays import RowReader, open_npz

    x = rng.normal(size=(64, 3, 4, 4)).astype(np.float32)  # 12 KiB
    np.savez(tmp_path / "a.npz", x=x, y=x[:2])
    sources = open_npz(tmp_path / "a.npz")
    with RowReader(keep_bytes=4096) as reader:
        for start in range(0, 64, 5):
            np.testing.assert_array_equal(reader.read(sources["x"], start, start + 5), x[start : start + 5])
        np.testing.assert_array_equal(reader.read(sources["y"], 1, 2), x[1:2])
        # x (12 KiB) is read batch by batch through the open file; y (384 bytes) is kept whole
        assert reader.keep_left == 4096 - x[:2].nbytes and len(reader._kept) == 1 and len(reader._files) == 1
    assert not reader._files and not reader._kept


def test_a_reader_keeps_few_files_open(tmp_path, rng):
    from quantcli.data.arrays import RowReader, open_npy

    x = rng.normal(size=(20, 3, 4, 4)).astype(np.float32)
    for i in range(20):
        np.save(tmp_path / f"{i:02d}.npy", x[i : i + 1])
    sources = [open_npy(tmp_path / f"{i:02d}.npy") for i in range(20)]
    with RowReader(keep_bytes=0, max_open=3) as reader:
        for i, source in enumerate(sources):
            np.testing.assert_array_equal(reader.read(source, 0, 1), x[i : i + 1])
            assert len(reader._files) == min(i + 1, 3)
