"""The site data path: manifest -> load and check -> standardize -> extract, for many cases.

Longer than 400 lines: the case loop, the supervision of the processes that run it, and the
two outputs it writes (features table, ingestion report) read together.

Cases run in parallel, each in a process of its own forked from one that built the pyradiomics
extractor once (see :func:`run_cases`). Each
extracted case is cached on disk under a key made of the protocol hash, the software versions and
the content of the case's files, written atomically: a killed run resumes where it stopped, and a
changed file or protocol is recomputed. The standardized volume is kept beside its features for
the CNN's crops (:mod:`client.volumes`), and the image after N4 bias-field correction (the
slowest step, which the image harmonization phase and the preparation both run) under the same
key: the preparation reads it instead of correcting the image again. A case that fails is skipped
with its reason; the others go on.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import SimpleITK as sitk
from threadpoolctl import threadpool_limits

from client.extract import FeatureExtractor, pyradiomics_settings
from client.limits import MAX_CASE_VOXELS, Budget, CaseTimeout, cap_memory, time_limit
from client.loading import check_roi, load_case
from client.manifest import CaseSpec, RowProblem
from client.standardize import (
    BiasFieldCorrection,
    Volume,
    build_steps,
    intensity_steps,
    measure_image,
    standardize,
)
from client.volumes import load_volume, save_volume, volume_path
from common.errors import CaseError, SkipReason
from common.protocol import StudyProtocol
from common.provenance import atomic_write_bytes, atomic_write_json, software_versions
from harmonization.images import AXES, PERCENTILES, ImageMeasure, ImageStandard

CACHE_SCHEMA_VERSION = 1
#: The image after N4, beside the case's features cached under the key without the standard.
N4_SUFFIX = ".n4.npz"
TABLE_SCHEMA_VERSION = 1
REPORT_SCHEMA_VERSION = 1

#: ``check``: read and check; ``extract``: standardize and extract the features;
#: ``landmarks``: the histogram landmarks after N4 and normalization (image harmonization).
Mode = Literal["check", "extract", "landmarks"]


@dataclass(frozen=True)
class CaseOutcome:
    """What happened to one case. ``features`` is set for extracted cases only."""
    case_id: str
    row: int
    reason: SkipReason | None = None
    detail: str = ""
    features: dict[str, float] | None = None
    roi_voxels: int | None = None
    seconds: float = 0.0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.reason is None


def _digest(path: Path, h: Any) -> None:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file():
                h.update(child.relative_to(path).as_posix().encode())
                _digest(child, h)
    elif path.is_file():
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)


def case_cache_key(case: CaseSpec, protocol_hash: str, versions: dict[str, str],
                   standard: ImageStandard | None = None) -> str:
    """Content key of one case's features: protocol, the study's standard landmarks (with
    histogram standardization), software, ROI choice and file bytes."""
    h = hashlib.sha256()
    standardized = [] if standard is None else [list(standard.landmarks), standard.noise,
                                                 standard.spacing]
    h.update(json.dumps([CACHE_SCHEMA_VERSION, protocol_hash, versions, case.roi,
                         case.series_uid, *standardized]).encode())
    for path in (case.image, case.mask):
        h.update(b"\0" + path.name.encode())
        _digest(path, h)
    return h.hexdigest()


def features_cache_path(cache_dir: Path, protocol_hash: str, key: str) -> Path:
    """Where the features of the case of content key ``key`` (:func:`case_cache_key`) are
    cached."""
    return cache_dir / protocol_hash[:16] / key[:2] / f"{key}.json"


#: How ITK says an allocation failed (numpy raises MemoryError).
_OUT_OF_MEMORY = ("bad_alloc", "Failed to allocate memory")


class CaseProcessor:
    """Processes cases in one process: holds the protocol, the standardization steps and the
    pyradiomics extractor, built once."""
    def __init__(self, protocol: StudyProtocol, mode: Mode, cache_dir: Path | None,
                 max_voxels: int | Budget = MAX_CASE_VOXELS,
                 time_limit_s: float | None = None,
                 standard: ImageStandard | None = None) -> None:
        self.protocol = protocol
        self.mode = mode
        self.cache_dir = cache_dir
        self.budget = max_voxels if isinstance(max_voxels, Budget) else Budget(max_voxels)
        self.time_limit_s = time_limit_s
        self.protocol_hash = protocol.content_hash()
        self.versions = software_versions()
        self.standard = standard
        self.steps = (intensity_steps(protocol) if mode == "landmarks" else
                      build_steps(protocol, self.budget, standard) if mode == "extract" else [])
        self.extractor = FeatureExtractor(protocol) if mode == "extract" else None

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else features_cache_path(self.cache_dir,
                                                                       self.protocol_hash, key)

    def __call__(self, case: CaseSpec) -> CaseOutcome:
        start = time.perf_counter()
        try:
            with time_limit(self.time_limit_s):
                return self._process(case, start)
        except CaseTimeout:
            return CaseOutcome(case.case_id, case.row, SkipReason.RESOURCE_LIMIT,
                               f"took more than the site's case_time_limit_s "
                               f"({self.time_limit_s:g} s)", seconds=time.perf_counter() - start)
        except CaseError as exc:
            return CaseOutcome(case.case_id, case.row, exc.reason, exc.detail,
                               seconds=time.perf_counter() - start)
        except Exception as exc:  # a bug or an unforeseen file: skip the case, keep the run
            if isinstance(exc, MemoryError) or any(m in str(exc) for m in _OUT_OF_MEMORY):
                cap = (f"this site's max_case_memory_mb ({self.budget.max_memory_mb:,})"
                       if self.budget.max_memory_mb else "free memory")
                return CaseOutcome(case.case_id, case.row, SkipReason.RESOURCE_LIMIT,
                                   f"ran out of memory: it needs more than {cap}",
                                   seconds=time.perf_counter() - start)
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            return CaseOutcome(case.case_id, case.row, SkipReason.INTERNAL_ERROR,
                               f"unexpected error: {last}", seconds=time.perf_counter() - start)

    def _process(self, case: CaseSpec, start: float) -> CaseOutcome:
        cache_path = None
        if self.mode == "extract" and self.cache_dir is not None:
            cache_path = self._cache_path(case_cache_key(case, self.protocol_hash, self.versions,
                                                         self.standard))
            cached = _read_cache(cache_path, case.case_id)
            if cached is not None:
                return CaseOutcome(case.case_id, case.row, features=cached["features"],
                                   roi_voxels=cached["roi_voxels"], cached=True,
                                   seconds=time.perf_counter() - start)
        volume = load_case(case, self.protocol, self.budget)
        if self.mode == "landmarks":
            histogram = self.protocol.standardization.histogram
            landmarks, noise, spacing = measure_image(self._standardize(case, volume),
                                                      histogram.scale if histogram else 100.0)
            return CaseOutcome(case.case_id, case.row,
                               features={**{_landmark_key(i): float(v)
                                            for i, v in enumerate(landmarks)},
                                         "noise": noise,
                                         **{f"spacing_{a}": v
                                            for a, v in zip(AXES, spacing, strict=True)}},
                               seconds=time.perf_counter() - start)
        if self.mode == "check" or self.extractor is None:
            voxels = check_roi(volume.labels, self.protocol.ingestion, case.case_id)
            return CaseOutcome(case.case_id, case.row, roi_voxels=voxels,
                               seconds=time.perf_counter() - start)
        volume = self._standardize(case, volume)
        where = f"after standardization of case '{case.case_id}'"
        voxels = check_roi(volume.labels, self.protocol.ingestion, where)
        intensity_roi = volume.roi_for_intensity()
        if not sitk.GetArrayViewFromImage(intensity_roi).any():
            raise CaseError(SkipReason.EMPTY_MASK, f"{where}: re-segmentation left no ROI voxel")
        features = self.extractor.extract(volume.image, volume.morphological_roi(), intensity_roi)
        if cache_path is not None:  # for the CNN's crops (client/volumes.py)
            save_volume(volume_path(cache_path), volume, case.case_id)
            atomic_write_json(cache_path, {
                "schema_version": CACHE_SCHEMA_VERSION,
                "case_id": case.case_id,
                "protocol_hash": self.protocol_hash,
                "roi_voxels": voxels,
                "features": features,
            })
        return CaseOutcome(case.case_id, case.row, features=features, roi_voxels=voxels,
                           seconds=time.perf_counter() - start)


    def _standardize(self, case: CaseSpec, volume: Volume) -> Volume:
        """The steps on the loaded ``volume``; the N4 bias-field correction read from the
        cache where this study corrected the case before (its key leaves out the standard
        landmarks, which come after it), and kept there otherwise."""
        steps = self.steps
        if steps and isinstance(steps[0], BiasFieldCorrection) and self.cache_dir is not None:
            key = case_cache_key(case, self.protocol_hash, self.versions)
            path = features_cache_path(self.cache_dir, self.protocol_hash, key).with_suffix(
                N4_SUFFIX)
            corrected = load_volume(path, case.case_id)
            if corrected is None:
                corrected = standardize(volume, steps[:1])
                save_volume(path, corrected, case.case_id)
            volume, steps = corrected, steps[1:]
        return standardize(volume, steps)


def _landmark_key(i: int) -> str:
    return f"landmark_{i:02d}"


def landmark_rows(cases: list[CaseSpec], outcomes: list[CaseOutcome]
                  ) -> list[tuple[CaseSpec, ImageMeasure]]:
    """Each case that ``landmarks`` mode measured, with what it measured (its scanner, mapped
    landmarks, noise level and spacing); the skipped cases left out."""
    out = []
    for case, outcome in zip(cases, outcomes, strict=True):
        if not outcome.ok or outcome.features is None:
            continue
        f = outcome.features
        x, y, z = (float(f[f"spacing_{a}"]) for a in AXES)
        out.append((case, ImageMeasure(
            case.batch, np.array([f[_landmark_key(i)] for i in range(len(PERCENTILES))]),
            float(f["noise"]), (x, y, z))))
    return out


def _read_cache(path: Path, case_id: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or damaged: recompute
    if entry.get("schema_version") != CACHE_SCHEMA_VERSION or entry.get("case_id") != case_id:
        return None
    return entry


# --- parallel execution -----------------------------------------------------------------------

#: After the cooperative timer (``case_time_limit_s``), a case's process gets this much longer
#: (or a tenth of the limit, if larger) to return before it is killed: the timer cannot
#: interrupt a single long call into ITK or NumPy, the kill can.
KILL_GRACE_S = 30.0


def _kill_after(time_limit_s: float | None) -> float | None:
    return None if not time_limit_s else time_limit_s + max(KILL_GRACE_S, time_limit_s / 10)


def _case_process(processor: CaseProcessor, case: CaseSpec, conn: Any, threads: int) -> None:
    """A forked child: one case, its outcome sent back through ``conn``."""
    # Each process gets its share of the cores: ITK and BLAS (numpy's eigvals in pyradiomics'
    # GLCM MCC) would otherwise each start a thread per core in every process and thrash.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    threadpool_limits(threads)
    cap_memory(processor.budget.max_memory_mb)
    conn.send(processor(case))
    conn.close()


def _size_on_disk(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def run_cases(
    cases: list[CaseSpec],
    protocol: StudyProtocol,
    *,
    mode: Mode,
    workers: int,
    cache_dir: Path | None,
    on_done: Callable[[CaseOutcome], None] | None = None,
    max_voxels: int | Budget = MAX_CASE_VOXELS,
    time_limit_s: float | None = None,
    standard: ImageStandard | None = None,
) -> list[CaseOutcome]:
    """Process ``cases`` with up to ``workers`` processes at once (1 = in this process); outcomes
    in input order. ``on_done`` is called in this process as each case finishes (progress
    display). A case whose image or resampled grid holds more voxels, or would take more
    memory, than ``max_voxels`` allows (a :class:`~client.limits.Budget`) is skipped
    (``resource_limit``) before it is allocated, and so is one that runs past ``time_limit_s``
    (:func:`client.limits.time_limit`). ``standard`` is the study's image standard, which a
    protocol with histogram standardization needs to extract.

    With several workers each case runs in its own forked process (the protocol's extractor is
    built once, here, and shared copy-on-write): a case stuck past the time limit and its grace
    (:data:`KILL_GRACE_S`) is killed, and a case whose process dies (the out-of-memory killer)
    is skipped by name while every other case goes on. There the budget's memory is also a cap
    on each case's process (:func:`client.limits.cap_memory`)."""
    workers = max(1, min(workers, len(cases))) if cases else 1
    outcomes: dict[int, CaseOutcome] = {}
    processor = CaseProcessor(protocol, mode, cache_dir, max_voxels, time_limit_s, standard)

    def done(i: int, outcome: CaseOutcome) -> None:
        outcomes[i] = outcome
        if on_done:
            on_done(outcome)

    if workers == 1 or "fork" not in multiprocessing.get_all_start_methods():
        for i, case in enumerate(cases):
            done(i, processor(case))
        return [outcomes[i] for i in range(len(cases))]

    context = multiprocessing.get_context("fork")
    threads = max(1, (os.cpu_count() or 1) // workers)
    kill_after = _kill_after(time_limit_s)
    # Largest cases first (longest-processing-time order): no worker is left with one big case
    # at the end while the others idle.
    pending = sorted(range(len(cases)), key=lambda i: -_size_on_disk(cases[i].image))
    running: dict[Any, tuple[int, Any, float]] = {}  # pipe -> (case index, process, start)
    try:
        while pending or running:
            while pending and len(running) < workers:
                i = pending.pop(0)
                receive, send = context.Pipe(duplex=False)
                child = context.Process(target=_case_process, daemon=True,
                                        args=(processor, cases[i], send, threads))
                child.start()
                send.close()
                running[receive] = (i, child, time.monotonic())
            wait_s = 1.0 if kill_after else None
            for pipe in multiprocessing.connection.wait(list(running), wait_s):
                i, child, started = running.pop(pipe)
                try:
                    outcome = pipe.recv()
                except (EOFError, OSError):  # it ended without answering
                    outcome = None
                pipe.close()
                child.join()
                done(i, outcome or _died(cases[i], child.exitcode, started))
            now = time.monotonic()
            for pipe, (i, child, started) in list(running.items()):
                if kill_after and now - started > kill_after:
                    child.kill()
                    child.join()
                    pipe.close()
                    del running[pipe]
                    done(i, CaseOutcome(
                        cases[i].case_id, cases[i].row, SkipReason.RESOURCE_LIMIT,
                        f"still running {kill_after:g} s after it started, past the site's "
                        f"case_time_limit_s ({time_limit_s:g} s): its process was killed",
                        seconds=now - started))
    finally:
        for pipe, (_, child, _) in running.items():  # interrupted: leave no process behind
            child.kill()
            child.join()
            pipe.close()
    return [outcomes[i] for i in range(len(cases))]


def _died(case: CaseSpec, code: int | None, started: float) -> CaseOutcome:
    """The outcome of a case whose process ended (with exit ``code``) without answering."""
    seconds = time.monotonic() - started
    if code is not None and code < 0 and -code == signal.SIGKILL:
        return CaseOutcome(case.case_id, case.row, SkipReason.RESOURCE_LIMIT,
                           "its process was killed (SIGKILL): most likely the system's "
                           "out-of-memory killer; lower the site's max_case_memory_mb or "
                           "workers", seconds=seconds)
    return CaseOutcome(case.case_id, case.row, SkipReason.INTERNAL_ERROR,
                       f"its process ended without a result (exit code {code})", seconds=seconds)


# --- outputs ----------------------------------------------------------------------------------

def features_table(
    cases: list[CaseSpec], outcomes: list[CaseOutcome], protocol: StudyProtocol
) -> pa.Table:
    """One row per extracted case: case_id, batch, where its mask came from (``mask_source``:
    ``manual``, or ``auto`` for a mask the study's segmentation network made), label (and a
    survival task's event), covariates, then the features."""
    records = []
    for case, outcome in zip(cases, outcomes, strict=True):
        if not outcome.ok or outcome.features is None:
            continue
        record: dict[str, Any] = {
            "case_id": case.case_id,
            "batch": case.batch,
            "mask_source": "auto" if case.auto_mask else "manual",
            protocol.task.label_column: case.label,
            **({protocol.task.event_column: case.event} if protocol.task.event_column else {}),
            **case.covariates,
        }
        record.update(outcome.features)
        records.append(record)
    return pa.Table.from_pylist(records)


def write_features_table(
    arrow: pa.Table, path: Path, protocol: StudyProtocol, site_name: str,
    standard: ImageStandard | None = None,
) -> None:
    """Parquet, with the protocol, its hash, the standardization steps as run (with the image
    standard, if any), the pyradiomics settings and the software versions in the file
    metadata."""


    meta = {
        "schema_version": TABLE_SCHEMA_VERSION,
        "site": site_name,
        "protocol_hash": protocol.content_hash(),
        "protocol": protocol.model_dump(mode="json"),
        "standardization_steps": [step.record() for step in
                                  build_steps(protocol, standard=standard)],
        "pyradiomics_settings": pyradiomics_settings(protocol.radiomics),
        "software": software_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    merged = dict(arrow.schema.metadata or {})
    merged[b"myelofed"] = json.dumps(meta).encode("utf-8")
    arrow = arrow.replace_schema_metadata(merged)
    buffer = io.BytesIO()
    pq.write_table(arrow, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_features_metadata(path: Path) -> dict[str, Any]:
    """The MyeloFed metadata of a features table (protocol hash, protocol, software)."""
    schema = pq.read_schema(path)
    return json.loads((schema.metadata or {})[b"myelofed"])


def ingestion_report(
    outcomes: Iterable[CaseOutcome],
    problems: Iterable[RowProblem],
    protocol: StudyProtocol,
    site_name: str,
    mode: Mode,
) -> dict[str, Any]:
    """The ingestion report: counts, and every case with its status and reason."""
    entries: list[dict[str, Any]] = []
    for p in problems:
        entries.append({"case_id": p.case_id, "row": p.row, "status": "skipped",
                        "reason": p.reason.value, "detail": p.detail})
    for o in outcomes:
        entries.append({
            "case_id": o.case_id, "row": o.row,
            "status": "ok" if o.ok else "skipped",
            "reason": o.reason.value if o.reason else None,
            "detail": o.detail,
            "roi_voxels": o.roi_voxels,
            "seconds": round(o.seconds, 3),
            "cached": o.cached,
        })
    entries.sort(key=lambda e: e["row"])
    skipped = [e for e in entries if e["status"] == "skipped"]
    by_reason: dict[str, int] = {}
    for e in skipped:
        by_reason[e["reason"]] = by_reason.get(e["reason"], 0) + 1
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "site": site_name,
        "mode": mode,
        "protocol_name": protocol.name,
        "protocol_hash": protocol.content_hash(),
        "software": software_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "counts": {"total": len(entries), "usable": len(entries) - len(skipped),
                   "skipped": len(skipped)},
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "cases": entries,
    }
