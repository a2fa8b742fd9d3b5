"""The coordinator's registry of sites: which SuperNode (Flower's node ID, its key) is which
hospital.

Flower 1.42 keys a registered SuperNode by a node ID and shows no name for it
(``flwr supernode list`` has an owner column, not the ``--name`` given at registration), so the
coordinator keeps ``sites.json`` beside the SuperLink's database: ``myelofed server register``
records each site's name with its node ID and key fingerprint, ``myelofed server sites`` lists
them with Flower's status and unregisters a site by name, and the ServerApp names every node it
sees by it (:func:`site_names`): in its log, its exclusions and the report, a site that never
answered is its name, not a number. A registered node that answers under another site's name is
excluded (it would speak for another hospital).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from common.errors import ConfigError
from common.provenance import atomic_write_json

#: The registry's file name, in the coordinator's state folder.
REGISTRY_FILE = "sites.json"


@dataclass(frozen=True)
class RegisteredSite:
    name: str
    node_id: int
    key_sha256: str
    registered_at: str


def registry_path(state: Path) -> Path:
    return state / REGISTRY_FILE


def load_registry(path: Path) -> dict[str, RegisteredSite]:
    """Site name -> its registration (empty when the file does not exist yet)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {name: RegisteredSite(name=name, **entry) for name, entry in raw["sites"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(str(path), [f"not a site registry: {exc}"]) from None


def _save(path: Path, sites: dict[str, RegisteredSite]) -> None:
    atomic_write_json(path, {"sites": {
        name: {k: v for k, v in asdict(site).items() if k != "name"}
        for name, site in sorted(sites.items())}})


def key_fingerprint(public_key: Path) -> str:
    """SHA-256 of a public key file's content (how a key is told apart in the registry)."""
    return hashlib.sha256(public_key.read_bytes().strip()).hexdigest()


def check_new(path: Path, name: str, public_key: Path) -> None:
    """Refuse a name or a key that is registered already (before Flower registers it)."""
    fingerprint = key_fingerprint(public_key)
    for site in load_registry(path).values():
        if site.name == name:
            raise ConfigError(name, [f"a site of this name is registered (node {site.node_id});"
                                     " unregister it first ('myelofed server sites "
                                     "--unregister')"])
        if site.key_sha256 == fingerprint:
            raise ConfigError(str(public_key), [f"this key is registered as site {site.name}"])


def record(path: Path, name: str, node_id: int, public_key: Path) -> RegisteredSite:
    sites = load_registry(path)
    site = RegisteredSite(name, int(node_id), key_fingerprint(public_key),
                          datetime.now(UTC).isoformat(timespec="seconds"))
    sites[name] = site
    _save(path, sites)
    return site


def _find(sites: dict[str, RegisteredSite], path: Path, name: str) -> RegisteredSite:
    if name not in sites:
        raise ConfigError(name, [f"no site of this name in {path} (registered: "
                                 f"{', '.join(sorted(sites)) or 'none'})"])
    return sites[name]


def registered(path: Path, name: str) -> RegisteredSite:
    """The registration of the site ``name``; an error naming the registered sites if none."""
    return _find(load_registry(path), path, name)


def remove(path: Path, name: str) -> RegisteredSite:
    sites = load_registry(path)
    site = _find(sites, path, name)
    del sites[name]
    _save(path, sites)
    return site


def site_names(path: Path | None = None) -> dict[int, str]:
    """Node ID -> site name, from ``path`` or, in the ServerApp, from the registry beside the
    SuperLink's FLWR_HOME (``<state>/flwr-home`` -> ``<state>/sites.json``); empty when there
    is none (a simulation, a test)."""
    if path is None:
        home = os.environ.get("FLWR_HOME")
        if not home:
            return {}
        path = registry_path(Path(home).parent)
    try:
        return {site.node_id: site.name for site in load_registry(path).values()}
    except ConfigError:
        return {}
