"""Spine phantom images: a patient of :mod:`common.synthetic.cohort` as a scanner acquires it,
with its label map and lesion mask (a pure function of a seed; no files here).

* **anatomy**: a lumbar spine segment on an axial stack: three vertebral bodies with a cortical
  shell, 1.5 mm endplates and trabecular marrow, intervertebral discs, pedicles and the posterior
  arch around the spinal canal, paraspinal muscles, body wall and subcutaneous fat; vertebra size
  varies between patients. Physical coordinates are DICOM's LPS (x to the patient's left, y to
  the posterior, z to the head), so the vertebral body lies anterior (at negative y) of the canal.
* **disease** as it looks: diffuse infiltration replaces marrow fat: lower T1 signal, lower
  trabecular density on CT, coarser texture; metastases with an irregular margin and sometimes a
  sclerotic rim (on CT also osteoblastic lesions); on CT, punched-out lytic myeloma lesions
  without a rim; after treatment, residual or fatty-replaced lesions.
* **biological variability** the label does not explain (marrow fat with age and between people,
  how strongly the marrow shows infiltration, red-marrow reconversion in metastatic patients),
  which keeps the tasks learnable but not trivial.
* **scanner effects** of :class:`~common.synthetic.cohort.ScannerEffects`: blur, then on MRI a
  non-linear response, a smooth bias field, scale, offset and Rician noise that also varies by
  patient; on CT a calibration offset and Gaussian noise.
"""

from __future__ import annotations

import math
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from common.synthetic.cohort import VERTEBRA_Z_MM, Patient, Pattern, ScannerEffects, stable_int

FloatArray: TypeAlias = npt.NDArray[np.float64]
Mask: TypeAlias = npt.NDArray[np.bool_]

ROI_LABEL = 1       #: vertebral-body trabecular marrow: the radiomics ROI
MUSCLE_LABEL = 2    #: paraspinal muscle: reference tissue for MRI normalization

#: Field of view, mm: x (right-left), y (anterior-posterior), z (caudal-cranial).
FOV_MM = (96.0, 96.0, 99.0)


def _grid(spacing: tuple[float, float, float]) -> tuple[FloatArray, FloatArray, FloatArray]:
    """LPS coordinates (mm, centred on the field of view) of every voxel, as (z, y, x) arrays."""
    n = [max(8, int(round(f / s))) for f, s in zip(FOV_MM, spacing, strict=True)]
    axes = [(np.arange(k) - (k - 1) / 2.0) * s for k, s in zip(n, spacing, strict=True)]
    z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return x, y, z


def _anatomy(x: FloatArray, a: FloatArray, z: FloatArray, size: float) -> dict[str, Mask]:
    """Boolean masks of each tissue; ``a`` is the anterior coordinate (mm, = -y in LPS)."""
    x, a = x / size, a / size
    body = (x / 46.0) ** 2 + ((a + 2.0) / 44.0) ** 2 <= 1.0
    fat = body & ~((x / 40.0) ** 2 + ((a + 2.0) / 38.0) ** 2 <= 1.0)
    centres = np.asarray(VERTEBRA_Z_MM)
    nearest = np.min(np.abs(z[..., None] - centres), axis=-1)
    vertebra_z = nearest <= 12.5 * size
    disc = np.zeros_like(vertebra_z)
    for lower, upper in zip(centres[:-1], centres[1:], strict=True):
        disc |= np.abs(z - (lower + upper) / 2.0) <= (upper - lower) / 2.0 - 12.5 * size
    cylinder = (x / 20.0) ** 2 + ((a - 10.0) / 15.0) ** 2 <= 1.0
    inner = (x / 18.3) ** 2 + ((a - 10.0) / 13.3) ** 2 <= 1.0
    vertebral_body = cylinder & vertebra_z
    marrow = inner & (nearest <= 12.5 * size - 1.5)  # 1.5 mm endplates above and below
    canal = (x / 8.0) ** 2 + ((a + 12.0) / 7.0) ** 2 <= 1.0
    pedicles = (((np.abs(x) - 10.0) / 4.0) ** 2 + ((a + 8.0) / 9.0) ** 2 <= 1.0) & vertebra_z
    lamina = ((x / 14.0) ** 2 + ((a + 16.0) / 10.0) ** 2 <= 1.0) & ~canal & vertebra_z
    muscle = ((np.abs(x) - 17.0) / 10.0) ** 2 + ((a + 25.0) / 10.0) ** 2 <= 1.0
    return {"body": body, "fat": fat, "vertebral_body": vertebral_body, "marrow": marrow,
            "cortex": vertebral_body & ~marrow, "disc": disc & cylinder, "canal": canal,
            "posterior": (pedicles | lamina) & ~canal, "muscle": muscle & ~fat}


