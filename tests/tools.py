"""External programs some tests drive (docker-compose, headless Chromium): a developer's
machine without one skips those tests; CI, which installs them, sets ALIGNSWEEP_REQUIRE_TOOLS=1
(.ci/run) and a missing program then fails the test instead of skipping it silently."""

from __future__ import annotations

import os

import pytest

REQUIRE_TOOLS = "ALIGNSWEEP_REQUIRE_TOOLS"


def missing(reason: str) -> None:
    """Skip the calling test, or fail it where the tools are required."""
    if os.environ.get(REQUIRE_TOOLS) == "1":
        pytest.fail(f"{reason} ({REQUIRE_TOOLS}=1: this machine must have it)", pytrace=False)
    pytest.skip(reason)
