"""Client side of the control socket, for operator commands run on the host (as root)."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from plugin.errors import PluginError


class ControlError(PluginError):
    """The running plugin could not be reached, or refused the call."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))


def call(path: Path, verb: str, body: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """POST `body` to `/Control.<verb>` on the control socket at `path`. Raises `ControlError`."""
    connection = _UnixConnection(path, timeout)
    try:
        connection.request("POST", f"/Control.{verb}", body=json.dumps(body).encode())
        response = connection.getresponse()
        reply = json.loads(response.read())
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise ControlError(f"no plugin is listening on {path}: is vault-secrets-plugin serve running with this --state-dir?") from e
    except PermissionError as e:
        raise ControlError(f"cannot connect to {path}: the control socket is root-only") from e
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise ControlError(f"the plugin on {path} did not answer properly: {e}") from e
    finally:
        connection.close()
    if reply.get("Err"):
        raise ControlError(reply["Err"])
    return reply
