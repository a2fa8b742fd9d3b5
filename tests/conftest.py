"""Shared fixtures: where the shared real data lives, and small synthetic volumes; and the lock
that keeps an ``exclusive`` test from sharing the machine with another slow test."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from harmonization.images import ImageMeasure

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Under pytest-xdist, a test marked ``exclusive`` runs while no other ``slow`` test does,
    on any worker: the 20-site load test starts 20 SuperNodes whose ClientApps must start
    within Flower's 30 s, which a study running beside it on 2 cores made them miss, and the
    deployment rehearsal's sites missed its 120 s preparation round beside a simulation. The lock
    (shared for ``slow``, exclusive for ``exclusive``) is held over the test's setup, call and
    teardown, so a module's study fixture counts too. The lock file is the machine's, so two
    test runs side by side keep to it as well."""
    mode = None
    if "PYTEST_XDIST_WORKER" in os.environ and os.name == "posix":
        import fcntl  # POSIX only, and needed only under pytest-xdist

        if item.get_closest_marker("exclusive"):
            mode = fcntl.LOCK_EX
        elif item.get_closest_marker("slow"):
            mode = fcntl.LOCK_SH
    if mode is None:
        yield
        return
    with open(Path(tempfile.gettempdir()) / "myelofed-tests.lock", "a") as handle:
        fcntl.flock(handle, mode)
        yield


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with a clear message when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (clone the project beside shared/)")
    return path


def make_volume(
    shape_zyx: tuple[int, int, int] = (12, 24, 24),
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    seed: int = 0,
    roi_value: int = 1,
) -> tuple[sitk.Image, sitk.Image]:
    """A noisy float image with a brighter cube ROI (label ``roi_value``) and muscle label 2."""
    rng = np.random.default_rng(seed)
    z, y, x = shape_zyx
    image = rng.normal(100.0, 10.0, size=shape_zyx).astype(np.float32)
    labels = np.zeros(shape_zyx, dtype=np.uint8)
    labels[z // 4: 3 * z // 4, y // 4: 3 * y // 4, x // 4: 3 * x // 4] = roi_value
    image[labels == roi_value] += rng.normal(60.0, 25.0, size=int((labels == roi_value).sum()))
    labels[1:3, 1:4, 1:4] = 2
    img = sitk.GetImageFromArray(image)
    msk = sitk.GetImageFromArray(labels)
    for item in (img, msk):
        item.SetSpacing(spacing)
        item.SetOrigin(origin)
    return img, msk


def image_measure(scanner: str, landmarks: np.ndarray, noise: float = 2.0,
                  spacing: tuple[float, float, float] = (0.8, 0.8, 3.0)) -> ImageMeasure:
    """What the image harmonization round measures on one training image, for tests that
    care about its landmarks only."""
    return ImageMeasure(scanner, np.asarray(landmarks, dtype=np.float64), noise, spacing)
