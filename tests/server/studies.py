"""What several server tests set up alike: a synthetic cohort with a study protocol cut down
for speed, a site's config file for a deployment on this machine, and what real-process tests
read in the processes' logs."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from common.protocol import CnnSpec, ModelSpec, StudyProtocol, load_protocol
from common.synthetic import CohortSpec, make_sites, write_cohort
from server.study import StudySettings

SITES = ("site_A", "site_B", "site_C")
#: The ServerApp's wait for a round's replies: the round a site dies in lasts at most this long
#: (less when Flower reports the node unavailable first). The first round makes the sites' crops:
#: 60 s was too short on a loaded 2-core machine (two sites dropped from round 1).
ROUND_TIMEOUT_S = 120.0


def small_study(tmp_path: Path, sizes: tuple[int, ...], **cnn: object
                ) -> tuple[Path, StudyProtocol]:
    """A cohort of ``sizes`` patients per site (scanner effects on) under ``tmp_path/cohort``,
    and its protocol with a small radiomics search and a small CNN (``cnn``: the other
    :class:`CnnSpec` fields, e.g. rounds and aggregator), without the image harmonization
    phase (its N4 pass over every training image; the study tests of the default protocol run
    it)."""
    cohort = tmp_path / "cohort"
    write_cohort(cohort, CohortSpec(make_sites(sizes, True)), workers=2)
    protocol = load_protocol(cohort / "study.yaml")
    protocol = protocol.model_copy(update={
        "standardization": protocol.standardization.without_study_standard(),
        "model": ModelSpec(screening_top_k=5, cv_folds=3, n_lambdas=3),
        "cnn": CnnSpec(architecture="resnet10", crop_size=(16, 16, 8), batch_size=8, **cnn)})
    return cohort, protocol


def write_site_config(path: Path, site: str, manifest: Path, work_dir: Path,
                      min_patients: int = 5) -> Path:
    """A site config file (one worker; ``min_patients``: its floor) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"site_name = {json.dumps(site)}\nmanifest = {json.dumps(str(manifest))}\n"
                    f"work_dir = {json.dumps(str(work_dir))}\nworkers = 1\n"
                    f"min_patients = {min_patients}\n", encoding="utf-8")
    return path


def image_only_study(tmp_path: Path, rounds: int) -> tuple[dict[str, Path], StudySettings, Path]:
    """Three sites' configs, an image-only CNN study's settings and its protocol file."""
    cohort, protocol = small_study(tmp_path, (22, 22, 22), rounds=rounds, aggregator="fedavg")
    protocol_file = tmp_path / "protocol.yaml"
    protocol_file.write_text(yaml.safe_dump(protocol.model_dump(mode="json"), sort_keys=False))
    configs = {site: write_site_config(tmp_path / "sites" / f"{site}.toml", site,
                                       cohort / site / "manifest.csv", tmp_path / "work" / site)
               for site in SITES}
    settings = StudySettings(load_protocol(protocol_file), tmp_path / "out", min_sites=2,
                             min_cases_per_site=10, timeout_s=ROUND_TIMEOUT_S, seed=1,
                             until="cnn", radiomics=False)
    return configs, settings, protocol_file


