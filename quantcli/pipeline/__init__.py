"""What the commands run: requests checked once, and ``convert`` as lists of steps over a context.

The phase folders (``stats``, ``passes``, ``static``, ``modes``, ``search``, ``verify``) never import
this package; it imports them, in the order a conversion needs them.
"""

from __future__ import annotations

from quantcli.pipeline.context import ConvertContext, Step
from quantcli.pipeline.convert import (
    ALGORITHM_STEPS,
    MODE_STEPS,
    RECIPE_STEPS,
    SEARCH_STEPS,
    STATIC_STEPS,
    run_convert,
    steps_for,
)
from quantcli.pipeline.request import CalibrateRequest, CompareRequest, ConvertRequest
from quantcli.pipeline.result import ConvertResult

__all__ = [
    "ALGORITHM_STEPS",
    "MODE_STEPS",
    "RECIPE_STEPS",
    "SEARCH_STEPS",
    "STATIC_STEPS",
    "CalibrateRequest",
    "CompareRequest",
    "ConvertContext",
    "ConvertRequest",
    "ConvertResult",
    "Step",
    "run_convert",
    "steps_for",
]
