"""Helpers shared by the tests of `sr3fast study`: photos, a tiny study, a server in a thread and
plain-HTTP requests to it (urllib, localhost only)."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from sr3fast.study.server import make_server


def write_photos(folder: Path, count: int = 3, size: tuple[int, int] = (40, 44), seed: int = 0) -> Path:
    """`count` random RGB photos (height, width = size) in `folder`, which is created."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = (rng.random((*size, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i}.png")
    return folder


def make_tiny_study(folder: Path, photos: int = 3, attention_checks: int = 2) -> Path:
    """A study of two models, 'tiny-a' and 'tiny-b' (the `tiny` preset, 4x, random weights from
    seeds 0 and 1), 2 sampling steps, 16 px crops of `photos` random photos: seconds on a CPU.
    Returns the study folder."""
    import sr3fast
    from sr3fast.study.make import StudyModel, make_study

    models = [StudyModel(f"tiny-{name}", sr3fast.load("tiny", seed=seed)) for seed, name in enumerate("ab")]
    data = write_photos(folder / "photos", count=photos)
    return make_study(models, [data], folder / "study", steps=2, crop=16, attention_checks=attention_checks,
                      progress=False)


@contextmanager
def running_server(study: Path, **options):
    """A study server on 127.0.0.1 and a free port, serving in a thread; yields its base URL."""
    server = make_server(study, port=0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def request(url: str, body=None, raw: bytes | None = None, method: str | None = None) -> tuple[int, bytes]:
    """(status, body bytes) of a GET, or of a POST of `body` as JSON (or of the bytes `raw`)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post(url: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
    status, data = request(url, body, raw, method="POST")
    return status, json.loads(data)
