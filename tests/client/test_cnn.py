"""The site's 3D CNN: crops, local training (FedAvg and FedProx), evaluation, weights as arrays.

Longer than 400 lines: crops, rounds and evaluation are tested on the one prepared site below.

One small synthetic site (16 patients) is prepared once for the module; tests that change its
files or its prepared table work on copies. The protocol keeps first-order features only and no
N4 correction, so that preparation takes seconds.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from client.cnn.crops import crop_path, crop_volume, prepare_crops
from client.cnn.device import select_device
from client.cnn.evaluate import _split_metrics, evaluate_arrays
from client.cnn.train import TargetScale, TrainResult, train_round
from client.phases.prepare import prepare
from client.workspace import PREPARED_FILE, study_dir
from common.errors import ConfigError
from common.glm import ModelError
from common.network import build_network, float32_nbytes, load_state_arrays, state_arrays
from common.payloads import MIN_ROWS_SENT, CnnMetrics, SplitMetrics
from common.protocol import CnnSpec, RadiomicsSpec, StudyProtocol, TaskKind, TaskSpec, load_protocol
from common.provenance import atomic_write_parquet
from common.site_config import SiteConfig
from common.synthetic import CohortSpec, make_sites, write_cohort
from tests.conftest import make_volume

SPEC = CnnSpec(architecture="resnet10", crop_size=(16, 16, 8), batch_size=6, learning_rate=1e-3)
N_PATIENTS = 16


@dataclass(frozen=True)
class Study:
    cohort: Path
    site: SiteConfig
    protocol: StudyProtocol
    initial: dict[str, np.ndarray]


def _fast(protocol: StudyProtocol, **update: object) -> StudyProtocol:
    std = protocol.standardization.without_study_standard().model_copy(
        update={"bias_correction": None})
    return protocol.model_copy(update={
        "standardization": std, "radiomics": RadiomicsSpec(feature_classes={"firstorder": ()}),
        "cnn": SPEC, **update})


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    root = tmp_path_factory.mktemp("cnn")
    write_cohort(root / "cohort", CohortSpec(make_sites((N_PATIENTS,))), workers=2)
    protocol = _fast(load_protocol(root / "cohort" / "study.yaml"))
    site = SiteConfig(site_name="site_A", manifest=root / "cohort" / "site_A" / "manifest.csv",
                      work_dir=root / "work", workers=2)
    reply = prepare(site, protocol, seed=0, test_fraction=0.3)
    assert reply.status == "ok" and reply.n_train + reply.n_test == N_PATIENTS
    initial = state_arrays(build_network(SPEC, protocol.task.kind, seed=0))
    return Study(root / "cohort", site, protocol, initial)


@pytest.fixture(scope="module")
def trained(study: Study) -> TrainResult:
    """Round 0 of study seed 0 from the initial weights."""
    return train_round(study.site, study.protocol, study.initial, round_index=0, seed=0)


def _copy_site(study: Study, tmp_path: Path) -> SiteConfig:
    """The site's files and work folder (prepared table, crop cache) copied, to be changed."""
    shutil.copytree(study.site.manifest.parent, tmp_path / "site_A")
    shutil.copytree(study.site.work_dir, tmp_path / "work")
    return study.site.model_copy(update={"manifest": tmp_path / "site_A" / "manifest.csv",
                                         "work_dir": tmp_path / "work"})


def _with_cnn(study: Study, **changes: object) -> StudyProtocol:
    """The study with other CNN settings; its (new) study folder gets the prepared table and
    crops, which do not depend on those settings."""
    protocol = study.protocol.model_copy(
        update={"cnn": study.protocol.cnn.model_copy(update=changes)})
    target = study_dir(study.site, protocol)
    if not target.exists():
        shutil.copytree(study_dir(study.site, study.protocol), target)
    return protocol


def _prepared(site: SiteConfig, protocol: StudyProtocol) -> pd.DataFrame:
    return pd.read_parquet(study_dir(site, protocol) / PREPARED_FILE)


