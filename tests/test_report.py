"""report.md + PNG plots per job, and the side-by-side comparison of several jobs."""

from __future__ import annotations

import argparse
import json
import math
import struct
from pathlib import Path

import pytest

from kdray.report import plots
from kdray.report import render as rep
from kdray.report.train_metrics import TRAIN_METRICS_FILE, StepLog, read_train_metrics
from kdray.errors import KdrayError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def step(i: int, n: int, *, ce: bool = True, curriculum: bool = False) -> dict:
    m = {"step": i, "total_steps": n, "epoch": 0, "round": 0 if i <= n // 2 else 1,
         "loss": 2.0 - 0.1 * i, "kd": 1.5 - 0.1 * i, "tokens_per_s": 100.0 * i,
         "lr": 1e-3 * i / n, "grad_norm": 1.0, "kd_temperature": 1.0, "kd_ratio": 0.75,
         "data_wait_s": 0.01 * i, "forward_s": 0.2, "backward_s": 0.3, "optimizer_s": 0.05,
         "report_s": 0.12 if i % 3 == 0 else 0.0,  # reports are batched: one step in three carries one
         "step_s": 0.6}
    if ce:
        m["ce"] = 0.5
    if curriculum:
        m.update(alpha_mean=0.1 + 0.01 * i, alpha_min=0.05, alpha_max=0.2, beta=i / n, stage=float(i // 3),
                 skl=1.0 / i, delta_mean_teacher=0.3)
    return m


def make_job(root: Path, name: str, *, steps: int = 6, rounds: tuple[int, ...] = (), after: float = 0.4841,
             evaluation: bool = True, **kw) -> Path:
    ev = {}
    if evaluation:
        ev = {"teacher": {"rougeL": 0.9468, "exact_match": 0.935, "mean_length": 2.74, "n": 400},
              "student_before": {"rougeL": 0.3304, "exact_match": 0.225, "mean_length": 2.07, "n": 400}}
        for r in rounds:
            ev[f"student_round_{r}"] = {"rougeL": 0.35 + r / 100, "exact_match": 0.25, "mean_length": 2.5, "n": 400}
        ev["student_after"] = {"rougeL": after, "exact_match": 0.3175, "mean_length": 2.735, "n": 400}
    metrics = [step(i, steps, **kw) for i in range(1, steps + 1)]
    if metrics:
        metrics[-1]["final"] = True
    report = {
        "name": name, "status": "succeeded", "started": 1000.0, "finished": 1135.0,
        "timings_s": {"prepare": 5.0, "generate": 20.0, "train": 50.0, "evaluate": 45.0},
        "rows": {"train": {"split": "train", "total": 2050, "kept": 2048,
                           "bad": {"rows with a duplicate id": {"count": 2, "first_ids": ["a", "b"]}}},
                 "heldout": {"split": "heldout", "total": 400, "kept": 400, "bad": {}}},
        "evaluation": ev, "train_metrics_file": TRAIN_METRICS_FILE, "student_dir": str(root / name / "student"),
        "spec": {"name": name, "teacher": {"model": "toy:teacher"}, "student": {"model": "toy:student"},
                 "objective": {"kind": "forward_kl", "kd_temperature": 1.0, "kd_ratio": 0.75}},
    }
    job = root / name
    job.mkdir(parents=True)
    report["train_summary"] = write_steps(job, metrics)
    (job / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return job


def write_steps(job: Path, metrics: list[dict]) -> dict:
    """``job``'s train_metrics.jsonl, written as a job's driver writes it; its summary."""
    log = StepLog(job / TRAIN_METRICS_FILE)
    log.start()
    for m in metrics:
        log.add(m)
    return log.summary()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])  # width, height


