"""The study's credentials: its TLS certificate authority, the coordinator's certificate and
each site's SuperNode key pair. What Flower needs, made with the ``cryptography`` package (no
``openssl`` or ``ssh-keygen`` on the machine).

* The **coordinator** makes the study CA and its SuperLink certificate
  (:func:`make_server_credentials`; ``myelofed server certs``): ``ca.crt`` goes to every site
  (it is public), ``server.pem`` and ``server.key`` stay on the coordinator (the key readable by
  its owner only).
* Each **site** makes its own key pair (:func:`make_site_key`; ``myelofed site keys``): the
  private key never leaves the site; the public key (``<site>.pub``, OpenSSH format) goes to
  the coordinator, who registers it (``flwr supernode register``). A SuperLink started with
  ``--enable-supernode-auth`` refuses any SuperNode whose key is not registered. Flower takes
  ECDSA keys only (ed25519 is refused): P-384 here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"
CA_KEY = "ca.key"


@dataclass(frozen=True)
class ServerCredentials:
    """The coordinator's files: the study CA (certificate and key) and the SuperLink's
    certificate and key."""
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class SiteKey:
    """A site's SuperNode key pair: the private key (stays) and the public key (registered)."""
    private: Path
    public: Path


def _write_private(path: Path, data: bytes) -> None:
    """A secret file readable by its owner only (created so, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _refuse_overwrite(*paths: Path) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ConfigError(existing[0], ["exists: credentials are never overwritten (move the "
                                        "old ones away first, and re-register the sites)"])


def _subject_alternative_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c in host for c in " /:@"):
                raise ConfigError("--host", [f"'{host}' is neither an IP address nor a DNS "
                                             "name"]) from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_server_credentials(folder: Path, hosts: list[str], study: str = "MyeloFed study",
                            days: int = 825) -> ServerCredentials:
    """A new study CA and a SuperLink certificate for ``hosts`` (the names and addresses sites
    use to reach the coordinator; they go in its subjectAltName), valid ``days``."""
    if not hosts:
        raise ConfigError("--host", ["name at least one host name or IP address the sites "
                                     "connect to"])
    out = ServerCredentials(folder / CA_CERT, folder / CA_KEY, folder / SERVER_CERT,
                            folder / SERVER_KEY)
    _refuse_overwrite(out.ca_cert, out.ca_key, out.cert, out.key)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{study} CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
              .add_extension(_subject_alternative_names(hosts), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    folder.mkdir(parents=True, exist_ok=True)
    out.ca_cert.write_bytes(ca.public_bytes(pem))
    out.cert.write_bytes(server.public_bytes(pem))
    for key, path in ((ca_key, out.ca_key), (server_key, out.key)):
        _write_private(path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return out


def make_site_key(folder: Path, site: str) -> SiteKey:
    """A new ECDSA P-384 key pair for ``site``'s SuperNode, in OpenSSH format (what
    ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read)."""
    if not site or any(c in site for c in "/\\ \n"):
        raise ConfigError("--site", [f"'{site}' cannot name a key file"])
    out = SiteKey(folder / site, folder / f"{site}.pub")
    _refuse_overwrite(out.private, out.public)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(out.private, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    out.public.write_bytes(public + f" myelofed-{site}\n".encode())
    return out
