"""The study, phase by phase, independent of Flower: the handshake, the segmentation network
(when the protocol has one), the local preparation, federated ComBat, the radiomics model and
the nomogram (again on each of the protocol's repeated splits), the CNN (each in
:mod:`server.phases`), with the validation inside each;
``study.json`` says how it ended and ``checkpoint.json`` how far it got, so a restarted
coordinator resumes it. Every run ends by writing the multicentre report
(:mod:`server.report`) of what it got to."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from common.errors import ConfigError
from common.protocol import TaskKind
from common.provenance import atomic_write_json
from server.phases.cnn import run_cnn
from server.phases.combat import run_combat
from server.phases.handshake import run_handshake
from server.phases.harmony import HARMONY_FILE, run_embedding_harmony
from server.phases.images import run_images
from server.phases.nomogram import run_nomogram
from server.phases.prepare import PrepareSummary, load_prepare, run_prepare, training_prevalence
from server.phases.radiomics import run_model
from server.phases.segmentation import run_segmentation
from server.phases.validation import repeat_summary
from server.report import write_report
from server.rounds import Transport
from server.study import (
    REPEATS_DIR,
    Checkpoint,
    Progress,
    StudySettings,
    StudyStopped,
    open_checkpoint,
)


def run_study(transport: Transport, settings: StudySettings, progress: Progress) -> None:
    """The phases in order, up to ``settings.until``; ``study.json`` says how it ended.
    ``progress`` gets a line per phase and round (Flower's log in :mod:`server.app`: ``flwr
    run --stream`` shows it).

    A coordinator restarted mid-study goes on from its checkpoint (:func:`open_checkpoint`):
    the handshake runs again (which sites are there, on which protocol), finished phases are
    read back from their files instead of being redone, and the CNN goes on after its last
    saved round."""
    checkpoint, resumed = open_checkpoint(settings)
    status = {"status": "done", "until": settings.until, "reason": ""}
    atomic_write_json(settings.out_dir / "protocol.json",  # the report shows what was run
                      {"hash": settings.protocol.content_hash(),
                       "protocol": settings.protocol.model_dump(mode="json"),
                       "settings": settings.to_run_config("(this file)")})
    try:
        if resumed:
            progress(f"resuming the study in {settings.out_dir}: finished "
                     f"{', '.join(checkpoint.done) or 'no phase'}"
                     + (f", CNN round {checkpoint.cnn_round}" if checkpoint.cnn_round else ""))
        progress(f"phase 1/5 handshake: waiting for {settings.min_sites}+ sites")
        summary = run_handshake(transport, settings)
        if not summary.go_on:
            raise StudyStopped(f"handshake: {summary.reason}")
        nodes = {n: s for n, s in summary.nodes.items() if s not in summary.excluded}
        progress(f"handshake: {len(nodes)} site(s) go on"
                 + (f", excluded {summary.excluded}" if summary.excluded else ""))
        segmentation = settings.protocol.segmentation
        if settings.runs("segmentation") and segmentation is not None:
            if checkpoint.finished("segmentation"):
                progress("segmentation network: done before the restart")
            else:
                progress(f"segmentation network: {segmentation.architecture}, "
                         f"{segmentation.rounds} rounds of {segmentation.aggregator}")
                atomic_write_json(settings.out_dir / "segmentation.json", run_segmentation(
                    transport, nodes, settings, progress, checkpoint))
                checkpoint.finish(settings.out_dir, "segmentation")
        if settings.runs("prepare"):
            if checkpoint.finished("prepare"):
                prepared = load_prepare(settings.out_dir)
                progress("phase 2/5 local preparation: done before the restart")
            else:
                standard = None
                if settings.protocol.standardization.histogram is not None:
                    progress("phase 2/5 image harmonization: histogram landmarks per scanner")
                    images = run_images(transport, nodes, settings)
                    standard = images.standard
                    progress(f"image harmonization: the standard from "
                             f"{sum(n for n, _ in standard.scanners.values())} training images "
                             f"of {len(standard.scanners)} scanner(s)"
                             + (f"; no landmarks from {', '.join(images.missing)}"
                                if images.missing else ""))
                progress("phase 2/5 local preparation: ingest, standardize, extract, split")
                prepared = run_prepare(transport, nodes, settings, standard)
                if not prepared.go_on:
                    raise StudyStopped(f"local preparation: {prepared.reason}")
                checkpoint.finish(settings.out_dir, "prepare")
            kept = {r.site for r in prepared.kept}
            nodes = {n: s for n, s in nodes.items() if s in kept}
            harmonized: dict[int, str] = {}  # the sites whose rows ComBat harmonized
            if settings.runs("combat"):
                if checkpoint.finished("combat"):
                    failed = json.loads((settings.out_dir / "combat.json").read_text())["failed"]
                    progress("phase 3/5 federated ComBat: done before the restart")
                else:
                    progress("phase 3/5 federated ComBat")
                    failed = run_combat(transport, nodes, prepared.kept, settings)
                    checkpoint.finish(settings.out_dir, "combat")
                harmonized = {n: s for n, s in nodes.items() if s not in failed}
                if failed:
                    progress(f"ComBat: raw features only at {', '.join(sorted(failed))}")
            if settings.runs("model") and checkpoint.finished("model"):
                progress("phase 4/5 radiomics model: done before the restart")
            elif settings.runs("model"):
                run_models(transport, nodes, harmonized, prepared, settings, progress)
                checkpoint.finish(settings.out_dir, "model")
            if settings.runs("model") and settings.protocol.validation.repeats > 1:
                run_repeats(transport, nodes, settings, progress, checkpoint)
            if settings.runs("cnn") and settings.protocol.cnn is not None:
                progress(f"phase 5/5 CNN: {settings.protocol.cnn.architecture}, "
                         f"{settings.protocol.cnn.rounds} rounds of "
                         f"{settings.protocol.cnn.aggregator}")
                atomic_write_json(settings.out_dir / "cnn.json", run_cnn(
                    transport, nodes, settings, progress, training_prevalence(prepared.kept),
                    checkpoint))
                checkpoint.finish(settings.out_dir, "cnn")
                if settings.protocol.harmonization.embeddings is not None:
                    progress("CNN embeddings: federated Harmony")
                    atomic_write_json(settings.out_dir / HARMONY_FILE, run_embedding_harmony(
                        transport, nodes, settings, progress))
    except StudyStopped as exc:
        status = {"status": "stopped", "until": settings.until, "reason": str(exc)}
        progress(f"stopped: {exc}")
        raise
    except BaseException as exc:  # the coordinator failed: a restart resumes the study
        status = {"status": "failed", "until": settings.until,
                  "reason": f"{type(exc).__name__}: {exc}"[:500]}
        raise
    finally:
        atomic_write_json(settings.out_dir / "study.json", status)
        _write_report(settings, progress)


def _write_report(settings: StudySettings, progress: Progress) -> None:
    """The multicentre report of what the run wrote, whether it finished, stopped or failed
    (the report says which, and where): in deployment as in the demo."""
    try:
        paths = write_report(settings.out_dir)
    except (ConfigError, OSError, ValueError, KeyError) as exc:  # e.g. no handshake yet
        progress(f"multicentre report not written: {exc}")
        return
    progress(f"multicentre report: {paths['html']}")


#: The file a repeated split that stopped leaves in its folder, saying why.
STOPPED_FILE = "stopped.json"


def repeat_dir(out_dir: Path, repeat: int) -> Path:
    """Where split ``repeat``'s phase files go (the study's first split's are in the out-dir)."""
    return out_dir if repeat == 0 else out_dir / REPEATS_DIR / str(repeat)


