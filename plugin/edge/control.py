"""Client side of the control socket, for operator commands run on the host (as root)."""

from __future__ import annotations

import http.client
from pathlib import Path
from typing import Any

from plugin.core.errors import PluginError
from plugin.edge.unixhttp import request


class ControlError(PluginError):
    """The running plugin could not be reached, or refused the call."""


def call(path: Path, verb: str, body: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """POST `body` to `/Control.<verb>` on the control socket at `path`. Raises `ControlError`."""
    try:
        _, reply = request(path, "POST", f"/Control.{verb}", body, timeout)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise ControlError(
            f"no plugin is listening on {path}: is vault-secrets-plugin serve running with this --state-dir?"
        ) from e
    except PermissionError as e:
        raise ControlError(f"cannot connect to {path}: the control socket is root-only") from e
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise ControlError(f"the plugin on {path} did not answer properly: {e}") from e
    if not isinstance(reply, dict):
        raise ControlError(f"the plugin on {path} did not answer properly")
    if reply.get("Err"):
        raise ControlError(reply["Err"])
    return reply
