"""The service's web page (``GET /``) in Debian's chromium, headless, against the app on a real
HTTP server (uvicorn, no Ray): the token entered once, the jobs table, and for a job its loss
curve from the event stream, its evaluation table and its report (with its plots). The page following a job
that a real `kdray serve` runs to the end is in test_service.py."""

from __future__ import annotations

import base64
import json
import re
import time

import pytest

from kdray.service.app import ServiceConfig, build_app
from tests.browser import ARTIFACTS, chromium, click, waiting
from tests.http_app import serving


#: A PNG of one pixel (a plot in a report).
ONE_PIXEL_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="


@pytest.fixture
def server(tmp_path):
    config = ServiceConfig(state_dir=str(tmp_path / "state"), output_root=str(tmp_path / "runs"), token="page-token",
                           dashboard_url="http://127.0.0.1:1", auth_reads=True)
    app = build_app(config)
    with serving(app) as url:
        yield app, url


def test_the_page_shows_jobs_their_loss_curve_evaluation_and_report(server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app, url = server
    store = app.state.store
    out = tmp_path / "runs" / "finished"
    out.mkdir(parents=True)
    done, _ = store.create(name="finished", spec={}, output_dir=str(out))
    store.update(done["id"], state="running", driver=True)
    for step, loss in enumerate((2.5, 1.9, 1.4, 1.2, 1.3), start=1):
        store.append_event(done["id"], {"kind": "train_step", "step": step, "total_steps": 5, "loss": loss})
    # restored from checkpoint 2: steps 3 on are trained again, and replace the lost ones
    store.append_event(done["id"], {"kind": "train_step", "step": 3, "total_steps": 5, "loss": 1.5})
    (out / "report.json").write_text(json.dumps({"status": "succeeded", "started": time.time(), "evaluation": {
        "teacher": {"rougeL": 0.971, "exact_match": 0.968, "mean_length": 3.1},
        "student_after": {"rougeL": 0.484, "exact_match": 0.335, "mean_length": 3.4, "rougeL_stderr": 0.0314,
                          "exact_match_stderr": None}},  # one prompt's exact match: no stderr
        "paired_differences": {"student_after - teacher": {"rougeL": -0.4873, "rougeL_stderr": 0.0221,
                                                           "exact_match": -0.633, "exact_match_stderr": None, "n": 400}},
        "judge": {"model": "toy:teacher", "reference": "teacher", "win_rate": 0.25, "win_rate_stderr": 0.0433,
                  "comparisons": 24}}))
    # a plot, and markup in a value (a job's name is the user's) that must stay text
    (out / "loss.png").write_bytes(base64.b64decode(ONE_PIXEL_PNG))
    (out / "report.md").write_text("# finished\n\nThe distilled student <b>x</b>.\n\n![the loss](loss.png)\n\n"
                                   "![gone](schedule.png)\n")
    store.update(done["id"], state="succeeded")
    queued, _ = store.create(name="waiting", spec={}, output_dir=str(tmp_path / "runs" / "waiting"))
    live, _ = store.create(name="live", spec={}, output_dir=str(tmp_path / "runs" / "live"))
    store.update(live["id"], state="running", driver=True)
    store.append_event(live["id"], {"kind": "message", "text": "plan: 1 segment(s), 9 optimizer steps"})
    for step in (1, 2, 3):
        store.append_event(live["id"], {"kind": "train_step", "step": step, "total_steps": 9, "loss": 3.0 - step / 2,
                                        "lr": 1e-4 * step})

    driver = chromium(tmp_path / "profile")
    wait = waiting(driver, 30)
    try:
        driver.get(url + "/")
        wait.until(lambda d: "API token" in d.find_element(By.ID, "status").text)  # reads need it here
        driver.find_element(By.ID, "token").send_keys("page-token")
        driver.find_element(By.ID, "use-token").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")) == 3)
        states = {tr.get_attribute("data-job"): tr.find_element(By.CSS_SELECTOR, "td.state").text
                  for tr in driver.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")}
        assert states == {done["id"]: "succeeded", queued["id"]: "queued", live["id"]: "running"}
        click(driver, f'tr[data-job="{done["id"]}"]')
        wait.until(lambda d: d.find_element(By.ID, "loss").get_attribute("data-points") == "3")
        # The x-axis runs to the job's last step (5; a restore left steps 1-3), and the values read
        # from the keyboard (End, Home, →) and under the pointer.
        canvas = driver.find_element(By.ID, "loss")
        assert canvas.get_attribute("data-x-end") == "5" and "of 5" in canvas.get_attribute("aria-label")
        readout = lambda d: d.find_element(By.ID, "readout").text  # noqa: E731
        for key, shown in ((Keys.END, "step 3: loss 1.5"), (Keys.HOME, "step 1: loss 2.5"), (Keys.ARROW_RIGHT, "step 2: loss 1.9")):
            canvas.send_keys(key)
            wait.until(lambda d: readout(d) == shown)
        ActionChains(driver).move_to_element_with_offset(canvas, 52 + 648 * 2 // 4 - 360, 0).perform()  # step 3's column
        wait.until(lambda d: readout(d) == "step 3: loss 1.5")
        ActionChains(driver).move_to_element_with_offset(canvas, 52 + 648 * 3 // 4 - 360, 0).perform()  # no step 4
        wait.until(lambda d: readout(d) == "")
        wait.until(lambda d: "0.971" in d.find_element(By.ID, "evaluation").text)
        rows = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#evaluation tbody tr")]
        assert rows == ["teacher 0.971 0.968 3.10", "student after 0.484 ± 0.031 0.335 3.40"]
        lines = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#comparisons li")]
        assert lines == ["student after − teacher: ROUGE-L -0.487 ± 0.022, exact match -0.633 (400 prompts)",
                         "judge toy:teacher: student after vs teacher: win rate 0.250 ± 0.043 over 24 comparisons"]
        assert f"finished ({done['id']}): succeeded" in driver.find_element(By.ID, "d-title").text
        click(driver, "#report-link")  # report.md rendered, its plot in it, in a sandboxed frame
        wait.until(lambda d: d.find_element(By.ID, "report-frame").is_displayed())
        assert not driver.find_element(By.ID, "viewer").is_displayed()
        ARTIFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "service-page-units.png"))
        driver.switch_to.frame(driver.find_element(By.ID, "report-frame"))
        try:
            wait.until(lambda d: "The distilled student <b>x</b>." in d.find_element(By.TAG_NAME, "body").text)
            assert driver.find_element(By.TAG_NAME, "h1").text == "finished"
            shown = "return document.images.length && document.images[0].naturalWidth"
            wait.until(lambda d: d.execute_script(shown) == 1)
            assert driver.find_element(By.TAG_NAME, "img").get_attribute("alt") == "the loss"
            body = driver.find_element(By.TAG_NAME, "body").text
            assert "[gone: schedule.png is not shown: not a file of the job's output directory]" in body
        finally:
            driver.switch_to.default_content()
        # The token stays for the tab: a reload shows the jobs without asking again.
        driver.refresh()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")) == 3)
        assert driver.find_element(By.ID, "status").text == ""
        # A running job: its curve so far, then the steps streamed after it, a restore included.
        click(driver, f'tr[data-job="{live["id"]}"]')
        loss = lambda d: (d.find_element(By.ID, "loss").get_attribute("data-points"),  # noqa: E731
                          d.find_element(By.ID, "loss").get_attribute("data-last-step"))
        wait.until(lambda d: loss(d) == ("3", "3"))
        for step in (4, 5):
            store.append_event(live["id"], {"kind": "train_step", "step": step, "total_steps": 9, "loss": 1.0,
                                            "lr": 1e-4 * step, "kl": 0.5})
        wait.until(lambda d: loss(d) == ("5", "5"))
        # The driver's messages: those before the curve, then those streamed; a failure opens them.
        messages = lambda d: [li.get_attribute("textContent").split(" ", 1)[1]  # noqa: E731
                              for li in d.find_elements(By.CSS_SELECTOR, "#d-messages li")]
        assert messages(driver) == ["plan: 1 segment(s), 9 optimizer steps"]
        assert not driver.find_element(By.ID, "d-messages-box").get_attribute("open")
        failed = "train: the worker group failed after step 5 (rank 1: RuntimeError: [gloo] closed <b>x</b>)"
        store.append_event(live["id"], {"kind": "message", "text": failed})
        wait.until(lambda d: len(messages(d)) == 2)
        assert messages(driver)[1] == failed and driver.find_element(By.ID, "d-messages-count").text == "2"
        assert driver.find_element(By.ID, "d-messages-box").get_attribute("open") is not None
        store.append_event(live["id"], {"kind": "train_step", "step": 2, "total_steps": 9, "loss": 2.1, "lr": 2e-4})
        wait.until(lambda d: loss(d) == ("2", "2"))
        # Another number of the steps: the choices are the job's (kl came with the streamed steps).
        from selenium.webdriver.support.ui import Select

        metric = Select(driver.find_element(By.ID, "metric"))
        assert [o.text for o in metric.options] == ["loss", "lr", "kl"]
        metric.select_by_visible_text("lr")
        wait.until(lambda d: d.find_element(By.ID, "loss").get_attribute("data-field") == "lr" and loss(d) == ("2", "2"))
        store.append_event(live["id"], {"kind": "train_step", "step": 3, "total_steps": 9, "loss": 2.0})  # no lr
        store.append_event(live["id"], {"kind": "train_step", "step": 4, "total_steps": 9, "loss": 1.9, "lr": 4e-4})
        wait.until(lambda d: loss(d) == ("3", "4"))  # steps 1, 2 and 4
        # Every event stream slot taken: the job's curve still shows, the page says why it does
        # not follow the job yet (the stream's 429), and follows it once a slot is free (it
        # tries again after the Retry-After of 5 s): the job's end event loads its report.
        hub = app.state.events
        hub.open += hub.cap
        try:
            click(driver, f'tr[data-job="{done["id"]}"]')
            wait.until(lambda d: "follows as many pages as it can" in d.find_element(By.ID, "d-follow").text)
            wait.until(lambda d: loss(d) == ("3", "3"))  # steps 1, 2 and the redone 3
        finally:
            hub.open -= hub.cap
        wait.until(lambda d: not d.find_element(By.ID, "d-follow").is_displayed())
        wait.until(lambda d: hub.open == 0)  # the finished job's stream ended with its end event: its slot is back
    finally:
        driver.quit()


def test_the_loss_curve_of_a_long_job_draws_every_step(server, tmp_path):
    """60,000 training steps: the page reads the job's curve (GET /curve, at most two points per
    pixel column) rather than replaying its 60,000 events, and draws a pixel column per group of
    steps (replaying took 3 s for 60,000 steps and 85 MB for 120,000; a redraw per step took 28 s
    for 20,000)."""
    import sqlite3

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app, url = server
    store = app.state.store
    n = 60_000
    job, _ = store.create(name="long", spec={}, output_dir=str(tmp_path / "runs" / "long"))
    store.update(job["id"], state="running", driver=True)
    db = sqlite3.connect(store.path)  # the rows append_event writes, in one transaction rather than 60,000
    db.executemany("INSERT INTO events (job_id, seq, time, kind, data) VALUES (?, ?, ?, 'train_step', ?)",
                   ((job["id"], k, 1e9 + k, json.dumps({"step": k, "total_steps": n, "loss": 2.0 / (1 + k / 1000)}))
                    for k in range(1, n + 1)))
    db.commit()
    db.close()
    store.update(job["id"], state="succeeded")

    driver = chromium(tmp_path / "profile")
    try:
        driver.get(url + "/")
        driver.execute_script("sessionStorage.setItem('kdray-token', 'page-token')")
        driver.refresh()
        click(driver, f'tr[data-job="{job["id"]}"]')
        canvas = driver.find_element(By.ID, "loss")
        waiting(driver, 60).until(lambda d: canvas.get_attribute("data-last-step") == str(n))
        points = int(canvas.get_attribute("data-points"))
        assert 648 <= points <= 2 * 650 and canvas.get_attribute("data-drawn") == str(points)
        # The curve spans the plot: a blue pixel in (nearly) every one of its 648 columns.
        columns = driver.execute_script("""
            const c = document.getElementById('loss'), px = c.getContext('2d').getImageData(52, 0, 648, c.height).data;
            let n = 0;
            for (let x = 0; x < 648; x++) {
              for (let y = 0; y < c.height; y++) { const i = 4 * (y * 648 + x); if (px[i + 2] > 200 && px[i] < 120) { n++; break; } }
            }
            return n;""")
        assert columns >= 640, columns
        # A column holds about 92 steps: the readout gives their range and their lowest and highest.
        canvas.send_keys(Keys.END)
        shown = waiting(driver).until(lambda d: d.find_element(By.ID, "readout").text)
        assert re.fullmatch(r"steps 59\d{3}–60000: loss 0\.0\d+ to 0\.0\d+", shown), shown
    finally:
        driver.quit()


def test_the_jobs_table_pages_through_older_jobs_and_filters_by_state(server, tmp_path):
    """A service that ran for weeks holds more jobs than one page: the table shows 100 at a
    time, newest first, with newer/older buttons, and a state filter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    app, url = server
    store = app.state.store
    ids = []
    for k in range(130):
        job, _ = store.create(name=f"job-{k}", spec={}, output_dir=str(tmp_path / "runs" / str(k)))
        store.update(job["id"], state="failed" if k % 10 == 0 else "succeeded")
        ids.append(job["id"])
    driver = chromium(tmp_path / "profile")
    wait = waiting(driver, 30)
    shown = lambda d: [tr.get_attribute("data-job") for tr in d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")]  # noqa: E731
    text = lambda d, id: d.find_element(By.ID, id).text  # noqa: E731
    try:
        driver.get(url + "/")
        driver.execute_script("sessionStorage.setItem('kdray-token', 'page-token')")
        driver.refresh()
        wait.until(lambda d: text(d, "range") == "1–100 of 130")
        assert shown(driver) == ids[::-1][:100]
        assert not driver.find_element(By.ID, "newer").is_enabled() and driver.find_element(By.ID, "older").is_enabled()
        driver.find_element(By.ID, "older").send_keys(Keys.ENTER)  # from the keyboard
        wait.until(lambda d: text(d, "range") == "101–130 of 130")
        assert shown(driver) == ids[::-1][100:]
        assert not driver.find_element(By.ID, "older").is_enabled()
        assert driver.switch_to.active_element.get_attribute("id") == "newer"  # not lost with the disabled button
        Select(driver.find_element(By.ID, "state-filter")).select_by_visible_text("failed")
        wait.until(lambda d: text(d, "range") == "1–13 of 13")
        assert shown(driver) == ids[120::-10]  # jobs 120, 110, ..., 0
        assert {tr.text for tr in driver.find_elements(By.CSS_SELECTOR, "#jobs td.state")} == {"failed"}
        Select(driver.find_element(By.ID, "state-filter")).select_by_visible_text("running")
        wait.until(lambda d: d.find_element(By.ID, "none-in-state").is_displayed())
        assert shown(driver) == [] and not driver.find_element(By.ID, "empty").is_displayed()
        Select(driver.find_element(By.ID, "state-filter")).select_by_visible_text("any")
        wait.until(lambda d: text(d, "range") == "1–100 of 130")
        # Jobs deleted while the last page shows: the page steps back to the last one there is.
        click(driver, "#older")
        wait.until(lambda d: text(d, "range") == "101–130 of 130")
        for job_id in ids[:40]:
            assert store.delete(job_id)
        wait.until(lambda d: text(d, "range") == "1–90 of 90")
        assert shown(driver) == ids[::-1][:90]
    finally:
        driver.quit()


def test_a_stream_cut_short_is_resumed_after_its_last_event(server, tmp_path):
    """The connection of a job's event stream drops (the service restarted, a proxy timed out):
    the page follows the job again from the last event it had, as an EventSource would, and
    the steps after the cut reach the curve. Also: rows open from the keyboard, the address
    (#job=ID) follows the job shown both ways, and an ended job without a report says why."""
    import sqlite3

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app, url = server
    store = app.state.store
    job, _ = store.create(name="live", spec={}, output_dir=str(tmp_path / "runs" / "live"))
    store.update(job["id"], state="running", driver=True)
    for step in (1, 2, 3):
        store.append_event(job["id"], {"kind": "train_step", "step": step, "total_steps": 9, "loss": 3.0 - step / 2})
    failed, _ = store.create(name="broke", spec={}, output_dir=str(tmp_path / "runs" / "broke"))
    store.update(failed["id"], state="running", driver=True)
    store.update(failed["id"], state="failed", error="the teacher did not load")

    hub = app.state.events
    original, starts = hub.stream, []

    async def cut_after_one_chunk(job_id, after, give_back):  # the first stream drops after one chunk
        starts.append(after)
        frames = original(job_id, after, give_back)
        try:
            async for chunk in frames:
                yield chunk
                if len(starts) == 1:
                    return
        finally:
            await frames.aclose()

    hub.stream = cut_after_one_chunk
    driver = chromium(tmp_path / "profile")
    wait = waiting(driver, 30)
    loss = lambda d: (d.find_element(By.ID, "loss").get_attribute("data-points"),  # noqa: E731
                      d.find_element(By.ID, "loss").get_attribute("data-last-step"))
    try:
        driver.get(url + "/")
        driver.execute_script("sessionStorage.setItem('kdray-token', 'page-token')")
        driver.refresh()
        row = driver.find_element(By.CSS_SELECTOR, f'tr[data-job="{job["id"]}"]')
        row.send_keys(Keys.ENTER)  # a row takes the keyboard's focus, and Enter opens it
        wait.until(lambda d: loss(d) == ("3", "3"))
        assert driver.execute_script("return location.hash") == f"#job={job['id']}"
        for step in (4, 5):  # the one chunk the first stream brings before it drops
            store.append_event(job["id"], {"kind": "train_step", "step": step, "total_steps": 9, "loss": 1.0})
        wait.until(lambda d: loss(d) == ("5", "5"))
        wait.until(lambda d: len(starts) == 2)
        assert starts[1] > starts[0]  # resumed after the events it had, not from the start
        store.append_event(job["id"], {"kind": "train_step", "step": 6, "total_steps": 9, "loss": 0.9})
        wait.until(lambda d: loss(d) == ("6", "6"))
        assert not driver.find_element(By.ID, "d-follow").is_displayed()
        # A page left open on a long job: what it streams is cut to what the plot draws, as
        # the curve is, so it does not grow with the job.
        db = sqlite3.connect(store.path)
        db.executemany("INSERT INTO events (job_id, seq, time, kind, data) VALUES (?, ?, 0, 'train_step', ?)",
                       ((job["id"], 6 + k, json.dumps({"step": 6 + k, "loss": 1.0 / k})) for k in range(1, 6001)))
        db.commit()
        db.close()
        wait.until(lambda d: loss(d)[1] == "6006")
        assert int(loss(driver)[0]) <= 8 * 649  # 6,006 steps without the cut: it keeps at most 8 points a column
        # The address names another job (a link, Back): the page shows that one.
        driver.execute_script(f"location.hash = 'job={failed['id']}'")
        wait.until(lambda d: f"broke ({failed['id']}): failed" in d.find_element(By.ID, "d-title").text)
        wait.until(lambda d: "ended before writing one" in d.find_element(By.ID, "evaluation").text)
        driver.back()
        wait.until(lambda d: f"live ({job['id']})" in d.find_element(By.ID, "d-title").text)
    finally:
        driver.quit()


def test_the_api_docs_render_from_the_service_alone(server, tmp_path):
    """``/docs`` (Swagger UI) and ``/redoc`` load their scripts from the service, not a CDN: on a
    machine without internet access (this one) FastAPI's own pages stayed blank."""
    from selenium.webdriver.common.by import By

    _, url = server
    driver = chromium(tmp_path / "profile")
    wait = waiting(driver, 30)
    try:
        driver.get(url + "/docs")
        paths = lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]  # noqa: E731
        wait.until(lambda d: "/v1/jobs/{job_id}/curve" in paths(d))
        assert "cdn" not in driver.page_source.lower()
        driver.get(url + "/redoc")
        wait.until(lambda d: "/v1/jobs/{job_id}/curve" in d.find_element(By.TAG_NAME, "body").text)
    finally:
        driver.quit()
