from __future__ import annotations

from pathlib import Path

import pytest

from client.manifest import read_manifest
from common.errors import ConfigError, SkipReason
from common.protocol import protocol_from_mapping

PROTOCOL = protocol_from_mapping({
    "name": "t", "modality": "MR",
    "task": {"kind": "classification", "label_column": "diagnosis",
             "classes": ["metastasis", "myeloma"]},
    "covariates": {"categorical": {"iss_stage": ["I", "II", "III"]}, "continuous": ["age"]},
    "batch_column": "scanner",
})


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_rows_are_typed_and_paths_resolved(tmp_path: Path):
    path = _write(tmp_path, "case_id,image,mask,diagnosis,iss_stage,age,scanner,roi\n"
                            "p1,img/p1.nii.gz,seg/p1.nii.gz,myeloma,II,63,GE_1.5T,\n"
                            "p2,dicom/p2,dicom/p2/RS.dcm,metastasis,I,70.5,Siemens_3T,Spine\n")
    cases, problems = read_manifest(path, PROTOCOL, default_batch="siteA")
    assert problems == []
    assert [c.label for c in cases] == [1.0, 0.0]
    assert cases[0].image == (tmp_path / "img" / "p1.nii.gz").resolve()
    assert cases[1].covariates == {"iss_stage": "I", "age": 70.5}
    assert cases[1].batch == "Siemens_3T" and cases[1].roi == "Spine"


def test_batch_defaults_to_site_when_column_absent(tmp_path: Path):
    path = _write(tmp_path, "case_id,image,mask,diagnosis,iss_stage,age\np1,a,b,myeloma,I,50\n")
    cases, _ = read_manifest(path, PROTOCOL, default_batch="siteA")
    assert cases[0].batch == "siteA"


def test_each_bad_row_is_named_and_the_rest_go_on(tmp_path: Path):
    path = _write(tmp_path, "case_id,image,mask,diagnosis,iss_stage,age,scanner\n"
                            "ok,a,b,myeloma,I,50,s1\n"
                            "dup,a,b,myeloma,I,50,s1\n"
                            "dup,a,b,myeloma,I,50,s1\n"
                            "nolabel,a,b,,I,50,s1\n"
                            "badlabel,a,b,lymphoma,I,50,s1\n"
                            "badstage,a,b,myeloma,IV,50,s1\n"
                            "badage,a,b,myeloma,I,old,s1\n"
                            "noimage,,b,myeloma,I,50,s1\n"
                            ",a,b,myeloma,I,50,s1\n"
                            "nobatch,a,b,myeloma,I,50,\n")
    cases, problems = read_manifest(path, PROTOCOL, default_batch="x")
    assert [c.case_id for c in cases] == ["ok"]
    got = {(p.case_id, p.reason) for p in problems}
    assert got == {
        ("dup", SkipReason.DUPLICATE_CASE_ID),
        ("nolabel", SkipReason.LABEL_MISSING),
        ("badlabel", SkipReason.LABEL_INVALID),
        ("badstage", SkipReason.COVARIATE_INVALID),
        ("badage", SkipReason.COVARIATE_INVALID),
        ("noimage", SkipReason.MISSING_FIELD),
        ("<row 10>", SkipReason.MISSING_FIELD),
        ("nobatch", SkipReason.MISSING_FIELD),
    }
    detail = {p.case_id: p.detail for p in problems}
    assert "'lymphoma' is not one of ['metastasis', 'myeloma']" in detail["badlabel"]
    assert "'iss_stage' = 'IV'" in detail["badstage"]


def test_regression_labels_are_checked_against_the_range(tmp_path: Path):
    protocol = protocol_from_mapping({
        "name": "t", "modality": "MR",
        "task": {"kind": "regression", "label_column": "pci", "value_range": [0, 100]},
    })
    path = _write(tmp_path, "case_id,image,mask,pci\na,x,y,35.5\nb,x,y,130\nc,x,y,nan\nd,x,y,n/a\n")
    cases, problems = read_manifest(path, protocol, default_batch="s")
    assert [c.label for c in cases] == [35.5]
    assert all(p.reason is SkipReason.LABEL_INVALID for p in problems) and len(problems) == 3


