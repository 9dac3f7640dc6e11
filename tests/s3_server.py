"""A local S3 for tests: moto's server behind a reverse proxy that injects faults by rule.

Clients talk to `LocalS3.endpoint` (the proxy), which forwards every request to moto and, for the
object GETs a `Fault` rule matches, answers HTTP 500 InternalError, 503 SlowDown, or the real
headers and half the body and then a closed connection. Rules count the GETs they match, so which
request fails is deterministic. `env()` is what a process (a training rank too) needs to use it:
dummy credentials, AWS_ENDPOINT_URL, and botocore and s3fs retries off, so every injected fault
reaches the trainer's own retry path instead of being absorbed below it.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

from moto.server import ThreadedMotoServer

BUCKET = "tic"
# Small reads, so a shard takes several ranged GETs and a fault can land in the middle of one.
BLOCK_SIZE = 4096

_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}
# Hop-by-hop or re-computed headers that are not passed through as they are.
_SKIP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@dataclass
class Fault:
    """Fail GETs of objects whose key contains `key`: number n of them (from 1) for n in `at`, the
    first `first`, and every `every`-th. Every rule counts every GET it matches."""

    kind: Literal["500", "503", "drop"]
    key: str = ""
    at: tuple[int, ...] = ()
    first: int = 0
    every: int = 0
    seen: int = 0
    injected: int = 0

    def hit(self, key: str) -> bool:
        """Count a GET of `key`; True when this one must fail."""
        if self.key not in key:
            return False
        self.seen += 1
        return self.seen in self.at or self.seen <= self.first or (self.every > 0 and self.seen % self.every == 0)


@dataclass
class LocalS3:
    """A running moto server (`direct`) and the fault proxy in front of it (`endpoint`)."""

    endpoint: str
    direct: str
    faults: list[Fault] = field(default_factory=list)
    gets: list[str] = field(default_factory=list)
    """Every object GET's key, in arrival order."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def env(self, small_reads: bool = True) -> dict[str, str]:
        """Environment variables that point boto/s3fs (in this process or a child) at the proxy.

        `small_reads`: s3fs reads in blocks of BLOCK_SIZE (writes refuse blocks under 5 MB, so a
        writer such as make_shards gets False).
        """
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            # botocore's own retries (legacy mode: 4 for a 500) would hide the faults.
            "AWS_MAX_ATTEMPTS": "1",
        }
        if small_reads:
            # fsspec reads FSSPEC_<PROTOCOL> (JSON) into S3FileSystem's keyword defaults at import.
            env["FSSPEC_S3"] = json.dumps(self.s3fs_options())
        return env

    @staticmethod
    def s3fs_options() -> dict[str, int]:
        """S3FileSystem keywords of `env()` (s3fs's own retries are a class attribute, not one of them)."""
        return {"default_block_size": BLOCK_SIZE}

    def injected(self) -> int:
        """Faults injected so far, all rules together."""
        with self.lock:
            return sum(f.injected for f in self.faults)

    def fault_for(self, method: str, path: str) -> Fault | None:
        """The rule that fails this request, if any (only GETs of object keys are ever failed)."""
        parts = urlsplit(path)
        bucket_and_key = parts.path.lstrip("/").split("/", 1)
        if method != "GET" or len(bucket_and_key) < 2 or not bucket_and_key[1]:
            return None  # listings, HEADs and writes pass through
        key = bucket_and_key[1]
        with self.lock:
            self.gets.append(key)
            hits = [f for f in self.faults if f.hit(key)]  # a list, not next(): every rule counts
            if hits:
                hits[0].injected += 1
            return hits[0] if hits else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _handler(s3: LocalS3, upstream: tuple[str, int]) -> type[BaseHTTPRequestHandler]:
    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 does: a dropped connection is then a surprise

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self) -> None:
            body = self._body()
            fault = s3.fault_for(self.command, self.path)
            if fault is not None and fault.kind in _ERRORS:
                status, code, message = _ERRORS[fault.kind]
                xml = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
                self._reply(status, [("Content-Type", "application/xml")], xml.encode())
                return
            conn = http.client.HTTPConnection(*upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _SKIP}
                headers["Host"] = self.headers.get("Host", f"{upstream[0]}:{upstream[1]}")
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                passed = [(k, v) for k, v in resp.getheaders() if k.lower() not in _SKIP]
                length = resp.getheader("Content-Length")
            finally:
                conn.close()
            if self.command == "HEAD":  # no body, but the object's real length
                self._reply(resp.status, [*passed, ("Content-Length", length or "0")], b"")
                return
            if fault is not None:  # "drop": the real headers, half the body, then the connection is gone
                self.send_response(resp.status)
                for k, v in passed:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._reply(resp.status, passed, data)

        def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Proxy


@contextmanager
def local_s3(bucket: str = BUCKET) -> Iterator[LocalS3]:
    """moto's S3 server and the fault proxy on free localhost ports, with `bucket` created."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    moto_port = _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    proxy: ThreadingHTTPServer | None = None
    try:
        direct = f"http://127.0.0.1:{moto_port}"
        s3 = LocalS3(endpoint="", direct=direct)
        proxy = ThreadingHTTPServer(("127.0.0.1", 0), _handler(s3, ("127.0.0.1", moto_port)))
        proxy.daemon_threads = True
        s3.endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        conn = http.client.HTTPConnection("127.0.0.1", moto_port, timeout=30)
        conn.request("PUT", f"/{bucket}")  # create the bucket (moto needs no signature)
        assert conn.getresponse().status == 200
        conn.close()
        yield s3
    finally:
        if proxy is not None:
            proxy.shutdown()
            proxy.server_close()
        moto.stop()
