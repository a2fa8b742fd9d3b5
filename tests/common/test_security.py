"""The study's credentials: a CA, the SuperLink certificate and the sites' SuperNode keys."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from common.errors import ConfigError
from common.security import make_server_credentials, make_site_key


def test_the_server_certificate_is_signed_by_the_study_ca_for_the_named_hosts(tmp_path: Path):
    made = make_server_credentials(tmp_path, ["coordinator.example.org", "10.0.0.5"], "Trial")
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the signature is not the CA's
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for secret in (made.key, made.ca_key):  # private keys: the owner only
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="never overwritten"):
        make_server_credentials(tmp_path, ["localhost"])
    with pytest.raises(ConfigError, match="at least one host"):
        make_server_credentials(tmp_path / "b", [])
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        make_server_credentials(tmp_path / "c", ["https://coordinator"])


def test_a_site_key_is_an_ecdsa_p384_pair_in_openssh_format(tmp_path: Path):
    key = make_site_key(tmp_path, "site_A")
    public = key.public.read_text()
    assert public.startswith("ecdsa-sha2-nistp384 ") and public.rstrip().endswith("site_A")
    private = load_ssh_private_key(key.private.read_bytes(), password=None)
    assert private.public_key().public_numbers() == load_ssh_public_key(
        public.encode()).public_numbers()
    assert stat.S_IMODE(key.private.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="never overwritten"):
        make_site_key(tmp_path, "site_A")
    with pytest.raises(ConfigError, match="cannot name a key file"):
        make_site_key(tmp_path, "../evil")


def test_the_commands_make_the_files_and_never_overwrite(tmp_path: Path):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    made = runner.invoke(app, ["server", "certs", "--host", "localhost", "-o", str(tmp_path)])
    assert made.exit_code == 0, made.output
    assert (tmp_path / "ca.crt").is_file() and (tmp_path / "server.key").is_file()
    keys = runner.invoke(app, ["site", "keys", "--site", "site_B", "-o", str(tmp_path / "s")])
    assert keys.exit_code == 0 and (tmp_path / "s" / "site_B.pub").is_file()
    again = runner.invoke(app, ["site", "keys", "--site", "site_B", "-o", str(tmp_path / "s")])
    assert again.exit_code == 2 and "never overwritten" in again.output.replace("\n", " ")