def test_survival_times_and_events_are_checked_and_named(tmp_path: Path):
    protocol = protocol_from_mapping({
        "name": "t", "modality": "MR",
        "task": {"kind": "survival", "label_column": "pfs_months", "event_column": "pfs_event"},
    })
    path = _write(tmp_path, "case_id,image,mask,pfs_months,pfs_event\n"
                            "a,x,y,35.5,1\nb,x,y,12,0\nc,x,y,-3,1\nd,x,y,20,2\ne,x,y,20,\n"
                            "f,x,y,,1\n")
    cases, problems = read_manifest(path, protocol, default_batch="s")
    assert [(c.label, c.event) for c in cases] == [(35.5, 1.0), (12.0, 0.0)]
    detail = {p.case_id: (p.reason, p.detail) for p in problems}
    assert detail["c"] == (SkipReason.LABEL_INVALID,
                           "label column 'pfs_months': -3 is a negative follow-up time")
    assert detail["d"] == (SkipReason.LABEL_INVALID,
                           "event column 'pfs_event': '2' is not 0 (censored) or 1 (the event)")
    assert detail["e"] == (SkipReason.LABEL_MISSING, "no value in event column 'pfs_event'")
    assert detail["f"][0] is SkipReason.LABEL_MISSING
    with pytest.raises(ConfigError, match="missing column 'pfs_event'"):
        read_manifest(_write(tmp_path, "case_id,image,mask,pfs_months\na,x,y,3\n"), protocol, "s")


def test_unusable_manifest_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="manifest file not found"):
        read_manifest(tmp_path / "none.csv", PROTOCOL, "s")
    path = _write(tmp_path, "case_id,image,diagnosis\np1,a,myeloma\n")
    with pytest.raises(ConfigError) as err:
        read_manifest(path, PROTOCOL, "s")
    assert "missing column 'mask'" in str(err.value)
    assert "missing column 'iss_stage'" in str(err.value)


def test_rows_with_extra_fields_or_nul_bytes_are_skipped_by_name(tmp_path: Path):
    """A row with more fields than the header (an unquoted comma) used to crash the reader
    (AttributeError); a NUL byte in a path, the path resolution (ValueError)."""
    path = tmp_path / "manifest.csv"
    path.write_bytes(b"case_id,image,mask,diagnosis,iss_stage,age\n"
                     b"ok,a,b,myeloma,I,50\n"
                     b"wide,a,b,myeloma,I,50,extra,more\n"
                     b"nul,a\x00b,b,myeloma,I,50\n")
    cases, problems = read_manifest(path, PROTOCOL, default_batch="s")
    assert [c.case_id for c in cases] == ["ok"]
    detail = {p.case_id: (p.reason, p.detail) for p in problems}
    assert detail["wide"] == (SkipReason.MISSING_FIELD,
                              "row 3 has 2 more field(s) than the header (an unquoted comma?)")
    assert detail["nul"] == (SkipReason.FILE_MISSING, "image: the path holds a NUL byte")


def test_a_repeated_column_or_a_semicolon_manifest_is_named(tmp_path: Path):
    path = _write(tmp_path, "case_id,image,mask,diagnosis,age,iss_stage,age\n"
                            "p1,a,b,myeloma,50,I,51\n")
    with pytest.raises(ConfigError, match="column 'age' appears more than once"):
        read_manifest(path, PROTOCOL, "s")
    path = _write(tmp_path, "case_id;image;mask;diagnosis;iss_stage;age\np1;a;b;myeloma;I;50\n")
    with pytest.raises(ConfigError, match="one column holding ';': a manifest is comma-sep"):
        read_manifest(path, PROTOCOL, "s")


def test_paths_outside_the_data_root_are_skipped_by_name(tmp_path: Path):
    """Manifest paths could point anywhere on the machine (``../../etc/passwd``); with a data
    root, an image or mask that resolves outside it, through ``..`` or a symbolic link, is
    skipped."""
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "escape").symlink_to(tmp_path)
    path = root / "manifest.csv"
    path.write_text("case_id,image,mask,diagnosis,iss_stage,age\n"
                    "inside,img/a.nii.gz,img/a_mask.nii.gz,myeloma,I,50\n"
                    "dotdot,../../etc/passwd,img/b.nii.gz,myeloma,I,50\n"
                    "absolute,img/c.nii.gz,/etc/shadow,myeloma,I,50\n"
                    "linked,escape/secret.nii.gz,img/d.nii.gz,myeloma,I,50\n")
    cases, problems = read_manifest(path, PROTOCOL, "s", data_root=root)
    assert [c.case_id for c in cases] == ["inside"]
    assert {p.case_id: p.reason for p in problems} == {
        name: SkipReason.PATH_OUTSIDE_DATA_ROOT for name in ("dotdot", "absolute", "linked")}
    detail = {p.case_id: p.detail for p in problems}
    assert "mask '/etc/shadow' resolves to /etc/shadow" in detail["absolute"]
    assert f"outside the site's data_root {root.resolve()}" in detail["linked"]
    # without a data root (check and extract on one's own files), every path is taken
    assert len(read_manifest(path, PROTOCOL, "s")[0]) == 4
