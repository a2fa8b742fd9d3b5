"""The segmentation network as both sides build it, and its model file: every architecture maps
a patch to per-class maps of the same size, DynUNet's strides follow nnU-Net's rule, and a model
file of another format, architecture, modality or label set is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from common.network import state_arrays
from common.protocol import Modality, SegmentationSpec, StudyProtocol, load_protocol
from common.segmenter import (
    SegmenterHeader,
    SegmenterLabels,
    build_segmenter,
    dynunet_layout,
    load_segmenter,
    save_segmenter,
)

SPEC = SegmentationSpec(channels=(4, 8, 16), patch_size=(32, 32, 8))


@pytest.fixture(scope="module")
def protocol() -> StudyProtocol:
    return load_protocol("preset:spine_mri_t1w").model_copy(update={"segmentation": SPEC})


def _header(protocol: StudyProtocol, spec: SegmentationSpec = SPEC) -> SegmenterHeader:
    return SegmenterHeader(spec=spec.model_dump(mode="json"), modality=protocol.modality.value,
                           labels=SegmenterLabels.of(protocol), spacing_zyx=(4.0, 1.0, 1.0),
                           volume_ml={"1": (30.0, 80.0), "2": (40.0, 90.0)},
                           parts={"1": 3, "2": 2}, trained_on={"sites": ["A"], "cases": 12})


@pytest.mark.parametrize("architecture", ["unet", "dynunet", "segresnet"])
def test_every_architecture_gives_one_map_per_class_the_size_of_the_patch(architecture: str):
    spec = SPEC.model_copy(update={"architecture": architecture})
    network = build_segmenter(spec, 3, (4.0, 1.0, 1.0), seed=1).eval()
    with torch.no_grad():
        assert network(torch.zeros(2, 1, 8, 32, 32)).shape == (2, 3, 8, 32, 32)
    again = build_segmenter(spec, 3, (4.0, 1.0, 1.0), seed=1)
    first, second = state_arrays(network), state_arrays(again)
    assert all(np.array_equal(first[k], second[k]) for k in first)  # the seed decides


def test_dynunet_keeps_a_thick_slice_axis_until_the_plane_catches_up():
    kernels, strides = dynunet_layout((4.0, 1.0, 1.0), 4)
    # z (4 mm) is more than twice the finest (1 mm): in-plane halves first, z waits
    assert strides == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert kernels[0] == [1, 3, 3] and kernels[2] == [3, 3, 3]
    assert dynunet_layout((1.0, 1.0, 1.0), 3)[1] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]


def test_a_patch_the_levels_cannot_halve_is_refused_by_the_protocol():
    with pytest.raises(ValueError, match="multiple of 4"):
        SegmentationSpec(channels=(4, 8, 16), patch_size=(32, 32, 10))


def test_labels_are_the_roi_and_the_reference_tissue_of_the_protocol(protocol: StudyProtocol):
    labels = SegmenterLabels.of(protocol)
    norm = protocol.standardization.normalization
    assert norm is not None and labels.values == (protocol.ingestion.roi_label,
                                                   norm.reference_label)
    assert labels.n_classes == 3


def test_a_model_file_reads_back_to_the_same_network(protocol: StudyProtocol, tmp_path: Path):
    header = _header(protocol)
    network = header.network(seed=3)
    save_segmenter(tmp_path / "m.npz", header, state_arrays(network))
    read, loaded = load_segmenter(tmp_path / "m.npz", protocol)
    assert read == header and not loaded.training
    x = torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(network.eval()(x), loaded(x))


def test_a_model_file_of_another_kind_is_named(protocol: StudyProtocol, tmp_path: Path):
    header = _header(protocol)
    weights = state_arrays(header.network())
    save_segmenter(tmp_path / "unet.npz", header, weights)

    # the header says dynunet, the weights are a unet's
    lying = SegmenterHeader(**{**header.__dict__, "spec": SPEC.model_copy(
        update={"architecture": "dynunet"}).model_dump(mode="json")})
    save_segmenter(tmp_path / "lying.npz", lying, weights)
    with pytest.raises(ConfigError, match="weights do not fit its dynunet"):
        load_segmenter(tmp_path / "lying.npz")

    ct = load_protocol("preset:wb_ldct")
    assert ct.modality is Modality.CT
    with pytest.raises(ConfigError, match="trained on MR images; this study is CT"):
        load_segmenter(tmp_path / "unet.npz", ct)

    np.savez(tmp_path / "other.npz", header=np.array(json.dumps({"format": "nnunet"})))
    with pytest.raises(ConfigError, match="not a MyeloFed segmentation model"):
        load_segmenter(tmp_path / "other.npz")
    np.savez(tmp_path / "future.npz", header=np.array(json.dumps(
        {**json.loads(header.to_json()), "version": 99})))
    with pytest.raises(ConfigError, match="version 99"):
        load_segmenter(tmp_path / "future.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match="unreadable"):
        load_segmenter(tmp_path / "text.npz")
    with pytest.raises(ConfigError, match="file not found"):
        load_segmenter(tmp_path / "absent.npz")


def test_a_protocol_without_a_segmentation_section_says_so():
    from common.segmenter import segmentation_spec

    with pytest.raises(ConfigError, match="no 'segmentation' section"):
        segmentation_spec(load_protocol("preset:spine_mri_t1w"))
