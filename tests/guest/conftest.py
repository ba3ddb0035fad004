from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import short_tmp_dir


@pytest.fixture
def root() -> Iterator[Path]:
    """A short private directory for the guest's socket files."""
    with short_tmp_dir() as path:
        yield path
