"""The segmentation phase at a site (issue 17): one ``train`` message a round (the global
network trained on this site's training cases with a mask), and the final ``evaluate`` message
(the study's network scored on this site's held-out masks, kept here as a model file, and the
masks it makes for the cases without one).

Which cases: the manifest's rows with a mask are split once into training and test cases
(seeded by the study seed and the site, ``test_fraction`` held out); the rows without a mask
are the cases to segment. What leaves: the weights, the training loss, the sums of the
training masks' shapes (:func:`common.segmenter.shape_sum_names`, only from
``min_patients`` masks or more) and, at the end, each label's mean Dice and HD95 with their
bootstrap CIs and counts. The per-case figures, the masks and the images stay here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import SimpleITK as sitk
import torch

from client.cnn.device import select_device, torch_threads
from client.loading import load_case
from client.manifest import CaseSpec, read_manifest
from client.report import refresh_site_report, report_dir
from client.segment.masks import MODEL_FILE, segmentation_dir, write_auto_masks
from client.segment.network import seed_of, train_epochs
from client.segment.site import (
    SegmentationCases,
    Segmented,
    agreement_summary,
    feature_icc,
    load_training,
    paired_features,
    segment_case,
    shape_sums,
    split_cases,
    write_mask,
)
from common import plots
from common.glm import ModelError
from common.messages import SEGMENTATION_LEAVE_SITE_OUT, StudyConfig
from common.metrics.agreement import GOOD_ICC
from common.network import load_state_arrays, state_arrays
from common.payloads import MIN_ROWS_SENT, released
from common.protocol import StudyProtocol
from common.provenance import atomic_write_json
from common.segmenter import (
    SegmenterHeader,
    SegmenterLabels,
    build_segmenter,
    network_spacing,
    save_segmenter,
    segmentation_spec,
)
from common.site_config import SiteConfig

log = logging.getLogger("myelofed.site")


def segmentation_cases(site: SiteConfig, protocol: StudyProtocol, seed: int,
                       test_fraction: float) -> SegmentationCases:
    """This site's manifest split as the module docstring says (the same at every message of a
    study: :func:`client.segment.site.split_cases`)."""
    cases, _ = read_manifest(site.manifest, protocol, default_batch=site.site_name,
                             data_root=site.data_root, for_segmentation=True)
    return split_cases(cases, seed, site.site_name, test_fraction)


def train(site: SiteConfig, protocol: StudyProtocol, study: StudyConfig,
          weights: Mapping[str, np.ndarray]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """One round: the global weights trained ``local_epochs`` epochs on this site's training
    cases. A :class:`ModelError` with fewer than :data:`MIN_ROWS_SENT` (or ``min_patients``)
    usable training cases: a site without masks trains nothing and sends nothing."""
    spec = segmentation_spec(protocol)
    labels = SegmenterLabels.of(protocol)
    round_index, seed = study.required("server_round"), study.required("seed")
    cases = segmentation_cases(site, protocol, seed, study.required("test_fraction"))
    loaded = load_training(cases.train, protocol, site.budget)
    floor = max(MIN_ROWS_SENT, site.min_patients)
    if len(loaded.cases) < floor:
        raise ModelError(f"site '{site.site_name}' has {len(loaded.cases)} training case(s) "
                         f"with a usable mask, fewer than {floor}: it sends no segmentation "
                         "weights")
    network = build_segmenter(spec, labels.n_classes, network_spacing(protocol), seed=seed)
    load_state_arrays(network, weights)
    with torch_threads(site.n_workers):
        result = train_epochs(
            network, list(loaded.cases.values()), spec, labels.n_classes,
            epochs=spec.local_epochs, seed=seed_of(seed, site.site_name, round_index),
            device=select_device(site.device),
            proximal_mu=spec.proximal_mu if spec.aggregator == "fedprox" else 0.0)
    metrics = {"num-examples": result.cases, "train_loss": result.loss,
               "train_seconds": result.seconds,
               **shape_sums(list(loaded.shapes.values()), labels)}
    return metrics, state_arrays(network)


def evaluate(site: SiteConfig, protocol: StudyProtocol, study: StudyConfig,
             weights: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The study's network at this site: kept as a model file (``segmentation/segmenter.npz``
    in the site's study folder, for ``myelofed site segment``), scored on the test cases
    (Dice and HD95 per label, mean and 95% bootstrap CI; NaN from fewer than
    ``min_patients`` cases), and run on the cases without a mask: a mask that passes quality
    control is written (NIfTI, and a DICOM SEG for a DICOM series) and recorded for the
    preparation; one that fails is recorded with the reason, and the case is skipped. A request
    naming :data:`~common.messages.SEGMENTATION_LEAVE_SITE_OUT` carries the network trained
    without this site: its test scores alone, nothing kept."""
    header = SegmenterHeader.from_json(study.required("segmenter"), "the study's segmenter")
    seed = study.required("seed")
    network = header.network(seed=seed)
    load_state_arrays(network, weights)
    network.eval()
    cases = segmentation_cases(site, protocol, seed, study.required("test_fraction"))
    device = select_device(site.device)
    left_out = study.models == (SEGMENTATION_LEAVE_SITE_OUT,)
    with torch_threads(site.n_workers):
        tested = [segment_case(c, protocol, header, network, site.budget, device, compare=True)
                  for c in cases.test]
        made = {} if left_out else {
            c.case_id: _make_mask(c, protocol, header, network, site, device)
            for c in cases.to_segment}
    metrics, rows = agreement_summary(tested, header.labels, seed, site.min_patients)
    if left_out:  # the network trained without this site: its test scores alone
        return metrics
    save_segmenter(segmentation_dir(site, protocol) / MODEL_FILE, header, weights)
    write_auto_masks(site, protocol, made)
    metrics |= {"auto_n": released(len(made), site.min_patients),
                "auto_used": released(sum("mask" in m for m in made.values()),
                                      site.min_patients)}
    agreement, per_feature = feature_agreement(site, protocol, cases.test, tested)
    metrics |= agreement
    _record(site, protocol, tested, made, rows, cases.test, per_feature)
    return metrics


