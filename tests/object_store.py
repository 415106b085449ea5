"""A real S3-compatible server for the tests (moto's server mode on a random loopback port) and a
proxy in front of it that cuts chosen downloads mid-transfer, as a failing network does, or answers
503 SlowDown, as S3 does when throttling."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

AWS_VARS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


@dataclass
class S3:
    endpoint: str
    env: dict[str, str] = field(default_factory=dict)  # what a process needs to reach it (and nothing else)

    def client(self):
        import boto3

        return boto3.session.Session(
            aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        ).client("s3", endpoint_url=self.endpoint)


def aws_env(endpoint: str, home: Path) -> dict[str, str]:
    """Credentials for the test server only: the caller's profiles and tokens never leak in."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextlib.contextmanager
def s3_server(home: Path) -> Iterator[S3]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        yield S3(endpoint, aws_env(endpoint, home))
    finally:
        server.stop()


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` set (and AWS_VARS unset) in this process for the block."""
    saved = {k: os.environ.get(k) for k in (*env, *AWS_VARS)}
    for k in AWS_VARS:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


SLOW_DOWN = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Please reduce your request "
    b"rate.</Message></Error>"
)


class CuttingProxy:
    """TCP proxy to ``target``; a request whose first line contains one of ``cut`` gets the first
    ``keep`` bytes of its response, then the connection is closed (counted in ``cuts``). Throttling:
    from the ``throttle_after``-th GET of a ``.tar`` on, every request is answered 503 SlowDown for
    ``throttle_s`` seconds (counted in ``throttled``), as S3 answers an overloaded prefix."""

    def __init__(
        self,
        target: tuple[str, int],
        cut: tuple[str, ...] = (),
        keep: int = 1500,
        throttle_after: int = 0,
        throttle_s: float = 0.0,
    ):
        self.target, self.cut, self.keep = target, cut, keep
        self.throttle_after, self.throttle_s = throttle_after, throttle_s
        self.throttle_until: float | None = None
        self.tar_gets = 0
        self.cuts = self.throttled = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self.sock.close()

    def _throttling(self, line: str) -> bool:
        import time

        if not self.throttle_after:
            return False
        if self.throttle_until is None:
            if line.startswith("GET") and ".tar " in line:
                self.tar_gets += 1
                if self.tar_gets >= self.throttle_after:
                    self.throttle_until = time.monotonic() + self.throttle_s
            if self.throttle_until is None:
                return False
        return time.monotonic() < self.throttle_until

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        state = {"budget": None}  # bytes of the current response still allowed through (None: all)
        lock = threading.Lock()

        def down() -> None:
            try:
                while True:
                    data = upstream.recv(65536)
                    if not data:
                        break
                    with lock:
                        budget = state["budget"]
                        if budget is not None:
                            data = data[:budget]
                            state["budget"] = budget - len(data)
                    client.sendall(data)
                    if state["budget"] == 0:
                        self.cuts += 1
                        break
            except OSError:
                pass
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

        threading.Thread(target=down, daemon=True).start()
        buf = b""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                buf += data
                while b"\r\n\r\n" in buf:  # GET and HEAD requests: a head and no body
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    line = head.split(b"\r\n", 1)[0].decode(errors="replace")
                    if self._throttling(line):  # answered here; clients send one request at a time
                        self.throttled += 1
                        body = b"" if line.startswith("HEAD") else SLOW_DOWN
                        client.sendall(
                            b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                            + f"Content-Length: {len(SLOW_DOWN)}\r\n\r\n".encode()
                            + body
                        )
                        continue
                    if any(c in line for c in self.cut):
                        with lock:
                            state["budget"] = self.keep
                    upstream.sendall(head + b"\r\n\r\n")
        except OSError:
            pass
