from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from common.presets import list_presets
from common.protocol import StudyProtocol, load_protocol, protocol_from_mapping

MINIMAL = {"name": "t", "modality": "CT", "task": {"kind": "classification"}}


def test_every_preset_loads_and_hashes():
    names = list_presets()
    assert {"ibsi_ct_a", "ibsi_ct_e", "ibsi_digital_phantom", "spine_mri_t1w", "wb_ldct",
            "pet_ct", "spine_mri_pci"} <= set(names)
    hashes = {load_protocol(f"preset:{n}").content_hash() for n in names}
    assert len(hashes) == len(names)  # every preset is a different protocol


def test_hash_is_stable_across_formats_and_key_order(tmp_path: Path):
    toml = tmp_path / "p.toml"
    toml.write_text('modality = "CT"\nname = "t"\n[task]\nkind = "classification"\n')
    yaml = tmp_path / "p.yaml"
    yaml.write_text("task:\n  kind: classification\nname: t\nmodality: CT\n")
    a, b = load_protocol(toml), load_protocol(yaml)
    assert a == b
    assert a.content_hash() == b.content_hash() == protocol_from_mapping(MINIMAL).content_hash()
    changed = protocol_from_mapping({**MINIMAL, "radiomics": {"bin_width": 10.0}})
    assert changed.content_hash() != a.content_hash()


@pytest.mark.parametrize(
    ("patch", "field", "reason"),
    [
        ({"modality": "XR"}, "modality", "Input should be 'CT', 'MR' or 'PET'"),
        ({"radiomics": {"bin_width": -1}}, "radiomics.bin_width", "greater than 0"),
        ({"radiomics": {"feature_classes": {"glcmm": []}}}, "radiomics", "unknown feature classes"),
        ({"standardization": {"resegmentation_range": [400, -1000]}}, "standardization",
         "low < high"),
        ({"standardization": {"normalization": {"method": "zscore"}}}, "(top level)",
         "normalization is for MR protocols only"),
        ({"ingestion": {"min_roi_voxel": 3}}, "ingestion.min_roi_voxel", "Extra inputs"),
        ({"harmonization": {"covbat": {"pct_var": 1.0}}}, "harmonization.covbat.pct_var",
         "less than 1"),
        ({"task": {"kind": "regression", "classes": ["a", "b"]}}, "task", "classification"),
        ({"task": {"kind": "survival", "label_column": "pfs_months"}}, "task",
         "a survival task needs 'event_column'"),
        ({"task": {"kind": "regression", "event_column": "pfs_event"}}, "task",
         "'event_column' only applies to survival tasks"),
        ({"task": {"kind": "survival", "label_column": "t", "event_column": "e"}, "cnn": {}},
         "(top level)", "the CNN does not train on survival times yet"),
        ({"validation": {"times": [24, 12]}}, "validation", "validation.times must increase"),
        ({"modality": "MR", "standardization": {"normalization": {
            "method": "zscore", "reference_roi": "Muscle"}}}, "standardization.normalization",
         "'reference_roi' only applies to reference_tissue"),
    ],
)
def test_validation_error_names_field_and_reason(patch, field, reason):
    with pytest.raises(ConfigError) as err:
        protocol_from_mapping({**MINIMAL, **patch}, source="study.toml")
    text = str(err.value)
    assert text.startswith("study.toml: invalid")
    assert any(p.startswith(f"{field}:") and reason in p for p in err.value.problems), text


