"""Spine phantoms of a multi-site myeloma cohort, as latent truth: sites, scanners, patients and
their labels.

Pure functions of a seed (no files here; :mod:`common.synthetic.images` renders a patient's
images, :mod:`common.synthetic.write` writes them):

* **disease**: the T1-weighted MRI marrow patterns of the review (normal, focal, diffuse, mixed
  focal + diffuse, salt-and-pepper) for myeloma; metastases with fewer, larger, irregular
  lesions and pedicle involvement. Each patient's pattern, infiltration and lesions (centre,
  radius) are drawn here and rendered by :mod:`common.synthetic.images`.
* **labels** for the four tasks: MM vs metastasis, plasma-cell infiltration (PCI, %), treatment
  response and minimal residual disease (MRD, seen on after-treatment scans); clinical
  covariates (age, sex, ISS stage) related to them as the literature reports (ISS tracks tumour
  burden; stage and burden both lower the chance of response; responders are more often
  MRD-negative), so a nomogram with clinical factors carries information the image does not.
* **scanner effects** per site (voxel spacing and slice thickness, intensity scale, offset and a
  non-linear response, T1 contrast, a smooth bias field, Rician noise on MRI, blur,
  reconstruction sharpness: :class:`ScannerEffects`, applied by :mod:`common.synthetic.images`),
  and, in a hospital with two scanners, referral pathways that send suspected myeloma to one of
  them more often: what makes a model trained at some sites worse at another.

What the phantoms are not: a substitute for clinical validation. Lesion appearance, marrow signal
and covariate effects are stylised from the literature; only the *structure* of the problem
(learnable signal, non-IID sites, scanner shift) is meant to be realistic.
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np

VERTEBRA_Z_MM = (-33.0, 0.0, 33.0)  #: centres of the three vertebral bodies

Lesion = tuple[float, float, float, float]  # x, anterior, z, radius (mm)


class Pattern(str, enum.Enum):
    """Marrow appearance: the five MM patterns of the review, and metastasis."""

    NORMAL = "normal"
    FOCAL = "focal"
    DIFFUSE = "diffuse"
    MIXED = "mixed"
    SALT_AND_PEPPER = "salt_and_pepper"
    METASTASIS = "metastasis"


MM_PATTERNS = (Pattern.NORMAL, Pattern.FOCAL, Pattern.DIFFUSE, Pattern.MIXED,
               Pattern.SALT_AND_PEPPER)


class Task(str, enum.Enum):
    """Which clinical question a cohort is drawn for.

    ``diagnosis``: myeloma and metastatic patients at diagnosis (MM vs metastasis). ``pci``,
    ``response``, ``pfs`` and ``os`` (progression-free and overall survival): myeloma patients
    at diagnosis. ``mrd``: myeloma patients scanned after treatment. Every cohort carries every
    label column that applies to its patients.
    """

    DIAGNOSIS = "diagnosis"
    PCI = "pci"
    RESPONSE = "response"
    MRD = "mrd"
    PFS = "pfs"
    OS = "os"


@dataclass(frozen=True)
class ScannerEffects:
    """One scanner's acquisition: what differs between hospitals.

    On CT, HU are calibrated: ``intensity_scale`` and ``gamma`` are not applied and
    ``intensity_offset`` acts at half strength (a calibration drift of some HU).
    """

    name: str
    spacing_mm: tuple[float, float, float]  # x, y, z
    intensity_scale: float = 1.0
    intensity_offset: float = 0.0
    bias_strength: float = 0.0   # peak log-amplitude of a smooth multiplicative field (MR)
    noise_sd: float = 0.02       # fraction of the normal-marrow signal (MR); x 500 HU (CT)
    blur_mm: float = 0.0         # Gaussian point-spread sigma, mm
    texture_gain: float = 1.0    # sharpness of the marrow texture (reconstruction kernel)
    gamma: float = 1.0           # non-linear intensity response (MR; not removed by rescaling)
    manufacturer: str = "MyeloFed Phantom"
    field_strength_t: float = 1.5
    t1_contrast: float = 1.0     # how strongly marrow infiltration lowers T1 signal (sequence)


#: Chance that a myeloma patient of a two-scanner site is scanned on its second scanner
#: (metastatic patients: one minus it).
REFERRAL_SECOND_SCANNER = 0.7

#: The scanner of a site without scanner effects: every site then acquires identically.
REFERENCE_SCANNER = ScannerEffects("reference", (0.8, 0.8, 3.0))


@dataclass(frozen=True)
class SiteSpec:
    """One hospital: its size, case mix and scanners (see :data:`REFERRAL_SECOND_SCANNER`)."""

    name: str
    n_patients: int
    mm_fraction: float           # share of myeloma patients in a diagnosis cohort
    severity: float              # PCI shift, %-points (referral centres see more advanced MM)
    scanners: tuple[ScannerEffects, ...]


@dataclass(frozen=True)
class Patient:
    """One synthetic patient: the latent truth and the labels derived from it.

    ``mrd``, ``response`` and ``iss_stage`` are None for metastatic patients (not applicable).
    ``pci`` is the plasma-cell infiltration at diagnosis, % of marrow cells.
    """

    case_id: str
    site: str
    scanner: str
    timepoint: str               # "diagnosis" or "after_treatment"
    diagnosis: str               # "myeloma" or "metastasis"
    pattern: Pattern
    pci: float
    age: float
    sex: str
    iss_stage: str | None
    response: int | None         # 1 = responded to induction treatment
    mrd: int | None              # 1 = minimal residual disease detected after treatment
    lesions: tuple[Lesion, ...] = ()
    size: float = 1.0            # vertebra size factor
    # survival from diagnosis (myeloma only; see SURVIVAL): months of follow-up, 1 = event
    pfs_months: float | None = None
    pfs_event: int | None = None
    os_months: float | None = None
    os_event: int | None = None


@dataclass(frozen=True)
class SurvivalModel:
    """A proportional-hazards outcome of myeloma: exponential baseline with the median
    ``median_months`` for the reference patient (ISS I, age 65, MRD negative, PCI 30 %), and
    the hazard ratios of ISS II and III (against I), of ten years of age, of MRD detected
    (against MRD negative) and of ten %-points of plasma-cell infiltration."""

    median_months: float
    iss_ii: float
    iss_iii: float
    age_per_decade: float
    mrd_positive: float
    pci_per_10: float

    def log_hazard_ratio(self, iss: str, age: float, mrd: int, pci: float) -> float:
        return (math.log({"I": 1.0, "II": self.iss_ii, "III": self.iss_iii}[iss])
                + (age - 65) / 10 * math.log(self.age_per_decade)
                + mrd * math.log(self.mrd_positive)
                + (pci - 30) / 10 * math.log(self.pci_per_10))


#: The generating survival models, magnitudes from the literature and not tuned to any figure:
#: MRD negativity's hazard ratio about 0.33 for PFS and 0.57 for OS (Munshi et al., JAMA Oncol
#: 2017), so MRD detected 1 / 0.33 and 1 / 0.57; ISS II and III about 1.4 and 2.1 for OS
#: (Greipp et al., JCO 2005: medians 62, 44 and 29 months), milder for PFS; age about 1.4 a
#: decade for OS; tumour burden a small effect beyond stage. Medians of the modern era.
SURVIVAL = {"pfs": SurvivalModel(48.0, 1.3, 1.7, 1.1, 1 / 0.33, 1.15),
            "os": SurvivalModel(110.0, 1.4, 2.1, 1.4, 1 / 0.57, 1.1)}
#: Follow-up: staggered accrual makes the administrative censoring uniform between these
#: months; loss to follow-up is exponential with this median.
FOLLOW_UP_MONTHS = (12.0, 84.0)
LOSS_MEDIAN_MONTHS = 200.0


def stable_int(*parts: object) -> int:
    """A seed component that does not depend on Python's hash randomization."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


