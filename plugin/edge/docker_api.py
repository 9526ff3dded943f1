"""The little of dockerd's API the plugin uses (optional, with --docker-socket): which running
containers use a volume. (Its `Mounts` cannot tell one container's mount of a volume from another's:
dockerd reports the volume's latest mountpoint for all of them.)"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from pathlib import Path
from typing import Any

from plugin.core.errors import PluginError
from plugin.edge.unixhttp import request


class DockerError(PluginError):
    """dockerd could not be reached or refused a call."""


class DockerAPI:
    def __init__(self, socket_path: Path, timeout: float = 5.0):
        self._socket, self._timeout = socket_path, timeout

    def running_containers_using(self, volume: str) -> list[str]:
        """IDs of running containers that mount `volume`."""
        return [c["Id"] for c in self._running_with(volume)]

    def _running_with(self, volume: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"filters": json.dumps({"volume": [volume]})})
        return list(self._call("GET", f"/containers/json?{query}") or [])

    def _call(self, method: str, url: str) -> Any:
        """dockerd's decoded JSON answer (None for an empty body)."""
        try:
            status, reply = request(self._socket, method, url, timeout=self._timeout)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise DockerError(f"cannot reach dockerd at {self._socket}: {e}") from e
        if status >= 400:
            message = reply.get("message") if isinstance(reply, dict) else ""
            raise DockerError(f"dockerd refused {method} {url.split('?')[0]}: {status} {message}")
        return reply
