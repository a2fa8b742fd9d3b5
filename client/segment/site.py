"""A site's segmentation work on its own cases: training the network on the cases that have a
mask, checking it on held-out ones, and segmenting the cases that have none. Every image, mask
and per-case figure stays at the site; a model file holds the weights and the training masks'
volume range and part counts (no case's)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from client.folds import split_state
from client.limits import Budget
from client.loading import load_case, read_image
from client.manifest import CaseSpec
from client.pipeline import run_cases
from client.segment.inputs import network_classes, network_input, to_source
from client.segment.network import (
    EpochsResult,
    TrainingCase,
    class_probabilities,
    seed_of,
    train_epochs,
)
from client.segment.quality import (
    LabelShape,
    agreement,
    label_shapes,
    mean_with_interval,
    quality_problems,
)
from common.errors import CaseError, SkipReason
from common.metrics.agreement import icc_3_1
from common.payloads import released
from common.protocol import Modality, StudyProtocol
from common.segmenter import (
    SegmenterHeader,
    SegmenterLabels,
    build_segmenter,
    header_from_sums,
    network_spacing,
    segmentation_spec,
)
from common.site_config import SiteConfig

log = logging.getLogger("myelofed.site")


@dataclass
class LoadedCases:
    """A site's cases with masks, as the network trains on them: per case id, its input and
    classes, and each label's shape in the mask as drawn (on the case's own grid); the cases
    that could not be read, with the reason."""

    cases: dict[str, TrainingCase] = field(default_factory=dict)
    shapes: dict[str, dict[int, LabelShape]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SegmentationCases:
    """A site's cases for the segmentation network: training and test cases (with a mask) and
    the cases to segment (without)."""

    train: list[CaseSpec]
    test: list[CaseSpec]
    to_segment: list[CaseSpec]


def split_cases(cases: Sequence[CaseSpec], seed: int, site_name: str, test_fraction: float
                ) -> SegmentationCases:
    """The cases with a mask split once into training and test cases (``test_fraction`` held
    out, seeded by ``seed`` and the site's name), and the cases without one to segment."""
    masked = [c for c in cases if c.mask is not None]
    order = np.random.default_rng(split_state(seed, f"{site_name}/segmentation")
                                  ).permutation(len(masked))
    held = set(order[:int(round(test_fraction * len(masked)))].tolist())
    return SegmentationCases([c for i, c in enumerate(masked) if i not in held],
                             [c for i, c in enumerate(masked) if i in held],
                             [c for c in cases if c.mask is None])


def load_training(cases: Sequence[CaseSpec], protocol: StudyProtocol, budget: Budget | int
                  ) -> LoadedCases:
    """Read each case with a mask (images and masks as the radiomics read them: DICOM, SEG,
    RTSTRUCT or NIfTI) into the network's input and classes. A case that fails is skipped,
    named with its reason; the others go on. A mask that lacks one of the network's labels is
    skipped too (it would teach the network that label is absent)."""
    labels = SegmenterLabels.of(protocol)
    spacing = network_spacing(protocol)
    out = LoadedCases()
    for case in cases:
        if case.mask is None:
            continue
        try:
            volume = load_case(case, protocol, budget)
            shapes = label_shapes(volume.labels, labels)
            absent = [f"{v} ({n})" for v, n in zip(labels.values, labels.names, strict=True)
                      if shapes[v].volume_ml == 0]
            if absent:
                raise CaseError(SkipReason.ROI_NOT_FOUND,
                                f"the mask has no voxel of label {', '.join(absent)}")
            item = network_input(volume.image, spacing, protocol.modality, budget)
            out.cases[case.case_id] = TrainingCase(
                item.values, network_classes(volume.labels, item.grid, labels))
            out.shapes[case.case_id] = shapes
        except CaseError as exc:
            out.skipped[case.case_id] = f"{exc.reason.value}: {exc.detail}"
        except Exception as exc:  # a bug or an unforeseen file: skip the case, keep the others
            out.skipped[case.case_id] = (f"{SkipReason.INTERNAL_ERROR.value}: "
                                         f"{type(exc).__name__}: {exc}")
    for case_id, reason in out.skipped.items():
        log.warning("segmentation: case '%s' skipped: %s", case_id, reason)
    return out


def shape_sums(shapes: Sequence[dict[int, LabelShape]], labels: SegmenterLabels
               ) -> dict[str, float]:
    """The sums of :func:`common.segmenter.shape_sum_names` over these masks' shapes."""
    sums = {"masks": float(len(shapes))}
    for v in labels.values:
        volumes = np.array([s[v].volume_ml for s in shapes], dtype=float)
        sums[f"label_{v}_volume_sum"] = float(volumes.sum())
        sums[f"label_{v}_volume_sumsq"] = float((volumes ** 2).sum())
        sums[f"label_{v}_parts_sum"] = float(sum(s[v].parts for s in shapes))
    return sums


def header_of(protocol: StudyProtocol, shapes: Sequence[dict[int, LabelShape]],
              trained_on: dict[str, object]) -> SegmenterHeader:
    """A model file's header for a network trained under ``protocol`` on masks of these
    ``shapes`` (:func:`common.segmenter.header_from_sums`)."""
    return header_from_sums(protocol, shape_sums(shapes, SegmenterLabels.of(protocol)),
                            dict(trained_on))


def train_alone(protocol: StudyProtocol, training: Sequence[TrainingCase], *, seed: int,
                site_name: str, device: torch.device, epochs: int | None = None
                ) -> tuple[torch.nn.Module, EpochsResult]:
    """The network trained on this site's cases alone: from the study seed's initial weights,
    ``rounds x local_epochs`` epochs (the federation's budget of epochs) unless ``epochs``."""
    spec = segmentation_spec(protocol)
    labels = SegmenterLabels.of(protocol)
    network = build_segmenter(spec, labels.n_classes, network_spacing(protocol), seed=seed)
    result = train_epochs(network, training, spec, labels.n_classes,
                          epochs=epochs or spec.rounds * spec.local_epochs,
                          seed=seed_of(seed, site_name, "alone"), device=device,
                          proximal_mu=0.0)
    return network, result


def segment_image(image: sitk.Image, header: SegmenterHeader, network: torch.nn.Module,
                  budget: Budget | int, device: torch.device) -> sitk.Image:
    """The network's mask of one image, on the image's grid (label values as the study's)."""
    item = network_input(image, header.spacing_zyx, Modality(header.modality), budget)
    probabilities = class_probabilities(network, item.values, header.segmentation, device)
    return to_source(probabilities, item, header.labels, budget)


@dataclass(frozen=True)
class Segmented:
    """One case segmented: its mask (None when it could not be made), what quality control
    found (empty: the mask may be used) and, where the case has a reference mask, the
    agreement per label value (Dice, HD95 mm)."""

    case_id: str
    mask: sitk.Image | None
    problems: tuple[str, ...]
    agreement: dict[int, tuple[float, float]] = field(default_factory=dict)


def segment_case(case: CaseSpec, protocol: StudyProtocol, header: SegmenterHeader,
                 network: torch.nn.Module, budget: Budget | int, device: torch.device,
                 compare: bool = False) -> Segmented:
    """Segment one case; check the mask (:func:`quality_problems`); with ``compare`` and a
    mask in the manifest, measure the agreement with it. A case that cannot be read or
    segmented comes back with its reason as the problem, never raised."""
    try:
        image = read_image(case, protocol, budget)
        mask = segment_image(image, header, network, budget, device)
    except CaseError as exc:
        return Segmented(case.case_id, None, (f"{exc.reason.value}: {exc.detail}",))
    except Exception as exc:  # a bug or an unforeseen file: skip the case, keep the others
        return Segmented(case.case_id, None, (f"{SkipReason.INTERNAL_ERROR.value}: "
                                              f"{type(exc).__name__}: {exc}",))
    problems = tuple(quality_problems(mask, header.labels, header.segmentation,
                                      header.volume_ml, header.parts))
    measured: dict[int, tuple[float, float]] = {}
    if compare and case.mask is not None:
        try:
            truth = load_case(case, protocol, budget).labels
            measured = agreement(mask, truth, header.labels)
        except CaseError as exc:
            log.warning("segmentation: case '%s' has no usable reference mask: %s",
                        case.case_id, exc.detail)
    return Segmented(case.case_id, mask, problems, measured)


def write_mask(case: CaseSpec, mask: sitk.Image, header: SegmenterHeader, folder: Path
               ) -> tuple[list[Path], str]:
    """Write a mask the network made of ``case`` into ``folder``: ``<case>.nii.gz``, and for a
    DICOM series also ``<case>.seg.dcm``, a DICOM SEG that references it
    (:func:`client.dicom.seg_out.write_seg`). The files written, and why the SEG could not be
    ('' when it was, or the image is no series): the NIfTI mask stands without it."""
    from client.dicom.seg_out import write_seg  # deferred: highdicom, for a DICOM series only
    from common.provenance import software_versions  # deferred: reads package metadata

    folder.mkdir(parents=True, exist_ok=True)
    nifti = folder / f"{case.case_id}.nii.gz"
    sitk.WriteImage(mask, str(nifti), useCompression=True)
    if not case.image.is_dir():
        return [nifti], ""
    seg = folder / f"{case.case_id}.seg.dcm"
    try:
        write_seg(mask, case.image, case.series_uid,
                  list(zip(header.labels.values, header.labels.names, strict=True)), seg,
                  software_versions().get("myelofed", "unknown"))
    except Exception as exc:  # noqa: BLE001 - highdicom raises many types; the NIfTI stands
        return [nifti], f"DICOM SEG not written: {exc}"
    return [nifti, seg], ""


def agreement_summary(tested: Sequence[Segmented], labels: SegmenterLabels, seed: int,
                      floor: int) -> tuple[dict[str, float], list[dict[str, object]]]:
    """The agreement of the cases ``tested`` against their hand-drawn masks: per label, Dice
    and HD95 as the mean and its 95% bootstrap CI (NaN from fewer than ``floor`` cases), as
    the metrics a site sends (``label_<v>_dice``, ``_low``, ``_high``; the counts as
    :func:`common.payloads.released` lets them leave) and as rows for a table."""
    scored = [r for r in tested if r.agreement]
    metrics: dict[str, float] = {"num-examples": released(len(scored), floor),
                                 "test_n": released(len(scored), floor)}
    rows = []
    for value, name in zip(labels.values, labels.names, strict=True):
        for metric, index in (("dice", 0), ("hd95", 1)):
            values = np.array([r.agreement[value][index] for r in scored], dtype=float)
            mean, low, high = (mean_with_interval(values, seed) if len(scored) >= floor
                               else (math.nan, math.nan, math.nan))
            metrics |= {f"label_{value}_{metric}": mean, f"label_{value}_{metric}_low": low,
                        f"label_{value}_{metric}_high": high}
        rows.append({"label": value, "name": name,
                     "dice": [metrics[f"label_{value}_dice{s}"] for s in ("", "_low", "_high")],
                     "hd95": [metrics[f"label_{value}_hd95{s}"] for s in ("", "_low", "_high")]})
    return metrics, rows


def paired_features(pairs: Sequence[tuple[CaseSpec, sitk.Image]], protocol: StudyProtocol,
                    site: SiteConfig, folder: Path) -> list[tuple[dict[str, float],
                                                                  dict[str, float]]]:
    """The radiomic features of each case from its hand-drawn mask and from the network's
    (``pairs``: the case and the mask made, written into ``folder``), with the study's
    extraction less its histogram standardization (whose standard the image phase makes after
    the segmentation's): only the mask differs. Cases either extraction skipped are left out."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for case, mask in pairs:
        path = folder / f"{case.case_id}.nii.gz"
        sitk.WriteImage(mask, str(path), useCompression=True)
        made.append(dataclasses.replace(case, mask=path, auto_mask=True))
    plain = protocol.model_copy(
        update={"standardization": protocol.standardization.without_study_standard()})
    manual, automatic = (run_cases(chosen, plain, mode="extract", workers=site.n_workers,
                                   cache_dir=site.cache_dir, max_voxels=site.budget,
                                   time_limit_s=site.case_time_limit_s)
                         for chosen in ([c for c, _ in pairs], made))
    return [(m.features, a.features) for m, a in zip(manual, automatic, strict=True)
            if m.ok and a.ok and m.features and a.features]


def feature_icc(kept: Sequence[tuple[dict[str, float], dict[str, float]]]
                ) -> tuple[np.ndarray, list[str]]:
    """ICC(3,1) per feature of :func:`paired_features`' pairs, and the features' names."""
    names = sorted(kept[0][0])
    return icc_3_1(np.array([[[m[n] for n in names], [a[n] for n in names]]
                             for m, a in kept])), names
