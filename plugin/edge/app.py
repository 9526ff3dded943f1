"""The HTTP edge: Docker's plugin protocol over Flask (only the edge package imports Flask).

dockerd sends POST requests with no Content-Type and, for verbs without arguments, an empty body, so
bodies are parsed from raw bytes. Docker's wire names (`Name`, `Opts`, `ID`, `Mountpoint`, `Err`)
appear only here. Every failure becomes `{"Err": "..."}`; a traceback never leaves this module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from plugin.core.driver import Driver
from plugin.core.errors import InvalidOptionError, PluginError
from plugin.core.records import VolumeInfo
from plugin.ops.operations import Operations
from plugin.vault.identity import Identity

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
MAX_BODY = 1 << 20


def create_app(driver: Driver) -> Flask:
    """The Flask application serving `driver` on Docker's volume plugin protocol."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    def route(verb: str, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        def view() -> Response:
            return _reply(handler(_body()))

        app.add_url_rule(f"/{verb}", endpoint=verb, view_func=view, methods=["POST"])

    def create(b: dict[str, Any]) -> dict[str, Any]:
        driver.create(_name(b), _options(b))
        return {"Err": ""}

    def remove(b: dict[str, Any]) -> dict[str, Any]:
        driver.remove(_name(b))
        return {"Err": ""}

    def unmount(b: dict[str, Any]) -> dict[str, Any]:
        driver.unmount(_name(b), _mount_id(b))
        return {"Err": ""}

    route("Plugin.Activate", lambda body: {"Implements": ["VolumeDriver"]})
    route("VolumeDriver.Create", create)
    route("VolumeDriver.Remove", remove)
    route("VolumeDriver.Mount", lambda b: {"Mountpoint": driver.mount(_name(b), _mount_id(b)), "Err": ""})
    route("VolumeDriver.Unmount", unmount)
    route("VolumeDriver.Path", lambda b: {"Mountpoint": driver.path(_name(b)), "Err": ""})
    route("VolumeDriver.Get", lambda b: {"Volume": _volume(driver.get(_name(b))), "Err": ""})
    route("VolumeDriver.List", lambda b: {"Volumes": [_volume(v) for v in driver.list()], "Err": ""})
    route("VolumeDriver.Capabilities", lambda b: {"Capabilities": {"Scope": driver.capabilities()}})

    _install_error_handlers(app)
    return app


def create_control_app(identity: Identity, driver: Driver, operations: Operations) -> Flask:
    """Operator calls on the root-only control socket (never on dockerd's socket)."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    @app.post("/Control.Status")
    def status() -> Response:
        return _reply({**operations.status(), "Err": ""})

    @app.post("/Control.Doctor")
    def doctor() -> Response:
        names = _body().get("Volumes") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidOptionError("Volumes must be a list of volume names")
        return _reply({"Checks": [dataclasses.asdict(c) for c in operations.doctor(names)], "Err": ""})

    @app.post("/Control.Revoke")
    def revoke() -> Response:
        body = _body()
        volume, everything = body.get("Volume"), body.get("All") is True
        if everything == (volume is not None) or (volume is not None and not isinstance(volume, str)):
            raise InvalidOptionError("give a Volume name or All: true, not both")
        return _reply({**driver.break_glass(None if everything else volume), "Err": ""})

    @app.post("/Control.Bootstrap")
    def bootstrap() -> Response:
        token = _body().get("WrappingToken")
        if not isinstance(token, str) or not token.strip():
            raise InvalidOptionError("request has no WrappingToken")
        issued, previous = identity.bootstrap(token.strip())
        retired = driver.retire_identity(previous) if previous is not None else {}
        return _reply({"Accessor": issued.accessor, "TTL": issued.ttl, **retired, "Err": ""})

    _install_error_handlers(app)
    return app


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(PluginError)
    def plugin_error(e: PluginError) -> Response:
        log.info("%s failed: %s", request.path.lstrip("/"), e)
        return _reply({"Err": str(e)}, 500)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Response:
        return _reply(
            {
                "Err": f"{e.code} {e.name}: {request.path} is not a call this plugin accepts"
                if e.code in (404, 405)
                else f"{e.code} {e.name}"
            },
            e.code or 500,
        )

    @app.errorhandler(Exception)
    def unexpected(e: Exception) -> Response:
        log.exception("unexpected error in %s", request.path)
        return _reply({"Err": "internal error in the vault-secrets plugin: see the plugin's log"}, 500)


def _volume(info: VolumeInfo) -> dict[str, Any]:
    """A volume as dockerd reads it (`docker volume inspect` shows `Status`)."""
    return {
        "Name": info.name,
        "Mountpoint": info.mountpoint,
        "CreatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.created_at)),
        "Status": {"activeMounts": info.active_mounts},
    }


def _reply(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, content_type=CONTENT_TYPE)


def _body() -> dict[str, Any]:
    raw = request.get_data(cache=False)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
        # A lone surrogate ("\ud800") decodes but is no text: refused here, not by SQLite or a file write.
        json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, UnicodeError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise InvalidOptionError("request body is not valid JSON") from e
    if not isinstance(body, dict):
        raise InvalidOptionError("request body must be a JSON object")
    return body


def _name(body: dict[str, Any]) -> str:
    name = body.get("Name")
    if not isinstance(name, str) or not name:
        raise InvalidOptionError("request has no volume Name")
    return name


def _mount_id(body: dict[str, Any]) -> str:
    mount_id = body.get("ID")
    if not isinstance(mount_id, str) or not mount_id:
        raise InvalidOptionError("request has no mount ID")
    return mount_id


def _options(body: dict[str, Any]) -> dict[str, str]:
    options = body.get("Opts") or {}
    if not isinstance(options, dict):
        raise InvalidOptionError("Opts must be an object of string options")
    return options
