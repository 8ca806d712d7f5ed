"""`sr3fast study serve`: the study's web page and the small JSON API behind it.

Standard library only (http.server, sqlite3). Endpoints:

- ``GET /``: the page (`static/study.html`);
- ``GET /api/study``: the questions, the number of trials and the viewing time;
- ``POST /api/start`` ``{"participant": ID}``: registers the participant (or welcomes them back)
  and returns their plan, each trial's two candidates already placed left and right, and the
  trials they have answered, so the page resumes where they left off;
- ``POST /api/answer`` ``{"participant", "trial", "choice": "left"|"right", "response_ms"}``:
  stores one answer, committed before the reply. The server, not the page, knows on which side
  the model's image was: the page never learns which picture is which;
- ``GET /files/NAME``: an image of the study, only when NAME is listed in the manifest.

Refused: malformed requests (400, with a JSON error), an unknown participant or a trial not in
their plan (404), a second answer to the same trial (409), anything else (404 / 405). Images are
looked up by exact name in the manifest, never by joining paths, so '..', encoded dots and
absolute paths find nothing.
"""
from __future__ import annotations

import json
import re
import socket
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .manifest import ANSWERS, load_manifest, trial_pictures
from .plan import PlannedTrial, make_plan, participant_seed
from .store import AnswerStore, DuplicateAnswer

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
PARTICIPANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MAX_BODY = 16 * 1024
MAX_RESPONSE_MS = 24 * 3600 * 1000
FILES = "/files/"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                               "style-src 'self' 'unsafe-inline'; img-src 'self'",
    "Referrer-Policy": "no-referrer",
}


