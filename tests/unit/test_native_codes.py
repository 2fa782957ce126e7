"""The facts the native modules hard-code (C enums, for speed) agree with where each is defined:
the feature kernel's codes with gateway/features/_plan.py. The test reads what the built module
exposes, so a stale build fails too.
"""

from __future__ import annotations

from gateway.features import _plan
from gateway.types import OUTCOMES

try:
    from gateway import _features_c
except ImportError:  # the tests below then fail loudly instead of being skipped
    _features_c = None

# _plan's codes: the kernel's kinds, range policies, steps, errors and coverage columns.
CODE_NAMES = ("NUMERIC", "CATEGORICAL")
CODE_PREFIXES = ("RANGE_", "STEP_", "ERROR_", "COUNT_")


def plan_codes() -> dict[str, int]:
    return {
        name: value
        for name, value in vars(_plan).items()
        if (name in CODE_NAMES or name.startswith(CODE_PREFIXES)) and isinstance(value, int)
    }


def test_the_native_kernel_has_each_of_plans_codes_with_its_value():
    assert _features_c is not None, "gateway._features_c is not built: run `make native`"
    assert len(plan_codes()) >= 17  # the filter above still finds them
    assert plan_codes() == _features_c.CODES


def test_coverage_columns_are_in_outcomes_order():
    columns = {outcome: getattr(_plan, f"COUNT_{outcome.upper()}") for outcome in OUTCOMES}
    assert columns == {outcome: i for i, outcome in enumerate(OUTCOMES)}
