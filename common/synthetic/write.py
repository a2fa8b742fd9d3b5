"""Write a synthetic cohort the way hospitals hold data.

Per site: images as NIfTI and/or DICOM series (MR or CT Image Storage, one file a slice), masks
as NIfTI label maps and/or a DICOM SEG (segments "Vertebral marrow", "Paraspinal muscle" and
"Lesions"), and the site manifest CSV ready for ``myelofed site check/extract``. For the cohort: a
study protocol matching its task and modality (``study.yaml``), a preview picture and
``cohort.json`` (the generator's settings; written last, so its presence means a complete cohort).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
import yaml
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from common.protocol import CnnSpec, load_protocol, protocol_from_mapping
from common.provenance import atomic_write_bytes, atomic_write_json, software_versions
from common.synthetic.cohort import (
    FOLLOW_UP_MONTHS,
    LOSS_MEDIAN_MONTHS,
    MM_PATTERNS,
    SURVIVAL,
    Patient,
    Pattern,
    ScannerEffects,
    SiteSpec,
    Task,
    make_patients,
)
from common.synthetic.images import MUSCLE_LABEL, ROI_LABEL, render

FORMATS = ("nifti", "dicom", "both")
MARROW_SEGMENT = "Vertebral marrow"
MUSCLE_SEGMENT = "Paraspinal muscle"
LESION_SEGMENT = "Lesions"
COHORT_FILE = "cohort.json"
STUDY_FILE = "study.yaml"

MANIFEST_COLUMNS = ("case_id", "image", "mask", "roi", "scanner", "diagnosis", "pci", "mrd",
                    "response", "age", "sex", "iss_stage", "pattern", "timepoint",
                    "lesion_mask", "pfs_months", "pfs_event", "os_months", "os_event")

NOMOGRAM_TASKS = (Task.RESPONSE, Task.PFS, Task.OS)  # a nomogram with ISS stage and age
#: The preset each (modality) study protocol starts from: its standardization and radiomics.
_BASE_PRESET = {"MR": "spine_mri_t1w", "CT": "wb_ldct"}
_TASK_SPEC: dict[Task, tuple[dict[str, Any], str]] = {
    Task.DIAGNOSIS: ({"kind": "classification", "label_column": "diagnosis",
                      "classes": ["metastasis", "myeloma"]}, "MM vs spinal metastasis"),
    Task.PCI: ({"kind": "regression", "label_column": "pci", "value_range": [0.0, 100.0]},
               "bone-marrow plasma-cell infiltration (%)"),
    Task.RESPONSE: ({"kind": "classification", "label_column": "response"},
                    "treatment response (0/1), nomogram with ISS stage"),
    Task.MRD: ({"kind": "classification", "label_column": "mrd"},
               "minimal residual disease after treatment (0/1)"),
    **{t: ({"kind": "survival", "label_column": f"{t.value}_months",
            "event_column": f"{t.value}_event"}, f"{what} survival (months), Cox by site")
       for t, what in ((Task.PFS, "progression-free"), (Task.OS, "overall"))}}


@dataclass(frozen=True)
class CohortSpec:
    """Everything that decides a cohort: the same spec gives the same files."""
    sites: tuple[SiteSpec, ...]
    task: Task = Task.DIAGNOSIS
    modality: str = "MR"
    seed: int = 0
    scanner_effects: bool = True
    file_format: str = "nifti"

    def __post_init__(self) -> None:
        if self.modality not in _BASE_PRESET:
            raise ValueError(f"modality must be MR or CT, got {self.modality!r}")
        if self.file_format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}: {self.file_format!r}")


def study_protocol_mapping(task: Task, modality: str) -> dict[str, Any]:
    """The study protocol for a synthetic cohort: the modality's preset (standardization,
    radiomics) with the task's label and covariates, the DICOM SEG segment names, the CNN."""
    task = Task(task)
    base = load_protocol(f"preset:{_BASE_PRESET[modality]}").model_dump(mode="json")
    spec, what = _TASK_SPEC[task]
    categorical = {"sex": ["F", "M"], **({"iss_stage": ["I", "II", "III"]}
                                         if task in NOMOGRAM_TASKS else {})}
    base.update(
        name=f"synthetic-{modality.lower()}-{task.value}",
        description=f"Synthetic spine {modality} cohort (myelofed simulate): {what}",
        task=spec,
        covariates={"continuous": ["age"], "categorical": categorical},
        # the CNN with its defaults (MONAI ResNet-10, 48x48x16 crops, FedAvg); none for survival
        cnn=None if spec["kind"] == "survival" else CnnSpec().model_dump(mode="json"),
    )
    if task in NOMOGRAM_TASKS:  # the nomogram: the radiomics score with the clinical factors
        base["model"] = {**base.get("model", {}), "clinical": ["iss_stage", "age"],
                         "clinical_ranges": {"age": [40, 90]}}
    # ComBat protects the outcome and age. A categorical covariate in its design would need,
    # at every site, each of its levels crossed with the outcome (ComBat's X'X counts them) to
    # hold 0 or at least min_patients, which the synthetic sites of 40 to 110 patients do not
    # for sex (a site's release ledger then refuses ComBat), nor for the ISS stage
    base["covariates"]["harmonize"] = ["age"]
    base["ingestion"]["rtstruct_roi"] = MARROW_SEGMENT
    normalization = base["standardization"].get("normalization")
    if normalization and normalization["method"] == "reference_tissue":
        normalization["reference_roi"] = MUSCLE_SEGMENT
    protocol_from_mapping(base, source="synthetic study protocol")  # refuse a broken template
    return base