#: T1w signal (arbitrary units) / CT HU of each tissue
_TISSUE = {"body": (300.0, 40.0), "fat": (850.0, -100.0), "muscle": (330.0, 50.0),
           "posterior": (520.0, 300.0), "disc": (260.0, 80.0), "canal": (140.0, 15.0),
           "cortex": (90.0, 900.0)}
_NORMAL_MARROW = {"MR": 620.0, "CT": 230.0}


def render(patient: Patient, scanner: ScannerEffects, modality: str, seed: int
           ) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """The patient's image as ``scanner`` acquires it, its label map and its lesion mask.

    Parameters
    ----------
    modality
        ``"MR"`` (T1-weighted-like, arbitrary units, Rician noise) or ``"CT"`` (HU).

    Returns
    -------
    image : SimpleITK.Image
        Int16, LPS geometry with the scanner's spacing.
    labels : SimpleITK.Image
        UInt8: vertebral-body marrow = :data:`ROI_LABEL`, paraspinal muscle = :data:`MUSCLE_LABEL`.
    lesions : SimpleITK.Image
        UInt8 {0, 1}: the focal lesions (inside and outside the ROI).
    """
    if modality not in _NORMAL_MARROW:
        raise ValueError(f"modality must be MR or CT, got {modality!r}")
    rng = np.random.default_rng([seed, stable_int(patient.case_id)])
    x, y, z = _grid(scanner.spacing_mm)
    anterior = -y
    t = _anatomy(x, anterior, z, patient.size)
    mr = modality == "MR"
    k = 0 if mr else 1
    values = np.full(x.shape, 0.0 if mr else -1000.0)
    for name in ("body", "fat", "muscle", "posterior", "disc", "canal", "cortex"):
        values[t[name]] = _TISSUE[name][k]

    marrow = t["marrow"]
    normal = _NORMAL_MARROW[modality]
    infiltration = patient.pci / 100.0
    if patient.timepoint == "after_treatment":
        # What is left after induction: residual disease in MRD-positive patients.
        infiltration *= rng.uniform(0.25, 0.7) if patient.mrd else rng.uniform(0.0, 0.12)
    if patient.pattern is Pattern.METASTASIS and rng.random() < 0.25:
        infiltration = rng.uniform(0.05, 0.3)  # red-marrow reconversion (anaemia, therapy)
    # Biological variability the label does not explain: marrow fat rises with age and varies
    # between people; how strongly the marrow shows infiltration varies too.
    fat = math.exp(rng.normal(0.0, 0.15) + 0.006 * (patient.age - 65.0))
    effective = infiltration * math.exp(rng.normal(0.0, 0.3))
    drop = 0.65 * scanner.t1_contrast if mr else 0.45
    level = normal * fat * (1.0 - drop * min(effective, 1.0))
    # Trabecular texture: band-limited noise whose contrast is a property of the marrow and of
    # the scanner's reconstruction kernel.
    grain: FloatArray = ndimage.gaussian_filter(rng.normal(0, 1, x.shape), 0.8)
    grain /= grain.std() + 1e-9
    texture = ((0.05 + 0.10 * min(effective, 1.0)) * scanner.texture_gain * normal
               * math.exp(rng.normal(0.0, 0.3)))
    values[marrow] = level + texture * grain[marrow]
    if patient.pattern is Pattern.SALT_AND_PEPPER:
        speckle: FloatArray = ndimage.gaussian_filter(rng.normal(0, 1, x.shape), 0.5)
        spots = marrow & (speckle > np.quantile(speckle[marrow], 0.8))
        values[spots] *= 0.75

    lesion_mask = np.zeros(x.shape, dtype=bool)
    metastasis = patient.pattern is Pattern.METASTASIS
    blastic = metastasis and not mr and rng.random() < 0.25
    for lx, la, lz, r in patient.lesions:
        if patient.timepoint == "after_treatment":
            if not patient.mrd:
                # Treated lesions: fatty replacement (bright on T1) or gone.
                if rng.random() < 0.5:
                    inside = marrow & (((x - lx) ** 2 + (anterior - la) ** 2 + (z - lz) ** 2)
                                       <= (0.8 * r) ** 2)
                    values[inside] = _TISSUE["fat"][k] * (0.8 if mr else 0.5) + (0 if mr else 60)
                continue
            r *= rng.uniform(0.5, 0.9)  # residual lesion
        d2 = (x - lx) ** 2 + (anterior - la) ** 2
        if metastasis:
            # irregular margin: the radius modulated by angle; may reach the pedicle
            angle = np.arctan2(anterior - la, x - lx)
            radius = r * (1.0 + 0.3 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi)))
            inside = (d2 + ((z - lz) * 1.2) ** 2) <= radius ** 2
            inside &= t["vertebral_body"] | t["posterior"]
        else:  # myeloma: round, punched-out, confined to the marrow
            inside = ((d2 + (z - lz) ** 2) <= r ** 2) & marrow
        lesion_mask |= inside
        count = int(inside.sum())
        if mr:
            values[inside] = 230.0 + 30.0 * rng.normal(0, 1, count)
        elif blastic:
            values[inside] = 850.0 + 80.0 * rng.normal(0, 1, count)  # osteoblastic
        else:
            values[inside] = 35.0 + 10.0 * rng.normal(0, 1, count)  # lytic
        if metastasis and rng.random() < 0.35:
            rim = ndimage.binary_dilation(inside, iterations=1) & ~inside & t["vertebral_body"]
            values[rim] = 60.0 if mr else 1100.0  # sclerotic rim

    values = _acquire(values, scanner, mr, normal, (x, y, z), rng)
    labels = np.zeros(x.shape, dtype=np.uint8)
    labels[t["muscle"]] = MUSCLE_LABEL
    labels[marrow] = ROI_LABEL
    origin = (float(x[0, 0, 0]), float(y[0, 0, 0]), float(z[0, 0, 0]))
    out = []
    for array, dtype in ((values, np.int16), (labels, np.uint8), (lesion_mask, np.uint8)):
        image = sitk.GetImageFromArray(array.astype(dtype))
        image.SetSpacing(tuple(float(s) for s in scanner.spacing_mm))
        image.SetOrigin(origin)
        out.append(image)
    return out[0], out[1], out[2]


