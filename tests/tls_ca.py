"""A throwaway PKI for TLS tests, made with the `openssl` command line (no Python dependency).

`make_pki(directory, client_key_passphrase=...)` writes a CA, a server certificate for
127.0.0.1/localhost (mosquitto's TLS listener, the metrics endpoint) and a client certificate
(mutual TLS), all valid for two days, EC P-256 keys (fast to make). The client key is
encrypted when a passphrase is given; passphrases reach openssl through files, never argv.
"""
from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess

__all__ = ["Pki", "find_openssl", "make_pki"]


def find_openssl() -> str | None:
    return shutil.which("openssl")


@dataclasses.dataclass(frozen=True)
class Pki:
    ca_cert: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path
    client_key_passphrase_file: pathlib.Path | None


def _run(args, cwd) -> None:
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}{r.stderr}")


def _key(openssl, path, cwd, passfile=None) -> None:
    args = [openssl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)]
    if passfile is not None:
        args += ["-aes256", "-pass", f"file:{passfile}"]
    _run(args, cwd)


def _issue(openssl, d: pathlib.Path, name: str, subject: str, extensions: str, passfile=None) -> None:
    (d / f"{name}.ext").write_text(extensions)
    req = [openssl, "req", "-new", "-key", str(d / f"{name}.key"), "-subj", subject, "-out", str(d / f"{name}.csr")]
    if passfile is not None:
        req += ["-passin", f"file:{passfile}"]
    _run(req, d)
    _run([openssl, "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
          "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-sha256",
          "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem")], d)


def make_pki(directory, client_key_passphrase: str | None = None) -> Pki:
    openssl = find_openssl()
    if openssl is None:
        raise RuntimeError("openssl command not found")
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _key(openssl, d / "ca.key", d)
    _run([openssl, "req", "-x509", "-new", "-key", str(d / "ca.key"), "-subj", "/CN=streamlstm test CA",
          "-days", "2", "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(d / "ca.pem")], d)

    _key(openssl, d / "server.key", d)
    _issue(openssl, d, "server", "/CN=localhost",
           "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\n"
           "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")

    passfile = None
    if client_key_passphrase is not None:
        passfile = d / "client.pass"
        passfile.write_text(client_key_passphrase + "\n")
        passfile.chmod(0o600)
    _key(openssl, d / "client.key", d, passfile)
    _issue(openssl, d, "client", "/CN=streamlstm-client",
           "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\n"
           "extendedKeyUsage=clientAuth\n", passfile)
    return Pki(ca_cert=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
               client_cert=d / "client.pem", client_key=d / "client.key", client_key_passphrase_file=passfile)
