"""HTTP over a Unix socket (the control socket, dockerd's API): one small transport for both clients."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float, host: str = "localhost"):
        super().__init__(host, timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))


def request(path: Path, method: str, url: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    """Send a JSON request and return (status, decoded JSON or None). OS and HTTP errors propagate."""
    connection = UnixHTTPConnection(path, timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        connection.request(method, url, body=payload, headers={"Content-Type": "application/json"} if payload else {})
        response = connection.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw.strip() else None)
    finally:
        connection.close()
