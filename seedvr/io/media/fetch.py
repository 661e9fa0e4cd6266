"""Download a client's `media_url` into the job's temporary folder, guarded against a hostile URL.

- Scheme: http and https only. Size: refused from Content-Length, and again as soon as the streamed body
  passes the cap (the header may be missing or lie); the body goes to disk in chunks.
- SSRF: each hop (redirects are followed by hand, at most `MAX_REDIRECTS`) resolves its host and is
  refused if any address is not public (`is_public_address`). `SEEDVR_ALLOW_PRIVATE_URLS=1` allows all.
- DNS rebinding: `_PinnedAdapter` gives urllib3 the checked IP as the pool's host and keeps the name in
  the Host header and, for https, in `server_hostname` (SNI and certificate match), so no second lookup
  can redirect the connection. `trust_env = False`: environment proxies and .netrc are ignored.
- Time: connect and per-read timeouts, plus a deadline for the whole download, since a server that
  trickles a byte at a time never trips a read timeout: `_Deadline`'s timer shuts down the download's
  sockets, waking a read blocked anywhere (TLS handshake, headers, body); DNS has the resolver's timeouts.
Failures are `RestoreError`s quoting a short excerpt of the URL without credentials or query string.
"""

import contextvars
import ipaddress
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest, Response
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ReadTimeoutError

from seedvr import settings
from seedvr.errors import INVALID_INPUT, RestoreError, excerpt

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0  # the longest silence between two reads
MAX_REDIRECTS = 5
CHUNK_BYTES = 1024**2
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")  # its last 32 bits are an IPv4 address
_current_deadline: contextvars.ContextVar["_Deadline"] = contextvars.ContextVar("seedvr_download_deadline")


def fetch_url(url: str, dest_dir: Path, *, field: str = "media_url", max_bytes: int | None = None,
              timeout_s: float | None = None) -> Path:
    """Download `url` into a new file inside `dest_dir` and return its path (sniff its bytes for the type).

    `max_bytes` and `timeout_s` default to the settings SEEDVR_MAX_DOWNLOAD_BYTES and SEEDVR_DOWNLOAD_TIMEOUT_S."""
    if max_bytes is None:
        max_bytes = settings.current().max_download_bytes
    if timeout_s is None:
        timeout_s = settings.current().download_timeout_s
    with tempfile.NamedTemporaryFile(dir=dest_dir, prefix=f"{field}-", suffix=".download", delete=False) as file:
        path = Path(file.name)
    deadline = _Deadline(timeout_s)
    token = _current_deadline.set(deadline)
    try:
        with requests.Session() as session:
            session.trust_env = False
            for prefix in ("http://", "https://"):
                session.mount(prefix, _PinnedAdapter(field))
            _download(session, url, path, field, max_bytes, deadline)
        if deadline.expired:  # a body without Content-Length ends cleanly when its socket is shut down
            raise requests.Timeout()
    except BaseException as err:
        path.unlink(missing_ok=True)
        if not isinstance(err, requests.RequestException):
            raise
        cause = err.args[0] if err.args else None  # iter_content wraps a read timeout in a ConnectionError
        if deadline.expired or isinstance(err, requests.Timeout) or isinstance(cause, ReadTimeoutError):
            raise RestoreError(INVALID_INPUT, f"{field}: downloading {_quote(url)} timed out (limits: {timeout_s:g} s "
                                              f"in all, see SEEDVR_DOWNLOAD_TIMEOUT_S, and {READ_TIMEOUT_S:g} s "
                                              f"without data)") from err
        if isinstance(err, requests.exceptions.InvalidURL):
            raise RestoreError(INVALID_INPUT, f"{field} is not a valid URL: {_quote(url)}") from err
        if isinstance(err, requests.exceptions.SSLError):
            raise RestoreError(INVALID_INPUT, f"{field}: the TLS connection to {_quote(url)} failed (is the "
                                              f"certificate valid for this host?)") from err
        raise RestoreError(INVALID_INPUT, f"{field}: the host of {_quote(url)} could not be reached or broke "
                                          f"the connection") from err
    finally:
        deadline.cancel()
        _current_deadline.reset(token)
    return path


