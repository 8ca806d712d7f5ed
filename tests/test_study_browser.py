"""End to end in a real browser: a participant takes a short study with the keyboard in headless
Chromium (Debian's /usr/bin/chromium, driven by playwright; no browser download), reloads the
page halfway and resumes, finishes, and `sr3fast study report` counts exactly the answers given.

Skipped when the browser or playwright is missing, unless SR3FAST_REQUIRE_BROWSER=1 (.ci/run sets
it), which turns the skip into a failure so CI cannot skip it silently. SR3FAST_CHROMIUM names
another Chromium binary."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sr3fast.cli import main as cli
from sr3fast.study.manifest import load_manifest, trial_pictures
from study_support import make_tiny_study, running_server

CHROMIUM = Path(os.environ.get("SR3FAST_CHROMIUM", "/usr/bin/chromium"))   # Debian's package
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REQUIRE = os.environ.get("SR3FAST_REQUIRE_BROWSER", "0").lower() in ("1", "true", "yes", "on")
TIMEOUT_MS = 60_000        # generous: a shared 2-core machine; nothing here measures time


def _browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no `playwright install` needed)"
    return None


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    reason = _browser_missing()
    if reason:
        if REQUIRE:
            pytest.fail(f"SR3FAST_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1100, "height": 700})
        context.set_default_timeout(TIMEOUT_MS)
        # localhost only: anything else the page might ask for is refused
        context.route(lambda url: not url.startswith("http://127.0.0.1:"), lambda route: route.abort())
        try:
            yield context
        finally:
            context.close()


def test_participant_completes_a_study_with_the_keyboard(browser_context, tmp_path):
    from playwright.sync_api import expect

    study = make_tiny_study(tmp_path, photos=2, attention_checks=1)
    manifest = load_manifest(study)
    trials = {t["id"]: t for t in manifest["trials"]}
    total = len(trials)                                   # 2 models x 2 photos x 2 variants + 2 checks
    assert total == 10
    keys = {"left": ["f", "ArrowLeft", "F"], "right": ["j", "ArrowRight", "J"]}

    with running_server(study, viewing_time=0.2) as base:
        page = browser_context.new_page()
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(base + "/")
        page.fill("#participant", "kb-1")
        page.keyboard.press("Enter")
        for number in range(1, total + 1):
            expect(page.locator("#count")).to_have_text(f"{number} / {total}")   # the last answer is stored
            if number == 5:                               # a closed tab: reload, same id, resume
                page.reload()
                expect(page.locator("#participant")).to_have_value("kb-1")
                page.keyboard.press("Enter")
                expect(page.locator("#count")).to_have_text(f"{number} / {total}")
            page.wait_for_selector("#pictures:not(.waiting)")
            if number == 1:                               # the fixed viewing time hides the pair
                page.wait_for_selector("#pictures.timed-out img", state="hidden")
            left = page.get_attribute("#left img", "src")
            right = page.get_attribute("#right img", "src")
            shown = page.is_visible("#input-figure")
            trial = next(t for t in trials.values() if {left, right} ==
                         {"/files/" + p for p in trial_pictures(manifest, t)[:2]}
                         and (t["variant"] == "with_input") == shown)
            candidate, truth, _ = trial_pictures(manifest, trial)
            # pick tiny-a's image every time, the truth against tiny-b and in the attention checks
            wanted = candidate if trial["model"] == "tiny-a" else truth
            side = "left" if left == "/files/" + wanted else "right"
            page.keyboard.press(keys[side][number % 3])
        page.wait_for_selector("#done", state="visible")
        assert f"All {total} answers are saved" in page.inner_text("#done")
        assert errors == []
        # a reload after the end goes straight to the finish screen
        page.reload()
        expect(page.locator("#participant")).to_have_value("kb-1")
        page.keyboard.press("Enter")
        page.wait_for_selector("#done", state="visible")

    out = tmp_path / "report.json"
    assert cli(["study", "report", str(study), "--json", str(out), "--bootstrap", "100"]) == 0
    report = json.loads(out.read_text())
    (person,) = report["participants"]
    assert (person["id"], person["answered"], person["attention_passed"], person["attention_total"],
            person["included"]) == ("kb-1", total, 2, 2, True)
    rates = {(row["model"], row["variant"]): (row["fooled"], row["trials"]) for row in report["rows"]}
    for variant in ("with_input", "without_input"):
        assert rates[("tiny-a", variant)] == (2, 2)
        assert rates[("tiny-b", variant)] == (0, 2)
    assert rates[("tiny-a", "both")] == (4, 4) and rates[("tiny-b", "both")] == (0, 4)
