"""A throwaway certificate authority for the local emulator, so the emulator path uses the same
TLS, SNI and certificate checks in Envoy as the path to the real api.z.ai."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class LocalTls:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_local_tls(directory: Path, hostname: str = "localhost") -> LocalTls:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="zai-proxy local emulator")
    issued = ca.issue_cert(hostname, "127.0.0.1")
    tls = LocalTls(directory / "emulator-ca.pem", directory / "emulator-cert.pem",
                   directory / "emulator-key.pem")
    ca.cert_pem.write_to_path(str(tls.ca_file))
    with open(tls.cert_file, "wb") as fh:
        for pem in issued.cert_chain_pems:
            fh.write(pem.bytes())
    issued.private_key_pem.write_to_path(str(tls.key_file))
    tls.key_file.chmod(0o600)
    return tls