def default_sites(scanner_effects: bool = True) -> tuple[SiteSpec, ...]:
    """Three hospitals of different sizes, case mix and scanners (sites B and C have two)."""
    scanners: tuple[tuple[ScannerEffects, ...], ...]
    if scanner_effects:
        scanners = (
            (ScannerEffects("A_GE_1.5T", (0.7, 0.7, 3.0), 1.35, 40.0, 0.25, 0.03, 0.3, 1.45, 1.18,
                            "GE", 1.5, 1.0),),
            (ScannerEffects("B_Siemens_3T", (0.9, 0.9, 4.0), 0.75, -30.0, 0.45, 0.08, 1.1, 0.6,
                            0.8, "Siemens", 3.0, 0.7),
             ScannerEffects("B_Siemens_1.5T", (0.75, 0.75, 3.0), 1.1, 10.0, 0.2, 0.035, 0.4,
                            1.25, 1.1, "Siemens", 1.5, 1.0)),
            (ScannerEffects("C_Philips_1.5T", (0.8, 0.8, 3.5), 1.0, 0.0, 0.1, 0.045, 0.6, 1.0,
                            1.0, "Philips", 1.5, 1.0),
             ScannerEffects("C_Philips_3T", (1.0, 1.0, 3.0), 1.15, 15.0, 0.35, 0.07, 0.9, 0.7,
                            0.85, "Philips", 3.0, 0.75)),
        )
    else:
        scanners = ((REFERENCE_SCANNER,),) * 3
    return (SiteSpec("site_A", 40, 0.3, 8.0, scanners[0]),
            SiteSpec("site_B", 70, 0.5, 0.0, scanners[1]),
            SiteSpec("site_C", 110, 0.7, -5.0, scanners[2]))