def feature_agreement(site: SiteConfig, protocol: StudyProtocol, cases: list[CaseSpec],
                      tested: list[Segmented]) -> tuple[dict[str, float], dict[str, float]]:
    """How much the radiomic features depend on who drew the mask: the test cases' features
    from the network's mask and from the hand-drawn one (the study's extraction, without its
    histogram standardization, whose standard comes later: only the mask differs), ICC(3,1)
    per feature over this site's test cases. What leaves: the share of features with ICC >=
    :data:`~common.metrics.agreement.GOOD_ICC`, the median ICC and the count of cases (none
    of them from fewer than ``min_patients`` cases); the per-feature ICC stays here."""
    pairs = [(c, r) for c, r in zip(cases, tested, strict=True)
             if r.mask is not None and r.agreement]
    floor = max(2, site.min_patients)
    if len(pairs) < floor:
        return {}, {}
    kept = paired_features([(c, r.mask) for c, r in pairs], protocol, site,
                           segmentation_dir(site, protocol) / "test_masks")
    if len(kept) < floor:
        return {}, {}
    icc, names = feature_icc(kept)
    finite = icc[np.isfinite(icc)]
    if not finite.size:
        return {}, {}
    return ({"icc_n": float(len(kept)), "icc_good_share": float(np.mean(finite >= GOOD_ICC)),
             "icc_median": float(np.median(finite))},
            {n: float(v) for n, v in zip(names, icc, strict=True)})


def _make_mask(case: CaseSpec, protocol: StudyProtocol, header: SegmenterHeader,
               network: torch.nn.Module, site: SiteConfig, device: torch.device
               ) -> dict[str, object]:
    """One case without a mask: ``{"mask": path}`` when the network's mask passed quality
    control (written here), else ``{"reason": ...}``."""
    result = segment_case(case, protocol, header, network, site.budget, device)
    if result.mask is None or result.problems:
        reason = "; ".join(result.problems)
        log.warning("segmentation: no mask for case '%s': %s", case.case_id, reason)
        return {"reason": reason}
    files, problem = write_mask(case, result.mask, header,
                                segmentation_dir(site, protocol) / "masks")
    if problem:
        log.warning("segmentation: case '%s': %s", case.case_id, problem)
    return {"mask": str(files[0])}


#: Test cases drawn in the site report, with the hand-drawn and the network's contours.
OVERLAYS = 3


def _overlays(cases: list[CaseSpec], tested: list[Segmented], protocol: StudyProtocol,
              site: SiteConfig) -> list[dict[str, str]]:
    """The middle ROI slice of the first :data:`OVERLAYS` test cases, both masks' contours."""
    labels = SegmenterLabels.of(protocol)
    out = []
    for case, result in list(zip(cases, tested, strict=True))[:OVERLAYS]:
        if result.mask is None or not result.agreement:
            continue
        volume = load_case(case, protocol, site.budget)
        image = sitk.GetArrayFromImage(volume.image)
        drawn = sitk.GetArrayFromImage(volume.labels)
        made = sitk.GetArrayFromImage(result.mask)
        rows = np.flatnonzero((drawn == labels.values[0]).any(axis=(1, 2)))
        k = int(rows[len(rows) // 2]) if rows.size else image.shape[0] // 2
        dice = ", ".join(f"{n} Dice {result.agreement[v][0]:.2f}"
                         for v, n in zip(labels.values, labels.names, strict=True))
        out.append({"title": f"test case {case.case_id}: {dice}",
                    "src": plots.contour_figure(image[k], drawn[k], made[k], labels.values,
                                                f"{case.case_id}, slice {k}")})
    return out


def _record(site: SiteConfig, protocol: StudyProtocol, tested: list[Segmented],
            made: Mapping[str, Mapping[str, object]], rows: list[dict[str, object]],
            cases: list[CaseSpec], icc: Mapping[str, float]) -> None:
    """The segmentation section of the site's own report: per test case and in summary, a
    few test cases drawn with both masks, and every case segmented (kept here)."""
    try:
        atomic_write_json(report_dir(site, protocol) / "segmentation.json", {
            "summary": rows, "overlays": _overlays(cases, tested, protocol, site),
            "tested": [{"case_id": r.case_id,
                        "agreement": {str(k): list(v) for k, v in r.agreement.items()},
                        "problems": list(r.problems)} for r in tested],
            "auto": {k: dict(v) for k, v in made.items()},
            "icc": {"good": GOOD_ICC, "features": len(icc),
                    "share": (float(np.mean([v >= GOOD_ICC for v in icc.values()]))
                              if icc else None),
                    "lowest": [[n, v] for n, v in sorted(icc.items(), key=lambda x: x[1])[:10]]}})
        refresh_site_report(site, protocol)
    except Exception as exc:  # noqa: BLE001 - the site's own report must not stop the study
        log.warning("segmentation section of the site report of %s not written: %r",
                    site.site_name, exc)
