"""seedvr.io.media.fetch against real HTTP servers on loopback addresses (no mocks of requests)."""

import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from seedvr import settings
from seedvr.errors import INVALID_INPUT, RestoreError
from seedvr.io.media import fetch

BODY = bytes(range(256)) * 40  # 10 240 bytes
STALL_LIMIT_S = 5.0  # a stalling handler gives up after this, so the server never outlives a test by much


class _Handler(BaseHTTPRequestHandler):
    """Routes: /file, /missing, /hop/<n> (n redirects to /file), /loop, /to?url=..., and misbehaving bodies."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Host")))
        path = self.path.split("?")[0]
        if path == "/file":
            self._reply(200, BODY)
        elif path == "/missing":
            self._reply(404, b"no such file")
        elif path.startswith("/hop/"):
            left = int(path.rsplit("/", 1)[1])
            self._redirect(f"/hop/{left - 1}" if left > 1 else "/file")
        elif path == "/loop":
            self._redirect("/loop")
        elif path == "/to":
            self._redirect(self.path.split("?url=", 1)[1])
        elif path == "/no-length":  # HTTP/1.0: the body ends when the connection closes
            self.send_response(200)
            self.end_headers()
            self.wfile.write(BODY)
        elif path == "/length-too-large":  # announces a huge body, then sends nothing: only an early refusal is quick
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            self._trickle(b"", period=0.1)
        elif path == "/length-lying-low":  # says 10 bytes, sends them all: the client must stop at 10
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(BODY)
        elif path == "/chunked-lying":  # says 10 bytes, but chunked framing wins and carries the whole BODY
            self.protocol_version = "HTTP/1.1"
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            for start in range(0, len(BODY), 1024):
                self.wfile.write(b"400\r\n" + BODY[start:start + 1024] + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/stall":  # a few bytes, then silence
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:10])
            self._trickle(b"", period=0.1)
        elif path == "/trickle-body":  # a byte every 0.1 s: no read ever times out
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self._trickle(b"x", period=0.1)
        elif path == "/trickle-headers":  # the headers never end
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self._trickle(b"X-Slow: 1\r\n", period=0.1)

    def _reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _trickle(self, piece, period):
        ends = time.monotonic() + STALL_LIMIT_S
        try:
            while time.monotonic() < ends:
                self.wfile.write(piece)
                self.wfile.flush()
                time.sleep(period)
        except OSError:  # the client hung up
            pass


def _serve(host="127.0.0.1"):
    server = ThreadingHTTPServer((host, 0), _Handler)
    server.seen = []
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture
def server():
    server = _serve()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def base(server):
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def allow_private(monkeypatch):
    monkeypatch.setenv("SEEDVR_ALLOW_PRIVATE_URLS", "1")


@pytest.fixture
def no_flag(monkeypatch):
    monkeypatch.delenv("SEEDVR_ALLOW_PRIVATE_URLS", raising=False)


@pytest.fixture
def dest(tmp_path):
    yield tmp_path
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) <= 1, leftovers  # at most the one successful download


def _refused(url, dest, **kwargs) -> str:
    with pytest.raises(RestoreError) as caught:
        fetch.fetch_url(url, dest, **kwargs)
    assert caught.value.code == INVALID_INPUT
    assert list(dest.iterdir()) == [], "a failed download left a file behind"
    return caught.value.message


# With SEEDVR_ALLOW_PRIVATE_URLS=1: the download itself.
def test_download_returns_the_exact_bytes(allow_private, base, dest):
    path = fetch.fetch_url(f"{base}/file", dest)
    assert path.parent == dest and path.read_bytes() == BODY


def test_http_error_names_the_status(allow_private, base, dest):
    assert "HTTP 404" in _refused(f"{base}/missing", dest)


def test_redirect_chain_is_followed(allow_private, server, base, dest):
    path = fetch.fetch_url(f"{base}/hop/{fetch.MAX_REDIRECTS}", dest)
    assert path.read_bytes() == BODY
    assert [seen[0] for seen in server.seen][-1] == "/file"


def test_too_many_redirects(allow_private, server, base, dest):
    assert "redirects more than" in _refused(f"{base}/hop/{fetch.MAX_REDIRECTS + 1}", dest)
    assert len(server.seen) == fetch.MAX_REDIRECTS + 1
    assert "redirects more than" in _refused(f"{base}/loop", dest)


@pytest.mark.parametrize("route", ["file", "no-length", "chunked-lying"])
def test_body_over_the_cap(allow_private, base, dest, route):
    message = _refused(f"{base}/{route}", dest, max_bytes=len(BODY) - 1)
    assert f"{len(BODY) - 1} bytes" in message and "SEEDVR_MAX_DOWNLOAD_BYTES" in message
    assert fetch.fetch_url(f"{base}/{route}", dest, max_bytes=len(BODY)).read_bytes() == BODY


def test_content_length_lying_low_reads_no_further(allow_private, base, dest):
    assert fetch.fetch_url(f"{base}/length-lying-low", dest, max_bytes=100).read_bytes() == BODY[:10]


def test_content_length_over_the_cap_is_refused_before_the_body(allow_private, base, dest):
    started = time.monotonic()
    assert "download limit" in _refused(f"{base}/length-too-large", dest, timeout_s=3)
    assert time.monotonic() - started < 1.0


def test_cap_from_the_environment(allow_private, base, dest, monkeypatch):
    monkeypatch.setenv("SEEDVR_MAX_DOWNLOAD_BYTES", "1000")
    assert "1000 bytes" in _refused(f"{base}/file", dest)
    monkeypatch.setenv("SEEDVR_MAX_DOWNLOAD_BYTES", "lots")  # the worker refuses to start with it (test_settings)
    with pytest.raises(settings.SettingsError, match="SEEDVR_MAX_DOWNLOAD_BYTES must be a positive integer"):
        fetch.fetch_url(f"{base}/file", dest)


@pytest.mark.parametrize("route", ["stall", "trickle-body", "trickle-headers"])
def test_deadline_covers_the_whole_download(allow_private, base, dest, route):
    started = time.monotonic()
    assert "timed out" in _refused(f"{base}/{route}", dest, timeout_s=1.0)
    assert time.monotonic() - started < 2.0


def test_silence_trips_the_read_timeout_before_the_deadline(allow_private, base, dest, monkeypatch):
    monkeypatch.setattr(fetch, "READ_TIMEOUT_S", 0.3)
    started = time.monotonic()
    assert "timed out" in _refused(f"{base}/stall", dest, timeout_s=3.0)
    assert time.monotonic() - started < 1.0


def test_deadline_from_the_environment(allow_private, base, dest, monkeypatch):
    monkeypatch.setenv("SEEDVR_DOWNLOAD_TIMEOUT_S", "0.5")
    started = time.monotonic()
    assert "0.5 s" in _refused(f"{base}/trickle-body", dest)
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/video.mp4", "gopher://x/", "video.mp4"])
def test_only_http_and_https(allow_private, dest, url):
    assert _refused(url, dest, field="video_url").startswith("video_url must be an http:// or https:// URL")


def test_connection_refused(allow_private, dest):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert "could not be reached" in _refused(f"http://127.0.0.1:{port}/file", dest)


def test_unknown_host(allow_private, dest):
    assert "could not be resolved" in _refused("http://no-such-host.invalid/video.mp4", dest)


def test_messages_hide_credentials_and_query(allow_private, server, dest):
    port = server.server_address[1]
    message = _refused(f"http://user:hunter2@127.0.0.1:{port}/missing?token=s3cret#frag", dest)
    assert "HTTP 404" in message and f"127.0.0.1:{port}/missing" in message
    assert not any(secret in message for secret in ("user", "hunter2", "token", "s3cret", "frag"))


# Without the flag: the SSRF guard.
def test_loopback_literal_is_refused_before_connecting(no_flag, server, base, dest):
    assert "not a public address" in _refused(f"{base}/file", dest)
    assert server.seen == []


def test_name_resolving_to_loopback_is_refused(no_flag, server, dest):
    assert "not a public address" in _refused(f"http://localhost:{server.server_address[1]}/file", dest)
    assert server.seen == []


@pytest.fixture
def first_server_public(no_flag, monkeypatch):
    """Treats 127.0.0.1 as public: it stands for an allowed server; every other address is judged as usual."""
    judge = fetch.is_public_address
    monkeypatch.setattr(fetch, "is_public_address", lambda address: address == "127.0.0.1" or judge(address))


def test_redirect_to_a_forbidden_address_is_refused(first_server_public, server, base, dest):
    inner = _serve("127.0.0.2")  # all of 127/8 is loopback on Linux
    try:
        target = f"http://127.0.0.2:{inner.server_address[1]}/file"
        assert "not a public address" in _refused(f"{base}/to?url={target}", dest)
        assert [seen[0] for seen in server.seen] == [f"/to?url={target}"] and inner.seen == []
    finally:
        inner.shutdown()
        inner.server_close()
    started = time.monotonic()  # a connect to the metadata service would hang here, not fail at once
    assert "not a public address" in _refused(f"{base}/to?url=http://169.254.169.254/latest/meta-data/", dest)
    assert time.monotonic() - started < 1.0
    assert fetch.fetch_url(f"{base}/to?url=/file", dest).read_bytes() == BODY  # an allowed hop still works


@pytest.fixture
def rebinding_dns(monkeypatch):
    """Names under .example answer 127.0.0.1 at their first lookup, then the metadata address; returns the lookups."""
    lookups = []
    real_getaddrinfo = socket.getaddrinfo

    def rebinding_getaddrinfo(host, port, *args, **kwargs):
        if not str(host).endswith(".example"):
            return real_getaddrinfo(host, port, *args, **kwargs)
        address = "169.254.169.254" if host in lookups else "127.0.0.1"
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 80))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    return lookups


def test_connects_to_the_checked_address(first_server_public, rebinding_dns, server, dest):
    port = server.server_address[1]
    assert fetch.fetch_url(f"http://media.example:{port}/file", dest, timeout_s=3).read_bytes() == BODY
    assert rebinding_dns == ["media.example"]
    assert server.seen == [("/file", f"media.example:{port}")]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for media.example only (no IP in it)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=media.example", "-addext", "subjectAltName=DNS:media.example",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
                   check=True, capture_output=True)
    return folder / "cert.pem", folder / "key.pem"


def test_https_checks_the_certificate_against_the_name(first_server_public, rebinding_dns, certificate, dest,
                                                        monkeypatch):
    """Pinned to 127.0.0.1, TLS still sends the name as SNI and matches the certificate against it."""
    cert, key = certificate
    monkeypatch.setattr("requests.adapters.DEFAULT_CA_BUNDLE_PATH", str(cert))  # trust the test certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names_asked = []
    context.sni_callback = lambda connection, name, ctx: names_asked.append(name)
    tls_server = _serve()
    tls_server.socket = context.wrap_socket(tls_server.socket, server_side=True)
    try:
        port = tls_server.server_address[1]
        assert "TLS connection" in _refused(f"https://other.example:{port}/file", dest, timeout_s=3)
        assert fetch.fetch_url(f"https://media.example:{port}/file", dest, timeout_s=3).read_bytes() == BODY
        assert names_asked == ["other.example", "media.example"]
        assert tls_server.seen == [("/file", f"media.example:{port}")]
    finally:
        tls_server.shutdown()
        tls_server.server_close()


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True), ("64:ff9b::808:808", True),
    ("169.254.169.254", False), ("127.0.0.1", False), ("127.0.0.2", False), ("0.0.0.0", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("172.31.255.255", False), ("192.168.1.1", False),
    ("100.64.0.1", False), ("100.100.100.200", False), ("224.0.0.1", False), ("240.0.0.1", False),
    ("255.255.255.255", False), ("192.0.2.1", False),
    ("::1", False), ("::", False), ("fe80::1", False), ("fe80::1%eth0", False), ("fc00::1", False),
    ("fd00:ec2::254", False), ("fec0::1", False), ("ff02::1", False), ("ff0e::1", False), ("2001:db8::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("2002:7f00:1::", False),
    ("2002:a9fe:a9fe::", False), ("64:ff9b::7f00:1", False), ("::127.0.0.1", False),
])
def test_address_classifier(address, public):
    assert fetch.is_public_address(address) is public
