"""`kdray repro`: the table and verdict logic on constructed numbers, the grid's specs, the
CLI's errors, and (slow) the quick grid end to end on the real stack."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from kdray.errors import KdrayError
from kdray.repro.harness import EXTRA_METHODS, METHODS, ReproSize, method_spec, write_outputs
from kdray.repro.tables import (BASE_LOSSES, Comparison, Stat, chain_verdict, markdown, method_stats, pocl_rows, pocl_verdict, summarize, verdicts)


def runs_for(scores: dict[str, list[float]]) -> list[dict]:
    return [{"method": m, "seed": i, "rougeL": v, "exact_match": v / 2}
            for m, values in scores.items() for i, v in enumerate(values)]


def all_methods(base: float = 0.40, pocl_gain: float = 0.02, **override: list[float]) -> dict[str, Stat]:
    """Every method of the grid at 3 seeds: bases at ``base``, each +POCL ``pocl_gain`` above."""
    scores: dict[str, list[float]] = {}
    for key in BASE_LOSSES:
        scores[key] = [base - 0.01, base, base + 0.01]
        scores[key + "+pocl"] = [base + pocl_gain - 0.01, base + pocl_gain, base + pocl_gain + 0.01]
    scores["distillm2-paper"] = [0.50, 0.51, 0.52]
    scores["distillm2-released_code"] = [0.47, 0.48, 0.49]
    scores.update(override)
    return method_stats(runs_for(scores))


# -- statistics ---------------------------------------------------------------------------

def test_summarize_uses_sample_std_and_leaves_it_undefined_for_one_seed():
    two = summarize([0.4, 0.6])
    assert two.mean == pytest.approx(0.5) and two.std == pytest.approx(math.sqrt(0.02)) and two.n == 2
    assert two.fmt() == "0.500 ± 0.141"
    one = summarize([0.42])
    assert one.std is None and one.n == 1 and one.fmt() == "0.420"
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def test_comparison_holds_tie_and_noise_flags():
    low, high = Stat(0.40, 0.01, 3), Stat(0.45, 0.01, 3)
    assert Comparison(low, high).holds and Comparison(low, high).word() == "yes"
    assert Comparison(low, high).within_noise is False  # 0.05 > 2 * sqrt(2 * 0.01² / 3)
    assert not Comparison(high, low).holds and Comparison(high, low).word() == "no"
    tie = Comparison(Stat(0.40, 0.01, 3), Stat(0.40, 0.02, 3))
    assert tie.tie and not tie.holds and tie.word() == "tie"
    noisy = Comparison(Stat(0.40, 0.05, 3), Stat(0.41, 0.05, 3))
    assert noisy.holds and noisy.within_noise is True and noisy.note() == "within seed noise"
    single = Comparison(Stat(0.40, None, 1), Stat(0.41, None, 1))
    assert single.holds and single.within_noise is None and single.note() == "single seed: no noise estimate"


def test_method_stats_skips_failed_runs():
    stats = method_stats([{"method": "fkl", "seed": 0, "rougeL": 0.3}, {"method": "fkl", "seed": 1, "rougeL": 0.5},
                          {"method": "fkl", "seed": 2, "error": "boom"}])
    assert stats["fkl"].n == 2 and stats["fkl"].mean == pytest.approx(0.4)


# -- POCL verdict --------------------------------------------------------------------------

def test_pocl_ordering_that_holds_for_every_base_loss():
    stats = all_methods()
    rows = pocl_rows(stats)
    assert [r["loss"] for r in rows] == list(BASE_LOSSES.values())
    assert all(r["holds"] == "yes" and r["diff"] == pytest.approx(0.02) for r in rows)
    v = pocl_verdict(stats)
    assert v["holds"] is True
    assert "HOLDS on this run; POCL helps 7 of 7 base losses" in v["text"]


def test_pocl_ordering_that_does_not_hold_names_the_losses_it_fails_and_ties():
    stats = all_methods(**{"skl+pocl": [0.30, 0.31, 0.32], "tvd+pocl": [0.39, 0.40, 0.41]})
    v = pocl_verdict(stats)
    assert v["holds"] is False
    assert "DOES NOT HOLD" in v["text"] and "POCL helps 5 of 7" in v["text"]
    assert "SKL (0.400 → 0.310)" in v["text"] and "TVD (0.400 → 0.400, tie)" in v["text"]
    assert v["pairs"]["TVD"]["holds"] == "tie" and v["pairs"]["SKL"]["holds"] == "no"


def test_pocl_verdict_with_one_seed_and_missing_losses():
    stats = method_stats(runs_for({"fkl": [0.30], "fkl+pocl": [0.35], "rkl": [0.2]}))
    v = pocl_verdict(stats)
    assert v["holds"] is True and "1 of 1" in v["text"]
    assert "not run: RKL, JSD, TVD, SKL, SRKL, AKL" in v["text"]
    assert pocl_rows(stats)[0]["note"] == "single seed: no noise estimate"
    assert pocl_verdict(method_stats(runs_for({"fkl": [0.3]})))["holds"] is None


# -- DistiLLM-2 verdict --------------------------------------------------------------------

def test_distillm2_chain_that_holds():
    stats = all_methods(fkl=[0.30, 0.31, 0.32], skl=[0.40, 0.41, 0.42])
    v = chain_verdict(stats, "skl", "paper")
    assert v["holds"] is True and "HOLDS on this run" in v["text"]
    assert "KD 0.310 < DistiLLM 0.410" in v["text"] and "DistiLLM 0.410 < DistiLLM-2 0.510" in v["text"]


def test_distillm2_chain_that_does_not_hold_says_which_link_fails():
    stats = all_methods(fkl=[0.45, 0.46, 0.47], skl=[0.40, 0.41, 0.42])
    v = chain_verdict(stats, "skl", "paper")
    assert v["holds"] is False and "fails: DistiLLM > KD)" in v["text"]
    assert v["pairs"] == {"kd<distillm": "no", "distillm<distillm2": "yes"}
    tie = chain_verdict(all_methods(fkl=[0.30], skl=[0.51], **{"distillm2-paper": [0.51]}), "skl", "paper")
    assert tie["holds"] is False and tie["pairs"]["distillm<distillm2"] == "tie"


def test_verdicts_headline_first_and_missing_methods_not_checked():
    found = verdicts(method_stats(runs_for({"fkl": [0.3], "skl": [0.4]})))
    assert [v["claim"] for v in found] == ["pocl", "distillm2:skl:paper", "distillm2:skl:released_code",
                                           "distillm2:srkl:paper", "distillm2:srkl:released_code"]
    assert found[1]["holds"] is None and "not run: distillm2-paper" in found[1]["text"]


def test_markdown_has_both_tables_and_every_verdict_line():
    stats = all_methods()
    em = method_stats(runs_for({"fkl": [0.1]}), "exact_match")
    found = verdicts(stats)
    text = markdown(stats, {"teacher": Stat(0.95, None, 1)}, em, found)
    assert "| FKL | 0.400 ± 0.010 | 0.420 ± 0.010 | +0.020 | yes (beyond seed noise) |" in text
    order = [text.index(label) for label in ("KD (FKL)", "DistiLLM (SKL", "DistiLLM (SRKL",
                                             "DistiLLM-2 (released_code)", "DistiLLM-2 (paper)")]
    assert order == sorted(order)
    assert "| teacher (reference) | 0.950 |" in text
    assert text.count("- **holds**: ") + text.count("- **does not hold**: ") == len(found)


def test_write_outputs_writes_json_and_markdown_and_fails_on_a_failed_run(tmp_path: Path):
    from rich.console import Console

    result = {
        "config": {"size": asdict(ReproSize.quick()), "methods": ["fkl", "fkl+pocl"],
                   "data": {"train": "toy:train"}},
        "timings_s": {"total": 12.0},
        "references": {"teacher": {"rougeL": 0.9, "exact_match": 0.9}},
        "generator_check": {"training_prompts": 400, "student_before_pool": {"rougeL": 0.33}, "student_before_hf": {"rougeL": 0.33},
                            "answer_agreement": 1.0},
        "runs": runs_for({"fkl": [0.3, 0.32], "fkl+pocl": [0.35, 0.36]}),
    }
    console = Console(file=open(tmp_path / "console.txt", "w"), width=200)
    write_outputs(result, tmp_path, console)
    saved = json.loads((tmp_path / "repro.json").read_text())
    assert saved["summary"]["fkl"]["rougeL"]["n"] == 2
    assert saved["verdicts"][0]["holds"] is True
    assert "POCL helps 1 of 1" in (tmp_path / "repro.md").read_text()
    result["runs"].append({"method": "fkl", "seed": 2, "error": "ValueError: boom"})
    with pytest.raises(KdrayError, match="1 run\\(s\\) failed: fkl seed 2"):
        write_outputs(result, tmp_path, console)
    assert "**Failed runs**" in (tmp_path / "repro.md").read_text()


# -- the grid's specs and the CLI -------------------------------------------------------------

@pytest.mark.parametrize("size", [ReproSize.quick(), ReproSize.default()], ids=["quick", "default"])
def test_every_method_is_a_valid_spec_with_the_same_optimizer_steps(size, tmp_path):
    from kdray.curriculum.plan import plan_segments, total_steps
    from kdray.spec import parse_spec

    steps = {}
    for m in METHODS + EXTRA_METHODS:
        spec = parse_spec(method_spec(m, size, "toy:train", "toy:heldout", tmp_path), m)
        plan = plan_segments(spec, size.train_rows)
        steps[m] = total_steps(plan)
        if "+pocl" in m:
            assert [s.stage for s in plan] == list(range(1, size.pocl_stages + 1))
        elif m.startswith("distillm2"):
            assert len(plan) == size.distillm2_rounds and all(s.regenerate_student for s in plan)
    assert set(steps.values()) == {size.epochs * (size.train_rows // size.global_batch_size)}


def test_size_check_and_cli_errors_name_the_option(capsys):
    from kdray.cli import main

    with pytest.raises(KdrayError, match="distillm2_rounds"):
        ReproSize(epochs=3, distillm2_rounds=2).check()
    assert main(["repro", "--methods", "fkl", "nope"]) == 2
    assert "--methods: unknown method(s) nope; choose from fkl, fkl+pocl" in capsys.readouterr().err
    assert main(["repro", "--data", "x.jsonl"]) == 2
    assert "--data/--heldout: give both" in capsys.readouterr().err
    assert main(["repro", "--data", "/nonexistent/train.jsonl", "--heldout", "/nonexistent/h.jsonl",
                 "--methods", "fkl"]) == 2
    assert "data.train: dataset '/nonexistent/train.jsonl' does not exist" in capsys.readouterr().err


# -- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_repro_quick_runs_every_method_and_states_the_verdicts(tmp_path, toy_world):
    from tests.test_e2e import kdray

    # One seed: the grid's cells are what CI's minutes go to (means and stds over seeds, and the
    # seed-noise flags, are checked on tables above).
    res = kdray("repro", "--quick", "--seeds", "1", "--out", str(tmp_path / "repro"), cwd=tmp_path, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "repro"
    report = json.loads((out / "repro.json").read_text())
    size = ReproSize.quick()
    cells = {(r["method"], r["seed"]) for r in report["runs"]}
    assert cells == {(m, 0) for m in METHODS} and report["config"]["seeds"] == [0]
    for run in report["runs"]:
        assert "error" not in run
        assert math.isfinite(run["rougeL"]) and 0.0 <= run["rougeL"] <= 1.0
        assert run["steps"] == size.epochs * (size.train_rows // size.global_batch_size)
        assert run["final_loss"] is not None and math.isfinite(run["final_loss"])
    # The references and the check that HF generate answers as the vLLM pool does.
    assert report["references"]["teacher"]["rougeL"] > report["references"]["student_before"]["rougeL"]
    assert report["generator_check"]["answer_agreement"] >= 0.95
    # DistiLLM-2 trained on fresh student responses each round, with its schedules.
    paper = next(r for r in report["runs"] if r["method"] == "distillm2-paper")
    assert paper["on_policy_generate_s"] > 0 and paper["train_metrics"][-1]["beta"] == 1.5
    # POCL's difficulty measured once, through the pool.
    assert (out / "shared" / "curriculum" / "difficulty.parquet").is_file()
    _assert_pool_answers_and_cross_entropies_are_hfs(out / "shared")
    md = (out / "repro.md").read_text()
    assert "## POCL: average ROUGE-L" in md and "## DistiLLM-2 Table 2 order" in md
    verdict_lines = [line for line in md.splitlines() if line.startswith("- **")]
    assert len(verdict_lines) == 5 and all("not checked" not in line for line in verdict_lines)
    assert "POCL helps every base loss" in res.stdout and "KD (FKL) < DistiLLM (SKL" in res.stdout


def _assert_pool_answers_and_cross_entropies_are_hfs(shared: Path, n: int = 24) -> None:
    """The difficulty pass's vLLM pool (Ray's processor) against HF, row by row, on the first
    ``n`` training rows: the initial student's greedy answer, and its cross-entropy on the
    teacher's response (vLLM's prompt log-probs: the gold request). float32 on both sides."""
    import numpy as np
    import pyarrow.parquet as pq

    from kdray.pools.base import SamplingConfig, pool_env
    from kdray.pools.hf import HFGenerator
    from kdray.spec import GenerationSpec

    def rows(path: Path, columns: list[str]) -> list[dict]:
        marker = json.loads((path / "_kdray_dataset.json").read_text())
        return [r for f in marker["files"] for r in pq.read_table(path / f, columns=columns).to_pylist()]

    responses = sorted(rows(shared / "datasets" / "responses", ["_row", "key", "prompt", "response", "finish_reason"]),
                       key=lambda r: r["_row"])[:n]
    measured = rows(shared / "curriculum" / "difficulty", ["key", "student_response", "gold_rouge_l", "gold_ce"])
    answers = {r["key"]: r["student_response"] for r in measured if not math.isnan(r["gold_rouge_l"])}
    gold_ce = {r["key"]: r["gold_ce"] for r in measured if not math.isnan(r["gold_ce"])}
    size = ReproSize.quick()
    hf = HFGenerator("toy:student", dtype="float32", max_model_len=128, enforce_eager=True, tensor_parallel_size=1,
                     sampling=SamplingConfig.greedy(size.max_new_tokens), env=pool_env(GenerationSpec()),
                     score_gold=True)
    got = hf({"id": np.asarray([r["key"] for r in responses]), "prompt": np.asarray([r["prompt"] for r in responses]),
              "gold_response": np.asarray([r["response"] for r in responses]),
              "gold_finish_reason": np.asarray([r["finish_reason"] for r in responses])})
    assert list(got["response"]) == [answers[r["key"]] for r in responses]
    np.testing.assert_allclose(got["gold_ce"], [gold_ce[r["key"]] for r in responses], rtol=1e-3, atol=1e-4)
    assert max(got["gold_ce"]) > 1e-2  # not all trivially zero