def run_repeats(transport: Transport, nodes: dict[int, str], settings: StudySettings,
                progress: Progress, checkpoint: Checkpoint) -> None:
    """The study's other splits (``validation.repeats``), after its first: each site prepares
    split r (its features are cached: it splits and writes tables apart), then ComBat and the
    radiomics models as in the first, their files under ``repeats/<r>``; ``repeats.json``
    summarizes every model per site over the splits (:func:`repeat_summary`). A split that
    stops (too few sites prepared it) is named there and the others go on."""
    repeats = settings.protocol.validation.repeats
    for repeat in range(1, repeats):
        name = f"split {repeat + 1}/{repeats}"
        if checkpoint.finished(name):
            progress(f"{name}: done before the restart")
            continue
        split = replace(settings, out_dir=repeat_dir(settings.out_dir, repeat), repeat=repeat)
        split.out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (split.out_dir / STOPPED_FILE).unlink(missing_ok=True)
        progress(f"{name}: preparation, ComBat and the radiomics models")
        try:
            prepared = run_prepare(transport, nodes, split)
            if not prepared.go_on:
                raise StudyStopped(f"local preparation: {prepared.reason}")
            kept = {r.site for r in prepared.kept}
            here = {n: s for n, s in nodes.items() if s in kept}
            harmonized: dict[int, str] = {}
            if settings.runs("combat"):
                failed = run_combat(transport, here, prepared.kept, split)
                harmonized = {n: s for n, s in here.items() if s not in failed}
            run_models(transport, here, harmonized, prepared, split, progress)
        except StudyStopped as exc:
            atomic_write_json(split.out_dir / STOPPED_FILE, {"reason": str(exc)})
            progress(f"{name}: stopped: {exc}")
        checkpoint.finish(settings.out_dir, name)
    finished, stopped = [], {}
    for repeat in range(repeats):
        folder = repeat_dir(settings.out_dir, repeat)
        if (folder / STOPPED_FILE).is_file():
            stopped[repeat] = json.loads((folder / STOPPED_FILE).read_text())["reason"]
        elif (folder / "model.json").is_file():
            nomogram = folder / "nomogram.json"
            finished.append((json.loads((folder / "model.json").read_text())["models"],
                             json.loads(nomogram.read_text()) if nomogram.is_file() else None))
        else:
            stopped[repeat] = "not run"
    atomic_write_json(settings.out_dir / "repeats.json", repeat_summary(finished, stopped))
    progress(f"repeated splits: {len(finished)} of {repeats} finished")


