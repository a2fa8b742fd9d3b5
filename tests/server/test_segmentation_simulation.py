"""The segmentation phase over Flower's simulation engine: two sites with hand-drawn masks
train the network (FedAvg), a third site has no mask at all. That site says each round why it
sends nothing, gets the study's network at the end, makes its own masks with it (those that
fail quality control named and skipped), and runs the rest of the study on them: its radiomics
model is scored beside the manual-mask sites'. Every reply passes the privacy guard and the
shape audit; the coordinator and every site hold the same model file. With
``segmentation.leave_site_out``, each site with test masks is scored with the network the others
trained without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from client.segment.masks import AUTO_MASKS_FILE, MODEL_FILE, SEGMENTATION_DIR
from client.workspace import PREPARED_FILE
from common.messages import MessageType
from common.protocol import ModelSpec, SegmentationSpec, StudyProtocol, load_protocol
from common.segmenter import load_segmenter
from common.synthetic import CohortSpec, make_sites, write_cohort
from common.synthetic.variants import without_masks
from harmonization.combat.design import CombatOptions
from server.study import StudySettings
from tests.server.studies import audit_mod, no_patient_axis, render_in_chromium

pytestmark = pytest.mark.slow

SITES = ("site_A", "site_B", "site_C")


def test_a_site_without_masks_joins_with_the_federated_networks_masks(tmp_path: Path):
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    written = tmp_path / "written"
    write_cohort(written, CohortSpec(make_sites((24, 24, 44), True)), workers=2)
    cohort = without_masks(written, tmp_path / "cohort", {"site_C"})  # site_C drew no mask
    protocol = load_protocol(cohort / "study.yaml")
    protocol = StudyProtocol.model_validate(protocol.model_copy(update={
        "standardization": protocol.standardization.without_study_standard(),
        "model": ModelSpec(screening_top_k=5, cv_folds=3, n_lambdas=3), "cnn": None,
        "segmentation": SegmentationSpec(rounds=4, leave_site_out=True)}).model_dump())
    settings = StudySettings(protocol, tmp_path / "out", min_sites=2, timeout_s=300, seed=1,
                             combat=CombatOptions(min_batch_size=3, min_cell=1), until="model")
    run_simulation(server_app=make_server_app(settings, lambda _: None),
                   client_app=make_client_app(cohort, min_patients=1,
                                              mods=[audit_mod(tmp_path / "outgoing.jsonl")]),
                   num_supernodes=3, backend_config={"client_resources": {"num_cpus": 1}})
    out = tmp_path / "out"
    assert json.loads((out / "study.json").read_text())["status"] == "done"
    seg = json.loads((out / "segmentation.json").read_text())

    # site_C trained nothing, and said why each round; the others trained every round
    assert seg["trained_on"] == {"sites": ["site_A", "site_B"], "cases": 34}
    assert {e["round"] for e in seg["left_out"] if e["site"] == "site_C"} == {1, 2, 3, 4}
    assert all("0 training case(s) with a usable mask" in e["reason"]
               for e in seg["left_out"])
    assert [sorted(sites) for _, sites in sorted(seg["history"].items())] == [
        ["site_A", "site_B"]] * 4
    for site in ("site_A", "site_B"):
        final = seg["final"][site]
        assert final["test_n"] == 7 and final["auto_n"] == 0
        for v in (1, 2):
            assert 0 <= final[f"label_{v}_dice_low"] <= final[f"label_{v}_dice"] <= final[
                f"label_{v}_dice_high"] <= 1
        # the features from the network's masks against the hand-drawn ones' (ICC(3,1))
        assert final["icc_n"] == 7 and 0 <= final["icc_good_share"] <= 1
        assert -1 <= final["icc_median"] <= 1
    final_c = seg["final"]["site_C"]
    assert final_c["test_n"] == 0 and final_c["label_1_dice"] is None
    assert "icc_good_share" not in final_c
    assert final_c["auto_n"] == 44 and final_c["auto_used"] > 0

    # leave-site-out: the network of the others, scored on each site's own test masks; not
    # at site_C, which has none
    loso = seg["leave_site_out"]
    assert sorted(loso["sites"]) == ["site_A", "site_B"]
    assert loso["skipped"] == {"site_C": "no held-out hand-drawn masks to score it on"}
    for site, metrics in loso["sites"].items():
        assert metrics["test_n"] == 7 and 0 <= metrics["label_1_dice"] <= 1
        assert "auto_n" not in metrics  # scored, nothing made or kept
        progress = json.loads((out / "segmentation_loso" / site /
                               "segmentation_progress.json").read_text())
        assert all(site not in sites for sites in progress["history"].values())

    # one model file: the coordinator's, and each site's copy
    header, network = load_segmenter(out / "segmentation" / MODEL_FILE, protocol)
    assert header.trained_on == seg["trained_on"]
    weights = {k: v.detach().numpy() for k, v in network.state_dict().items()}
    for site in SITES:
        study = cohort / "work" / site / "study" / protocol.short_hash
        copy, copied = load_segmenter(study / SEGMENTATION_DIR / MODEL_FILE, protocol)
        assert copy == header
        assert all(np.array_equal(v.detach().numpy(), weights[k])
                   for k, v in copied.state_dict().items())

    # site_C's masks: each made one is a label map on its image's grid; each refusal named
    study_c = cohort / "work" / "site_C" / "study" / protocol.short_hash
    made = json.loads((study_c / SEGMENTATION_DIR / AUTO_MASKS_FILE).read_text())["cases"]
    used = {case: entry["mask"] for case, entry in made.items() if "mask" in entry}
    refused = {case: entry["reason"] for case, entry in made.items() if "reason" in entry}
    assert len(used) == final_c["auto_used"] and len(used) + len(refused) == 44
    assert all(refused.values())
    case = next(iter(used))
    image = sitk.ReadImage(str(written / "site_C" / "images" / f"{case}.nii.gz"))
    mask = sitk.ReadImage(used[case])
    assert mask.GetSize() == image.GetSize() and mask.GetOrigin() == image.GetOrigin()
    assert set(np.unique(sitk.GetArrayViewFromImage(mask))) == {0, 1, 2}

    # the preparation used them: site_C's table is its auto-segmented cases, marked
    prepare = json.loads((out / "prepare.json").read_text())
    by_site = {s["site"]: s for s in prepare["sites"]}
    assert by_site["site_C"]["status"] == "ok"
    table_c = pd.read_parquet(study_c / PREPARED_FILE)
    assert set(table_c["case_id"]) <= set(used) and set(table_c["mask_source"]) == {"auto"}
    table_a = pd.read_parquet(cohort / "work" / "site_A" / "study" / protocol.short_hash
                              / PREPARED_FILE)
    assert set(table_a["mask_source"]) == {"manual"}

    # its radiomics model is scored beside the manual-mask sites'
    raw = next(m for m in json.loads((out / "model.json").read_text())["models"]
               if not m["harmonized"])
    assert {"site_A", "site_B", "site_C"} <= set(raw["sites"])
    assert raw["sites"]["site_C"]["metrics"]["federated"]["auc"] is not None

    # the shape audit: a train reply is the network's weights, shaped by the protocol alone
    # (its channels may equal a patient count by chance); nothing else a site sent has a
    # dimension or a list as long as its patients
    audit = tmp_path / "outgoing.jsonl"
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    shapes = sorted(list(v.shape) for v in network.state_dict().values())
    trained = [e for e in entries if e["type"] == MessageType.TRAIN and e["arrays"]]
    assert trained and all(sorted(e["arrays"]) == shapes for e in trained)
    audit.write_text("".join(json.dumps(e) + "\n" for e in entries
                             if e["type"] != MessageType.TRAIN))
    sent = no_patient_axis(audit, prepare)
    assert MessageType.EVALUATE in {e["type"] for e in sent}
    report = (out / "report.html").read_text()
    assert "Segmentation network (unet, fedavg, 4 rounds)" in report
    assert "Dice without the site (leave-site-out)" in report
    # each site's own report: its test cases drawn with both masks; site_C's masks made
    pages = {site: cohort / "work" / site / "study" / protocol.short_hash / "report" /
             "site_report.html" for site in SITES}
    assert "test case site_A_" in pages["site_A"].read_text()
    assert "of 107\nfeatures at 0.75 or above" in pages["site_A"].read_text()
    assert "Masks made for the cases without one (44)" in pages["site_C"].read_text()
    render_in_chromium([out / "report.html", pages["site_A"]])