class Refused(Exception):
    """A request the API refuses: the HTTP status and the message for the JSON error."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class StudyApp:
    """What the server knows: the study (manifest checked, images' hashes verified once), the
    answers store and each participant's plan. Thread-safe."""

    def __init__(self, folder: str | Path, viewing_time: float | None = None):
        if viewing_time is not None and not viewing_time > 0:
            raise ValueError(f"--viewing-time must be a positive number of seconds, got {viewing_time}")
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        self.trials = {trial["id"]: trial for trial in self.manifest["trials"]}
        self.store = AnswerStore(self.folder / ANSWERS, self.manifest["study_id"])
        self.viewing_ms = None if viewing_time is None else round(viewing_time * 1000)
        self.page = resources.files(__package__).joinpath("static", "study.html").read_bytes()
        self._plans: dict[str, dict[str, PlannedTrial]] = {}
        self._lock = threading.Lock()

    def plan(self, participant: str) -> dict[str, PlannedTrial]:
        """The participant's plan, trial id -> planned trial, in the order it is shown."""
        with self._lock:
            if participant not in self._plans:
                seed = participant_seed(self.manifest["study_id"], participant)
                self._plans[participant] = {p.trial: p for p in make_plan(self.manifest["trials"], seed)}
            return self._plans[participant]

    def study(self) -> dict:
        return {"questions": self.manifest["variants"], "trials": len(self.trials),
                "viewing_ms": self.viewing_ms}

    def start(self, body: dict) -> dict:
        participant = _participant(body)
        plan = self.plan(participant)
        self.store.start(participant, participant_seed(self.manifest["study_id"], participant))
        trials = []
        for planned in plan.values():
            trial = self.trials[planned.trial]
            candidate, truth, low = trial_pictures(self.manifest, trial)
            left, right = (candidate, truth) if planned.model_side == "left" else (truth, candidate)
            trials.append({"id": planned.trial, "variant": trial["variant"], "left": FILES + left,
                           "right": FILES + right,
                           "input": FILES + low if trial["variant"] == "with_input" else None})
        return {"participant": participant, "trials": trials,
                "answered": sorted(self.store.answered(participant))}

    def answer(self, body: dict) -> dict:
        participant = _participant(body)
        extra = set(body) - {"participant", "trial", "choice", "response_ms"}
        if extra:
            raise Refused(HTTPStatus.BAD_REQUEST, f"unexpected fields: {', '.join(sorted(extra))}")
        trial, choice, response_ms = body.get("trial"), body.get("choice"), body.get("response_ms")
        if not isinstance(trial, str):
            raise Refused(HTTPStatus.BAD_REQUEST, "'trial' must be a trial id (a string)")
        if choice not in ("left", "right"):
            raise Refused(HTTPStatus.BAD_REQUEST, "'choice' must be 'left' or 'right'")
        if isinstance(response_ms, bool) or not isinstance(response_ms, int) \
                or not 0 <= response_ms <= MAX_RESPONSE_MS:
            raise Refused(HTTPStatus.BAD_REQUEST, f"'response_ms' must be an integer from 0 to {MAX_RESPONSE_MS}")
        if not self.store.known(participant):
            raise Refused(HTTPStatus.NOT_FOUND, f"participant {participant!r} has not started; POST "
                                                "/api/start first")
        planned = self.plan(participant).get(trial)
        if planned is None:
            raise Refused(HTTPStatus.NOT_FOUND, f"trial {trial!r} is not in participant {participant!r}'s plan")
        try:
            self.store.record(participant, trial, planned.model_side, choice, response_ms, self.viewing_ms)
        except DuplicateAnswer as err:
            raise Refused(HTTPStatus.CONFLICT, str(err)) from None
        answered = len(self.store.answered(participant))
        return {"answered": answered, "total": len(self.trials), "done": answered == len(self.trials)}

    def image(self, name: str) -> bytes:
        """The bytes of manifest file `name`; Refused(404) for any name the manifest does not list."""
        if name not in self.manifest["files"]:
            raise Refused(HTTPStatus.NOT_FOUND, "no such image")
        path = (self.folder / name).resolve()
        if not path.is_relative_to(self.folder.resolve()):       # load_manifest already refuses these
            raise Refused(HTTPStatus.NOT_FOUND, "no such image")
        return path.read_bytes()


def _participant(body: dict) -> str:
    participant = body.get("participant")
    if not isinstance(participant, str) or not PARTICIPANT_ID.fullmatch(participant):
        raise Refused(HTTPStatus.BAD_REQUEST, "'participant' must be 1 to 64 letters, digits or _.@- "
                                              "(starting with a letter or digit)")
    return participant


def handler_for(app: StudyApp) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `app`."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "sr3fast-study"
        sys_version = ""

        def do_GET(self):
            self._respond(self._get)

        def do_POST(self):
            self._respond(self._post)

        def do_PUT(self):
            self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method not allowed"})

        do_DELETE = do_PATCH = do_PUT

        def _get(self):
            path = urlsplit(self.path).path
            if path in ("/", "/index.html"):
                return self._send(HTTPStatus.OK, app.page, "text/html; charset=utf-8")
            if path == "/api/study":
                return self._send_json(HTTPStatus.OK, app.study())
            if path.startswith(FILES):
                data = app.image(unquote(path[len(FILES):]))
                return self._send(HTTPStatus.OK, data, "image/png", cache="private, max-age=3600")
            raise Refused(HTTPStatus.NOT_FOUND, "not found")

        def _post(self):
            path = urlsplit(self.path).path
            routes = {"/api/start": app.start, "/api/answer": app.answer}
            if path not in routes:
                raise Refused(HTTPStatus.NOT_FOUND, "not found")
            return self._send_json(HTTPStatus.OK, routes[path](self._json_body()))

        def _json_body(self) -> dict:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise Refused(HTTPStatus.LENGTH_REQUIRED, "a JSON body with a Content-Length is required") from None
            if length > MAX_BODY or length < 0:
                raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body must be at most {MAX_BODY} bytes")
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise Refused(HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise Refused(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
            return body

        def _respond(self, route):
            try:
                route()
            except Refused as err:
                self._send_json(err.status, {"error": str(err)})
            except ConnectionError:      # the browser went away (a reload): an answer is stored anyway
                pass
            except Exception:            # a bug or a disk error: say so, keep serving
                traceback.print_exc()
                self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the server's log"})

        def _send_json(self, status: HTTPStatus, payload: dict):
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _send(self, status: HTTPStatus, data: bytes, content_type: str, cache: str = "no-store"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", cache)
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def log_message(self, format, *args):      # quiet: the answers are in the database
            pass

    return Handler


def make_server(folder: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                viewing_time: float | None = None) -> ThreadingHTTPServer:
    """A server for study `folder`, bound (not yet serving: call serve_forever). port=0 picks a
    free port (server.server_address says which). Raises StudyError/ValueError for a bad study."""
    app = StudyApp(folder, viewing_time)
    server = (_Server6 if ":" in host else _Server)((host, port), handler_for(app))
    server.app = app
    return server


class _Server(ThreadingHTTPServer):
    daemon_threads = True          # a hanging browser connection does not keep Ctrl-C waiting


class _Server6(_Server):
    address_family = socket.AF_INET6


def serve(folder: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          viewing_time: float | None = None) -> None:
    """Serve study `folder` until Ctrl-C, then close the socket and return: every answer already
    acknowledged is committed."""
    if host != DEFAULT_HOST:
        print(f"sr3fast study serve: warning: listening on {host}, not only this machine: anyone who can "
              "reach it can open the study and submit answers", file=sys.stderr)
    server = make_server(folder, host, port, viewing_time)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"serving study {str(folder)!r} ({len(server.app.trials)} trials per participant) at "
          f"http://{shown}:{bound_port}/ ; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    answers = server.app.store.answers()
    people = len({answer.participant for answer in answers})
    print(f"stopped; {len(answers)} answers from {people} participant(s) are in "
          f"{server.app.store.path}", flush=True)

