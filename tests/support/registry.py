"""A real registry for tests: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1.

`make_pki(dir)` makes, with ``openssl``, a CA and a server certificate for 127.0.0.1 and
``localhost`` it signs, and a self-signed key+certificate the token issuer signs JWTs with.
`RegistryServer` runs one registry over TLS with one of three auth setups: ``none``,
``htpasswd`` (a bcrypt file from ``htpasswd -B``) or ``token`` (the registry's token auth,
trusting the issuer's certificate; `TokenIssuer` is the issuer: a tiny HTTP server on
127.0.0.1 that checks basic credentials and returns an RS256 JWT signed with ``openssl``,
carrying the certificate in ``x5c`` and granting what the scope asks). `kill()` stops the
registry at once (SIGKILL), `start()` starts it again on the same port and storage; every
request is in `access_log()` (distribution's combined log lines; `served(digest)` counts a
blob's GETs and bytes from it); `push_blob` uploads a blob with plain requests.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

ACCESS = re.compile(r'"GET (/v2/[^ "]*/blobs/[^ "]*) HTTP/[0-9.]+" (\d{3}) (\d+)')
"""A blob GET in the access log: path, status, body bytes."""
USER = "sqsuser1"
PASSWORD = "s3cret-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class Pki:
    certs: Path
    """A --cert-dir: only the CA certificate (``ca.crt``)."""
    ca_cert: Path
    server_cert: Path
    server_key: Path
    signing_cert: Path
    signing_key: Path


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
             "-out", str(ca_cert), "-days", "2", "-subj", "/CN=squashstore test CA")
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=127.0.0.1")
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    sign_key, sign_cert = directory / "token.key", directory / "token.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(sign_key),
             "-out", str(sign_cert), "-days", "2", "-subj", "/CN=squashstore test tokens")
    certs = directory / "certs"
    certs.mkdir(exist_ok=True)
    (certs / "ca.crt").write_bytes(ca_cert.read_bytes())
    return Pki(certs, ca_cert, cert, key, sign_cert, sign_key)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """A token service: ``GET /token?service=S&scope=repository:R:pull,push``."""

    service = "squashstore-test-registry"
    issuer = "squashstore-test-issuer"

    def __init__(self, pki: Pki, user: str = USER, password: str = PASSWORD) -> None:
        self.pki, self.user, self.password = pki, user, password
        der = subprocess.run(["openssl", "x509", "-in", str(pki.signing_cert), "-outform",
                              "DER"], check=True, capture_output=True).stdout
        self._x5c = base64.b64encode(der).decode()
        self.requests: list[str] = []
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.requests.append(self.path)
                status, body = issuer.answer(self.path, self.headers.get("Authorization", ""))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def answer(self, path: str, authorization: str) -> tuple[int, dict[str, object]]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        subject = ""
        if authorization.startswith("Basic "):
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            if (user, password) != (self.user, self.password):
                return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad password"}]}
            subject = user
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if subject or a == "pull"]
            if subject or name.startswith("public/"):
                access.append({"type": kind, "name": name, "actions": granted})
        return 200, {"token": self.token(subject, access)}

    def token(self, subject: str, access: list[dict[str, object]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 600,
                  "nbf": now - 60, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "." +
                         _b64url(json.dumps(claims).encode())).encode()
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign",
                                    str(self.pki.signing_key)], input=signing_input,
                                   check=True, capture_output=True).stdout
        return signing_input.decode() + "." + _b64url(signature)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RegistryServer:
    """One ``docker-registry`` over TLS on 127.0.0.1 with `auth` none/htpasswd/token."""

    def __init__(self, base: Path, pki: Pki, auth: str = "none",
                 issuer: TokenIssuer | None = None) -> None:
        self.base, self.pki, self.auth = base, pki, auth
        base.mkdir(parents=True, exist_ok=True)
        self.storage = base / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log = base / "registry.log"
        lines = [
            "version: 0.1",
            "log: {level: info, accesslog: {disabled: false}}",
            f"storage: {{filesystem: {{rootdirectory: {self.storage}}}, "
            "delete: {enabled: true}}",
            f"http: {{addr: '{self.host}', tls: {{certificate: {pki.server_cert}, "
            f"key: {pki.server_key}}}}}",
        ]
        if auth == "htpasswd":
            htpasswd = base / "htpasswd"
            out = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True,
                                 capture_output=True, text=True).stdout
            htpasswd.write_text(out.strip() + "\n")
            lines.append(f"auth: {{htpasswd: {{realm: squashstore-test, path: {htpasswd}}}}}")
        elif auth == "token":
            assert issuer is not None
            lines.append(f"auth: {{token: {{realm: '{issuer.realm}', "
                         f"service: {issuer.service}, issuer: {issuer.issuer}, "
                         f"rootcertbundle: {pki.signing_cert}}}}}")
        self.config = base / "config.yml"
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = self.log.open("ab")
        self.process = subprocess.Popen(["docker-registry", "serve", str(self.config)],
                                        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.05)
        raise RuntimeError("docker-registry did not start listening")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def access_log(self) -> str:
        return self.log.read_text(errors="replace")

    def blob_url(self, repository: str, digest: str) -> str:
        return f"https://{self.host}/v2/{repository}/blobs/{digest}"

    def push_blob(self, repository: str, data: bytes,
                  auth: tuple[str, str] | None = None) -> str:
        """Upload `data` as a blob with plain requests (one monolithic PUT); its digest."""
        import requests

        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        verify = str(self.pki.ca_cert)
        start = requests.post(f"https://{self.host}/v2/{repository}/blobs/uploads/",
                              auth=auth, timeout=30, verify=verify)
        assert start.status_code == 202, start.text
        location = urllib.parse.urljoin(f"https://{self.host}/", start.headers["Location"])
        done = requests.put(location, params={"digest": digest}, data=data, auth=auth,
                            headers={"Content-Type": "application/octet-stream"}, timeout=60,
                            verify=verify)
        assert done.status_code == 201, done.text
        return digest

    def served(self, digest: str) -> tuple[int, int]:
        """(GET requests answered 200/206, body bytes) for the blob in the access log, once
        it has settled: the registry writes its access log lines asynchronously."""
        def now() -> tuple[int, int]:
            hits = [int(m.group(3)) for m in ACCESS.finditer(self.access_log())
                    if m.group(1).endswith(digest) and m.group(2) in ("200", "206")]
            return len(hits), sum(hits)

        # settled: unchanged over three samples (0.6 s), so that a log line delayed by a
        # preempted registry is not counted on the wrong side of an exact comparison
        last, same, deadline = now(), 0, time.monotonic() + 10
        while same < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            current = now()
            same = same + 1 if current == last else 0
            last = current
        return last

    def blob_data(self, digest: str) -> Path:
        hex_ = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def close(self) -> None:
        self.kill()


class LocalHTTP:
    """A plain-HTTP server on 127.0.0.1 running `handler` on a daemon thread: the base of the
    tests' hostile and misbehaving 'registries'. `host` is ``127.0.0.1:PORT``."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