def _parameter_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                        names: list[str]) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in names)))


# --- crops ----------------------------------------------------------------------------------------

def test_a_crop_is_centred_on_the_roi_and_z_scored_inside_it():
    image, labels = make_volume((12, 30, 30), spacing=(1.0, 1.0, 2.0))  # ROI: a centred cube
    roi = sitk.Cast(sitk.Equal(labels, 1), sitk.sitkUInt8)

    crop = crop_volume(image, roi, roi, (20, 16, 8))

    assert crop.shape == (8, 16, 20) and crop.dtype == np.float32  # (z, y, x)
    inside = np.abs(crop) > 0
    assert inside.any() and not inside[:, 0, :].any() and not inside[:, :, 0].any()
    assert not inside[0].any() and not inside[-1].any()  # the margin is outside the ROI
    centre = np.argwhere(inside).mean(axis=0)
    np.testing.assert_allclose(centre, (np.array(crop.shape) - 1) / 2.0, atol=1.0)
    middle = crop[3:5, 6:10, 8:12]  # deep inside the cube: z-scored ROI intensities
    assert abs(float(middle.mean())) < 0.6 and 0.4 < float(middle.std()) < 1.6


def test_crops_have_the_documented_shape_and_the_second_call_reads_the_cache(
        study: Study, monkeypatch: pytest.MonkeyPatch):
    table = _prepared(study.site, study.protocol)
    crop_path(study.site, study.protocol).unlink(missing_ok=True)

    crops = prepare_crops(study.site, study.protocol)

    x, y, z = SPEC.crop_size
    assert crops.crops.shape == (N_PATIENTS, z, y, x) and crops.crops.dtype == np.float32
    assert np.isfinite(crops.crops).all() and crops.skipped == {}
    assert list(crops.case_ids) == table.case_id.tolist()
    assert list(crops.splits) == table.split.tolist()
    label = study.protocol.task.label_column
    np.testing.assert_array_equal(crops.labels, table[label].to_numpy(float))
    assert crop_path(study.site, study.protocol).is_file()

    def no_loading(*args: object) -> None:
        raise AssertionError("a cached crop was loaded again")

    monkeypatch.setattr("client.cnn.crops.load_case", no_loading)
    again = prepare_crops(study.site, study.protocol)
    assert again.cached and not crops.cached
    np.testing.assert_array_equal(again.crops, crops.crops)
    assert again.case_ids == crops.case_ids and again.splits == crops.splits


def test_a_new_preparation_makes_new_crops_and_a_case_that_fails_is_skipped(
        study: Study, tmp_path: Path):
    site = _copy_site(study, tmp_path)
    table = _prepared(site, study.protocol)
    train_ids = table[table.split == "train"].case_id.tolist()
    broken, dropped = train_ids[0], table[table.split == "test"].case_id.iloc[0]
    prepare_crops(site, study.protocol)  # made (or read) before the file breaks
    (site.manifest.parent / "images" / f"{broken}.nii.gz").write_bytes(b"not an image")

    assert prepare_crops(site, study.protocol).cached  # same table: the crops stay
    atomic_write_parquet(study_dir(site, study.protocol) / PREPARED_FILE,
                         table[table.case_id != dropped])
    crops = prepare_crops(site, study.protocol)

    assert not crops.cached
    assert dropped not in crops.case_ids and broken not in crops.case_ids
    assert len(crops.case_ids) == N_PATIENTS - 2
    assert list(crops.skipped) == [broken] and "image_unreadable" in crops.skipped[broken]
    result = train_round(site, study.protocol, study.initial, round_index=0, seed=0)
    assert result.n_examples == len(train_ids) - 1 and np.isfinite(result.loss)