# --- DICOM ------------------------------------------------------------------------------------

_SOP_CLASS = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _dicom_series(image: sitk.Image, patient: Patient, scanner: ScannerEffects, modality: str,
                  seed: int) -> list[Any]:
    """One pydicom Dataset a slice (MR or CT Image Storage, explicit VR little endian)."""
    array = sitk.GetArrayFromImage(image).astype(np.int16)
    sx, sy, sz = image.GetSpacing()
    ox, oy, oz = image.GetOrigin()
    study, series = _uid(seed, patient.case_id, "study"), _uid(seed, patient.case_id, "series")
    frame = _uid(seed, patient.case_id, "frame")
    slices = []
    for k in range(array.shape[0]):
        meta = FileMetaDataset()
        # pydicom makes a UID of a str on assignment; UID() here says so to the type checker
        meta.MediaStorageSOPClassUID = UID(_SOP_CLASS[modality])
        meta.MediaStorageSOPInstanceUID = UID(_uid(seed, patient.case_id, "slice", k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = modality
        ds.PatientName = f"Synthetic^{patient.case_id}"
        ds.PatientID = patient.case_id
        ds.PatientBirthDate = ""
        ds.PatientSex = patient.sex
        ds.PatientAge = f"{int(patient.age):03d}Y"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.Manufacturer = scanner.manufacturer
        ds.ManufacturerModelName = scanner.name
        ds.InstitutionName = patient.site
        ds.BodyPartExamined = "LSPINE"
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [round(ox, 4), round(oy, 4), round(oz + k * sz, 4)]
        ds.SliceLocation = round(oz + k * sz, 4)
        ds.SliceThickness = round(sz, 4)
        ds.SpacingBetweenSlices = round(sz, 4)
        ds.PixelSpacing = [round(sy, 4), round(sx, 4)]  # row spacing (y), column spacing (x)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if modality == "MR":
            ds.SeriesDescription = "T1 SE axial"
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 550, 10, 3
            ds.MagneticFieldStrength = scanner.field_strength_t
        else:
            ds.SeriesDescription = "Low-dose CT bone"
            ds.KVP = 120
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = array[k].tobytes()
        slices.append(ds)
    return slices


def _dicom_seg(slices: list[Any], labels: npt.NDArray[np.uint8], lesions: npt.NDArray[np.uint8],
               patient: Patient, seed: int) -> Any:
    """A BINARY DICOM SEG (highdicom) of the marrow ROI, the muscle and the lesions."""
    import highdicom as hd  # highdicom loads only to write DICOM SEG

    def describe(number: int, label: str, category: Any, kind: Any) -> Any:
        return hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)

    planes = [labels == ROI_LABEL, labels == MUSCLE_LABEL]
    descriptions = [describe(1, MARROW_SEGMENT, codes.SCT.Tissue, codes.SCT.BoneMarrow),
                    describe(2, MUSCLE_SEGMENT, codes.SCT.Tissue, codes.SCT.SkeletalMuscle)]
    if lesions.any():
        planes.append(lesions.astype(bool))
        descriptions.append(describe(3, LESION_SEGMENT,
                                     codes.SCT.MorphologicallyAbnormalStructure,
                                     codes.SCT.Lesion))
    return hd.seg.Segmentation(
        source_images=slices,
        pixel_array=np.stack(planes, axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_uid(seed, patient.case_id, "seg-series"),
        series_number=100,
        sop_instance_uid=_uid(seed, patient.case_id, "seg"),
        instance_number=1,
        manufacturer="MyeloFed",
        manufacturer_model_name="myelofed simulate",
        software_versions=software_versions().get("myelofed", "unknown"),
        device_serial_number="0",
        series_description="Vertebral marrow ROI",
    )


# --- one case ---------------------------------------------------------------------------------

def _value(value: Any) -> Any:
    return "" if value is None else value


def write_case(site_dir: Path, patient: Patient, scanner: ScannerEffects, spec: CohortSpec
               ) -> dict[str, dict[str, Any]]:
    """Render one patient and write its files; returns manifest rows by format."""
    image, labels, lesions = render(patient, scanner, spec.modality, spec.seed)
    record = asdict(patient)
    truth = {k: _value(record.get(k)) for k in MANIFEST_COLUMNS if k in record}
    truth["pattern"] = patient.pattern.value
    rows: dict[str, dict[str, Any]] = {}
    cid = patient.case_id
    if spec.file_format in ("nifti", "both"):
        sitk.WriteImage(image, str(site_dir / "images" / f"{cid}.nii.gz"), useCompression=True)
        sitk.WriteImage(labels, str(site_dir / "masks" / f"{cid}.nii.gz"), useCompression=True)
        sitk.WriteImage(lesions, str(site_dir / "masks" / f"{cid}_lesions.nii.gz"),
                        useCompression=True)
        rows["nifti"] = {**truth, "image": f"images/{cid}.nii.gz", "mask": f"masks/{cid}.nii.gz",
                         "roi": "", "lesion_mask": f"masks/{cid}_lesions.nii.gz"}
    if spec.file_format in ("dicom", "both"):
        case_dir = site_dir / "dicom" / cid
        (case_dir / "image").mkdir(parents=True, exist_ok=True)
        slices = _dicom_series(image, patient, scanner, spec.modality, spec.seed)
        for k, ds in enumerate(slices):
            ds.save_as(case_dir / "image" / f"{k + 1:04d}.dcm", enforce_file_format=True)
        seg = _dicom_seg(slices, sitk.GetArrayFromImage(labels),
                         sitk.GetArrayFromImage(lesions), patient, spec.seed)
        seg.save_as(case_dir / "seg.dcm")
        rows["dicom"] = {**truth, "image": f"dicom/{cid}/image", "mask": f"dicom/{cid}/seg.dcm",
                         "roi": MARROW_SEGMENT, "lesion_mask": ""}
    return rows


def _write_case_job(args: tuple[Path, Patient, ScannerEffects, CohortSpec]
                    ) -> tuple[str, str, dict[str, dict[str, Any]]]:
    site_dir, patient, scanner, spec = args
    return patient.site, patient.case_id, write_case(site_dir, patient, scanner, spec)


def _manifest_bytes(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def write_cohort(out_dir: Path, spec: CohortSpec, workers: int | None = None,
                 on_case: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write every site's images, masks and manifest, the study protocol and ``cohort.json``.
    Cases are rendered in ``workers`` processes (default: all cores). Returns site name ->
    manifest path (``manifest.csv``; with ``file_format="both"`` it points at the NIfTI files and
    ``manifest_dicom.csv`` beside it at the DICOM ones).
    """
    out_dir = Path(out_dir)
    (out_dir / COHORT_FILE).unlink(missing_ok=True)  # incomplete until written again
    scanners = {s.name: s for site in spec.sites for s in site.scanners}
    jobs = []
    for site in spec.sites:
        site_dir = out_dir / site.name
        for sub in ("images", "masks") if spec.file_format != "dicom" else ():
            (site_dir / sub).mkdir(parents=True, exist_ok=True)
        site_dir.mkdir(parents=True, exist_ok=True)
        jobs += [(site_dir, p, scanners[p.scanner], spec)
                 for p in make_patients(site, spec.task, spec.seed)]
    results: dict[str, dict[str, dict[str, dict[str, Any]]]] = {s.name: {} for s in spec.sites}
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        for job in jobs:
            site_name, cid, rows = _write_case_job(job)
            results[site_name][cid] = rows
            if on_case is not None:
                on_case(cid)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for future in as_completed([pool.submit(_write_case_job, job) for job in jobs]):
                site_name, cid, rows = future.result()
                results[site_name][cid] = rows
                if on_case is not None:
                    on_case(cid)

    manifests: dict[str, Path] = {}
    names = {"nifti": "manifest.csv", "dicom": "manifest.csv"}
    if spec.file_format == "both":
        names["dicom"] = "manifest_dicom.csv"
    for site in spec.sites:
        per_case = [results[site.name][cid] for cid in sorted(results[site.name])]
        for fmt, name in names.items():
            if fmt in per_case[0]:
                path = out_dir / site.name / name
                atomic_write_bytes(path, _manifest_bytes([rows[fmt] for rows in per_case]))
                manifests.setdefault(site.name, path)
    study = study_protocol_mapping(spec.task, spec.modality)
    atomic_write_bytes(out_dir / STUDY_FILE,
                       ("# Made by 'myelofed simulate' for this cohort.\n"
                        + yaml.safe_dump(study, sort_keys=False)).encode("utf-8"))
    atomic_write_json(out_dir / COHORT_FILE, {
        "schema_version": 1,
        "made_by": "myelofed simulate",
        "task": spec.task.value, "modality": spec.modality, "seed": spec.seed,
        "scanner_effects": spec.scanner_effects, "format": spec.file_format,
        "sites": [json.loads(json.dumps(asdict(s))) for s in spec.sites],
        "survival": {"models": {k: asdict(m) for k, m in SURVIVAL.items()},
                     "follow_up_months": list(FOLLOW_UP_MONTHS),
                     "loss_median_months": LOSS_MEDIAN_MONTHS},
        "manifests": {k: str(v.relative_to(out_dir)) for k, v in manifests.items()},
        "study_protocol": STUDY_FILE,
        "software": software_versions(),
    })
    return manifests


def read_cohort_spec(out_dir: Path) -> dict[str, Any] | None:
    """The settings of a complete cohort in ``out_dir``, or None if there is none."""
    path = Path(out_dir) / COHORT_FILE
    if not path.is_file():
        return None
    spec: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return spec


# --- preview ----------------------------------------------------------------------------------

def preview_png(path: Path, spec: CohortSpec) -> None:
    """A picture for a person: per site (rows) one patient of each pattern (columns), an axial
    slice through a vertebral body and a sagittal one through the spine, at a common scale."""
    patterns = list(MM_PATTERNS) + ([Pattern.METASTASIS] if spec.task is Task.DIAGNOSIS else [])
    window = (0.0, 1000.0) if spec.modality == "MR" else (-200.0, 1200.0)
    mm_per_px = 0.8
    tile_w, tile_h, head = 250, 130, 16
    canvas = Image.new("L", (tile_w * len(patterns) + 60, head + tile_h * len(spec.sites)), 0)
    draw = ImageDraw.Draw(canvas)
    for col, pattern in enumerate(patterns):
        draw.text((60 + col * tile_w + 4, 2), pattern.value, fill=255)
    scanners = {s.name: s for site in spec.sites for s in site.scanners}
    for row, site in enumerate(spec.sites):
        top = head + row * tile_h
        draw.text((2, top + 2), site.name, fill=255)
        chosen: dict[Pattern, Patient] = {}
        for patient in make_patients(site, spec.task, spec.seed):
            chosen.setdefault(patient.pattern, patient)
        for col, pattern in enumerate(patterns):
            if pattern not in chosen:
                continue
            patient = chosen[pattern]
            image, _, _ = render(patient, scanners[patient.scanner], spec.modality, spec.seed)
            a = sitk.GetArrayFromImage(image).astype(np.float64)
            scaled = (np.clip((a - window[0]) / (window[1] - window[0]), 0, 1) * 255)
            sx, sy, sz = image.GetSpacing()
            axial = Image.fromarray(scaled[a.shape[0] // 2].astype(np.uint8))  # anterior up
            sagittal = Image.fromarray(scaled[::-1, :, a.shape[2] // 2].astype(np.uint8))
            views = (axial.resize((round(axial.width * sx / mm_per_px),
                                   round(axial.height * sy / mm_per_px))),
                     sagittal.resize((round(sagittal.width * sy / mm_per_px),
                                      round(sagittal.height * sz / mm_per_px))))
            for k, view in enumerate(views):
                view.thumbnail((tile_w // 2 - 4, tile_h - 4))
                canvas.paste(view, (60 + col * tile_w + k * (tile_w // 2), top + 2))
    atomic_write_bytes(path, _png_bytes(canvas))


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
