"""Fixtures shared by all tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """The worker runs on asyncio (aiohttp), so do its tests."""
    return "asyncio"