def test_a_damaged_cache_is_made_again(study: Study, tmp_path: Path):
    site = _copy_site(study, tmp_path)
    original = prepare_crops(site, study.protocol)
    crop_path(site, study.protocol).write_bytes(b"PK\x03\x04 half a zip file")

    crops = prepare_crops(site, study.protocol)

    assert not crops.cached and crops.case_ids == original.case_ids
    np.testing.assert_array_equal(crops.crops, original.crops)
    assert prepare_crops(site, study.protocol).cached


def test_crops_come_from_the_volumes_the_extraction_kept(study: Study, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    site = _copy_site(study, tmp_path)
    kept = sorted(site.cache_dir.rglob("*.volume.npz"))
    assert len(kept) == N_PATIENTS  # one per extracted case, beside its features
    crop_path(site, study.protocol).unlink(missing_ok=True)  # made by an earlier test, or not

    def no_loading(*args: object) -> None:
        raise AssertionError("a case the extraction kept was loaded and standardized again")

    with monkeypatch.context() as patched:
        patched.setattr("client.cnn.crops.load_case", no_loading)
        from_kept = prepare_crops(site, study.protocol)
    assert from_kept.skipped == {} and len(from_kept.case_ids) == N_PATIENTS

    kept[0].write_bytes(b"PK\x03\x04 half a zip file")  # damaged: standardized again
    for path in kept[1:]:
        path.unlink()
    crop_path(site, study.protocol).unlink()
    fresh = prepare_crops(site, study.protocol)
    assert fresh.case_ids == from_kept.case_ids
    np.testing.assert_array_equal(fresh.crops, from_kept.crops)


def test_a_site_with_too_few_training_crops_sends_no_weights(study: Study, tmp_path: Path):
    site = _copy_site(study, tmp_path)
    table = _prepared(site, study.protocol)
    train = table[table.split == "train"].head(MIN_ROWS_SENT - 1)
    atomic_write_parquet(study_dir(site, study.protocol) / PREPARED_FILE,
                         pd.concat([train, table[table.split == "test"]]))

    with pytest.raises(ModelError, match="fewer than"):
        train_round(site, study.protocol, study.initial, round_index=0, seed=0)


def test_no_cnn_section_is_a_config_error(study: Study):
    with pytest.raises(ConfigError, match="cnn"):
        prepare_crops(study.site, study.protocol.model_copy(update={"cnn": None}))


# --- training -------------------------------------------------------------------------------------

def test_a_round_changes_the_weights_and_keeps_their_names_and_shapes(study: Study,
                                                                      trained: TrainResult):
    table = _prepared(study.site, study.protocol)

    result = trained

    assert result.n_examples == int((table.split == "train").sum())
    assert np.isfinite(result.loss) and result.loss > 0 and result.seconds > 0
    assert list(result.weights) == list(study.initial)
    for name, array in study.initial.items():
        assert result.weights[name].shape == array.shape, name
        assert result.weights[name].dtype == array.dtype, name
        assert np.isfinite(result.weights[name]).all(), name
    assert not np.array_equal(result.weights["conv1.weight"], study.initial["conv1.weight"])
    assert not np.array_equal(result.weights["bn1.running_mean"],  # buffers travel too
                              study.initial["bn1.running_mean"])
    assert int(result.weights["bn1.num_batches_tracked"]) == int(
        study.initial["bn1.num_batches_tracked"]) + int(np.ceil(result.n_examples / 6))


def test_the_same_seed_gives_the_same_weights_on_cpu(study: Study, trained: TrainResult):
    first = trained
    second = train_round(study.site, study.protocol, study.initial, round_index=0, seed=0)
    other = train_round(study.site, study.protocol, study.initial, round_index=1, seed=0)

    for name in study.initial:
        np.testing.assert_array_equal(first.weights[name], second.weights[name], err_msg=name)
    assert first.loss == second.loss
    assert not np.array_equal(first.weights["conv1.weight"], other.weights["conv1.weight"])


def test_fedprox_with_a_large_mu_stays_closer_to_the_global_weights(study: Study):
    names = [n for n, _ in build_network(SPEC, TaskKind.CLASSIFICATION).named_parameters()]
    free = _with_cnn(study, aggregator="fedprox", proximal_mu=0.0)
    held = _with_cnn(study, aggregator="fedprox", proximal_mu=100.0)

    drift_free = _parameter_distance(
        train_round(study.site, free, study.initial, round_index=0, seed=0).weights,
        study.initial, names)
    drift_held = _parameter_distance(
        train_round(study.site, held, study.initial, round_index=0, seed=0).weights,
        study.initial, names)

    assert 0 < drift_held < 0.7 * drift_free


# --- evaluation -----------------------------------------------------------------------------------

def test_evaluation_returns_numbers_and_nothing_of_patient_size(study: Study,
                                                               trained: TrainResult):
    table = _prepared(study.site, study.protocol)
    test = table[table.split == "test"]
    label = study.protocol.task.label_column
    weights = trained.weights

    metrics = evaluate_arrays(study.site, study.protocol, weights)

    assert isinstance(metrics, CnnMetrics) and metrics.site == "site_A"
    assert metrics.test.n == len(test) and metrics.test.n_positive == int(test[label].sum())
    assert metrics.train is not None and metrics.train.n == len(table) - len(test)
    assert 0.0 <= metrics.test.auc <= 1.0 and 0.0 <= metrics.train.auc <= 1.0
    assert np.isfinite(metrics.test.loss) and metrics.test.loss > 0
    assert np.isnan(metrics.test.pearson_r) and np.isnan(metrics.test.mae)
    record = metrics.as_record()
    assert record["test_n"] == len(test) and "train_auc" in record
    assert all(type(v) in (int, float) for v in record.values()), record
    for split in (metrics.test, metrics.train):
        assert all(type(getattr(split, f.name)) in (int, float)
                   for f in dataclasses.fields(SplitMetrics))
    only_test = evaluate_arrays(study.site, study.protocol, weights, include_train=False)
    assert only_test.train is None
    np.testing.assert_equal(dataclasses.astuple(only_test.test), dataclasses.astuple(metrics.test))


def test_metrics_over_fewer_rows_than_the_minimum_are_not_sent(study: Study):
    labels = np.array([0.0, 1.0, 0.0, 1.0])
    output = np.array([-1.0, 1.0, -0.5, 0.5], dtype=np.float32)

    few = _split_metrics(study.protocol, labels[: MIN_ROWS_SENT - 1], output[: MIN_ROWS_SENT - 1],
                         None)
    enough = _split_metrics(study.protocol, np.r_[labels, 0.0], np.r_[output, -2.0], None)

    assert few.n == MIN_ROWS_SENT - 1 and np.isnan([few.loss, few.auc]).all()
    assert enough.auc == 1.0 and np.isfinite(enough.loss)
    with pytest.raises(ModelError, match="not finite on some of this site's crops"):  # diverged
        _split_metrics(study.protocol, np.r_[labels, 0.0], np.r_[output, np.nan], None)


def test_regression_trains_on_the_scaled_target_and_reports_r_and_mae(study: Study,
                                                                      tmp_path: Path):
    site = _copy_site(study, tmp_path)
    task = TaskSpec(kind=TaskKind.REGRESSION, label_column="pci", value_range=(0.0, 100.0))
    protocol = study.protocol.model_copy(update={"task": task})
    # the same rows and split with the infiltration as label (as prepare would give, faster)
    pci = pd.read_csv(site.manifest).set_index("case_id")["pci"]
    table = _prepared(site, study.protocol)
    table = table.drop(columns=[study.protocol.task.label_column]).assign(
        pci=table.case_id.map(pci).to_numpy(float))
    atomic_write_parquet(study_dir(site, protocol) / PREPARED_FILE, table)
    initial = state_arrays(build_network(SPEC, TaskKind.REGRESSION, seed=0))

    result = train_round(site, protocol, initial, round_index=0, seed=0)
    metrics = evaluate_arrays(site, protocol, result.weights)

    assert np.isfinite(result.loss)
    assert -1.0 <= metrics.test.pearson_r <= 1.0 and 0.0 <= metrics.test.mae <= 100.0
    assert np.isnan(metrics.test.auc) and metrics.test.n_positive == 0
    assert TargetScale.from_protocol(protocol) == TargetScale(50.0, 50.0)
    with pytest.raises(ConfigError, match="value_range"):
        TargetScale.from_protocol(protocol.model_copy(update={"task": task.model_copy(
            update={"value_range": None})}))


# --- network and weights --------------------------------------------------------------------------

def test_the_initial_weights_depend_on_the_seed_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)

    a = state_arrays(build_network(SPEC, TaskKind.CLASSIFICATION, seed=5))
    b = state_arrays(build_network(SPEC, TaskKind.REGRESSION, seed=5))
    c = state_arrays(build_network(SPEC, TaskKind.CLASSIFICATION, seed=6))

    assert torch.equal(torch.rand(3), expected_next)  # the global RNG was left alone
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])
    assert a["fc.weight"].shape == (1, int(512 * SPEC.width))  # one output
    assert float32_nbytes(a) == 4 * sum(v.size for v in a.values())


