"""`sr3fast study serve`: the API's answers, its refusals, the image files it serves (and the
ones it does not), answers surviving a restart, the default bind, Ctrl-C; and `study report`
on the answers given. Servers run in a thread on 127.0.0.1, port 0."""
from __future__ import annotations

import hashlib
import http.client
import json
import sqlite3
from collections import Counter
from urllib.parse import urlsplit

import pytest

from sr3fast.cli import build_parser, main as cli
from sr3fast.study import server as study_server
from sr3fast.study.manifest import ANSWERS, load_manifest, trial_pictures
from sr3fast.study.plan import make_plan, participant_seed
from sr3fast.study.server import make_server
from study_support import make_tiny_study, post, request, running_server


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_tiny_study(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def manifest(study):
    return load_manifest(study)


def raw_get(base: str, path: str) -> int:
    """The status of GET `path` sent byte for byte (no client-side normalisation of '..')."""
    address = urlsplit(base)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_host=False, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def stored(study, participant):
    with sqlite3.connect(study / ANSWERS) as db:
        return db.execute("SELECT trial, model_side, choice, picked_model, response_ms FROM answers "
                          "WHERE participant = ? ORDER BY trial", (participant,)).fetchall()


def test_default_bind_is_localhost(study):
    server = make_server(study, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    args = build_parser().parse_args(["study", "serve", str(study)])
    assert args.host == "127.0.0.1"


def test_page_study_info_and_plan(study, manifest):
    with running_server(study, viewing_time=1.5) as base:
        status, page = request(base + "/")
        assert status == 200 and b"Which image is real?" in page
        status, info = request(base + "/api/study")
        info = json.loads(info)
        assert status == 200 and info["trials"] == len(manifest["trials"]) and info["viewing_ms"] == 1500
        status, started = post(base + "/api/start", {"participant": "plan-check"})
    assert status == 200 and started["answered"] == []
    expected = make_plan(manifest["trials"], participant_seed(manifest["study_id"], "plan-check"))
    assert [t["id"] for t in started["trials"]] == [p.trial for p in expected]
    by_id = {t["id"]: t for t in manifest["trials"]}
    for shown, planned in zip(started["trials"], expected):
        candidate, truth, low = trial_pictures(manifest, by_id[shown["id"]])
        sides = {"left": shown["left"], "right": shown["right"]}
        assert sides[planned.model_side] == "/files/" + candidate
        assert sides["right" if planned.model_side == "left" else "left"] == "/files/" + truth
        assert shown["input"] == ("/files/" + low if shown["variant"] == "with_input" else None)
        assert set(shown) == {"id", "variant", "left", "right", "input"}      # nothing says which is which


def test_answers_stored_and_survive_a_restart(study, manifest):
    with running_server(study) as base:
        status, started = post(base + "/api/start", {"participant": "restart"})
        first = started["trials"][:3]
        for trial, choice in zip(first, ("left", "right", "left")):
            status, reply = post(base + "/api/answer", {"participant": "restart", "trial": trial["id"],
                                                        "choice": choice, "response_ms": 1234})
            assert status == 200 and reply["done"] is False
        assert reply["answered"] == 3 and reply["total"] == len(manifest["trials"])
    # a new server on the same folder: the answers are there, the participant resumes
    with running_server(study) as base:
        status, again = post(base + "/api/start", {"participant": "restart"})
        assert status == 200
        assert again["answered"] == sorted(t["id"] for t in first)
        assert again["trials"] == started["trials"]                      # same plan
        status, reply = post(base + "/api/answer", {"participant": "restart", "trial": first[0]["id"],
                                                    "choice": "right", "response_ms": 5})
        assert status == 409 and "already answered" in reply["error"]
    plan = {p.trial: p.model_side for p in
            make_plan(manifest["trials"], participant_seed(manifest["study_id"], "restart"))}
    rows = stored(study, "restart")
    assert len(rows) == 3
    for trial, model_side, choice, picked_model, response_ms in rows:
        # the side comes from the server's plan, the replay changed nothing
        assert model_side == plan[trial] and response_ms == 1234
        assert picked_model == (choice == model_side)
    assert {trial: choice for trial, _, choice, _, _ in rows} == \
        {t["id"]: c for t, c in zip(first, ("left", "right", "left"))}


MALFORMED = [
    b"{not json",
    b"[1, 2]",
    b"\xff\xfe",
    json.dumps({"participant": "bad", "trial": "t0", "choice": "up", "response_ms": 10}).encode(),
    json.dumps({"participant": "bad", "trial": "t0", "choice": "left", "response_ms": -1}).encode(),
    json.dumps({"participant": "bad", "trial": "t0", "choice": "left", "response_ms": "10"}).encode(),
    json.dumps({"participant": "bad", "trial": "t0", "choice": "left", "response_ms": True}).encode(),
    json.dumps({"participant": "bad", "trial": "t0", "choice": "left", "response_ms": 1.5}).encode(),
    json.dumps({"participant": "bad", "trial": 3, "choice": "left", "response_ms": 10}).encode(),
    json.dumps({"participant": "bad", "choice": "left", "response_ms": 10}).encode(),
    json.dumps({"participant": "../bad", "trial": "t0", "choice": "left", "response_ms": 10}).encode(),
    json.dumps({"participant": "", "trial": "t0", "choice": "left", "response_ms": 10}).encode(),
    json.dumps({"participant": "bad", "trial": "t0", "choice": "left", "response_ms": 10,
                "model_side": "left"}).encode(),
]


def test_refusals(study, manifest):
    trial = manifest["trials"][0]["id"]
    with running_server(study) as base:
        assert post(base + "/api/start", {"participant": "bad"})[0] == 200
        for raw in MALFORMED:
            status, reply = post(base + "/api/answer", raw=raw)
            assert status == 400 and reply["error"], raw
        assert post(base + "/api/start", raw=b"{}")[0] == 400
        assert post(base + "/api/start", {"participant": "x" * 65})[0] == 400
        # a participant who never started, and a trial that is not in the plan
        status, reply = post(base + "/api/answer", {"participant": "stranger", "trial": trial, "choice": "left",
                                                    "response_ms": 10})
        assert status == 404 and "has not started" in reply["error"]
        status, reply = post(base + "/api/answer", {"participant": "bad", "trial": "t-nope", "choice": "left",
                                                    "response_ms": 10})
        assert status == 404 and "not in participant" in reply["error"]
        # the first answer counts, a replay is refused
        answer = {"participant": "bad", "trial": trial, "choice": "left", "response_ms": 10}
        assert post(base + "/api/answer", answer)[0] == 200
        status, reply = post(base + "/api/answer", {**answer, "choice": "right"})
        assert status == 409 and "already answered" in reply["error"]
        assert request(base + "/api/answer", method="PUT", body={})[0] == 405
        assert post(base + "/api/nothing", {})[0] == 404
    assert [(t, c) for t, _, c, _, _ in stored(study, "bad")] == [(trial, "left")]
    assert stored(study, "stranger") == []


def test_only_manifest_files_are_served(study, manifest):
    (study / "images" / "extra.png").write_bytes(b"not in the manifest")
    listed = sorted(manifest["files"])[0]
    attempts = [
        "/files/../manifest.json", "/files/%2e%2e/manifest.json", "/files/%2E%2E%2Fmanifest.json",
        "/files/images/../manifest.json", "/files/images/%2e%2e/manifest.json", "/files/./" + listed,
        "/files//etc/passwd", "/files/%2Fetc%2Fpasswd", "/files/" + str((study / listed).resolve()),
        "/files/manifest.json", "/files/" + ANSWERS, "/files/images/extra.png", "/files/images/",
        "/manifest.json", "/../manifest.json", "/files/" + listed.upper(), "/files/" + listed + "%00",
    ]
    with running_server(study) as base:
        for path in attempts:
            assert raw_get(base, path) == 404, path
        for name, digest in manifest["files"].items():
            status, data = request(base + "/files/" + name)
            assert status == 200 and hashlib.sha256(data).hexdigest() == digest


def test_full_session_and_report(study, manifest, tmp_path, capsys):
    """Two participants answer everything (one always picks the model's image, one the truth,
    both pass every attention check); the report counts exactly that."""
    everything = {}
    with running_server(study) as base:
        for participant, pick_model in (("always-model", True), ("always-truth", False)):
            started = post(base + "/api/start", {"participant": participant})[1]
            plan = {p.trial: p.model_side for p in
                    make_plan(manifest["trials"], participant_seed(manifest["study_id"], participant))}
            kinds = {t["id"]: t["kind"] for t in manifest["trials"]}
            for shown in started["trials"]:
                model_side = plan[shown["id"]]
                truth_side = "right" if model_side == "left" else "left"
                wants_model = pick_model and kinds[shown["id"]] == "model"
                status, reply = post(base + "/api/answer", {"participant": participant, "trial": shown["id"],
                                                            "choice": model_side if wants_model else truth_side,
                                                            "response_ms": 700})
                assert status == 200
            assert reply["done"] is True
            everything[participant] = started
    out = tmp_path / "report.json"
    capsys.readouterr()
    status = cli(["study", "report", str(study), "--json", str(out), "--png", str(tmp_path / "r.png"),
                  "--bootstrap", "300", "--min-attention", "1"])
    table = capsys.readouterr().out
    assert status == 0 and "Wilson" in table and "--min-attention 1" in table
    data = json.loads(out.read_text())
    # earlier tests' participants (a few answers, no attention checks passed) are left out
    kept = sorted(p["id"] for p in data["participants"] if p["included"])
    assert kept == ["always-model", "always-truth"]
    per_cell = Counter((t["model"], t["variant"]) for t in manifest["trials"] if t["kind"] == "model")
    for row in data["rows"]:
        if row["variant"] == "both":
            continue
        items = per_cell[(row["model"], row["variant"])]
        assert (row["fooled"], row["trials"], row["participants"]) == (items, 2 * items, 2)
        assert row["fool_rate"] == 0.5
    assert {row["model"] for row in data["rows"]} == {"tiny-a", "tiny-b"}


def test_serve_command_warns_for_other_hosts_and_stops_on_ctrl_c(study, monkeypatch, capsys):
    class Interrupted:
        """Stands in for the HTTP server: Ctrl-C arrives at once."""
        server_address = ("0.0.0.0", 8123)
        app = study_server.StudyApp(study)
        closed = False

        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            Interrupted.closed = True

    monkeypatch.setattr(study_server, "make_server", lambda *args, **kwargs: Interrupted())
    assert cli(["study", "serve", str(study), "--host", "0.0.0.0", "--port", "8123"]) == 0
    err = capsys.readouterr()
    assert "warning: listening on 0.0.0.0" in err.err and Interrupted.closed
    assert "http://0.0.0.0:8123/" in err.out and "stopped;" in err.out
    assert cli(["study", "serve", str(study)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_serve_refuses_a_changed_study(study, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns("answers.sqlite*"))
    name = sorted(load_manifest(copy)["files"])[0]
    (copy / name).write_bytes(b"changed")
    assert cli(["study", "serve", str(copy), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "differ from their SHA-256" in err and "Traceback" not in err
    assert cli(["study", "serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