def make_sites(patients: tuple[int, ...], scanner_effects: bool = True, seed: int = 0
               ) -> tuple[SiteSpec, ...]:
    """Sites with the given sizes: the three default hospitals first, then further sites whose
    scanners and case mix are drawn from the same ranges (deterministic for ``seed``)."""
    if not patients or min(patients) < 1:
        raise ValueError(f"every site needs at least one patient, got {list(patients)}")
    defaults = default_sites(scanner_effects)
    sites = []
    for i, n in enumerate(patients):
        if i < len(defaults):
            sites.append(replace(defaults[i], n_patients=n))
            continue
        name = f"site_{chr(ord('A') + i)}" if i < 26 else f"site_{i:03d}"
        rng = np.random.default_rng([seed, stable_int(name)])
        scanner = REFERENCE_SCANNER
        if scanner_effects:
            in_plane = float(rng.uniform(0.6, 1.0))
            scanner = ScannerEffects(
                f"{name}_scanner", (in_plane, in_plane, float(rng.choice([3.0, 3.5, 4.0]))),
                float(rng.uniform(0.7, 1.4)), float(rng.uniform(-40, 40)),
                float(rng.uniform(0.1, 0.45)), float(rng.uniform(0.03, 0.06)),
                float(rng.uniform(0.3, 0.9)), float(rng.uniform(0.7, 1.3)),
                float(rng.uniform(0.85, 1.15)), field_strength_t=float(rng.choice([1.5, 3.0])),
                t1_contrast=float(rng.uniform(0.7, 1.0)))
        sites.append(SiteSpec(name, n, float(rng.uniform(0.3, 0.7)),
                              float(rng.uniform(-6, 6)), (scanner,)))
    return tuple(sites)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _random_lesion(rng: np.random.Generator, radius: tuple[float, float],
                   posterior: bool = False) -> Lesion:
    """A lesion centre in one vertebra: in the body, or (``posterior``) in a pedicle."""
    z = VERTEBRA_Z_MM[int(rng.integers(0, 3))] + rng.uniform(-8, 8)
    if posterior:
        x = float(rng.choice([-10.0, 10.0]) + rng.uniform(-2, 2))
        return (x, float(-8.0 + rng.uniform(-3, 3)), float(z), float(rng.uniform(*radius)))
    return (float(rng.uniform(-12, 12)), float(10.0 + rng.uniform(-8, 8)), float(z),
            float(rng.uniform(*radius)))


def _myeloma(rng: np.random.Generator, site: SiteSpec
             ) -> tuple[Pattern, float, float, str, str, int, int, list[Lesion]]:
    pattern = MM_PATTERNS[int(rng.choice(len(MM_PATTERNS), p=[0.25, 0.25, 0.2, 0.15, 0.15]))]
    base = {Pattern.NORMAL: 15, Pattern.FOCAL: 22, Pattern.DIFFUSE: 40, Pattern.MIXED: 44,
            Pattern.SALT_AND_PEPPER: 32}[pattern]
    pci = float(np.clip(rng.normal(base + site.severity, 16), 1, 95))
    age = float(np.clip(rng.normal(66, 9), 35, 90))
    sex = "M" if rng.random() < 0.55 else "F"
    lesions = [_random_lesion(rng, (2.0, 7.0)) for _ in range(int(rng.integers(2, 7)))
               if pattern in (Pattern.FOCAL, Pattern.MIXED)]
    # ISS (beta-2 microglobulin, albumin) tracks tumour burden and, through renal function, age.
    iss_score = 0.035 * (pci - 35) + 0.03 * (age - 65) + rng.normal(0, 0.9)
    iss = "I" if iss_score < -0.5 else ("II" if iss_score < 0.6 else "III")
    # Response: worse with burden and, beyond it, with stage (which also reflects biology the
    # image does not show): the nomogram's clinical factor adds real information.
    response_logit = 1.6 - 0.025 * pci - {"I": 0.0, "II": 0.8, "III": 1.7}[iss]
    response = int(rng.random() < _sigmoid(response_logit + rng.normal(0, 0.5)))
    mrd_logit = -1.0 + 0.04 * (pci - 30) - 1.5 * response
    mrd = int(rng.random() < _sigmoid(mrd_logit))
    return pattern, pci, age, sex, iss, response, mrd, lesions


