"""The chart rendered once per variant: defaults, GPU nodes, and most options turned."""

from __future__ import annotations

import pytest

from tests.deploy.chart import ALL_OPTIONS_VALUES, GPU_VALUES, Manifest, render


@pytest.fixture(scope="session")
def default_manifests() -> list[Manifest]:
    return render()


@pytest.fixture(scope="session")
def gpu_manifests() -> list[Manifest]:
    return render([GPU_VALUES])


@pytest.fixture(scope="session")
def all_options_manifests() -> list[Manifest]:
    return render([ALL_OPTIONS_VALUES])
