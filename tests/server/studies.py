"""What several server tests set up alike: a synthetic cohort with a study protocol cut down
for speed, and a site's config file for a deployment on this machine."""

from __future__ import annotations

import json
from pathlib import Path

from common.protocol import CnnSpec, ModelSpec, StudyProtocol, load_protocol
from common.synthetic import CohortSpec, make_sites, write_cohort


def small_study(tmp_path: Path, sizes: tuple[int, ...], **cnn: object
                ) -> tuple[Path, StudyProtocol]:
    """A cohort of ``sizes`` patients per site (scanner effects on) under ``tmp_path/cohort``,
    and its protocol with a small radiomics search and a small CNN (``cnn``: the other
    :class:`CnnSpec` fields, e.g. rounds and aggregator)."""
    cohort = tmp_path / "cohort"
    write_cohort(cohort, CohortSpec(make_sites(sizes, True)), workers=2)
    protocol = load_protocol(cohort / "study.yaml").model_copy(update={
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
