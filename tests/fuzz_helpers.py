"""Shared pieces of the fuzz tests: the example budget, a fixed seed, and the tally of outcomes.

``make test`` runs every fuzz test with a small fixed budget (``derandomize``: the same inputs on
every machine); ``make fuzz`` runs them with ``DELTATUNE_FUZZ_EXAMPLES`` examples each and writes
the tally (inputs tried and bad outcomes per category) to ``DELTATUNE_FUZZ_REPORT``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("DELTATUNE_FUZZ_EXAMPLES", "0"))

TALLY: dict[str, dict[str, float]] = defaultdict(lambda: {"tried": 0, "bad": 0, "accepted": 0})


def fuzz_settings(examples: int, share: float = 1.0) -> settings:
    """``examples`` in ``make test``; ``share`` of ``DELTATUNE_FUZZ_EXAMPLES`` when that is set (a
    slow kind of input takes a small share of the long budget)."""
    return settings(
        max_examples=max(1, int(EXAMPLES * share)) if EXAMPLES else examples,
        derandomize=True,
        deadline=None,  # a hang is caught by the test's own timeout, not by a flaky per-example clock
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )


def tally(category: str, bad: bool = False, accepted: bool = False, **figures: float) -> None:
    """Count one input of ``category``: ``bad`` if its outcome was neither a clear error nor a correct
    load, ``accepted`` if it loaded (the rest were refused with a clear error)."""
    entry = TALLY[category]
    entry["tried"] += 1
    entry["bad"] += int(bad)
    entry["accepted"] += int(accepted)
    for name, value in figures.items():
        entry[name] = max(entry.get(name, value), value)


def write_report() -> None:
    target = os.environ.get("DELTATUNE_FUZZ_REPORT")
    if not target:
        return
    path = Path(target)
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **TALLY}, indent=2, sort_keys=True) + "\n")
