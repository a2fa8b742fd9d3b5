"""The coordinator's study, independent of Flower: its settings (Flower's run config, typed
once), the rule that stops it, and its checkpoint (what a restarted coordinator reads back).
The phases are in :mod:`server.phases`; :mod:`server.orchestrator` runs them in order."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError, MyeloFedError
from common.protocol import StudyProtocol, load_protocol
from common.provenance import atomic_write_json
from harmonization.combat.design import CombatOptions

PHASES = ("handshake", "segmentation", "prepare", "combat", "model", "cnn")
#: Where a study says how it goes: a line per phase and round.
Progress = Callable[[str], None]


class StudyStopped(MyeloFedError):
    """The study cannot go on: too few sites left, with each excluded site and its reason."""


@dataclass(frozen=True)
class StudySettings:
    """What the coordinator decides for a run (Flower's run config, typed once)."""

    protocol: StudyProtocol
    out_dir: Path
    min_sites: int = 2
    min_cases_per_site: int = 10
    timeout_s: float = 600.0
    seed: int = 0
    test_fraction: float = 0.3
    combat: CombatOptions = CombatOptions()
    until: str = PHASES[-1]  # the last phase to run
    radiomics: bool = True  # False: an image-only study (no ComBat, no radiomics model)
    #: The split the phases work on (``validation.repeats``): the orchestrator sets it for the
    #: repeated splits' preparation, ComBat and models; it is not a setting of the run.
    repeat: int = 0

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> StudySettings:
        try:
            protocol = load_protocol(str(run_config.get("protocol", "preset:spine_mri_t1w")))
            settings = cls(protocol, Path(str(run_config.get("out-dir", "myelofed-study"))),
                           int(run_config.get("min-sites", 2)),
                           int(run_config.get("min-cases-per-site", 10)),
                           float(run_config.get("timeout-s", 600.0)),
                           int(run_config.get("seed", 0)),
                           float(run_config.get("test-fraction", 0.3)),
                           CombatOptions(
                               min_batch_size=int(run_config.get("combat-min-batch-size", 10)),
                               min_cell=int(run_config.get("combat-min-cell", 5))),
                           str(run_config.get("until", PHASES[-1])),
                           _flag(run_config.get("radiomics", True), "radiomics"))
        except (TypeError, ValueError) as exc:
            raise ConfigError("run config", [str(exc)]) from None
        if settings.min_sites < 1 or settings.min_cases_per_site < 1:
            raise ConfigError("run config", ["min-sites and min-cases-per-site must be >= 1"])
        return settings

    def __post_init__(self) -> None:
        if self.until not in PHASES:
            raise ConfigError("run config", [f"until: '{self.until}' is not one of "
                                             f"{', '.join(PHASES)}"])

    def to_run_config(self, protocol_source: str) -> dict[str, str | int | float]:
        """The run config that makes ``flwr run`` use these settings (the inverse of
        :meth:`from_run_config`; the protocol travels as a file or preset name)."""
        return {"protocol": protocol_source, "out-dir": str(self.out_dir),
                "min-sites": self.min_sites, "min-cases-per-site": self.min_cases_per_site,
                "timeout-s": self.timeout_s, "seed": self.seed,
                "test-fraction": self.test_fraction,
                "combat-min-batch-size": self.combat.min_batch_size,
                "combat-min-cell": self.combat.min_cell, "until": self.until,
                "radiomics": self.radiomics}

    def runs(self, phase: str) -> bool:
        """Whether ``phase`` is part of this run: phases up to ``until``, without ComBat and
        the radiomics model in an image-only study (``radiomics`` False)."""
        if phase in ("combat", "model") and not self.radiomics:
            return False
        return PHASES.index(phase) <= PHASES.index(self.until)


def _flag(value: object, key: str) -> bool:
    """A boolean of the run config (TOML true/false, or the words from a command line)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"{key}: {value!r} is not true or false")


def excluded_detail(excluded: dict[str, str]) -> str:
    """`` (site: why; ...)``, naming every excluded site in a stop reason (empty: none)."""
    return f" ({'; '.join(f'{s}: {why}' for s, why in sorted(excluded.items()))})" \
        if excluded else ""


def require_sites(replies: dict[str, Any], failed: dict[str, str], settings: StudySettings,
                  phase: str) -> None:
    """Stop the study, naming every failed site, when fewer than min-sites answered."""
    if len(replies) < settings.min_sites:
        detail = "; ".join(f"{site}: {why}" for site, why in sorted(failed.items()))
        raise StudyStopped(f"{phase}: {len(replies)} site(s) answered, fewer than min-sites = "
                           f"{settings.min_sites} ({detail or 'no site connected'})")


# --- resuming a study after a coordinator restart ---------------------------------------------

CHECKPOINT = "checkpoint.json"
#: The files a study writes in its out-dir (a fresh start removes an earlier study's).
STUDY_FILES = ("protocol.json", "handshake.json", "prepare.json", "combat.json", "model.json",
               "nomogram.json", "cnn.json", "cnn_progress.json", "harmony.json",
               "segmentation.json", "segmentation_progress.json", "study.json", CHECKPOINT,
               "repeats.json", "report.html", "report.json", "report.csv")
#: The folder of the repeated splits' phase files (``validation.repeats``), one per split.
REPEATS_DIR = "repeats"
#: Run-config keys that do not change a study's results (so a restart may differ in them).
_OPERATIONAL = ("out-dir", "until", "timeout-s", "protocol")


def study_key(settings: StudySettings) -> str:
    """What decides a study's results: the protocol's hash and the other settings."""
    config = {k: v for k, v in settings.to_run_config("").items() if k not in _OPERATIONAL}
    text = json.dumps({"protocol": settings.protocol.content_hash(), **config}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Checkpoint:
    """How far a study got: its finished phases, in order, and the last CNN round whose global
    model is saved (``cnn/global_round_<r>.npz``). Written after each phase and each CNN round,
    so a coordinator restarted mid-study goes on from there (:func:`open_checkpoint`)."""

    key: str
    done: list[str] = field(default_factory=list)
    cnn_round: int = 0
    segmentation_round: int = 0

    def rounds_of(self, phase: str) -> int:
        """The last saved round of a network's phase (``cnn`` or ``segmentation``)."""
        return int(getattr(self, f"{phase}_round"))

    def set_rounds(self, phase: str, done: int) -> None:
        setattr(self, f"{phase}_round", done)

    def finished(self, phase: str) -> bool:
        return phase in self.done

    def finish(self, out_dir: Path, phase: str) -> None:
        if phase not in self.done:
            self.done.append(phase)
        self.save(out_dir)

    def save(self, out_dir: Path) -> None:
        atomic_write_json(out_dir / CHECKPOINT, asdict(self))


def open_checkpoint(settings: StudySettings) -> tuple[Checkpoint, bool]:
    """The checkpoint of this study and whether it resumes one.

    A study resumes when its out-dir holds the checkpoint of an unfinished study (no
    ``study.json`` saying "done") with the same protocol and settings (:func:`study_key`;
    ``until`` and ``timeout-s`` may differ). Otherwise it starts afresh: the files of an earlier
    study in the out-dir are removed, so no stale phase shows in its report.
    """
    out = settings.out_dir
    key = study_key(settings)
    try:
        saved = json.loads((out / CHECKPOINT).read_text())
        status = json.loads((out / "study.json").read_text()).get("status") \
            if (out / "study.json").exists() else None
        if saved.get("key") == key and status != "done":
            return Checkpoint(key, [str(p) for p in saved.get("done", [])],
                              int(saved.get("cnn_round", 0)),
                              int(saved.get("segmentation_round", 0))), True
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    for name in STUDY_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "cnn", ignore_errors=True)
    shutil.rmtree(out / REPEATS_DIR, ignore_errors=True)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    checkpoint = Checkpoint(key)
    checkpoint.save(out)
    return checkpoint, False


