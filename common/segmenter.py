"""The segmentation network (issue 17), as the server and every site make it, and its model file.

The network is MONAI's UNet, DynUNet (nnU-Net's configuration: kernels and strides from the
input spacing) or SegResNet, one input channel, one output channel per class: background, the
ROI and, where the protocol has one, the reference tissue (:class:`SegmenterLabels`). Its
initial weights are a function of the study seed alone. Its weights travel and are stored as
named numpy arrays (:mod:`common.network`).

The model file (``.npz``, no pickles) holds the weights and a JSON header
(:class:`SegmenterHeader`): the architecture, the classes and what they mean, the input rules
(spacing, modality) and what the training masks looked like (the volume range and the number of
parts of each label), which the quality control of a new mask compares against. Reading a file
checks all of it, and a file of another format, architecture or modality is named.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets.dynunet import DynUNet
from monai.networks.nets.segresnet import SegResNet
from monai.networks.nets.unet import UNet

from common.errors import ConfigError
from common.glm import ModelError
from common.network import load_state_arrays
from common.protocol import SegmentationSpec, StudyProtocol
from common.provenance import atomic_write_npz

#: What a model file says it is, and the version of its layout.
FILE_FORMAT = "myelofed-segmenter"
FILE_VERSION = 1
#: The largest model file read (a UNet of the default channels is 1 MB, DynUNet's of 32-320
#: channels about 120 MB).
MAX_MODEL_BYTES = 1_000_000_000
#: Prefix of the weight arrays in the file (the header is the array ``header``).
_WEIGHT = "w/"


@dataclass(frozen=True)
class SegmenterLabels:
    """The network's classes: output channel ``i + 1`` is the label value ``values[i]`` of a
    mask, named ``names[i]``; channel 0 is the background."""

    values: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.values) + 1

    @classmethod
    def of(cls, protocol: StudyProtocol) -> SegmenterLabels:
        """The ROI, and the reference tissue where the protocol normalizes by one."""
        values, names = [protocol.ingestion.roi_label], [protocol.ingestion.rtstruct_roi or "ROI"]
        norm = protocol.standardization.normalization
        if norm is not None and norm.reference_label is not None:
            values.append(norm.reference_label)
            names.append(norm.reference_roi or "reference tissue")
        return cls(tuple(values), tuple(names))


def segmentation_spec(protocol: StudyProtocol) -> SegmentationSpec:
    """The protocol's ``segmentation`` section; a :class:`ConfigError` when it has none."""
    if protocol.segmentation is None:
        raise ConfigError("study protocol", [
            "has no 'segmentation' section: add one (e.g. segmentation: {} for the defaults) "
            "to train or use a segmentation network"])
    return protocol.segmentation


def network_spacing(protocol: StudyProtocol) -> tuple[float, float, float]:
    """The network's voxel spacing, (z, y, x) mm: ``segmentation.spacing_mm``, else the
    protocol's resampling spacing (its z too, even where the radiomics keep the slices)."""
    spec = segmentation_spec(protocol)
    xyz = spec.spacing_mm
    if xyz is None and protocol.standardization.resample is not None:
        xyz = protocol.standardization.resample.spacing_mm
    if xyz is None:
        raise ConfigError("study protocol", [
            "segmentation.spacing_mm: set it; the protocol has no resampling spacing to "
            "segment on"])
    return (float(xyz[2]), float(xyz[1]), float(xyz[0]))


