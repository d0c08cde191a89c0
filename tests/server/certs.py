"""Throwaway certificates for the TLS tests: a CA, a server certificate for 127.0.0.1 and localhost,
and a client certificate, all signed by the CA. Made with the `cryptography` package when it is
installed, else with the `openssl` command (`make_certs(dir, tool="openssl")` forces it)."""
from __future__ import annotations

import datetime
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def available_tool() -> str | None:
    try:
        import cryptography  # noqa: F401
        return "cryptography"
    except ImportError:
        return "openssl" if shutil.which("openssl") else None


def make_certs(directory: Path, tool: str | None = None) -> Certs:
    tool = tool or available_tool()
    if tool is None:
        raise RuntimeError("neither the cryptography package nor the openssl command is available")
    certs = Certs(*(directory / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
    (_with_cryptography if tool == "cryptography" else _with_openssl)(certs)
    return certs


def _with_cryptography(c: Certs) -> None:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(cn: str, key, issuer_name, issuer_key, ca: bool, extra: list):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False))
        for ext in extra:
            b = b.add_extension(ext, critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(cert_path: Path, key_path: Path | None, cert, key) -> None:
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key_path is not None:
            key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("dsv32 test CA", ca_key, None, ca_key, True,
               [x509.KeyUsage(False, False, False, False, False, True, True, False, False)])
    write(c.ca, None, ca, ca_key)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    for cn, cert_path, key_path, usage in (("127.0.0.1", c.server_cert, c.server_key, ExtendedKeyUsageOID.SERVER_AUTH),
                                           ("client", c.client_cert, c.client_key, ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        extra = [x509.ExtendedKeyUsage([usage])] + ([san] if usage == ExtendedKeyUsageOID.SERVER_AUTH else [])
        write(cert_path, key_path, build(cn, key, ca.subject, ca_key, False, extra), key)


def _with_openssl(c: Certs) -> None:
    d = c.ca.parent
    ca_key = d / "ca.key"

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
        "-subj", "/CN=dsv32 test CA", "-keyout", str(ca_key), "-out", str(c.ca),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign,cRLSign")
    for cn, cert, key, ext in (
            ("127.0.0.1", c.server_cert, c.server_key,
             "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
            ("client", c.client_cert, c.client_key, "extendedKeyUsage=clientAuth\n")):
        csr, extfile = d / f"{cn}.csr", d / f"{cn}.ext"
        extfile.write_text("basicConstraints=critical,CA:FALSE\nauthorityKeyIdentifier=keyid\n" + ext)
        run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(c.ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "1", "-extfile", str(extfile), "-out", str(cert))
