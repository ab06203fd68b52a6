"""Shared test set-up: eight fake CPU devices for the multi-device tests, and fixture paths."""

import os
import pathlib

# Must happen before jax initializes its backends; tests only (the package sets nothing at import).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def trl_fixture_dir() -> pathlib.Path:
    """The TRL 1.16 parity fixture (see tests/fixtures/trl_parity/PROVENANCE.md)."""
    return FIXTURES / "trl_parity"
