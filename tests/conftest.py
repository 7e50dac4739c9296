from __future__ import annotations

import pytest

from tests.support import start_standalone


@pytest.fixture
async def standalone(nursery):
    """A standalone server (gateway + 4 shards) in this test's trio run."""
    return await start_standalone(nursery)
