"""The standardized volumes a site keeps for the CNN's crops (client/volumes.py): read back
as written, another case's or a too-large volume never."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from client import volumes
from client.standardize import Volume
from tests.conftest import make_volume


def test_a_volume_too_large_to_keep_is_not_written(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    image, labels = make_volume()
    volume = Volume(image, labels, 1)
    path = tmp_path / "case.volume.npz"
    assert volumes.save_volume(path, volume, "p1")
    back = volumes.load_volume(path, "p1")
    assert back is not None and back.intensity_roi is None and back.roi_label == 1
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back.image),
                                  sitk.GetArrayFromImage(image).astype(np.float32))
    assert back.image.GetSpacing() == image.GetSpacing()
    assert back.image.GetOrigin() == image.GetOrigin()
    assert volumes.load_volume(path, "p2") is None  # another case's file reads as absent
    monkeypatch.setattr(volumes, "MAX_CACHED_VOXELS", image.GetNumberOfPixels() - 1)
    assert not volumes.save_volume(tmp_path / "big.volume.npz", volume, "p1")
    assert not (tmp_path / "big.volume.npz").exists()