def dynunet_layout(spacing_zyx: tuple[float, float, float], levels: int
                   ) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net's kernels and strides (array order z, y, x) for ``levels`` levels: an axis is
    halved at a level while its spacing is at most twice the finest one's (so a thick-slice
    axis waits until the in-plane axes have caught up), and its kernel is 1 until then."""
    spacing = list(spacing_zyx)
    kernels, strides = [], [[1, 1, 1]]
    for level in range(levels):
        finest = min(spacing)
        near = [s <= 2 * finest for s in spacing]
        kernels.append([3 if ok else 1 for ok in near])
        if level < levels - 1:
            strides.append([2 if ok else 1 for ok in near])
            spacing = [s * (2 if ok else 1) for s, ok in zip(spacing, near, strict=True)]
    return kernels, strides


def build_segmenter(spec: SegmentationSpec, n_classes: int,
                    spacing_zyx: tuple[float, float, float], *, seed: int = 0) -> torch.nn.Module:
    """The MONAI network of ``spec.architecture`` with one input channel and ``n_classes``
    outputs; instance normalization (no batch statistics to average across sites); weights a
    function of ``seed`` alone (the global torch RNG is left as it was). ``spacing_zyx`` only
    shapes DynUNet. A patch the network cannot take is a :class:`ConfigError`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: torch.nn.Module
        if spec.architecture == "unet":
            model = UNet(spatial_dims=3, in_channels=1, out_channels=n_classes,
                         channels=spec.channels, strides=(2,) * (spec.levels - 1),
                         num_res_units=2, norm="instance")
        elif spec.architecture == "segresnet":
            model = SegResNet(spatial_dims=3, init_filters=spec.channels[0], in_channels=1,
                              out_channels=n_classes,
                              blocks_down=(1, 2, 2, 4, 4, 4)[:spec.levels],
                              blocks_up=(1,) * (spec.levels - 1), norm="instance")
        else:
            kernels, strides = dynunet_layout(spacing_zyx, spec.levels)
            model = DynUNet(spatial_dims=3, in_channels=1, out_channels=n_classes,
                            kernel_size=kernels, strides=strides,
                            upsample_kernel_size=strides[1:], filters=spec.channels,
                            norm_name="instance", res_block=True)
    x, y, z = spec.patch_size
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 1, z, y, x))
    except RuntimeError as exc:
        raise ConfigError("study protocol", [
            f"segmentation.patch_size = {list(spec.patch_size)} (x, y, z) does not fit "
            f"{spec.architecture}: {str(exc).splitlines()[0]}"]) from None
    if tuple(out.shape) != (1, n_classes, z, y, x):
        raise ConfigError("study protocol", [
            f"segmentation: {spec.architecture} maps a patch of {[z, y, x]} (z, y, x) to "
            f"{list(out.shape[2:])}: choose a patch_size each network level can halve"])
    model.train()
    return model


#: A label's volume range in a model file: the training masks' mean +/- this many SDs (from
#: sums, which is all a federated study gets: no one case's volume leaves its site).
VOLUME_SDS = 3.0


def shape_sum_names(labels: SegmenterLabels) -> tuple[str, ...]:
    """The sums a site sends of its training masks' shapes: the count of masks, and per label
    the sum and the sum of squares of the volume (ml) and the sum of the parts."""
    return ("masks", *(f"label_{v}_{part}" for v in labels.values
                       for part in ("volume_sum", "volume_sumsq", "parts_sum")))


def header_from_sums(protocol: StudyProtocol, sums: Mapping[str, float],
                     trained_on: dict[str, Any]) -> SegmenterHeader:
    """A model file's header for a network trained under ``protocol`` on masks whose shapes
    summed to ``sums`` (:func:`shape_sum_names`, added over sites): each label's volume range
    is the mean +/- :data:`VOLUME_SDS` SDs (from 0), its parts the rounded mean count."""
    labels = SegmenterLabels.of(protocol)
    n = float(sums["masks"])
    if not n >= 2:
        raise ModelError("fewer than 2 training masks: no volume range to check masks by")
    volume, parts = {}, {}
    for v in labels.values:
        mean = sums[f"label_{v}_volume_sum"] / n
        var = max(sums[f"label_{v}_volume_sumsq"] / n - mean * mean, 0.0) * n / (n - 1)
        sd = float(np.sqrt(var))
        volume[str(v)] = (max(mean - VOLUME_SDS * sd, 0.0), mean + VOLUME_SDS * sd)
        parts[str(v)] = max(int(round(sums[f"label_{v}_parts_sum"] / n)), 1)
    return SegmenterHeader(spec=segmentation_spec(protocol).model_dump(mode="json"),
                           modality=protocol.modality.value, labels=labels,
                           spacing_zyx=network_spacing(protocol), volume_ml=volume, parts=parts,
                           trained_on=trained_on, protocol_hash=protocol.content_hash())


