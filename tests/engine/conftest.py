"""Fixtures shared by the engine's tests."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest

from eventrun.engine.store import SQLiteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """An open store in a fresh folder, closed after the test."""
    store = SQLiteStore(tmp_path / "eventrun.db")
    store.open()
    try:
        yield store
    finally:
        store.close()
