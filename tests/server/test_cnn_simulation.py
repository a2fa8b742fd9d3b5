"""Phase 5 over Flower: the CNN trained with a Flower strategy, each site's metrics kept by name,
a checkpoint every round; a site sending NaN weights, weights of the wrong shape or an update
under another protocol is left out of the average, by name and reason, and a site that drops
out of a round is asked again the next. The weights travel in half precision (``cnn.transfer``),
the global model stays float32; the normalization layers stay at the sites (FedBN), and each
site fine-tunes the final model on its own crops (``cnn.fine_tune_epochs``). The CNN trained
without each site is scored there, and federated Harmony runs on the final CNN's embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.messages import MessageType
from common.network import build_network, norm_names, state_arrays
from harmonization.combat.design import CombatOptions
from server.study import StudySettings
from tests.server.studies import small_study

pytestmark = pytest.mark.slow


def misbehave_mod(partition: int, by_round: dict[int, str]):  # noqa: ANN201 - a Flower mod
    """One site's train replies go wrong in the rounds of ``by_round``: NaN weights, a weight
    of the wrong shape, another protocol's hash, or an error reply (the site dropped out)."""
    def mod(msg, context, call_next):  # noqa: ANN001, ANN202
        reply = call_next(msg, context)
        if (msg.metadata.message_type != MessageType.TRAIN or not reply.has_content()
                or int(context.node_config["partition-id"]) != partition):
            return reply
        how = by_round.get(int(msg.content["study"]["server-round"]))
        from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message

        weights = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        if how == "nan":
            weights = {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v
                       for k, v in weights.items()}
        elif how == "shape":
            name = next(k for k, v in weights.items() if v.ndim == 5)
            weights[name] = weights[name][:, :, :-1]
        elif how == "hash":
            reply.content["site"] = ConfigRecord({"name": "x", "protocol_hash": "0" * 64})
        elif how == "drop":
            return Message(Error(0, "connection lost"), reply_to=msg)
        reply.content["arrays"] = ArrayRecord({k: Array(np.require(v, requirements="C"))
                                               for k, v in weights.items()})
        return reply
    return mod