def _metastasis(rng: np.random.Generator) -> tuple[float, float, str, list[Lesion]]:
    pci = float(np.clip(rng.normal(3, 2), 0, 10))
    age = float(np.clip(rng.normal(63, 10), 35, 90))
    sex = "M" if rng.random() < 0.5 else "F"
    kind = rng.random()
    if kind < 0.2:   # pedicle / posterior-element disease, the vertebral-body marrow spared
        lesions = [_random_lesion(rng, (3.0, 7.0), posterior=True)
                   for _ in range(int(rng.integers(1, 3)))]
    elif kind < 0.4:  # several small deposits, as myeloma shows
        lesions = [_random_lesion(rng, (2.0, 5.0)) for _ in range(int(rng.integers(3, 7)))]
    else:            # one to three large irregular deposits, sometimes reaching the pedicle
        lesions = [_random_lesion(rng, (3.0, 8.0)) for _ in range(int(rng.integers(1, 4)))]
    return pci, age, sex, lesions


def _survival(rng: np.random.Generator, iss: str, age: float, mrd: int, pci: float
              ) -> tuple[float, int, float, int]:
    """PFS and OS (months, event) under :data:`SURVIVAL`: both drawn from one uniform
    (progression never comes after death, PFS <= OS), each exactly proportional hazards in its
    own model, censored by the end of follow-up or loss to it (one censoring time for both)."""
    u = rng.random()
    times = {name: -math.log(u) * model.median_months / math.log(2)
             / math.exp(model.log_hazard_ratio(iss, age, mrd, pci))
             for name, model in SURVIVAL.items()}
    times["pfs"] = min(times["pfs"], times["os"])  # death is a PFS event too
    censor = min(rng.uniform(*FOLLOW_UP_MONTHS),
                 rng.exponential(LOSS_MEDIAN_MONTHS / math.log(2)))
    pfs, os_ = (min(times[k], censor) for k in ("pfs", "os"))
    return (round(pfs, 1), int(times["pfs"] <= censor), round(os_, 1),
            int(times["os"] <= censor))


def make_patients(site: SiteSpec, task: Task = Task.DIAGNOSIS, seed: int = 0) -> list[Patient]:
    """Draw the latent truth of every patient of one site (deterministic for ``seed``; a site's
    patients do not depend on the other sites). Survival outcomes come from a random stream of
    their own, so they change nothing else."""
    task = Task(task)
    rng = np.random.default_rng([seed, stable_int(site.name), stable_int(task.value)])
    outcomes = np.random.default_rng([seed, stable_int(site.name), stable_int(task.value),
                                      stable_int("survival")])
    patients = []
    iss: str | None
    response: int | None
    mrd: int | None
    for i in range(site.n_patients):
        is_mm = task is not Task.DIAGNOSIS or rng.random() < site.mm_fraction
        scanner = site.scanners[0]
        if len(site.scanners) > 1 and rng.random() < (REFERRAL_SECOND_SCANNER if is_mm
                                                      else 1.0 - REFERRAL_SECOND_SCANNER):
            # Referral pathways: suspected myeloma goes to the second scanner more often, so
            # within one hospital the scanner is related to the diagnosis, as it often is.
            scanner = site.scanners[1]
        if is_mm:
            pattern, pci, age, sex, iss, response, mrd, lesions = _myeloma(rng, site)
        else:
            pattern = Pattern.METASTASIS
            pci, age, sex, lesions = _metastasis(rng)
            iss, response, mrd = None, None, None
        size = float(np.exp(rng.normal(0.04 if sex == "M" else -0.04, 0.06)))
        survival = (_survival(outcomes, iss, round(age), mrd, round(pci, 1))  # as recorded
                    if is_mm and iss is not None
                    and mrd is not None else (None, None, None, None))
        patients.append(Patient(
            case_id=f"{site.name}_{i:03d}", site=site.name, scanner=scanner.name,
            timepoint="after_treatment" if task is Task.MRD else "diagnosis",
            diagnosis="myeloma" if is_mm else "metastasis", pattern=pattern, pci=round(pci, 1),
            age=round(age), sex=sex, lesions=tuple(lesions), size=size, iss_stage=iss,
            response=response, mrd=mrd, pfs_months=survival[0], pfs_event=survival[1],
            os_months=survival[2], os_event=survival[3]))
    return patients


def make_cohort(sites: tuple[SiteSpec, ...], task: Task = Task.DIAGNOSIS, seed: int = 0
                ) -> list[Patient]:
    """Every site's patients, site by site."""
    return [p for site in sites for p in make_patients(site, task, seed)]
