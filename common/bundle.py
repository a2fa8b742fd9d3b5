"""The study app's bundle and its hash: what a site approves before a run's code may run.

``flwr run`` bundles the app folder (the one with the app's ``pyproject.toml``) into a FAB and
sends it to every site; Flower builds a FAB reproducibly (same files, same bytes), so its
SHA-256 names one version of the app. The coordinator announces it with the study
(``myelofed app-hash``), each site lists it in its config's ``approved_apps``, and the site's
SuperNode (:mod:`client.supernode`) refuses any run whose bundle has another hash.

A release is one ``.fab`` file (:func:`build_release`): its hash does not depend on where a
checkout lies or what else its folder holds. The coordinator unpacks it (:func:`unpack`) and
runs ``flwr run`` on the unpacked folder, which Flower bundles into the very same bytes (checked
when unpacking), so the sites receive exactly the release they approved.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from common.errors import ConfigError
from common.provenance import atomic_write_bytes


def app_hash(app_dir: Path) -> str:
    """The SHA-256 (hex) of the app bundle Flower builds from ``app_dir`` for ``flwr run``
    (the folder with the app's pyproject.toml): what a site approves."""
    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def bundle_hash(path: Path) -> str:
    """The hash a site approves for ``path``: a released ``.fab`` file's SHA-256, or that of
    the bundle Flower builds from an app folder."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if not (path / "pyproject.toml").is_file():
        raise ConfigError(str(path), ["neither a .fab file nor an app folder with a "
                                      "pyproject.toml"])
    return app_hash(path)


def build_release(app_dir: Path, out_dir: Path) -> tuple[Path, str]:
    """Bundle ``app_dir`` as Flower does into ``out_dir/myelofed-<hash12>.fab`` (with a
    ``.sha256`` file beside it, as ``sha256sum`` writes it); the file and its hash."""
    fab = build_fab_from_disk(Path(app_dir))
    digest = hashlib.sha256(fab).hexdigest()
    path = out_dir / f"myelofed-{digest[:12]}.fab"
    atomic_write_bytes(path, fab)
    atomic_write_bytes(path.with_suffix(".sha256"), f"{digest}  {path.name}\n".encode())
    return path, digest


#: The most a released bundle may hold once unpacked (Flower ships at most 10 MB; margin).
MAX_UNPACKED_BYTES = 64 * 2 ** 20


def unpack(fab: Path, out_dir: Path) -> str:
    """Unpack a released ``.fab`` into ``out_dir`` (which must be empty or absent) and check
    that Flower bundles the folder back into the same bytes: the hash the sites approved."""
    data = fab.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(str(out_dir), ["not empty: unpack a release into a new folder"])
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as bundle:
            members = bundle.infolist()
            if sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
                raise ConfigError(str(fab), [f"unpacks to more than {MAX_UNPACKED_BYTES:,} bytes"])
            for member in members:
                target = (out_dir / member.filename).resolve()
                if out_dir.resolve() not in target.parents:
                    raise ConfigError(str(fab), [f"member {member.filename!r} points outside "
                                                 "the folder"])
            bundle.extractall(out_dir)
    except zipfile.BadZipFile as exc:
        raise ConfigError(str(fab), [f"not a Flower app bundle: {exc}"]) from None
    rebuilt = app_hash(out_dir)
    if rebuilt != digest:
        raise ConfigError(str(out_dir), [f"bundles to {rebuilt}, not the release's {digest}"])
    return digest


def is_app_hash(text: str) -> bool:
    """Whether ``text`` is an app hash as :func:`app_hash` writes it (64 lower-case hex
    digits)."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
