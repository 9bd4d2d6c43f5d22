"""The `instgenie` CLI end to end against scripted servers: output, requests sent, connection fallbacks, exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from instgenie import cli, cli_render
from instgenie.cli_config import DEFAULT_GATEWAY, DEFAULT_SCHEDULER, gateway_endpoint, scheduler_endpoint
from instgenie.client import sync
from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.status import StatusInfo
from tests.client.scripted_server import (Fail, ScriptedEditService, ScriptedSchedulerService, Stream, at_most,
                                          cluster_status, edit_events, invalid_argument, operation, png, serving,
                                          template)

KEY = "key-cli"


@dataclass
class Mesh:
    edit: ScriptedEditService
    scheduler: ScriptedSchedulerService
    address: str
    home: Path

    def write_local_json(self, **overrides) -> Path:
        data = {"gateway": self.address, "scheduler": self.address, "api_key": KEY, **overrides}
        self.home.mkdir(parents=True, exist_ok=True)
        path = self.home / "local.json"
        path.write_text(json.dumps(data))
        return path


@pytest.fixture()
def mesh(tmp_path, monkeypatch):
    """A scripted gateway and scheduler on one loopback port, a clean environment, INSTGENIE_HOME in tmp_path."""
    for var in ("INSTGENIE_ADDRESS", "INSTGENIE_API_KEY", "INSTGENIE_SCHEDULER"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("INSTGENIE_HOME", str(home))
    monkeypatch.setattr(sync, "_sleep", lambda seconds: None)  # retries without waiting out the backoff
    edit, scheduler = ScriptedEditService(api_key=KEY), ScriptedSchedulerService()
    with serving(edit, scheduler) as address:
        yield Mesh(edit, scheduler, address, home)


def run(mesh: Mesh, *argv: str) -> int:
    return cli.main(["--address", mesh.address, "--api-key", KEY, *argv])


@pytest.fixture()
def image(tmp_path) -> Path:
    path = tmp_path / "template.png"
    path.write_bytes(png())
    return path


@pytest.fixture()
def mask(tmp_path) -> Path:
    path = tmp_path / "mask.png"
    path.write_bytes(png(color=(255, 255, 255)))
    return path


# -- templates ---------------------------------------------------------------------------------------------------

def test_templates_create_prints_only_the_id(mesh, image, capsys):
    mesh.edit.script("CreateTemplate", pb.CreateTemplateResponse(operation=operation()))
    mesh.edit.script("WatchOperation", Stream([pb.WatchOperationResponse(operation=op) for op in (
        operation(steps_done=2), operation(steps_done=4, done=True, response=template()))]))
    code = run(mesh, "templates", "create", str(image), "--prompt", "3", "--name", "shoe", "--steps", "4",
               "--seed", "7", "--mode", "y", "--guidance", "2.5", "--request-id", "reg-1")
    out = capsys.readouterr()
    assert code == 0 and out.out == "tpl-1\n"
    request = mesh.edit.calls("CreateTemplate")[0].request
    assert (request.image, request.prompt, request.name, request.steps, request.seed, request.request_id) == \
        (png(), "3", "shoe", 4, 7, "reg-1")
    assert request.cache_mode == pb.CACHE_MODE_Y and request.guidance_scale == 2.5
    assert mesh.edit.calls("CreateTemplate")[0].metadata["authorization"] == f"Bearer {KEY}"


def test_templates_create_no_wait(mesh, image, capsys):
    mesh.edit.script("CreateTemplate", pb.CreateTemplateResponse(operation=operation("tpl-2")))
    assert run(mesh, "templates", "create", str(image), "--prompt", "3", "--no-wait") == 0
    out = capsys.readouterr()
    assert out.out == "tpl-2\n" and "operations/tpl-2" in out.err
    assert mesh.edit.calls("WatchOperation") == []


def test_templates_create_always_sends_a_request_id_so_it_can_retry(mesh, image, capsys):
    mesh.edit.script("CreateTemplate", Fail(grpc.StatusCode.UNAVAILABLE, "restarting"),
                     pb.CreateTemplateResponse(operation=operation("tpl-3")))
    assert run(mesh, "templates", "create", str(image), "--prompt", "3", "--no-wait") == 0
    assert capsys.readouterr().out == "tpl-3\n"
    ids = [s.request.request_id for s in mesh.edit.calls("CreateTemplate")]
    assert len(ids) == 2 and ids[0] == ids[1] and ids[0].startswith("sdk-")


def test_templates_create_failure(mesh, image, capsys):
    failure = StatusInfo(grpc.StatusCode.INVALID_ARGUMENT, "no model serves 16x16")
    mesh.edit.script("CreateTemplate", pb.CreateTemplateResponse(operation=operation(done=True, error=failure)))
    assert run(mesh, "-q", "templates", "create", str(image), "--prompt", "3") == 1
    out = capsys.readouterr()
    assert out.out == "" and "error: INVALID_ARGUMENT: no model serves 16x16" in out.err


def test_templates_list_table_and_json(mesh, capsys):
    pages = [pb.ListTemplatesResponse(templates=[template("tpl-a")], next_page_token="p2"),
             pb.ListTemplatesResponse(templates=[template("tpl-b", state=pb.TEMPLATE_STATE_CREATING)])]
    mesh.edit.script("ListTemplates", *pages, *pages)
    assert run(mesh, "templates", "list", "--page-size", "1") == 0
    table = capsys.readouterr().out
    assert "tpl-a" in table and "tpl-b" in table and "creating" in table and "123.5 kB" in table
    assert [s.request.page_size for s in mesh.edit.calls("ListTemplates")] == [1, 1]
    assert run(mesh, "templates", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(t["template_id"], t["state"]) for t in listed] == [("tpl-a", "ready"), ("tpl-b", "creating")]
    assert listed[0]["create_time"].startswith("2026-01-01T00:00:00")


def test_templates_get_and_delete(mesh, capsys):
    mesh.edit.script("GetTemplate", pb.GetTemplateResponse(template=template(prompt="a red shoe")),
                     pb.GetTemplateResponse(template=template()))
    mesh.edit.script("DeleteTemplate", pb.DeleteTemplateResponse())
    assert run(mesh, "templates", "get", "tpl-1") == 0
    assert "a red shoe" in capsys.readouterr().out
    assert run(mesh, "templates", "get", "tpl-1", "--json") == 0
    assert json.loads(capsys.readouterr().out)["cache_bytes"] == 123_456
    assert run(mesh, "templates", "delete", "tpl-1") == 0
    assert capsys.readouterr().out == "deleted tpl-1\n"
    assert mesh.edit.calls("DeleteTemplate")[0].request.template_id == "tpl-1"


def test_not_found_is_exit_1_without_traceback(mesh, capsys):
    mesh.edit.script("GetTemplate", Fail(grpc.StatusCode.NOT_FOUND, "no template tpl-9"))
    assert run(mesh, "templates", "get", "tpl-9") == 1
    err = capsys.readouterr().err
    assert err == "error: NOT_FOUND: no template tpl-9\n"


# -- edit --------------------------------------------------------------------------------------------------------

def test_edit_writes_the_image_and_a_summary(mesh, mask, tmp_path, capsys):
    def answer(request, context):
        return Stream(edit_events(request.edit.request_id, degraded_reason="template cache unreachable"))

    mesh.edit.script("StreamEdit", answer)
    out_path = tmp_path / "out.png"
    code = run(mesh, "edit", "--template", "tpl-1", "--mask", str(mask), "--prompt", "8", "--out", str(out_path),
               "--seed", "5", "--dilate", "2", "--guidance", "1.5", "--request-id", "cli-1")
    out = capsys.readouterr()
    assert code == 0
    request = mesh.edit.calls("StreamEdit")[0].request.edit
    assert (request.template_id, request.mask, request.prompt, request.seed, request.dilate, request.request_id) \
        == ("tpl-1", mask.read_bytes(), "8", 5, 2, "cli-1")
    assert request.guidance_scale == 1.5
    assert out_path.read_bytes() == edit_events()[-1].result.image
    assert out.out.count("\n") == 1
    for part in ("wrote", "seed 42", "mask 12.5% computed", "1.50 s", "worker worker-0",
                 "degraded: template cache unreachable"):
        assert part in out.out


def test_edit_invalid_argument_shows_the_field(mesh, mask, tmp_path, capsys):
    mesh.edit.script("StreamEdit", invalid_argument("mask", "the mask is empty"))
    # With the progress bar on: a failed call must leave nothing but the error line.
    code = run(mesh, "edit", "--template", "tpl-1", "--mask", str(mask), "--prompt", "8",
               "--out", str(tmp_path / "out.png"))
    err = capsys.readouterr().err
    assert code == 1
    assert err == "error: INVALID_ARGUMENT: bad mask [mask: the mask is empty]\n"
    assert not (tmp_path / "out.png").exists()


def test_resource_exhausted_shows_the_retry_hint(mesh, mask, tmp_path, capsys):
    busy = StatusInfo(grpc.StatusCode.RESOURCE_EXHAUSTED, "", retry_after=2.0)
    mesh.edit.script("StreamEdit", Fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "cluster full", busy))
    code = run(mesh, "-q", "edit", "--template", "tpl-1", "--mask", str(mask), "--prompt", "8",
               "--out", str(tmp_path / "out.png"))
    assert code == 1
    assert capsys.readouterr().err == "error: RESOURCE_EXHAUSTED: cluster full (retry after 2 s)\n"


def test_timeout_flag_sets_the_deadline(mesh, mask, tmp_path, capsys):
    mesh.edit.script("StreamEdit", Stream(edit_events()))
    assert run(mesh, "-q", "edit", "--template", "tpl-1", "--mask", str(mask), "--prompt", "8",
               "--out", str(tmp_path / "out.png"), "--timeout", "7") == 0
    assert mesh.edit.calls("StreamEdit")[0].time_remaining <= at_most(7.0)


def test_interrupt_exits_130_and_cancels_the_edit(mesh, mask, tmp_path, monkeypatch, capsys):
    def ctrl_c(self, event):
        raise KeyboardInterrupt

    release = threading.Event()
    mesh.edit.script("StreamEdit", Stream(edit_events()[:2], hold=release))
    monkeypatch.setattr(cli_render.EditBar, "__call__", ctrl_c)
    try:
        assert run(mesh, "edit", "--template", "tpl-1", "--mask", str(mask), "--prompt", "8",
                   "--out", str(tmp_path / "out.png")) == 130
        assert mesh.edit.cancelled["StreamEdit"].wait(timeout=10), "the edit call was left running"
    finally:
        release.set()
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("argv", [
    [],
    ["templates"],
    ["bogus"],
    ["edit", "--template", "t", "--mask", "m.png"],
    ["templates", "create", "img.png"],
    ["templates", "list", "--page-size", "many"],
    ["models", "--unknown-flag"],
])
def test_usage_errors_exit_2(mesh, argv, capsys):
    assert cli.main(argv) == 2
    assert "usage:" in capsys.readouterr().err
    assert mesh.edit.seen == []


def test_missing_input_files_exit_2_before_any_call(mesh, image, tmp_path, capsys):
    assert run(mesh, "edit", "--template", "t", "--mask", str(tmp_path / "none.png"), "--prompt", "8",
               "--out", str(tmp_path / "out.png")) == 2
    assert "none.png: no such file" in capsys.readouterr().err
    assert run(mesh, "edit", "--template", "t", "--mask", str(image), "--prompt", "8",
               "--out", str(tmp_path / "missing-dir" / "out.png")) == 2
    assert run(mesh, "templates", "create", str(tmp_path / "none.png"), "--prompt", "3") == 2
    assert mesh.edit.seen == []


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "templates" in capsys.readouterr().out


# -- models and status -------------------------------------------------------------------------------------------

def test_models_table_and_json(mesh, capsys):
    model = pb.Model(name="digits", width=16, height=16, default_steps=4, max_steps=50, guidance="none", workers=2)
    mesh.edit.script("ListModels", pb.ListModelsResponse(models=[model]), pb.ListModelsResponse(models=[model]))
    assert run(mesh, "models") == 0
    table = capsys.readouterr().out
    assert "digits" in table and "16x16" in table
    assert run(mesh, "models", "--json") == 0
    assert json.loads(capsys.readouterr().out) == [{
        "name": "digits", "width": 16, "height": 16, "default_steps": 4, "max_steps": 50, "guidance": "none",
        "default_guidance_scale": 0.0, "workers": 2}]


def test_status_table_and_json(mesh, capsys):
    mesh.scheduler.script("GetClusterStatus", cluster_status(), cluster_status())
    assert cli.main(["status", "--scheduler", mesh.address]) == 0
    out = capsys.readouterr().out
    assert "worker-0" in out and "127.0.0.1:6001" in out and "worker-1 (draining)" in out
    row = next(line for line in out.splitlines() if line.startswith("worker-0")).split()
    assert row[3:9] == ["2", "1", "1", "3", "3", "0.4"]  # running, waiting, preparing, resident, in flight, age
    assert "in flight 3/64" in out and "placed 120" in out and "rejected 5" in out
    assert cli.main(["status", "--scheduler", mesh.address, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["edits_placed"] == "120" and data["workers"][0]["worker"]["worker_id"] == "worker-0"
    assert mesh.scheduler.calls("GetClusterStatus")[0].time_remaining <= at_most(30.0)


# -- where the CLI connects --------------------------------------------------------------------------------------

def test_local_json_supplies_gateway_key_and_scheduler(mesh, capsys):
    mesh.write_local_json()
    mesh.edit.script("ListModels", pb.ListModelsResponse())
    mesh.scheduler.script("GetClusterStatus", cluster_status())
    assert cli.main(["models"]) == 0
    assert mesh.edit.calls("ListModels")[0].metadata["authorization"] == f"Bearer {KEY}"
    assert cli.main(["status"]) == 0
    assert "worker-0" in capsys.readouterr().out


def test_flags_after_the_command_work_too(mesh):
    mesh.edit.script("ListModels", pb.ListModelsResponse())
    assert cli.main(["models", "--address", mesh.address, "--api-key", KEY]) == 0


def test_environment_wins_over_local_json(mesh, monkeypatch, unused_address):
    mesh.write_local_json(gateway=unused_address, api_key="stale")
    monkeypatch.setenv("INSTGENIE_ADDRESS", mesh.address)
    monkeypatch.setenv("INSTGENIE_API_KEY", KEY)
    mesh.edit.script("ListModels", pb.ListModelsResponse())
    assert cli.main(["models"]) == 0


def test_unreachable_gateway_from_local_json_says_where_it_came_from(mesh, unused_address, capsys):
    path = mesh.write_local_json(gateway=unused_address)
    assert cli.main(["--timeout", "10", "models"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: ")
    assert f"address {unused_address} from {path}; is `instgenie up` running?" in err


def test_malformed_local_json_is_an_error(mesh, capsys):
    mesh.home.mkdir(parents=True)
    (mesh.home / "local.json").write_text("{not json")
    assert cli.main(["models"]) == 1
    assert capsys.readouterr().err.startswith("error: cannot read ")


def test_endpoint_resolution_order(tmp_path):
    home = tmp_path / "home"
    env = {"INSTGENIE_HOME": str(home)}
    assert gateway_endpoint(None, None, env).address == DEFAULT_GATEWAY
    assert gateway_endpoint(None, None, env).api_key is None
    assert scheduler_endpoint(None, env).address == DEFAULT_SCHEDULER
    home.mkdir()
    (home / "local.json").write_text(json.dumps({"gateway": "g:1", "scheduler": "s:2", "api_key": "k"}))
    assert (gateway_endpoint(None, None, env).address, gateway_endpoint(None, None, env).api_key) == ("g:1", "k")
    assert scheduler_endpoint(None, env).address == "s:2"
    # An address or a key given anywhere means the local mesh is not the target: its key must not leak.
    assert (gateway_endpoint("x:9", None, env).address, gateway_endpoint("x:9", None, env).api_key) == ("x:9", None)
    assert gateway_endpoint(None, "mine", env).address == DEFAULT_GATEWAY
    with_env = {**env, "INSTGENIE_ADDRESS": "e:3", "INSTGENIE_API_KEY": "ek", "INSTGENIE_SCHEDULER": "es:4"}
    assert (gateway_endpoint(None, None, with_env).address, gateway_endpoint(None, None, with_env).api_key) == \
        ("e:3", "ek")
    assert gateway_endpoint("f:5", "fk", with_env).address == "f:5"
    assert scheduler_endpoint(None, with_env).address == "es:4"
    assert scheduler_endpoint("f:6", with_env).address == "f:6"


@pytest.fixture()
def unused_address():
    import socket
    with socket.socket() as sock:  # a port that was free a moment ago and nothing listens on
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


# -- instgenie up ------------------------------------------------------------------------------------------------

def test_up_delegates_everything_after_it(monkeypatch):
    seen = []
    fake = types.ModuleType(cli.MESH_MODULE)
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, cli.MESH_MODULE, fake)
    assert cli.main(["up", "--workers", "2", "--help"]) == 3
    assert cli.main(["--address", "ignored:1", "up", "--model", "digits"]) == 3
    assert seen == [["--workers", "2", "--help"], ["--model", "digits"]]


def test_up_without_the_mesh_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, cli.MESH_MODULE, None)  # as if not installed
    assert cli.main(["up"]) == 1
    assert f"needs {cli.MESH_MODULE}" in capsys.readouterr().err


# -- the installed executable ------------------------------------------------------------------------------------

def test_installed_executable(mesh, image):
    executable = Path(sys.executable).parent / "instgenie"
    mesh.write_local_json()
    env = {**os.environ, "INSTGENIE_HOME": str(mesh.home)}
    mesh.edit.script("CreateTemplate", pb.CreateTemplateResponse(operation=operation()))
    mesh.edit.script("WatchOperation", Stream([pb.WatchOperationResponse(
        operation=operation(steps_done=4, done=True, response=template("tpl-exe")))]))
    mesh.edit.script("GetTemplate", Fail(grpc.StatusCode.NOT_FOUND, "no template tpl-x"))
    created = subprocess.run([str(executable), "templates", "create", str(image), "--prompt", "3"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert (created.returncode, created.stdout) == (0, "tpl-exe\n"), created.stderr
    missing = subprocess.run([str(executable), "templates", "get", "tpl-x"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == "error: NOT_FOUND: no template tpl-x\n"