def test_cnn_rounds_over_flower_with_a_poisoned_site(tmp_path: Path) -> None:
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    cohort, protocol = small_study(tmp_path, (30, 34, 38), rounds=4, aggregator="fedmedian",
                                   transfer="float16", local_norm=True, fine_tune_epochs=1)
    settings = StudySettings(protocol, tmp_path / "out", min_sites=2, timeout_s=300, seed=1,
                             combat=CombatOptions(min_batch_size=3, min_cell=1),
                             radiomics=False)  # the CNN alone: what this test is about
    run_simulation(server_app=make_server_app(settings, lambda _: None),
                   # tiny synthetic sites: they allow cells of 1 (min_patients), as min_cell
                   client_app=make_client_app(cohort, min_patients=1, mods=[
                       misbehave_mod(2, {2: "nan", 3: "shape", 4: "hash"}),
                       misbehave_mod(1, {2: "drop"})]),
                   num_supernodes=3, backend_config={"client_resources": {"num_cpus": 1}})

    assert json.loads((tmp_path / "out" / "study.json").read_text())["status"] == "done"
    report = json.loads((tmp_path / "out" / "cnn.json").read_text())
    assert report["aggregator"] == "fedmedian" and report["weights_bytes"] > 1e5
    assert report["transfer"] == "float16" and report["local_norm"]
    network = build_network(protocol.cnn, protocol.task.kind)
    assert report["shared_tensors"] == len(state_arrays(network)) - len(norm_names(network))
    assert report["wire_bytes"] <= 0.52 * report["weights_bytes"]
    # (on failure, say who was left out of which round and why)
    assert set(report["history"]["1"]) == {"site_A", "site_B", "site_C"}, report["left_out"]
    assert set(report["history"]["2"]) == {"site_A"}  # fedmedian of one: site_A's weights
    for r in ("3", "4"):  # site_B is back after its drop; site_C stays out, each time named
        assert set(report["history"][r]) == {"site_A", "site_B"}
    left_out = {(e["round"], e["site"]): (e["kind"], e["reason"]) for e in report["left_out"]}
    assert set(left_out) == {(2, "site_B"), (2, "site_C"), (3, "site_C"), (4, "site_C")}
    assert left_out[2, "site_B"] == ("dropped", "error 0: connection lost")
    assert left_out[2, "site_C"][0] == "excluded" and "NaN" in left_out[2, "site_C"][1]
    assert "the model's is float16[" in left_out[3, "site_C"][1]
    assert "not the study's" in left_out[4, "site_C"][1]
    assert report["failed"] == {"site_C": "CNN round 2: " + left_out[2, "site_C"][1]}
    for metrics in report["history"]["2"].values():  # the model of round 1, at each site
        assert metrics["num-examples"] > 0 and np.isfinite(metrics["train_loss"])
        assert 0.0 <= metrics["global_test_auc"] <= 1.0
    # the final model, scored where it was not poisoned
    assert set(report["final"]) == {"site_A", "site_B"}
    for site, metrics in report["final"].items():
        assert 0.0 <= metrics["test_auc"] <= 1.0 and metrics["test_n"] >= 5
        assert metrics["test_auc_low"] <= metrics["test_auc"] <= metrics["test_auc_high"]
        # the site's local-only CNN, trained there alone: its metrics only
        assert 0.0 <= metrics["local_test_auc"] <= 1.0
        assert metrics["local_test_n"] == metrics["test_n"]
        # and the final model fine-tuned there one epoch, kept there: its metrics only
        assert 0.0 <= metrics["finetuned_test_auc"] <= 1.0
        assert metrics["updated_test_auc"] == metrics[
            "finetuned_test_auc" if metrics["finetune_chosen"] else "test_auc"]
        assert (cohort / "work" / site / "study" / protocol.short_hash / "cnn"
                / "fine_tuned.npz").is_file()
        # the site's own report: the CNN's metrics, ROC and Grad-CAM maps of its test cases
        folder = cohort / "work" / site / "study" / protocol.short_hash / "report"
        cnn = json.loads((folder / "evaluation_cnn.json").read_text())
        assert cnn["metrics"]["models"]["CNN"]["auc"] == pytest.approx(metrics["test_auc"],
                                                                        abs=1e-6)
        assert len(cnn["overlays"]) == 4 and cnn["roc"]["CNN"]
        assert "Grad-CAM" in (folder / "site_report.html").read_text()
    checkpoints = sorted((tmp_path / "out" / "cnn").glob("global_round_*.npz"))
    assert [c.name for c in checkpoints] == [f"global_round_{r:03d}.npz" for r in (1, 2, 3, 4)]
    with np.load(checkpoints[-1]) as final:
        assert all(final[k].dtype != np.float16 for k in final.files)  # kept in float32
        assert not set(final.files) & norm_names(network)  # FedBN: never at the server
        assert all(np.all(np.isfinite(final[k])) for k in final.files
                   if final[k].dtype.kind == "f")
    for site in ("site_A", "site_B", "site_C"):  # each site's own, at the site
        assert (cohort / "work" / site / "study" / protocol.short_hash / "cnn"
                / "local_norm.npz").is_file()
    # the multicentre report names every round a site was left out of, and why
    from server.report import write_report

    html = write_report(tmp_path / "out")["html"].read_text()
    assert "Rounds a site was left out of" in html and "error 0: connection lost" in html
    assert "Sites not scored with the final CNN" in html and "not the study&#39;s" in html