def test_render_writes_markdown_and_plots(tmp_path):
    job = make_job(tmp_path, "fkl", rounds=(2, 1))
    written = rep.render_report(job)
    assert [p.name for p in written] == ["report.md", "loss.png", "schedule.png", "evaluation.png",
                                         "evaluation_rounds.png"]
    assert all(p.is_file() and p.parent == job for p in written)
    md = (job / "report.md").read_text(encoding="utf-8")
    assert "# kdray job `fkl`" in md and "succeeded" in md and "2m 15s" in md
    assert "| student after | 0.484 | 0.318 | 2.73 | 400 |" in md
    assert "| teacher | 0.947 | 0.935 | 2.74 | 400 |" in md
    for png in ("loss.png", "schedule.png", "evaluation.png"):
        assert f"]({png})" in md
    # Training summary: 6 steps, first loss 1.9, last loss 1.4, mean tokens/s 350.
    assert "| optimizer steps | 6 of 6 |" in md
    assert "| first loss | 1.9000 |" in md and "| last loss | 1.4000 |" in md
    assert "| mean tokens/s | 350.0 |" in md
    # Where a step's time went: the mean of each part over the steps (data wait 0.01 .. 0.06; a
    # report every third step, whose median would read 0).
    assert ("| a step's seconds (mean; rank 0) | data wait 0.035 · forward 0.200 · backward 0.300 · "
            "optimizer 0.050 · report 0.040 · whole step 0.600 |") in md
    assert "| train | 50.0 | 42% |" in md
    assert "| train | 2050 | 2048 | 2 |" in md and "2 rows with a duplicate id" in md
    # Rounds are ordered by number (1 before 2), between student before and student after.
    order = [md.index(f"| {label} |") for label in
             ("teacher", "student before", "student round 1", "student round 2", "student after")]
    assert order == sorted(order)
    # No temporary files are left behind.
    assert sorted(p.name for p in job.iterdir()) == sorted(["report.json", TRAIN_METRICS_FILE, *(p.name for p in written)])
    assert "was empty" not in md


def test_report_md_says_when_a_models_every_answer_was_empty(tmp_path):
    job = make_job(tmp_path, "mute")
    report = json.loads((job / "report.json").read_text())
    report["evaluation"]["student_before"].update(mean_length=0.0, rougeL=0.0, exact_match=0.0)
    report["evaluation"]["student_after"].update(mean_length=0.0, rougeL=0.0, exact_match=0.0)
    (job / "report.json").write_text(json.dumps(report))
    rep.render_report(job)
    md = (job / "report.md").read_text()
    assert "Every held-out answer of student before, student after was empty: the model ends its answer at once" in md


def test_pngs_are_valid_images_of_sensible_size(tmp_path):
    job = make_job(tmp_path, "j", curriculum=True)
    for path in rep.render_report(job)[1:]:
        width, height = png_size(path)
        assert 400 <= width <= 2000 and 300 <= height <= 2500, (path.name, width, height)
    import matplotlib.image

    pixels = matplotlib.image.imread(job / "loss.png")
    assert pixels.shape[:2] == png_size(job / "loss.png")[::-1]
    assert pixels.std() > 0.05  # something was drawn, not a blank canvas


def test_render_is_deterministic(tmp_path):
    job = make_job(tmp_path, "j")
    first = {p.name: p.read_bytes() for p in rep.render_report(job)}
    second = {p.name: p.read_bytes() for p in rep.render_report(job)}
    assert first == second


def test_series_keys_split_loss_parts_from_schedule_values():
    metrics = [step(i, 6, curriculum=True) for i in range(1, 7)]
    loss, schedule = rep._series_keys(metrics)
    assert loss == ["loss", "ce", "kd", "skl"]
    assert schedule[:3] == ["lr", "kd_temperature", "kd_ratio"]
    assert {"alpha_mean", "alpha_min", "alpha_max", "beta", "stage", "round", "delta_mean_teacher"} <= set(schedule)
    assert not {"step", "total_steps", "epoch", "tokens_per_s", "grad_norm", "final", "forward_s",
                "data_wait_s"} & set(schedule + loss)
    # A counter that never changes (one round, one stage) is not worth a panel.
    flat = [dict(m, round=0, stage=1.0) for m in metrics]
    assert not {"round", "stage"} & set(rep._series_keys(flat)[1])
    # Without ce, the loss plot has no ce line.
    assert "ce" not in rep._series_keys([step(i, 6, ce=False) for i in range(1, 7)])[0]


def test_missing_train_metrics_and_evaluation_are_reported_not_fatal(tmp_path):
    job = make_job(tmp_path, "bare", steps=0, evaluation=False)
    (job / "loss.png").write_bytes(b"stale")  # from an earlier render: must not survive
    written = rep.render_report(job)
    assert [p.name for p in written] == ["report.md"]
    assert not (job / "loss.png").exists()
    md = (job / "report.md").read_text(encoding="utf-8")
    assert "No training metrics" in md and "_No loss.png:" in md and "_No schedule.png:" in md
    assert "No evaluation results" in md and "_No evaluation.png:" in md
    assert "](loss.png)" not in md


