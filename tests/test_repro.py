"""`kdray repro`: the table and verdict logic on constructed numbers, the grid's specs, the
CLI's errors, and (slow) the quick grid end to end on the real stack."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from kdray.errors import KdrayError
from kdray.repro.harness import EXTRA_METHODS, METHODS, ReproSize, method_spec
from kdray.repro.report import write_outputs
from kdray.repro.tables import (BASE_LOSSES, Comparison, Stat, chain_verdict, markdown, method_stats, pocl_rows, pocl_verdict, summarize, verdict_line, verdicts)


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
    assert v["holds"] is False and "fails: DistiLLM not better than KD (beyond seed noise))" in v["text"]
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
    assert text.count(": **HOLDS** on this run") + text.count(": **DOES NOT HOLD** on this run") == len(found)
    assert "HOLDS on this run" not in text.replace("**HOLDS** on this run", "")  # the word once, in bold


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
    err = capsys.readouterr().err
    assert "--data: dataset '/nonexistent/train.jsonl' does not exist" in err
    assert "--heldout: dataset '/nonexistent/h.jsonl' does not exist" in err
    assert "data.train" not in err


# -- end to end ----------------------------------------------------------------------------------

@pytest.fixture
def tiny_grammar_cache(tmp_path, monkeypatch):
    """The grammar world at a tiny size, its teacher trained well past its student."""
    from tests.worlds import build_tiny_grammar

    return build_tiny_grammar(monkeypatch, tmp_path / "cache", n_train=512, n_heldout=48, teacher_steps=120,
                              student_steps=40, batch_size=32)


@pytest.mark.slow
def test_repro_quick_on_the_grammar_world_runs_every_method_and_states_the_verdicts(tmp_path, tiny_grammar_cache):
    from kdray.repro.language import LANGUAGE_METRICS
    from tests.test_e2e import kdray

    # One seed: the grid's cells are what CI's minutes go to (means and stds over seeds, and the
    # seed-noise flags, are checked on tables above).
    res = kdray("repro", "--world", "grammar", "--quick", "--seeds", "1", "--out", str(tmp_path / "repro"),
                cwd=tmp_path, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "repro"
    report = json.loads((out / "repro.json").read_text())
    size, n_train = ReproSize.quick(), 512  # the tiny world's rows
    assert report["config"]["world"] == "grammar" and report["config"]["response_source"] == "dataset"
    assert report["config"]["specs"]["fkl"]["student"]["model"] == "toy:grammar-student"
    assert "teacher_generate" not in report["timings_s"]  # the language's samples: no teacher pool
    cells = {(r["method"], r["seed"]) for r in report["runs"]}
    assert cells == {(m, 0) for m in METHODS} and report["config"]["seeds"] == [0]
    prompts = report["language"]["prompts"]
    assert 0 < prompts <= 48 and report["language"]["samples"] == 8
    for run in [*report["runs"], *({"language": v} for v in report["language"]["references"].values())]:
        assert "error" not in run
        fit = run["language"]
        assert fit["prompts"] == prompts and fit["samples"] == 8
        assert math.isfinite(fit["kl"]) and fit["kl"] >= 0 and fit["nll"] == pytest.approx(fit["entropy"] + fit["kl"], abs=2e-4)  # each rounded to 1e-4
        assert all(0.0 <= fit[k] <= 1.0 for k in ("validity_greedy", "validity_sampled", "coverage"))
        assert 0.0 < fit["valid_mass"] <= 1.0 + 1e-6
    for run in report["runs"]:
        assert math.isfinite(run["rougeL"]) and 0.0 <= run["rougeL"] <= 1.0
        assert run["steps"] == size.epochs * (n_train // size.global_batch_size)
        assert run["final_loss"] is not None and math.isfinite(run["final_loss"])
    # The teacher (120 SFT steps) is closer to the language than the student (40, a tenth of its size)
    refs = report["language"]["references"]
    assert refs["teacher"]["kl"] < refs["student_before"]["kl"]
    # HF generate answers as the vLLM pool does.
    assert report["generator_check"]["answer_agreement"] >= 0.95
    # DistiLLM-2 trained on fresh student responses each round, with its schedules.
    paper = next(r for r in report["runs"] if r["method"] == "distillm2-paper")
    assert paper["on_policy_generate_s"] > 0 and paper["train_metrics"][-1]["beta"] == 1.5
    # POCL's difficulty measured once, through the pool.
    assert (out / "shared" / "curriculum" / "difficulty.parquet").is_file()
    _assert_pool_answers_and_cross_entropies_are_hfs(out / "shared", "toy:grammar-student")
    md = (out / "repro.md").read_text()
    assert "## POCL: average ROUGE-L" in md and "## DistiLLM-2 Table 2 order" in md
    assert "## Against the language" in md and all(m.label in md for m in LANGUAGE_METRICS)
    verdict_lines = [line for line in md.splitlines() if line.startswith("- ") and ": **" in line]
    assert len(verdict_lines) == 5 + 7 and all("not checked" not in line for line in verdict_lines)
    assert {"world", "prepare"} <= set(report["timings_s"]) and "the grammar world (built on first use" in md
    assert "POCL helps every base loss (KL(language ‖ model): base > +POCL)" in res.stdout
    assert "AKL (arXiv:2404.02657): between FKL and RKL" in res.stdout


def _assert_pool_answers_and_cross_entropies_are_hfs(shared: Path, student: str, n: int = 24) -> None:
    """The difficulty pass's vLLM pool (Ray's processor) against HF, row by row, on the first
    ``n`` training rows: the initial ``student``'s greedy answer, and its cross-entropy on the
    row's training response (vLLM's prompt log-probs: the gold request). float32 on both sides."""
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
    hf = HFGenerator(student, dtype="float32", max_model_len=128, enforce_eager=True, tensor_parallel_size=1,
                     sampling=SamplingConfig.greedy(size.max_new_tokens), env=pool_env(GenerationSpec()),
                     score_gold=True)
    got = hf({"id": np.asarray([r["key"] for r in responses]), "prompt": np.asarray([r["prompt"] for r in responses]),
              "gold_response": np.asarray([r["response"] for r in responses]),
              "gold_finish_reason": np.asarray([r["finish_reason"] for r in responses])})
    assert list(got["response"]) == [answers[r["key"]] for r in responses]
    np.testing.assert_allclose(got["gold_ce"], [gold_ce[r["key"]] for r in responses], rtol=1e-3, atol=1e-4)
    assert max(got["gold_ce"]) > 1e-2  # not all trivially zero


# -- the grammar world: scores against the language ----------------------------------------------

def language_runs(scores: dict[str, list[dict]]) -> list[dict]:
    return [{"method": m, "seed": i, "rougeL": 0.5, "exact_match": 0.1, "language": s}
            for m, values in scores.items() for i, s in enumerate(values)]


def fit(kl: float, validity: float, coverage: float) -> dict:
    return {"kl": kl, "nll": 2.5 + kl, "validity_greedy": validity, "validity_sampled": validity,
            "coverage": coverage, "valid_mass": validity, "entropy": 2.5, "prompts": 64, "samples": 8}


def three_seeds(kl: float, validity: float, coverage: float) -> list[dict]:
    return [fit(kl + d, validity + d, coverage + d) for d in (-0.01, 0.0, 0.01)]


def test_language_verdicts_judge_kl_lower_is_better_and_the_mode_claims():
    from kdray.repro.language import language_stats, language_verdicts

    runs = language_runs({"fkl": three_seeds(2.0, 0.60, 0.50), "fkl+pocl": three_seeds(1.8, 0.62, 0.52),
                          "rkl": three_seeds(2.4, 0.80, 0.30), "akl": three_seeds(2.1, 0.70, 0.40),
                          "skl": three_seeds(1.9, 0.6, 0.5), "distillm2-paper": three_seeds(1.7, 0.6, 0.5)})
    runs.append({"method": "rkl", "seed": 3, "error": "boom"})  # a failed run counts nowhere
    stats = language_stats(runs)
    assert stats["kl"]["fkl"].mean == pytest.approx(2.0) and stats["kl"]["rkl"].n == 3
    found = {v["claim"]: v for v in language_verdicts(stats)}
    pocl = found["pocl:kl"]  # lower KL with POCL: it helps
    assert pocl["holds"] is True and "KL(language ‖ model): base > +POCL" in pocl["text"]
    assert "POCL helps 1 of 1 base losses (FKL)" in pocl["text"]
    chain = found["distillm2:skl:paper:kl"]
    assert chain["holds"] is True and "KD 2.000 > DistiLLM 1.900" in chain["text"]
    # the claim's signs are the metric's: lower KL is better
    assert "KD (FKL) > DistiLLM (SKL, α=0.1) > DistiLLM-2 (paper) (KL(language ‖ model): lower" in chain["text"]
    assert found["distillm2:srkl:paper:kl"]["holds"] is None  # SRKL not run
    mode = next(v for c, v in found.items() if c.startswith("Mode seeking"))
    assert mode["holds"] is True and mode["beyond_noise"] is True and "HOLDS on this run (beyond seed noise)" in mode["text"]
    assert "validity (samples): FKL 0.600 ± 0.010 < RKL 0.800 ± 0.010" in mode["text"]
    assert "coverage: RKL 0.300 ± 0.010 < FKL 0.500 ± 0.010" in mode["text"]
    akl = next(v for c, v in found.items() if c.startswith("AKL"))
    assert akl["holds"] is True and "FKL 0.600 ± 0.010 < AKL 0.700 ± 0.010 < RKL 0.800 ± 0.010" in akl["text"]

    # AKL outside the two on coverage; RKL covering more than FKL: neither claim holds.
    runs = language_runs({"fkl": three_seeds(2.0, 0.60, 0.30), "rkl": three_seeds(2.4, 0.80, 0.50),
                          "akl": three_seeds(2.1, 0.70, 0.60)})
    found = language_verdicts(language_stats(runs))
    mode, akl = found[-2], found[-1]
    assert mode["holds"] is False and mode["beyond_noise"] is False
    assert "DOES NOT HOLD on this run (fails beyond seed noise)" in mode["text"]
    assert "coverage: RKL 0.500 ± 0.010 > FKL 0.300 ± 0.010 (beyond seed noise)" in mode["text"]
    assert verdict_line(mode, False).startswith("Mode seeking") and ": **DOES NOT HOLD** on this run" in verdict_line(mode, False)
    assert ": [bold red]DOES NOT HOLD[/] on this run" in verdict_line(mode, True)
    assert akl["holds"] is False and "coverage: FKL 0.300 ± 0.010 < AKL 0.600 ± 0.010 > RKL 0.500 ± 0.010" in akl["text"]
    one = language_verdicts(language_stats(language_runs({"fkl": [fit(2, .6, .5)], "rkl": [fit(2, .8, .3)]})))
    assert one[-2]["holds"] is True and one[-2]["beyond_noise"] is None and "single seed" in one[-2]["text"]
    assert one[-1]["holds"] is None and "not checked" in one[-1]["text"]


def test_write_outputs_adds_the_language_table_and_its_verdicts(tmp_path: Path):
    from rich.console import Console

    result = {
        "config": {"size": asdict(ReproSize.quick()), "methods": ["fkl", "rkl"], "world": "grammar",
                   "response_source": "dataset", "data": {"train": "toy:grammar-train"}},
        "timings_s": {"total": 12.0},
        "references": {"teacher": {"rougeL": 0.4, "exact_match": 0.1}},
        "generator_check": {"training_prompts": 400, "student_before_pool": {"rougeL": 0.2},
                            "student_before_hf": {"rougeL": 0.2}, "answer_agreement": 1.0},
        "runs": language_runs({"fkl": three_seeds(2.0, 0.6, 0.5), "rkl": three_seeds(2.4, 0.8, 0.3)}),
        "language": {"prompts": 64, "samples": 8, "references": {"teacher": fit(0.3, 0.9, 0.8)}},
    }
    write_outputs(result, tmp_path, Console(file=open(tmp_path / "console.txt", "w"), width=200))
    md = (tmp_path / "repro.md").read_text()
    assert "on the grammar world" in md and "The training rows' own responses" in md
    assert "## Against the language" in md and "| teacher (reference) | 0.300 | 2.800 |" in md
    assert "| rkl | 2.400 ± 0.010 |" in md
    assert "## Verdicts against the language (64 held-out prompts, 8 samples each)" in md
    assert "- Mode seeking (Minka 2005; MiniLLM): RKL's samples more valid and less covering than FKL's: **HOLDS**" in md
    assert "the grammar world (built on first use, else checked) 0s, data 0s" in md
    console = (tmp_path / "console.txt").read_text()
    assert "Against the language" in console and "| rkl |" not in console  # a table, not markdown
    assert "Mode seeking" in console and "[bold" not in console
    saved = json.loads((tmp_path / "repro.json").read_text())
    assert saved["language"]["summary"]["kl"]["fkl"]["mean"] == pytest.approx(2.0)
    assert [v["holds"] for v in saved["language"]["verdicts"]][-2:] == [True, None]
    assert "Budget equal-steps: every method the same optimizer steps." in md
    result["config"].update(size={**result["config"]["size"], "budget": "paper"}, pocl_stage_epochs=1)
    write_outputs(result, tmp_path, Console(file=open(tmp_path / "console.txt", "w"), width=200))
    assert "Budget paper (the released scripts' shapes): POCL 1 epochs per stage" in (tmp_path / "repro.md").read_text()


def test_the_grammar_world_takes_its_own_data_and_models(capsys, tmp_path):
    from kdray.cli import main
    from kdray.repro.language import WORLDS
    from kdray.spec import parse_spec

    for given in (["--data", "a.jsonl", "--heldout", "b.jsonl"], ["--data", "a.jsonl"], ["--heldout", "b.jsonl"]):
        assert main(["repro", "--world", "grammar", *given]) == 2
        err = capsys.readouterr().err
        assert "kdray repro --data/--heldout: the grammar world scores every run against its own language" in err
        assert "invalid job spec" not in err and "Traceback" not in err
    world = WORLDS["grammar"]
    spec = parse_spec(method_spec("rkl", ReproSize.quick(), world.train, world.heldout, tmp_path, world=world), "rkl")
    assert (spec.teacher.model, spec.student.model) == ("toy:grammar-teacher", "toy:grammar-student")
    assert spec.data.response_source == "dataset" and spec.data.train == "toy:grammar-train"


@pytest.mark.parametrize("size", [ReproSize.quick(), ReproSize.default()], ids=["quick", "default"])
def test_the_paper_budget_gives_pocl_its_epochs_per_stage_and_distillm2_an_epoch_per_round(size, tmp_path):
    from kdray.curriculum.plan import plan_segments, total_steps
    from kdray.repro.harness import pocl_paper_stage_epochs
    from kdray.spec import parse_spec

    size = ReproSize(**{**asdict(size), "budget": "paper"})
    size.check()
    per_epoch = size.train_rows // size.global_batch_size
    stage_epochs = pocl_paper_stage_epochs(size.epochs)
    assert stage_epochs == {2: 1, 4: 2}[size.epochs]  # the scripts' 8 per stage for KD's 20, rounded
    for m in METHODS:
        plan = plan_segments(parse_spec(method_spec(m, size, "toy:train", "toy:heldout", tmp_path), m), size.train_rows)
        if "+pocl" in m:  # each stage its epochs over its cumulative rows: the easy rows get fewer steps
            assert [s.stage for s in plan] == list(range(1, size.pocl_stages + 1))
            assert [s.n_rows for s in plan] == sorted(s.n_rows for s in plan) and plan[-1].n_rows == size.train_rows
            assert total_steps(plan) == sum(stage_epochs * s.steps_per_epoch for s in plan)
        elif m.startswith("distillm2"):
            assert len(plan) == size.distillm2_rounds and total_steps(plan) == size.distillm2_rounds * per_epoch
        else:
            assert total_steps(plan) == size.epochs * per_epoch
    with pytest.raises(KdrayError, match="--budget: unknown budget 'long'"):
        ReproSize(budget="long").check()