def test_unreadable_files_are_config_errors(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_protocol(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_protocol(tmp_path / "absent.toml")
    other = tmp_path / "p.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match="unknown format"):
        load_protocol(other)
    with pytest.raises(ConfigError, match="no such preset"):
        load_protocol("preset:nope")


def test_deeply_nested_or_huge_files_are_config_errors(tmp_path: Path):
    """A protocol nested 20,000 deep overflowed the parsers' recursion (RecursionError)."""
    deep_yaml = tmp_path / "deep.yaml"
    deep_yaml.write_text("name: " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        load_protocol(deep_yaml)
    block = tmp_path / "block.yaml"
    block.write_text("a:\n" + "".join("  " * i + "b:\n" for i in range(1, 500)))
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        load_protocol(block)
    deep_toml = tmp_path / "deep.toml"
    deep_toml.write_text("name = " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        load_protocol(deep_toml)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * 2_000_000 + "\n")
    with pytest.raises(ConfigError, match="not a configuration file"):
        load_protocol(huge)


def test_mr_reference_tissue_needs_distinct_label():
    with pytest.raises(ConfigError, match="must differ"):
        protocol_from_mapping({
            **MINIMAL, "modality": "MR",
            "standardization": {"normalization": {"method": "reference_tissue",
                                                  "reference_label": 1}},
        })
    ok = protocol_from_mapping({
        **MINIMAL, "modality": "MR",
        "standardization": {"normalization": {"method": "reference_tissue",
                                              "reference_label": 2}},
    })
    assert isinstance(ok, StudyProtocol)


def test_json_round_trip_keeps_open_bounds():
    pet = load_protocol("preset:pet_ct")
    assert pet.standardization.resegmentation_range == (0.0, float("inf"))
    again = StudyProtocol.model_validate_json(pet.model_dump_json())
    assert again == pet and again.content_hash() == pet.content_hash()


def test_combat_protects_only_the_covariates_named_in_harmonize():
    from common.payloads import PrepareReply
    from server.phases.combat import combat_design

    base = load_protocol("preset:spine_mri_t1w").model_dump(mode="json")
    base["covariates"] = {"continuous": ["age"], "categorical": {"sex": ["F", "M"],
                                                                 "iss_stage": ["I", "II", "III"]},
                          "harmonize": ["age", "sex"]}
    base["model"] = {"clinical": ["iss_stage", "age"]}
    protocol = protocol_from_mapping(base)
    design, _ = combat_design(protocol, [PrepareReply("A", "ok", batches="s1:20")])
    # the label (preset: classification) is protected while estimating, not when applying
    label = protocol.task.label_column
    assert design.categorical == (("sex", ("F", "M")), (label, ("0", "1")))
    assert design.continuous == ("age",) and design.fit_only == (label,)
    base["covariates"]["protect_outcome"] = False
    design, _ = combat_design(protocol_from_mapping(base),
                              [PrepareReply("A", "ok", batches="s1:20")])
    assert [c for c, _ in design.categorical] == ["sex"] and design.fit_only == ()

    base["covariates"]["harmonize"] = ["stage"]
    with pytest.raises(ConfigError, match="harmonize names \\['stage'\\]"):
        protocol_from_mapping(base)
    base["covariates"]["harmonize"] = None
    base["model"] = {"clinical": ["ecog"]}
    with pytest.raises(ConfigError, match="model.clinical names \\['ecog'\\]"):
        protocol_from_mapping(base)


@pytest.mark.parametrize(("config", "reseg", "bins"), [
    ("a", (-500.0, 400.0), ("fixed_bin_size", 25.0)),
    ("b", (-500.0, 400.0), ("fixed_bin_number", 32)),
    ("c", (-1000.0, 400.0), ("fixed_bin_size", 25.0)),
    ("d", None, ("fixed_bin_number", 32)),
    ("e", (-1000.0, 400.0), ("fixed_bin_number", 32)),
])
def test_the_ibsi_presets_follow_the_ibsi_configurations(config, reseg, bins):
    """IBSI-1's CT configurations A to E (its manual's table of configurations): the
    re-segmentation range and the discretization of each preset (config B had [-1000, 400])."""
    protocol = load_protocol(f"preset:ibsi_ct_{config}")
    assert protocol.standardization.resegmentation_range == reseg
    method, value = bins
    assert protocol.radiomics.discretization == method
    assert (protocol.radiomics.bin_width if method == "fixed_bin_size"
            else protocol.radiomics.bin_count) == value


def _full_protocol() -> dict:
    """A protocol with every optional section set, so every numeric field is in its dump."""
    mapping = load_protocol("preset:spine_mri_t1w").model_dump(mode="json")
    mapping["task"] = {"kind": "regression", "label_column": "pci", "value_range": [0, 100]}
    mapping["standardization"]["outlier_sigma"] = 3.0
    mapping["radiomics"].update(ivh_discretization="fixed_bin_size", ivh_bin_width=2.5,
                                discretization="fixed_bin_number", bin_count=32, bin_width=25.0,
                                ivh_bin_count=100)
    mapping["radiomics"]["image_types"]["log_sigma_mm"] = [1.0, 2.0]
    mapping["model"].update(clinical=["age"], clinical_ranges={"age": [40, 90]})
    mapping["cnn"] = {"local_dp": {"epsilon": 0.5}}
    mapping["standardization"]["histogram"] = {"scale": 250.0}
    mapping["harmonization"] = {"covbat": {"pct_var": 0.9, "n_pc": 3}}
    mapping = protocol_from_mapping(mapping).model_dump(mode="json")
    assert mapping["cnn"]["local_dp"] and mapping["standardization"]["normalization"]
    assert mapping["harmonization"]["covbat"]["n_pc"] == 3
    return mapping


def _numeric_leaves(value, path=()):
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numeric_leaves(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numeric_leaves(item, (*path, i))


#: Numbers whose whole real line is meaningful: a re-segmentation bound may be -inf or inf (an
#: open side) and any finite HU or SUV; the pair's order is checked instead.
_UNBOUNDED = {("standardization", "resegmentation_range", 0),
              ("standardization", "resegmentation_range", 1)}


@pytest.mark.parametrize("wild", [1e30, -1e30, float("nan")])
def test_every_numeric_protocol_field_has_a_sane_range(wild):
    """Every number a protocol holds is refused, naming its field, when it is absurd (10^30,
    -10^30, NaN): nothing sized by a protocol value reaches a case unbounded."""
    import copy

    full = _full_protocol()
    leaves = list(_numeric_leaves(full))
    assert len(leaves) > 60
    accepted = []
    for path in leaves:
        if path in _UNBOUNDED and wild == wild:  # NaN is refused there too
            continue
        mapping = copy.deepcopy(full)
        target = mapping
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = wild
        try:
            protocol_from_mapping(mapping)
        except ConfigError as exc:
            named = ".".join(str(p) for p in path if not isinstance(p, int))
            assert named.split(".")[-1] in str(exc), (path, str(exc))
        else:
            accepted.append(path)
    assert not accepted, f"absurd value {wild} accepted at {accepted}"