def test_the_cnn_trained_without_each_site_is_scored_there(tmp_path: Path) -> None:
    """The CNN's leave-one-site-out validation; and, in the same study (one simulation less),
    federated Harmony on its embeddings (``harmonization.embeddings``): each site keeps its
    cases' embeddings under the final CNN, Harmony runs on them in rounds of sums, every reply
    through the site's privacy guard; the sites keep the corrected embeddings, the coordinator
    the run's trace and the scanners' mixing before and after, and the report shows it."""
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from common.protocol import EmbeddingHarmonySpec, HarmonizationSpec
    from server.app import make_server_app
    from server.phases.validation import summary_rows
    from server.report import write_report

    cohort, protocol = small_study(tmp_path, (22, 22, 22), rounds=2, leave_site_out=True)
    protocol = protocol.model_copy(update={"harmonization": HarmonizationSpec(
        embeddings=EmbeddingHarmonySpec(n_components=4))})
    settings = StudySettings(protocol, tmp_path / "out", min_sites=2, timeout_s=300, seed=1,
                             until="cnn", radiomics=False)
    log = tmp_path / "sent.jsonl"  # the sites run in other processes: they append here

    def watch(msg, context, call_next):  # noqa: ANN001, ANN202 - a Flower mod
        reply = call_next(msg, context)
        harmony = (MessageType.HARMONY, MessageType.HARMONY_PRODUCTS)
        if msg.metadata.message_type in harmony and reply.has_content():
            with log.open("a") as out:
                out.write(json.dumps(sorted(reply.content.keys())) + "\n")
        return reply

    lines: list[str] = []
    run_simulation(server_app=make_server_app(settings, lines.append),
                   client_app=make_client_app(cohort, min_patients=1, mods=[watch]),
                   num_supernodes=3, backend_config={"client_resources": {"num_cpus": 1}})

    assert json.loads((tmp_path / "out" / "study.json").read_text())["status"] == "done", lines
    report = json.loads((tmp_path / "out" / "cnn.json").read_text())
    loso = report["leave_site_out"]
    assert set(loso["sites"]) == {"site_A", "site_B", "site_C"} and loso["skipped"] == {}, loso
    for site, metrics in loso["sites"].items():
        assert 0.0 <= metrics["test_auc"] <= 1.0
        assert metrics["test_n"] == report["final"][site]["test_n"]
        # its federation: the other two sites, every round, and its own records
        progress = json.loads((tmp_path / "out" / "cnn_loso" / site / "cnn_progress.json")
                              .read_text())
        assert [sorted(sites) for sites in progress["history"].values()] == [
            sorted(set(loso["sites"]) - {site})] * 2
        assert f"  CNN without {site}: 2 round(s) with " in "\n".join(lines)
    # the site's own report keeps the federated CNN's section, not the left-out model's
    folder = cohort / "work" / "site_A" / "study" / protocol.short_hash / "report"
    section = json.loads((folder / "evaluation_cnn.json").read_text())
    assert section["metrics"]["models"]["CNN"]["auc"] == pytest.approx(
        report["final"]["site_A"]["test_auc"], abs=1e-6)
    models = [{"harmonized": False, "loss": "logistic",
               "sites": {site: {"n_test": 7} for site in loso["sites"]}}]
    _, rows = summary_rows(models, report)  # the demo's table
    assert [r["cnn_left_out"] for r in rows] == [loso["sites"][s]["test_auc"]
                                                 for s in sorted(loso["sites"])]
    html = write_report(tmp_path / "out")["html"].read_text()
    assert "The CNN trained without each site, scored there" in html

    harmony = json.loads((tmp_path / "out" / "harmony.json").read_text())
    assert harmony["status"] == "done", harmony
    assert harmony["components"] == 4 and harmony["failed"] == {}
    assert set(harmony["sites"]) == {"site_A", "site_B", "site_C"}
    assert len(harmony["scanners"]) >= 3 and harmony["clusters"] == 2  # 66 cases / 30
    mixing = harmony["cluster_mixing"]  # these crops' embeddings are mixed already: kept so
    assert 1.0 <= mixing["before"] <= mixing["ceiling"] + 1e-9
    assert mixing["before"] - 0.05 <= mixing["after"] <= mixing["ceiling"] + 1e-9
    for site, mixing in harmony["sites"].items():
        folder = cohort / "work" / site / "study" / protocol.short_hash / "cnn"
        with np.load(folder / "embeddings.npz") as kept, \
                np.load(folder / "embeddings_harmonized.npz") as corrected:
            assert kept["values"].shape == (len(kept["case_ids"]), protocol.cnn.embedding_width)
            assert corrected["values"].shape == (len(kept["case_ids"]), 4)
        if mixing["scanners"] == 1:
            assert mixing["lisi_before"] == mixing["lisi_after"] == 1.0
    # what left the sites: sums under the payloads' names, never a per-case record
    sent = [set(json.loads(line)) for line in log.read_text().splitlines()]
    assert len(sent) == 3 * harmony["rounds"]
    allowed = {f"{name}.{part}" for name in ("products", "counts", "coreset", "masses",
                                             "ridge", "mixing") for part in ("meta", "arrays")}
    assert all(keys <= allowed for keys in sent), sent
    assert any("Harmony: " in line for line in lines)
    assert "Harmony on the CNN" in html and "LISI before" in html