def test_missing_or_broken_report_names_path_and_fix(tmp_path):
    with pytest.raises(KdrayError) as info:
        rep.render_report(tmp_path)
    assert str(tmp_path / "report.json") in str(info.value) and "kdray run SPEC" in str(info.value)
    (tmp_path / "report.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(KdrayError, match="not a valid report.*kdray run SPEC"):
        rep.render_report(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdrayError, match="empty has no report.json"):
        rep.compare_reports([make_job(tmp_path, "ok"), tmp_path / "empty"], tmp_path)
    with pytest.raises(KdrayError, match="is not a directory"):
        rep.render_report(tmp_path / "nowhere")


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    job = make_job(tmp_path, "j", steps=0, evaluation=False)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(plots.os, "replace", boom)  # the atomic writer used by report.md and PNGs
    with pytest.raises(OSError):
        rep.render_report(job)
    assert sorted(p.name for p in job.iterdir()) == ["report.json", TRAIN_METRICS_FILE]


def test_compare_keeps_the_given_order_and_writes_png(tmp_path):
    jobs = [make_job(tmp_path, "zeta", after=0.61), make_job(tmp_path, "alpha", after=0.52, curriculum=True),
            make_job(tmp_path, "mid", steps=0, evaluation=False)]
    report = json.loads((jobs[1] / "report.json").read_text())  # a job that compared its students prompt by prompt
    report["paired_differences"] = {"student_after - student_before": {
        "rougeL": 0.1896, "rougeL_stderr": 0.0151, "exact_match": 0.0926, "exact_match_stderr": None, "n": 400}}
    (jobs[1] / "report.json").write_text(json.dumps(report))
    table, paths = rep.compare_reports(jobs, tmp_path / "cmp")
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 3
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["zeta", "alpha", "mid"]
    assert "0.330 → 0.610 (+0.280)" in lines[2] and "0.330 → 0.520 (+0.190 ± 0.015)" in lines[3]
    assert "0.225 → 0.318 (+0.093)" in lines[3]  # no error given: none shown
    assert "0.947 / 0.935" in lines[2] and "toy:teacher → toy:student" in lines[2]
    assert "| 6 |" in lines[2] and "2m 15s" in lines[2]
    assert "— → —" in lines[4]  # a job without evaluation still gets its row
    assert "different held-out sets" not in table  # the same prompts
    assert paths == [tmp_path / "cmp" / "compare.png"]
    width, height = png_size(paths[0])
    assert width >= 500 and height >= 300


def test_compare_says_when_the_jobs_were_scored_on_other_prompts(tmp_path):
    jobs = [make_job(tmp_path, "a"), make_job(tmp_path, "b")]
    report = json.loads((jobs[1] / "report.json").read_text())
    report["spec"]["data"] = {"heldout": "/data/other.jsonl"}
    report["evaluation"]["student_after"]["n"] = 23
    (jobs[1] / "report.json").write_text(json.dumps(report))
    table, _ = rep.compare_reports(jobs, tmp_path / "cmp")
    assert table.rstrip().splitlines()[-1] == (
        "The jobs were scored on different held-out sets, so their scores are not comparable: a: — (400 "
        "prompts); b: /data/other.jsonl (23 prompts).")


def test_cli_subcommands(tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="kdray")
    rep.add_parsers(parser.add_subparsers(dest="command", required=True))
    a, b = make_job(tmp_path, "a"), make_job(tmp_path, "b")

    args = parser.parse_args(["report", str(a)])
    assert args.fn(args) == 0
    assert f"wrote {a / 'report.md'}" in capsys.readouterr().out

    monkeypatch.chdir(tmp_path)  # compare.png defaults to the current directory
    args = parser.parse_args(["compare", str(b), str(a)])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert out.index("| b |") < out.index("| a |")
    assert (tmp_path / "compare.png").is_file()


def test_rounds_plot_only_for_jobs_scored_per_round(tmp_path):
    one = make_job(tmp_path, "one")  # a one-segment job: no rounds, no rounds plot, no mention
    (one / "evaluation_rounds.png").write_bytes(b"stale")
    assert "evaluation_rounds.png" not in [p.name for p in rep.render_report(one)]
    assert not (one / "evaluation_rounds.png").exists()
    assert "evaluation_rounds" not in (one / "report.md").read_text(encoding="utf-8")

    staged = make_job(tmp_path, "staged", rounds=(1, 2, 3))
    report = json.loads((staged / "report.json").read_text())
    report["plan"] = [{"index": i, "stage": i + 1} for i in range(4)]
    (staged / "report.json").write_text(json.dumps(report))
    assert rep._round_unit(report) == "stage" and rep._round_unit({"plan": [{"stage": None}]}) == "round"
    entries = rep._evaluation(report)
    assert [k for k, _ in rep._rounds(entries)] == ["student_round_1", "student_round_2", "student_round_3",
                                                    "student_after"]
    rep.render_report(staged)
    width, height = png_size(staged / "evaluation_rounds.png")
    assert 800 <= width <= 2000 and 250 <= height <= 1000
    import matplotlib.image

    assert matplotlib.image.imread(staged / "evaluation_rounds.png").std() > 0.05
    assert "](evaluation_rounds.png)" in (staged / "report.md").read_text(encoding="utf-8")


def test_judge_section_in_report_md(tmp_path):
    job = make_job(tmp_path, "judged")
    report = json.loads((job / "report.json").read_text())
    report["judge"] = {"model": "toy:teacher", "reference": "teacher", "items": 5, "comparisons": 10,
                       "wins": 3, "losses": 5, "ties": 2, "win_rate": 0.4, "win_rate_stderr": 0.1,
                       "position_consistency": 0.6,
                       "first_position_bias": 0.2, "second_position_bias": 0.2, "skipped_too_long": 1}
    (job / "report.json").write_text(json.dumps(report))
    rep.render_report(job)
    md = (job / "report.md").read_text(encoding="utf-8")
    assert "## LLM judge" in md and "`toy:teacher`" in md and "**teacher** on 5 held-out prompts" in md
    assert "| win rate of the student | 0.400 ± 0.100 |" in md and "| wins / ties / losses | 3 / 2 / 5 |" in md
    assert "Its ± is the standard error over the prompts" in md
    del report["judge"]["win_rate_stderr"]  # a report from before kdray gave it: no ±, and nothing said of one
    (job / "report.json").write_text(json.dumps(report))
    rep.render_report(job)
    md = (job / "report.md").read_text(encoding="utf-8")
    assert "| win rate of the student | 0.400 |" in md and "±" not in md
    assert "| position consistency | 0.600 |" in md
    assert "| prompts skipped (judge prompt too long) | 1 |" in md
    # A job without a judge has no judge section.
    rep.render_report(make_job(tmp_path, "plain"))
    assert "LLM judge" not in (tmp_path / "plain" / "report.md").read_text(encoding="utf-8")


def test_report_md_counts_replays_sources_and_the_pushes_to_the_student_pool(tmp_path):
    job = make_job(tmp_path, "replay", steps=4)
    metrics = read_train_metrics(job, json.loads((job / "report.json").read_text()))
    for m, (decision, sync) in zip(metrics, [("fixed", 0.0), ("fresh", 0.25), ("fresh", 0.05), ("replay", 0.0)]):
        m.update(replay_decision=decision, weight_sync_s=sync)
    write_steps(job, metrics)
    rep.render_report(job)
    md = (job / "report.md").read_text(encoding="utf-8")
    assert ("| replay steps (DistiLLM) | fresh 2, replayed 1, fixed 1 of 4; 2 pushes to the student pool, "
            "0.150 s each (mean) |") in md
    plain = make_job(tmp_path, "plain", steps=4)  # no replay: no row
    rep.render_report(plain)
    assert "replay steps" not in (plain / "report.md").read_text(encoding="utf-8")


def test_report_md_gives_the_on_policy_steps_and_the_teacher_pools_grading_time(tmp_path):
    job = make_job(tmp_path, "on_policy", steps=4)
    metrics = read_train_metrics(job, json.loads((job / "report.json").read_text()))
    for m, sampled in zip(metrics, [0, 1, 1, 0]):
        m["on_policy"] = float(sampled)
        if sampled:
            m.update(staleness=0, generate_s=0.5, teacher_score_s=0.1 * m["step"])
    write_steps(job, metrics)
    rep.render_report(job)
    md = (job / "report.md").read_text(encoding="utf-8")
    assert ("| on-policy steps (student samples) | 2 of 4; largest staleness 0 (pushes); the pool's generation "
            "0.500 s, the teacher pool's grading 0.250 s per step (mean) |") in md


def test_scores_show_their_standard_errors_and_what_they_mean(tmp_path):
    """A report written since 2026-12-06 holds each score's standard error: report.md and the
    model card show it beside the score, with a note; an older report's table is as before."""
    from kdray.report.markdown import STDERR_NOTE
    from kdray.report.model_card import model_card

    job = make_job(tmp_path, "se")
    report = json.loads((job / "report.json").read_text())
    report["evaluation"]["student_after"].update(rougeL_stderr=0.0314, exact_match_stderr=0.0233)
    report["evaluation"]["teacher"].update(rougeL_stderr=None, exact_match_stderr=None)  # one prompt
    report["paired_differences"] = {"student_after - student_before": {
        "rougeL": 0.1537, "rougeL_stderr": 0.0151, "exact_match": -0.0125, "exact_match_stderr": 0.0183, "n": 400}}
    (job / "report.json").write_text(json.dumps(report))
    rep.render_report(job)
    md = (job / "report.md").read_text(encoding="utf-8")
    assert "| student after | 0.484 ± 0.031 | 0.318 ± 0.023 | 2.73 | 400 |" in md
    assert "| teacher | 0.947 | 0.935 | 2.74 | 400 |" in md and STDERR_NOTE in md
    assert ("- student after − student before: ROUGE-L +0.154 ± 0.015, exact match -0.013 ± 0.018 (400 prompts)"
            in md.splitlines())
    assert "| student after | 0.484 ± 0.031 | 0.318 ± 0.023 | 2.73 | 400 |" in model_card(report)
    older = make_job(tmp_path / "older", "se")  # the same job, from before kdray gave the errors
    rep.render_report(older)
    assert "±" not in (older / "report.md").read_text(encoding="utf-8")
    # The plot draws the errors it has, and only where it has them; the older report's has none.
    from kdray.report.plots import _errors

    scores = report["evaluation"]
    assert _errors([scores["teacher"], scores["student_after"]], "rougeL")[1] == 0.0314
    assert math.isnan(_errors([scores["teacher"], scores["student_after"]], "rougeL")[0])
    assert _errors([scores["student_before"]], "rougeL") is None
    assert (job / "evaluation.png").read_bytes() != (older / "evaluation.png").read_bytes()
    del report["evaluation"]["student_after"]["rougeL_stderr"], report["evaluation"]["student_after"]["exact_match_stderr"]
    (job / "report.json").write_text(json.dumps(report))
    rep.render_report(job)
    assert (job / "evaluation.png").read_bytes() == (older / "evaluation.png").read_bytes()


def test_the_report_page_inlines_each_plot_once_within_its_budget_and_keeps_markup_as_text(monkeypatch):
    """kdray.report.html: a plot shown twice is read once; plots past the page's budget, names
    that are not a plot's, and plots that cannot be read are shown as their description and
    why; raw HTML and a javascript: link stay text; the page carries its own policy."""
    from kdray.report import html

    monkeypatch.setattr(html, "MAX_PAGE_PLOT_BYTES", 10)
    reads: list[str] = []

    def read_plot(name: str) -> bytes | str:
        reads.append(name)
        return {"a.png": b"12345678", "b.png": b"1234"}.get(name, "not a file of the job's output directory")

    page = html.report_page("# t\n\n![A](a.png) ![A again](a.png) ![B](b.png) ![C](c.png) ![up](../x.png)\n\n"
                            "<script>alert(1)</script> [x](javascript:alert(1)) [site](https://example.org)\n",
                            "<job>", read_plot)
    assert reads == ["a.png", "b.png", "c.png"]
    assert page.count('src="data:image/png;base64,MTIzNDU2Nzg="') == 2
    assert "[B: b.png is not shown: the page's plots are over 0 MiB]" in page
    assert "[C: c.png is not shown: not a file of the job's output directory]" in page
    assert "[up: ../x.png is not shown: not a plot of the job's output directory]" in page
    assert "<script>" not in page and "&lt;script&gt;" in page and 'href="javascript' not in page
    assert '<a href="https://example.org">site</a>' in page and '<base target="_blank">' in page
    assert f'content="{html.CONTENT_SECURITY_POLICY}"' in page and "<title>&lt;job&gt;</title>" in page