def _acquire(values: FloatArray, scanner: ScannerEffects, mr: bool, normal: float,
             xyz: tuple[FloatArray, FloatArray, FloatArray], rng: np.random.Generator
             ) -> FloatArray:
    """The scanner's view of the object: blur, then (MR) a non-linear response, a smooth bias
    field, scale, offset and Rician noise, or (CT) a calibration offset and Gaussian noise.
    Returns values rounded to integers (int16 range)."""
    values = ndimage.gaussian_filter(values, [scanner.blur_mm / s
                                              for s in scanner.spacing_mm[::-1]])
    x, y, z = xyz
    # Noise also varies between the patients of one scanner (body habitus, coil loading).
    noise_sd = scanner.noise_sd * math.exp(rng.normal(0.0, 0.45))
    if mr:
        values = 1000.0 * np.power(np.maximum(values, 0.0) / 1000.0, scanner.gamma)
        field = (np.sin(x / 40.0 + rng.uniform(0, 2 * np.pi))
                 + np.cos(y / 35.0 + rng.uniform(0, 2 * np.pi)) + 0.5 * np.sin(z / 50.0)) / 2.5
        values = values * np.exp(scanner.bias_strength * field)
        values = values * scanner.intensity_scale + scanner.intensity_offset
        sd = noise_sd * normal * scanner.intensity_scale
        values = np.hypot(values + rng.normal(0, sd, x.shape), rng.normal(0, sd, x.shape))
    else:
        values = values + 0.5 * scanner.intensity_offset + rng.normal(0, noise_sd * 500,
                                                                      x.shape)
    acquired: FloatArray = np.clip(np.round(values), -32768, 32767)
    return acquired