def test_a_crop_too_small_for_the_network_is_a_config_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="at least 29 voxels"):  # when the protocol loads
        CnnSpec(architecture="densenet121", crop_size=(48, 48, 16))
    with pytest.raises(ValidationError, match="a left-out site has no normalization layers"):
        CnnSpec(leave_site_out=True, local_norm=True)
    with pytest.raises(ConfigError, match="densenet121"):
        build_network(SPEC.model_copy(update={"architecture": "densenet121"}),
                      TaskKind.CLASSIFICATION)


def test_load_state_arrays_refuses_bad_weights_by_name(study: Study):
    model = build_network(SPEC, TaskKind.CLASSIFICATION, seed=1)
    before = state_arrays(model)
    wrong_shape = {**study.initial, "layer1.0.conv1.weight": np.zeros((3, 3))}
    with_nan = {k: v.copy() for k, v in study.initial.items()}
    with_nan["fc.bias"][0] = np.nan
    missing = {k: v for k, v in study.initial.items() if k != "bn1.running_var"}

    with pytest.raises(ModelError, match=r"'layer1\.0\.conv1\.weight' has shape"):
        load_state_arrays(model, wrong_shape)
    with pytest.raises(ModelError, match=r"'fc\.bias' holds 1 non-finite"):
        load_state_arrays(model, with_nan)
    with pytest.raises(ModelError, match="bn1.running_var"):
        load_state_arrays(model, missing)

    after = state_arrays(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing half-loaded
    averaged = {k: (v.astype(np.float64) + 0.6 if v.dtype == np.int64 else v)
                for k, v in study.initial.items()}  # FedAvg of batch counters: floats
    load_state_arrays(model, averaged)
    loaded = state_arrays(model)
    assert int(loaded["bn1.num_batches_tracked"]) == int(study.initial["bn1.num_batches_tracked"]
                                                         ) + 1
    np.testing.assert_array_equal(loaded["conv1.weight"], study.initial["conv1.weight"])

    # noise (local DP) can leave a running variance below 0: clamped, the outputs stay finite
    noised = {k: v.copy() for k, v in study.initial.items()}
    noised["bn1.running_var"][:] = -0.5
    load_state_arrays(model, noised)
    assert state_arrays(model)["bn1.running_var"].min() == 0.0
    with torch.no_grad():
        output = model.eval()(torch.ones((2, 1, *SPEC.crop_size)))
    assert torch.isfinite(output).all()


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="is not auto, cpu or cuda"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            select_device("cuda")


def test_fedbn_keeps_the_normalization_layers_at_the_site(study: Study):
    from client.phases import cnn
    from common.messages import StudyConfig
    from common.network import norm_names, shared_arrays

    protocol = _with_cnn(study, local_norm=True)
    network = build_network(protocol.cnn, protocol.task.kind, seed=0)
    local, sent = norm_names(network), shared_arrays(protocol.cnn, network)
    assert local and not local & set(sent) and local | set(sent) == set(study.initial)
    assert any(name.endswith("running_mean") for name in local)
    kept = cnn.local_norm_path(study.site, protocol)
    kept.unlink(missing_ok=True)

    metrics, first = cnn.train(study.site, protocol, StudyConfig.of(protocol, server_round=1,
                                                                     seed=0), sent)
    assert set(first.weights) == set(sent) and metrics["num-examples"] > 0  # what travels
    with np.load(kept) as own:  # the trained normalization layers, here
        assert set(own.files) == local
        own_first = {k: own[k] for k in own.files}
    assert any(not np.array_equal(own_first[k], study.initial[k]) for k in local)
    # the next round completes the global weights with them, and trains them on
    full = cnn.with_local_norm(study.site, protocol, first.weights, seed=0)
    assert all(np.array_equal(full[k], own_first[k]) for k in local)
    cnn.train(study.site, protocol, StudyConfig.of(protocol, server_round=2, seed=0),
              first.weights)
    with np.load(kept) as own:
        assert any(not np.array_equal(own[k], own_first[k]) for k in local)
    # a study's first round starts from the initial network's, whatever a file holds
    fresh = cnn.with_local_norm(study.site, protocol, sent, seed=0, first_round=True)
    assert all(np.array_equal(fresh[k], study.initial[k]) for k in local)
    final = cnn.evaluate(study.site, protocol, StudyConfig.of(protocol, seed=0), first.weights)
    assert final["num-examples"] > 0
    kept.write_bytes(b"PK\x03\x04 half a zip file")  # damaged: the initial layers, named in the log
    damaged = cnn.with_local_norm(study.site, protocol, sent, seed=0)
    assert all(np.array_equal(damaged[k], study.initial[k]) for k in local)


def test_the_local_only_cnn_is_trained_and_scored_at_the_site_alone(study: Study):
    from client.phases import cnn
    from server.phases.validation import summary_rows

    local = cnn.local_baseline(study.site, study.protocol, seed=0)
    assert set(local) == {f"local_test_{k}" for k in ("n", "n_positive", "loss", "auc",
                                                      "pearson_r", "mae")}
    assert 0.0 <= local["local_test_auc"] <= 1.0 and local["local_test_n"] >= MIN_ROWS_SENT
    again = cnn.local_baseline(study.site, study.protocol, seed=0)  # seeded: the same
    assert (again["local_test_auc"], again["local_test_loss"]) == (local["local_test_auc"],
                                                                   local["local_test_loss"])
    off = _with_cnn(study, local_baseline=False)
    assert cnn.local_baseline(study.site, off, seed=0) == {}
    final = {"site_A": {"test_auc": 0.7, **local}}
    models = [{"harmonized": False, "loss": "logistic", "sites": {"site_A": {"n_test": 5}}}]
    _, rows = summary_rows(models, {"final": final})
    assert rows[0]["cnn"] == 0.7 and rows[0]["cnn_local"] == local["local_test_auc"]


def test_the_model_trained_without_the_site_gets_its_test_metrics_alone(study: Study):
    from client.phases import cnn
    from common.messages import StudyConfig
    from common.payloads import CNN_LEAVE_SITE_OUT

    asked = StudyConfig.of(study.protocol, seed=0, models=(CNN_LEAVE_SITE_OUT,))
    metrics = cnn.evaluate(study.site, study.protocol, asked, study.initial)
    assert set(metrics) == {"num-examples", "seconds", *(f"test_{k}" for k in (
        "n", "n_positive", "loss", "auc", "pearson_r", "mae"))}  # no local baseline, no CI


def test_the_final_model_is_fine_tuned_kept_and_scored_at_the_site(study: Study):
    from client.guard import cnn_metric_names
    from client.phases import cnn
    from server.phases.validation import summary_rows

    site = study.site  # the protocol below has a study folder of its own
    protocol = _with_cnn(study, fine_tune_epochs=2)
    scored = evaluate_arrays(site, protocol, study.initial, include_train=False).test
    tuned = cnn.fine_tuned(site, protocol, study.initial, seed=0, scored=scored)
    split = ("n", "n_positive", "loss", "auc", "pearson_r", "mae")
    assert set(tuned) == {*(f"{m}_test_{k}" for m in ("finetuned", "updated") for k in split),
                          "finetune_chosen", "held_out_loss_global", "held_out_loss_finetuned"}
    assert set(tuned) <= cnn_metric_names("evaluate")  # the guard lets its metrics leave
    # the site's choice, made on a quarter of its training crops, never on its test crops
    chosen = tuned["held_out_loss_finetuned"] < tuned["held_out_loss_global"]
    assert tuned["finetune_chosen"] == float(chosen)
    winner = "finetuned_test" if chosen else None
    for k in split:
        got, want = tuned[f"updated_test_{k}"], (tuned[f"{winner}_{k}"] if winner
                                                 else getattr(scored, k))
        assert got == want or (np.isnan(got) and np.isnan(want)), k
    kept = study_dir(site, protocol) / "cnn" / cnn.FINE_TUNED_FILE
    with np.load(kept) as model:  # every array of the network, trained on from the one given
        assert set(model.files) == set(study.initial)
        assert any(not np.array_equal(model[k], study.initial[k]) for k in model.files)
    # two epochs from the same model and seed: the metrics of the kept model
    two = train_round(site, protocol, study.initial, round_index=SPEC.rounds + 1, seed=0,
                      epochs=2).weights
    assert evaluate_arrays(site, protocol, two, include_train=False).test.auc == (
        tuned["finetuned_test_auc"])
    assert cnn.fine_tuned(site, _with_cnn(study), study.initial, 0, scored) == {}  # 0: none
    _, labels = prepare_crops(site, protocol).split("train")
    held = cnn.held_out_rows(labels, protocol, 0, site.site_name)
    assert held.sum() == np.ceil(len(labels) / 4)  # a quarter, stratified, the same each time
    assert 0 < labels[held].sum() < held.sum()
    assert np.array_equal(held, cnn.held_out_rows(labels, protocol, 0, site.site_name))
    final = {"site_A": {"test_auc": 0.7, **tuned}}
    models = [{"harmonized": False, "loss": "logistic", "sites": {"site_A": {"n_test": 5}}}]
    _, rows = summary_rows(models, {"final": final})
    assert rows[0]["cnn_finetuned"] == tuned["finetuned_test_auc"]


@pytest.mark.parametrize(("architecture", "width", "crop"), [
    ("resnet10", 0.25, (16, 16, 8)), ("resnet18", 0.5, (16, 16, 8)),
    ("densenet121", 1.0, (32, 32, 32))])
def test_the_embeddings_are_what_enters_the_last_linear_layer(architecture, width, crop):
    """The privacy guard sizes the first Harmony sums by ``CnnSpec.embedding_width`` without
    building the network: it must be the network's."""
    from client.cnn.embed import penultimate

    spec = CnnSpec(architecture=architecture, width=width, crop_size=crop)
    model = build_network(spec, TaskKind.CLASSIFICATION).eval()
    x = np.random.default_rng(0).normal(size=(3, crop[2], crop[1], crop[0])).astype(np.float32)
    embedded = penultimate(model, x, 2, torch.device("cpu"))
    assert embedded.shape == (3, spec.embedding_width)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # the last layer on the embeddings is the network's output
        logits = model(torch.from_numpy(x)[:, None]).numpy().ravel()
        again = last(torch.from_numpy(embedded.astype(np.float32))).numpy().ravel()
    np.testing.assert_allclose(again, logits, rtol=1e-4, atol=1e-5)
