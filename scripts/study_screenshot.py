"""The README's picture of the study page: a trial of a real study, in headless Chromium.

    sr3fast study make --model default --data data/photos/val --out /tmp/study --crop 128
    python scripts/study_screenshot.py /tmp/study docs/images/study-page.png

Serves STUDY on 127.0.0.1 (any free port) in this process, opens the page in Debian's Chromium
(/usr/bin/chromium, or SR3FAST_CHROMIUM) through playwright, starts as a participant whose first
trial shows the low-resolution input, and saves the page once its pictures are shown. Answers
nothing: the study's answers are left as they were.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading

from sr3fast.study.manifest import load_manifest
from sr3fast.study.plan import make_plan, participant_seed
from sr3fast.study.server import make_server

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def participant_opening_with_input(manifest: dict) -> str:
    """The first id 'demo-N' whose plan opens with a trial that shows the input."""
    variants = {trial["id"]: trial["variant"] for trial in manifest["trials"]}
    for n in range(1000):
        name = f"demo-{n}"
        first = make_plan(manifest["trials"], participant_seed(manifest["study_id"], name))[0]
        if variants[first.trial] == "with_input":
            return name
    raise SystemExit("no participant id found whose first trial shows the input")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("output", help="PNG to write")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=560)
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    participant = participant_opening_with_input(load_manifest(args.study))
    server = make_server(args.study, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=os.environ.get("SR3FAST_CHROMIUM", "/usr/bin/chromium"), args=ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(f"http://{host}:{port}/?participant={participant}")
            expect(page.locator("#participant")).to_have_value(participant)
            page.keyboard.press("Enter")
            page.wait_for_selector("#pictures:not(.waiting)")
            page.screenshot(path=args.output)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    print(f"wrote {args.output} (participant {participant})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
