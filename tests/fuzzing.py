"""Shared settings of the property-based fuzz tests (`tests/test_fuzz_*.py`).

CI runs a fixed, derandomized set of examples (reproducible, a few seconds per test); setting
`TANDEM_FUZZ_EXAMPLES=N` runs N fresh random examples per test instead, for longer local hunts.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_LOCAL = int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "0") or 0)


def fuzz_settings(ci_examples: int) -> settings:
    """Hypothesis settings for one fuzz test: `ci_examples` derandomized examples in CI."""
    return settings(max_examples=_LOCAL or ci_examples, deadline=None, derandomize=not _LOCAL, database=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                            HealthCheck.filter_too_much,
                                                            HealthCheck.function_scoped_fixture])
