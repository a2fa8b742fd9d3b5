"""The site's own report folder: what a new run starts from."""

from __future__ import annotations

import json
from pathlib import Path

from client.report import record_prepare, report_dir
from client.workspace import (
    EMBEDDINGS_FILE,
    HARMONIZED_EMBEDDINGS_FILE,
    HARMONY_STATE_FILE,
    study_dir,
)
from common.payloads import PrepareReply
from common.protocol import load_protocol
from common.site_config import SiteConfig


def test_a_new_preparation_clears_the_last_runs_evaluations(tmp_path: Path) -> None:
    site = SiteConfig(site_name="site_A", manifest=tmp_path / "cases.csv",
                      work_dir=tmp_path / "work")
    protocol = load_protocol("preset:spine_mri_t1w")
    folder = report_dir(site, protocol)
    folder.mkdir(parents=True)
    (folder / "evaluation_cnn.json").write_text("{}")  # a CNN of an earlier run
    cnn = study_dir(site, protocol) / "cnn"  # and its embeddings, which Harmony would read
    cnn.mkdir()
    stale = [cnn / n for n in (EMBEDDINGS_FILE, HARMONY_STATE_FILE, HARMONIZED_EMBEDDINGS_FILE)]
    for path in stale:
        path.write_bytes(b"")
    (cnn / "crops.npz").write_bytes(b"")  # the crops' cache is keyed on its inputs: it stays
    record_prepare(site, protocol, PrepareReply("site_A", "ok", n_train=20, n_test=9),
                   [{"case_id": "c7", "row": 7, "reason": "mask_empty", "detail": "no voxel"}])
    assert not (folder / "evaluation_cnn.json").exists()
    assert not any(path.exists() for path in stale) and (cnn / "crops.npz").exists()
    written = json.loads((folder / "prepare.json").read_text())
    assert written["reply"]["n_train"] == 20 and "feature_names" not in written["reply"]
    assert written["skipped_cases"][0]["reason"] == "mask_empty"
