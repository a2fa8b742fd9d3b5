"""Where a site keeps a study: its configuration (from Flower's node config or a simulation
cohort), its study folder and the tables the phases write there. Nothing here is sent."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.errors import ConfigError
from common.glm import ModelError
from common.payloads import MIN_ROWS_SENT
from common.protocol import StudyProtocol
from common.provenance import atomic_write_bytes
from common.site_config import SiteConfig, load_site_config
from harmonization.images import ImageStandard

if TYPE_CHECKING:
    import pandas as pd

#: The site's feature table after the local preparation (all rows, with their split and fold).
PREPARED_FILE = "prepared.parquet"
#: The same rows after federated ComBat.
HARMONIZED_FILE = "harmonized.parquet"
NON_FEATURES = ("case_id", "batch", "mask_source", "split", "fold")
#: The study's standard landmarks the preparation ran with (histogram standardization).
IMAGE_STANDARD_FILE = "image_standard.json"
#: Under the study folder's ``cnn/``: the cases' embeddings under the final CNN
#: (``harmonization.embeddings``), the site's Harmony state between rounds, and the
#: embeddings' principal-component scores after Harmony. A new preparation removes them.
EMBEDDINGS_FILE = "embeddings.npz"
HARMONY_STATE_FILE = "harmony_state.npz"
HARMONIZED_EMBEDDINGS_FILE = "embeddings_harmonized.npz"


def resolve_site(node_config: dict[str, object], run_config: dict[str, object]) -> SiteConfig:
    """This SuperNode's site: from ``site-config`` (a site config file, in deployment) or, in
    the simulation engine, from the run's ``simulation-cohort`` folder and the node's
    ``partition-id`` (the cohort's sites in name order; ``simulation-min-patients`` stands in
    for the sites' ``min_patients``, for tests on tiny synthetic cohorts)."""
    if node_config.get("site-config"):
        return load_site_config(Path(str(node_config["site-config"])))
    cohort = str(run_config.get("simulation-cohort", "") or "")
    if not cohort or "partition-id" not in node_config:
        raise ConfigError("node config", ["set 'site-config' (deployment) or the run config's "
                                          "'simulation-cohort' (simulation)"])
    root = Path(cohort)
    sites = sorted(p.parent for p in root.glob("*/manifest.csv"))
    index = int(str(node_config["partition-id"]))
    if not 0 <= index < len(sites):
        raise ConfigError(str(root), [f"partition {index} has no site: {len(sites)} site "
                                      "folders with a manifest.csv"])
    site = sites[index]
    # one worker: the simulation engine runs every virtual site on this one machine
    floor = run_config.get("simulation-min-patients")
    return SiteConfig(site_name=site.name, manifest=site / "manifest.csv",
                      work_dir=root / "work" / site.name, workers=1,
                      **({} if floor is None else {"min_patients": int(str(floor))}))


def study_dir(site: SiteConfig, protocol: StudyProtocol) -> Path:
    """Where this site keeps the study's local results (never sent): its release ledgers,
    image standard, reports and the tables of the study's split."""
    return site.work_dir / "study" / protocol.short_hash


def tables_dir(site: SiteConfig, protocol: StudyProtocol, repeat: int = 0) -> Path:
    """Where the tables of split ``repeat`` live (``validation.repeats``): the study folder
    for the first, ``repeats/<r>`` in it for the others (their sums go in the study's one
    ledger)."""
    folder = study_dir(site, protocol)
    return folder if repeat == 0 else folder / "repeats" / str(repeat)


def save_image_standard(site: SiteConfig, protocol: StudyProtocol, standard: ImageStandard
                        ) -> None:
    """Keep the study's image standard beside the prepared table (the CNN's crops read it)."""
    atomic_write_bytes(study_dir(site, protocol) / IMAGE_STANDARD_FILE,
                       standard.to_json().encode("utf-8"))


def load_image_standard(site: SiteConfig, protocol: StudyProtocol) -> ImageStandard | None:
    """The image standard the preparation ran with; None for a protocol without histogram
    standardization, a :class:`ConfigError` where it needs one and the preparation left none."""
    if protocol.standardization.histogram is None:
        return None
    path = study_dir(site, protocol) / IMAGE_STANDARD_FILE
    if not path.is_file():
        raise ConfigError(str(path), ["missing: the protocol standardizes histograms and the "
                                      "preparation has not run here with the study's standard"])
    return ImageStandard.from_json(path.read_text(encoding="utf-8"))


def feature_columns(table: pd.DataFrame, protocol: StudyProtocol) -> list[str]:
    """The feature columns of a study table: every column but the row's identity, split, fold,
    label (a survival task's time and event) and covariates."""
    return _features_of(table.columns, protocol)


def _features_of(columns: Iterable[str], protocol: StudyProtocol) -> list[str]:
    skip = {*NON_FEATURES, protocol.task.label_column, protocol.task.event_column,
            *protocol.covariates.columns}
    return [c for c in columns if c not in skip]


def feature_width(site: SiteConfig, protocol: StudyProtocol) -> int | None:
    """The number of feature columns of this site's prepared table (None before the
    preparation): fixed by the protocol's extraction settings, the same at every site (the
    server checks their names' hash). Read from the table's schema, not its rows."""
    path = study_dir(site, protocol) / PREPARED_FILE
    if not path.is_file():
        return None
    # pyarrow and pandas load only in the processes that read a table: each message starts a
    # fresh ClientApp process, and the handshake reads none
    import pyarrow.parquet as pq

    return len(_features_of(pq.read_schema(path).names, protocol))


def load_study_table(site: SiteConfig, protocol: StudyProtocol, name: str, repeat: int = 0
                     ) -> pd.DataFrame:
    """One of the tables a phase kept at this site (``PREPARED_FILE``, ``HARMONIZED_FILE``),
    of split ``repeat``."""
    import pandas as pd  # see feature_width

    path = tables_dir(site, protocol, repeat) / name
    if not path.is_file():
        raise ConfigError(str(path), [f"missing: the phase that writes {name} has not run here"])
    return pd.read_parquet(path)


def split_table(site: SiteConfig, protocol: StudyProtocol, harmonized: bool, split: str,
                repeat: int = 0) -> pd.DataFrame:
    """One split's rows (``split`` "train" or "test" of split ``repeat``), raw or after
    federated ComBat. Training rows are refused below :data:`common.payloads.MIN_ROWS_SENT`:
    sums over them would come close to a patient's values."""
    table = load_study_table(site, protocol, HARMONIZED_FILE if harmonized else PREPARED_FILE,
                             repeat)
    table = table[table["split"] == split]
    if split == "train" and len(table) < MIN_ROWS_SENT:
        raise ModelError(f"site '{site.site_name}' has fewer than {MIN_ROWS_SENT} training rows "
                         "(a reason that leaves the site names no count under the minimum): it "
                         "sends no sums over them")
    return table


@dataclass(frozen=True)
class Embeddings:
    """A site's embeddings (cases, features), float64, with each case's id, split and
    scanner (its ComBat batch)."""
    case_ids: tuple[str, ...]
    splits: tuple[str, ...]
    scanners: tuple[str, ...]
    values: np.ndarray


def embeddings_path(site: SiteConfig, protocol: StudyProtocol) -> Path:
    return study_dir(site, protocol) / "cnn" / EMBEDDINGS_FILE


def load_embeddings(site: SiteConfig, protocol: StudyProtocol) -> Embeddings:
    """This site's embeddings; a :class:`ConfigError` naming the file when it has none."""
    path = embeddings_path(site, protocol)
    try:
        with np.load(path, allow_pickle=False) as npz:
            values = np.asarray(npz["values"], dtype=np.float64)
            return Embeddings(tuple(npz["case_ids"].tolist()), tuple(npz["splits"].tolist()),
                              tuple(npz["scanners"].tolist()), values)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(str(path), [f"no CNN embeddings of this site ({exc}): its final "
                                      "CNN evaluation did not run or failed"]) from None
