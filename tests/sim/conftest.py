"""Fixtures shared by the simulator tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Run the anyio-marked tests on asyncio only: the simulator is an aiohttp server."""
    return "asyncio"
