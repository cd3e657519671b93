"""``kdray repro``'s outputs: ``repro.json`` (every run, the summary and the verdicts) and
``repro.md`` (the tables and the verdict lines), and the same on the console."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kdray.errors import KdrayError


def _header(result: dict[str, Any]) -> list[str]:
    """What was run, how long it took and the generator check, as markdown lines."""
    size, t, check = result["config"]["size"], result["timings_s"], result["generator_check"]
    world = result["config"].get("world", "toy")
    if result["config"].get("response_source", "teacher") == "teacher":
        responses = "Teacher responses (greedy, vLLM pool)"
        timing = f"teacher responses {t.get('teacher_generate', 0):.0f}s, "
    else:
        responses = "The training rows' own responses (the dataset's: on the grammar world, samples of the language)"
        timing = ""
    return [
        "# kdray repro", "",
        f"{len(result['config']['methods'])} methods x {size['seeds']} seeds on the {world} world, "
        f"{result['config']['data']['train']} ({size['train_rows']} training rows, {size['heldout_rows']} held-out "
        f"rows, {size['epochs']} epochs of {size['train_rows'] // size['global_batch_size']} steps at batch "
        f"{size['global_batch_size']}; POCL {size['pocl_stages']} stages, DistiLLM-2 {size['distillm2_rounds']} "
        f"rounds; AdamW lr {size['lr']}, cosine, {size['warmup_steps']} warmup steps). {_budget(result['config'])} {responses} and POCL's "
        "difficulty order are shared by every run; each run trains in one process with kdray's plans, objectives "
        "and schedules (no DeepSpeed). Scores: greedy held-out answers (HF generate), ROUGE-L F. Teacher and "
        "initial student are references (one value each).",
        "",
        f"Timings: total {t['total']:.0f}s; the {world} world (built on first use, else checked) "
        f"{t.get('world', 0):.0f}s, data {t.get('prepare', 0):.0f}s, {timing}POCL difficulty (the initial student "
        f"through the pool) {t.get('pocl_difficulty', 0):.0f}s, grid {t.get('grid', 0):.0f}s.",
        "",
        f"Generator check (initial student, the first {check.get('training_prompts', '?')} training prompts, against "
        f"their training responses): vLLM pool ROUGE-L {check['student_before_pool']['rougeL']:.3f}, "
        f"HF generate {check['student_before_hf']['rougeL']:.3f}, identical answers {check['answer_agreement']:.1%}.",
        "",
    ]


def _budget(config: dict[str, Any]) -> str:
    """The budget the run used, in words (:data:`kdray.repro.harness.BUDGETS`)."""
    size = config["size"]
    if size.get("budget", "equal-steps") == "equal-steps":
        return "Budget equal-steps: every method the same optimizer steps."
    return (f"Budget paper (the released scripts' shapes): POCL {config['pocl_stage_epochs']} epochs per stage over "
            f"its cumulative rows, DistiLLM-2 one epoch per round, the others {size['epochs']} epochs.")


def write_outputs(result: dict[str, Any], out: Path, console: Any) -> dict[str, Any]:
    """Add the summary and verdicts to ``result`` (with ``result["language"]``, a grammar
    world's run: its table and verdicts too, :mod:`kdray.repro.language`); write repro.json
    and repro.md; print the tables and verdicts.

    Raises:
        KdrayError: a run failed (after both files are written, listing the failed runs)."""
    from kdray.repro.language import language_rich_table, language_stats, language_table, language_verdicts
    from kdray.repro.tables import Stat, markdown, method_stats, rich_tables, verdict_line, verdicts

    stats, em = method_stats(result["runs"]), method_stats(result["runs"], "exact_match")
    refs = {label.replace("_", " "): Stat(s["rougeL"], None, 1) for label, s in result["references"].items()}
    ref_em = {label.replace("_", " "): Stat(s["exact_match"], None, 1) for label, s in result["references"].items()}
    found = verdicts(stats)
    result["summary"] = {m: {"rougeL": stats[m].as_dict(), "exact_match": em[m].as_dict()} for m in stats}
    result["verdicts"] = found
    extra: list[str] = []
    language = result.get("language")
    if language is not None:
        lstats = language_stats(result["runs"])
        language["summary"] = {key: {m: s.as_dict() for m, s in by_method.items()} for key, by_method in lstats.items()}
        language["verdicts"] = lfound = language_verdicts(lstats)
        lrefs = {k.replace("_", " "): v for k, v in language["references"].items()}
        extra = ["", *language_table(lstats, lrefs),
                 "", f"## Verdicts against the language ({language['prompts']} held-out prompts, "
                     f"{language['samples']} samples each)", "", *(f"- {verdict_line(v, False)}" for v in lfound)]
        found = found + lfound
    failed = [f"{r['method']} seed {r['seed']}" for r in result["runs"] if r.get("error")]
    tmp = out / "repro.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, out / "repro.json")
    head = _header(result)
    if failed:
        head += [f"**Failed runs** (left out of the tables): {', '.join(failed)}", ""]
    body = markdown(stats, refs, {**em, **ref_em}, result["verdicts"]) + "\n".join(extra) + ("\n" if extra else "")
    (out / "repro.md").write_text("\n".join(head) + "\n" + body, encoding="utf-8")
    for table in rich_tables(stats, refs, {**em, **ref_em}):
        console.print(table)
    if extra:
        console.print(language_rich_table(lstats, lrefs))
    for v in found:
        console.print(verdict_line(v, True), highlight=False, soft_wrap=True)
    console.print(f"written: {out / 'repro.md'}, {out / 'repro.json'} (total {result['timings_s']['total']:.0f}s)",
                  markup=False)
    if failed:
        raise KdrayError(f"{len(failed)} run(s) failed: {', '.join(failed)}; see the errors in {out / 'repro.json'}")
    return result
