"""HTTP contract tests through Flask's test client, with requests shaped as dockerd sends them:
POST, no Content-Type, an empty body for verbs without arguments."""

from __future__ import annotations

import json

import pytest

from plugin.edge.app import create_app
from tests.support.fakes import OPTIONS

ACCEPT = {"Accept": "application/vnd.docker.plugins.v1.2+json"}


@pytest.fixture
def client(driver):
    return create_app(driver).test_client()


def post(client, verb, body=b""):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(f"/{verb}", data=raw, headers=ACCEPT)  # no Content-Type, as dockerd
    return response.status_code, json.loads(response.data)


def test_activate_and_capabilities_with_empty_bodies(client):
    assert post(client, "Plugin.Activate") == (200, {"Implements": ["VolumeDriver"]})
    assert post(client, "VolumeDriver.Capabilities") == (200, {"Capabilities": {"Scope": "local"}})


def test_full_lifecycle_over_the_wire(client, mounter, vault):
    assert post(client, "VolumeDriver.Create", {"Name": "db", "Opts": OPTIONS}) == (200, {"Err": ""})
    status, listed = post(client, "VolumeDriver.List")
    assert status == 200 and {v["Name"] for v in listed["Volumes"]} == {"web", "db"}
    status, mounted = post(client, "VolumeDriver.Mount", {"Name": "db", "ID": "f" * 64})
    assert status == 200 and mounted["Err"] == "" and mounted["Mountpoint"].endswith("/view")
    status, path = post(client, "VolumeDriver.Path", {"Name": "db"})
    assert path["Mountpoint"] == mounted["Mountpoint"]
    status, got = post(client, "VolumeDriver.Get", {"Name": "db"})
    assert got["Volume"]["Name"] == "db" and got["Volume"]["Status"] == {"activeMounts": 1}
    assert post(client, "VolumeDriver.Unmount", {"Name": "db", "ID": "f" * 64}) == (200, {"Err": ""})
    assert post(client, "VolumeDriver.Remove", {"Name": "db"}) == (200, {"Err": ""})
    assert mounter.mounted == {} and vault.live == {}


def test_create_with_null_opts_reports_missing_role(client):
    status, reply = post(client, "VolumeDriver.Create", {"Name": "x", "Opts": None})
    assert status == 500 and "missing option role" in reply["Err"]


@pytest.mark.parametrize(
    "verb, body, expected",
    [
        ("VolumeDriver.Create", b"{not json", "not valid JSON"),
        ("VolumeDriver.Create", b"[1, 2]", "JSON object"),
        ("VolumeDriver.Create", b"\xff\xfe", "not valid JSON"),
        ("VolumeDriver.Create", {"Opts": {}}, "no volume Name"),
        ("VolumeDriver.Create", {"Name": 5}, "no volume Name"),
        ("VolumeDriver.Create", {"Name": "x", "Opts": ["a"]}, "Opts must be an object"),
        ("VolumeDriver.Create", {"Name": "x", "Opts": {"role": 1}}, "option 'role' must be a string"),
        ("VolumeDriver.Mount", {"Name": "web"}, "no mount ID"),
        ("VolumeDriver.Mount", {"Name": "web", "ID": "../../x"}, "invalid mount ID"),
        ("VolumeDriver.Get", {"Name": "missing"}, "no vault-secrets volume named 'missing'"),
        ("VolumeDriver.Path", b"", "no volume Name"),
    ],
)
def test_bad_requests_get_an_err_and_no_traceback(client, verb, body, expected):
    status, reply = post(client, verb, body)
    assert status == 500 and expected in reply["Err"]
    assert "Traceback" not in reply["Err"]


def test_unknown_route_and_method(client):
    status, reply = post(client, "VolumeDriver.Explode", {})
    assert status == 404 and "not a call this plugin accepts" in reply["Err"]
    response = client.get("/VolumeDriver.List")
    assert response.status_code == 405 and json.loads(response.data)["Err"]


def test_oversized_body_is_refused(client):
    status, reply = post(client, "VolumeDriver.Create", b"{" + b" " * (2 << 20) + b"}")
    assert status == 413 and reply["Err"].startswith("413")


def test_unexpected_errors_are_generic_and_logged(client, vault, caplog):
    def explode(*args, **kwargs):
        raise RuntimeError("boom with child-token-secret")

    vault.mint_child = explode
    status, reply = post(client, "VolumeDriver.Mount", {"Name": "web", "ID": "a1"})
    assert status == 500 and reply["Err"] == "internal error in the vault-secrets plugin: see the plugin's log"
    assert "boom" in caplog.text


def test_mount_error_names_the_secret_but_not_the_value(client, vault):
    post(
        client, "VolumeDriver.Create", {"Name": "typo", "Opts": {"role": "web", "secret.pw": "secret/data/web/db#nope"}}
    )
    status, reply = post(client, "VolumeDriver.Mount", {"Name": "typo", "ID": "a1"})
    assert status == 500 and "secret/data/web/db" in reply["Err"] and "nope" in reply["Err"]
    assert "hunter2" not in reply["Err"] and "child-token" not in reply["Err"]


def test_responses_carry_the_plugin_content_type(client):
    response = client.post("/Plugin.Activate", data=b"", headers=ACCEPT)
    assert response.headers["Content-Type"] == "application/vnd.docker.plugins.v1.2+json"