@dataclass(frozen=True)
class SegmenterHeader:
    """What a model file says about its network (see the module docstring).

    ``volume_ml`` and ``parts`` are per label value (as a string, JSON's keys): the range of
    that label's volume the training masks make plausible, and its usual number of connected
    parts (:func:`header_from_sums`). ``trained_on`` names the sites and counts the cases
    (nothing about any one case)."""

    spec: dict[str, Any]
    modality: str
    labels: SegmenterLabels
    spacing_zyx: tuple[float, float, float]
    volume_ml: dict[str, tuple[float, float]]
    parts: dict[str, int]
    trained_on: dict[str, Any] = field(default_factory=dict)
    protocol_hash: str = ""

    @property
    def segmentation(self) -> SegmentationSpec:
        return SegmentationSpec.model_validate(self.spec)

    def network(self, seed: int = 0) -> torch.nn.Module:
        return build_segmenter(self.segmentation, self.labels.n_classes, self.spacing_zyx,
                               seed=seed)

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps({"format": FILE_FORMAT, "version": FILE_VERSION, **data},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> SegmenterHeader:
        try:
            data = json.loads(text)
            if data.get("format") != FILE_FORMAT:
                raise ConfigError(where, [f"not a MyeloFed segmentation model (format "
                                          f"{data.get('format')!r})"])
            if data.get("version") != FILE_VERSION:
                raise ConfigError(where, [f"model file version {data.get('version')!r}; this "
                                          f"MyeloFed reads version {FILE_VERSION}"])
            labels = SegmenterLabels(tuple(int(v) for v in data["labels"]["values"]),
                                     tuple(str(n) for n in data["labels"]["names"]))
            spacing = tuple(float(s) for s in data["spacing_zyx"])
            if len(spacing) != 3 or not all(0 < s < 1000 for s in spacing):
                raise ValueError(f"spacing {spacing} is not three positive millimetres")
            return cls(spec=dict(data["spec"]), modality=str(data["modality"]), labels=labels,
                       spacing_zyx=(spacing[0], spacing[1], spacing[2]),
                       volume_ml={str(k): (float(v[0]), float(v[1]))
                                  for k, v in data["volume_ml"].items()},
                       parts={str(k): int(v) for k, v in data["parts"].items()},
                       trained_on=dict(data.get("trained_on", {})),
                       protocol_hash=str(data.get("protocol_hash", "")))
        except ConfigError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(where, [f"malformed model header: {exc!r}"]) from None


def save_segmenter(path: Path, header: SegmenterHeader, weights: Mapping[str, np.ndarray]
                   ) -> None:
    """Write a model file (atomically: a partial file never has the final name)."""
    atomic_write_npz(path, {"header": np.array(header.to_json()),
                            **{_WEIGHT + k: np.asarray(v) for k, v in weights.items()}})


def load_segmenter(path: Path, protocol: StudyProtocol | None = None
                   ) -> tuple[SegmenterHeader, torch.nn.Module]:
    """Read a model file into its network, in eval mode. Named errors
    (:class:`ConfigError`) for a file that is absent, too large, not a model file, of another
    architecture than its header says (weights that do not fit), or, with ``protocol``, for a
    study of another modality or other labels than the model's."""
    where = f"segmentation model '{path}'"
    if not path.is_file():
        raise ConfigError(where, ["file not found"])
    if path.stat().st_size > MAX_MODEL_BYTES:
        raise ConfigError(where, [f"larger than {MAX_MODEL_BYTES:,} bytes"])
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "header" not in npz.files:
                raise ConfigError(where, ["not a MyeloFed segmentation model (no header)"])
            header = SegmenterHeader.from_json(str(npz["header"]), where)
            weights = {k.removeprefix(_WEIGHT): npz[k] for k in npz.files
                       if k.startswith(_WEIGHT)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(where, [f"unreadable: {exc}"]) from None
    if protocol is not None:
        problems = []
        if header.modality != protocol.modality.value:
            problems.append(f"trained on {header.modality} images; this study is "
                            f"{protocol.modality.value}")
        wanted = SegmenterLabels.of(protocol)
        if header.labels.values != wanted.values:
            problems.append(f"labels {list(header.labels.values)}; this study's are "
                            f"{list(wanted.values)}")
        if problems:
            raise ConfigError(where, problems)
    try:
        network = header.network()
        load_state_arrays(network, weights)
    except (ConfigError, ModelError, ValueError) as exc:
        raise ConfigError(where, [f"its weights do not fit its {header.spec.get('architecture')}"
                                  f" network: {exc}"]) from None
    network.eval()
    return header, network

