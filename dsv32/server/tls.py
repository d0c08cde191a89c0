"""HTTPS for `dsv32 serve`: uvicorn's certificate options, checked before the model loads so that a
wrong path or a key that does not match its certificate is a clear start-up error."""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def cert_reqs(value: str) -> int:
    """`--ssl-cert-reqs`: none, optional or required (or uvicorn's 0, 1, 2)."""
    if value.lower() in CERT_REQS:
        return CERT_REQS[value.lower()]
    if value in ("0", "1", "2"):
        return int(value)
    raise ValueError(f"not one of {', '.join(CERT_REQS)} (or 0, 1, 2)")


@dataclass(frozen=True)
class TLSConfig:
    """Server certificate and key (PEM), and the CA whose certificates clients must show when
    `cert_reqs` is optional or required (mutual TLS)."""

    certfile: Path | None = None
    keyfile: Path | None = None      # None: the key is in certfile
    ca_certs: Path | None = None
    cert_reqs: int | None = None     # None: required with ca_certs, else none

    @property
    def enabled(self) -> bool:
        return self.certfile is not None

    @property
    def client_cert_reqs(self) -> int:
        if self.cert_reqs is not None:
            return self.cert_reqs
        return ssl.CERT_REQUIRED if self.ca_certs is not None else ssl.CERT_NONE

    def check(self) -> None:
        """ValueError saying what is wrong when uvicorn could not serve with these options."""
        if not self.enabled:
            extra = [flag for flag, value in (("--ssl-keyfile", self.keyfile), ("--ssl-ca-certs", self.ca_certs),
                                              ("--ssl-cert-reqs", self.cert_reqs)) if value is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)} need(s) --ssl-certfile")
            return
        if self.client_cert_reqs != ssl.CERT_NONE and self.ca_certs is None:
            raise ValueError("--ssl-cert-reqs optional/required needs --ssl-ca-certs (the CA of the clients)")
        try:
            self.context()
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"TLS: {e.strerror or e} (--ssl-certfile {self.certfile}, --ssl-keyfile "
                             f"{self.keyfile}, --ssl-ca-certs {self.ca_certs})") from None

    def context(self) -> ssl.SSLContext:
        """The server's SSL context, built as uvicorn builds it (an encrypted key fails here rather
        than prompting for its passphrase)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.certfile, self.keyfile, password=lambda: b"")
        ctx.verify_mode = ssl.VerifyMode(self.client_cert_reqs)
        if self.ca_certs is not None:
            ctx.load_verify_locations(self.ca_certs)
        return ctx

    def uvicorn_kwargs(self) -> dict:
        """uvicorn.Config's ssl_* arguments (none without a certificate)."""
        if not self.enabled:
            return {}
        return {"ssl_certfile": str(self.certfile), "ssl_cert_reqs": self.client_cert_reqs,
                "ssl_keyfile": str(self.keyfile) if self.keyfile else None,
                "ssl_ca_certs": str(self.ca_certs) if self.ca_certs else None}