def _download(session: requests.Session, url: str, path: Path, field: str, max_bytes: int,
              deadline: "_Deadline") -> None:
    """Follow redirects by hand (the adapter checks each hop) and stream the final body into `path`."""
    for _ in range(MAX_REDIRECTS + 1):
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            raise RestoreError(INVALID_INPUT, f"{field} must be an http:// or https:// URL, got {_quote(url)}")
        timeout = (min(CONNECT_TIMEOUT_S, deadline.remaining()), min(READ_TIMEOUT_S, deadline.remaining()))
        with session.get(url, stream=True, allow_redirects=False, timeout=timeout,
                         headers={"Accept-Encoding": "identity", "User-Agent": "seedvr-worker"}) as response:
            if response.status_code in REDIRECT_STATUSES and "Location" in response.headers:
                url = urljoin(url, response.headers["Location"])
                continue
            if not 200 <= response.status_code < 300:
                raise RestoreError(INVALID_INPUT, f"{field}: {_quote(url)} answered HTTP {response.status_code}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise _too_large(field, max_bytes)
            written = 0
            with path.open("wb") as file:
                for chunk in response.iter_content(CHUNK_BYTES):
                    written += len(chunk)
                    if written > max_bytes:
                        raise _too_large(field, max_bytes)
                    file.write(chunk)
            return
    raise RestoreError(INVALID_INPUT, f"{field}: {_quote(url)} redirects more than {MAX_REDIRECTS} times")


def is_public_address(address: str) -> bool:
    """Whether the worker may connect to this IP. False for loopback, private (RFC 1918, fc00::/7), link-local
    (169.254/16 with the cloud metadata service, fe80::/10), CGNAT 100.64/10 (Alibaba Cloud's metadata is
    100.100.100.200), site-local, unspecified, multicast, reserved and documentation ranges. IPv6 forms
    carrying an IPv4 address (::ffff:a.b.c.d, 6to4 2002::/16, NAT64 64:ff9b::/96) are judged by it."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(str(embedded))
        if ip.is_site_local:
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


def resolve_public(host: str, port: int | None, field: str = "media_url") -> str:
    """The address to connect to for `host`; refused unless every address it resolves to is public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        raise RestoreError(INVALID_INPUT, f"{field}: the host {excerpt(host)} could not be resolved") from err
    addresses = [str(info[4][0]) for info in sorted(infos, key=lambda info: info[0] != socket.AF_INET)]
    if not settings.current().allow_private_urls:
        if not all(is_public_address(address) for address in addresses):  # the address itself is not shown
            raise RestoreError(INVALID_INPUT, f"{field}: the host {excerpt(host)} is not a public address; "
                                              f"SEEDVR_ALLOW_PRIVATE_URLS=1 on the worker allows private hosts")
    return addresses[0]  # IPv4 first: many containers have no IPv6 route


class _PinnedAdapter(HTTPAdapter):
    """Connects to the checked address of the request's host, never to a second DNS answer."""

    def __init__(self, field: str) -> None:
        self.field = field
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        assert request.url is not None  # a request reaches the adapter prepared, URL included
        request.headers["Host"] = urlsplit(request.url).netloc.rpartition("@")[2]  # else http.client sends the IP
        return super().send(request, *args, **kwargs)

    def build_connection_pool_key_attributes(self, request: PreparedRequest, verify: bool | str,
                                             cert: str | tuple[str, str] | None = None,
                                             ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        hostname = host_params["host"]
        host_params["host"] = resolve_public(hostname, host_params["port"], self.field)
        if host_params["scheme"] == "https":
            pool_kwargs["server_hostname"] = hostname  # SNI and the certificate check use the name, not the IP
        return host_params, pool_kwargs


class _Deadline:
    """Shuts down every socket of one download when its time is up, waking any read blocked on one."""

    def __init__(self, seconds: float) -> None:
        self._ends_at = time.monotonic() + seconds
        self._socket_getters: list[Callable[[], socket.socket | None]] = []
        self._lock = threading.Lock()
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return max(self._ends_at - time.monotonic(), 0.001)

    def watch(self, get_socket: Callable[[], socket.socket | None]) -> None:
        """Shut down the socket `get_socket()` returns when time is up, or now if it is already."""
        with self._lock:
            self._socket_getters.append(get_socket)
            if self.expired:
                _shutdown(get_socket())

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for get_socket in self._socket_getters:
                _shutdown(get_socket())

    def cancel(self) -> None:
        self._timer.cancel()


def _shutdown(sock: socket.socket | None) -> None:
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed, or the plain socket that TLS has just taken over
        pass


if TYPE_CHECKING:  # a mixin in front of HTTPConnection/HTTPSConnection; at run time it derives from object
    _ConnectionBase = HTTPConnection
else:
    _ConnectionBase = object


class _WatchedConnection(_ConnectionBase):
    """Puts the connection and its socket under the current download's deadline."""

    def connect(self) -> None:
        deadline = _current_deadline.get()
        deadline.watch(lambda: self.sock)  # while connecting: the TCP socket, then the TLS one wrapping it
        super().connect()
        sock = self.sock
        deadline.watch(lambda: sock)  # urllib3 drops self.sock when a response will close, the socket lives on


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = type("_WatchedHTTPConnection", (_WatchedConnection, HTTPConnection), {})


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = type("_WatchedHTTPSConnection", (_WatchedConnection, HTTPSConnection), {})


def _quote(url: str) -> str:
    """A short excerpt of `url` without userinfo, query string or fragment (they may hold credentials)."""
    parts = urlsplit(url)
    return excerpt(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="").geturl(), 60)


def _too_large(field: str, max_bytes: int) -> RestoreError:
    return RestoreError(INVALID_INPUT, f"{field}: the file is larger than the download limit of {max_bytes} bytes "
                                       f"({max_bytes / 1024**3:.2f} GiB), set by SEEDVR_MAX_DOWNLOAD_BYTES")