def run_models(transport: Transport, nodes: dict[int, str], harmonized: dict[int, str],
               prepared: PrepareSummary, settings: StudySettings, progress: Progress) -> None:
    """Phase 4: the radiomics model on raw features at every site, and on harmonized ones at
    the ``harmonized`` sites when there are min-sites of them (``model.json``; each site also
    scores the federated model updated on its own rows, on the last features it has); then the
    nomogram when the protocol names clinical factors (``nomogram.json``; classification and
    survival), on harmonized features when every site has them."""
    names = prepared.kept[0].feature_names
    two_passes = len(harmonized) >= settings.min_sites
    # each site updates the federated model once: the harmonized one where it has it
    protocol = settings.protocol
    update = (frozenset(nodes.values()) if protocol.validation.site_update
              else frozenset[str]())
    later = frozenset(harmonized.values()) if two_passes else frozenset[str]()
    progress("phase 4/5 radiomics model on raw features")
    passes = [run_model(transport, nodes, names, settings, False, progress, update - later)]
    if two_passes:
        progress("phase 4/5 radiomics model on harmonized features")
        passes.append(run_model(transport, harmonized, names, settings, True, progress,
                                update & later))
    atomic_write_json(settings.out_dir / "model.json",
                      {"models": [report for _, _, report in passes]})
    if protocol.model.clinical and protocol.task.kind is not TaskKind.REGRESSION:
        on_harmonized = len(passes) == 2 and harmonized == nodes
        models, sets, report = passes[-1] if on_harmonized else passes[0]
        # a logistic nomogram's risk cut-off (a Cox model's has none)
        prevalence = {n: t["prevalence"] for n, t in report["training_sets"].items()
                      if "prevalence" in t}
        atomic_write_json(settings.out_dir / "nomogram.json", run_nomogram(
            transport, nodes, settings, models, sets, prevalence, on_harmonized, progress))