def received(log: Path, message_type: str, run_id: str | None = None) -> int:
    """How many messages of ``message_type`` a SuperNode has received (its log), of run
    ``run_id`` only when given (the SuperNode logs "[RUN <id>, ...]" before each)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    count, run = 0, None
    for line in text.splitlines():
        if started := re.search(r"\[RUN (\d+)", line):
            run = started.group(1)
        elif f"Receiving: {message_type} message" in line and run_id in (None, run):
            count += 1
    return count


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str,
             report: Callable[[], str]) -> None:
    """Poll ``condition`` until it holds; fail with ``report()`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not seen within {timeout_s:g} s: {what}\n{report()}")
        time.sleep(0.2)


def process_tree(pid: int) -> list[tuple[psutil.Process, str]]:
    """Process ``pid`` and its descendants with their command lines, leaving out those that end
    while they are read (a short-lived helper a SuperLink or SuperNode runs)."""
    tree = []
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for proc in procs:
        try:
            tree.append((proc, " ".join(proc.cmdline())))
        except psutil.NoSuchProcess:
            continue
    return tree


CHROMIUM = Path("/usr/bin/chromium")


def render_in_chromium(pages: list[Path]) -> None:
    """Every figure of each report page loads in headless Chromium, with no console error; a
    screenshot of each is saved next to it (skipped where Chromium or playwright is absent)."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install "
                    "chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is a test dependency")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            for page_path in pages:
                page = browser.new_page()
                errors: list[str] = []
                page.on("console", lambda m, errors=errors: errors.append(m.text)
                        if m.type == "error" else None)
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                page.goto(page_path.resolve().as_uri())
                images = page.evaluate("Array.from(document.images).map("
                                       "i => [i.alt, i.complete && i.naturalWidth > 0])")
                assert len(images) >= 4, page_path
                assert [alt for alt, ok in images if not ok] == [], page_path
                assert errors == [], page_path
                shot = page_path.with_suffix(".png")
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 50_000
                page.close()
        finally:
            browser.close()


def audit_mod(path: Path):  # noqa: ANN201 - a Flower mod
    """A Flower mod that writes the shape of everything a site sends to ``path`` (JSON lines):
    arrays by shape, config values by length."""
    def mod(msg, context, call_next):  # noqa: ANN001, ANN202
        reply = call_next(msg, context)
        entry = {"partition": int(context.node_config["partition-id"]),
                 "type": msg.metadata.message_type, "arrays": [], "lists": []}
        # model terms are indexed by the fits the server asked for: that axis is not patients
        fits = (len(msg.content["request.arrays"]["fit_set"].numpy())
                if "request.arrays" in msg.content else None)
        if reply.has_content():
            for record in reply.content.values():
                if hasattr(record, "to_numpy_ndarrays"):  # an ArrayRecord
                    entry["arrays"] += [list(a.shape)[1:] if list(a.shape)[:1] == [fits]
                                        else list(a.shape) for a in record.values()]
                else:
                    entry["lists"] += [len(v) for v in record.values()
                                       if isinstance(v, list)]
                    for v in record.values():  # JSON texts (the metrics table): every list
                        if isinstance(v, str) and v.startswith(("{", "[")):
                            entry["lists"] += _list_lengths(json.loads(v))
        with path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return reply
    return mod


def _list_lengths(value: object) -> list[int]:
    """The length of every list nested in a JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _list_lengths(v)]
    if isinstance(value, list):
        return [len(value)] + [n for v in value for n in _list_lengths(v)]
    return []


def no_patient_axis(audit: Path, prepare: dict[str, Any], fixed: frozenset[int] = frozenset()
                    ) -> list[dict[str, Any]]:
    """The entries :func:`audit_mod` wrote, after checking that nothing a site sent has a
    dimension (or a list length) of its number of patients (training, test or all; from the
    study's ``prepare.json``); a site the preparation excluded has no counts to check.
    ``fixed``: list lengths the protocol sets (e.g. the Kaplan-Meier grid's), which may equal a
    count by chance."""
    rows = {s["site"]: {s["n_train"], s["n_test"], s["n_train"] + s["n_test"]}
            for s in prepare["sites"] if s.get("status", "ok") == "ok"}
    sites = sorted({s["site"] for s in prepare["sites"]})
    sent = [json.loads(line) for line in audit.read_text().splitlines()]
    for entry in sent:
        counts = rows.get(sites[entry["partition"]], set())
        dims = {d for shape in entry["arrays"] for d in shape} | (set(entry["lists"]) - fixed)
        assert not dims & counts, (entry, counts)
    return sent
