"""The evaluation's LLM judge: it compares the distilled student with a reference model
pairwise on the held-out prompts, once in each answer order (student as A, then as B), since
LLM judges favour a position (Zheng et al. 2023, arXiv:2306.05685, "position bias"). A verdict
is the first letter the judge writes, A or B; anything else counts as a tie. The win rate counts
a tie as half a win, and its standard error takes the prompt as the unit."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from kdray.data.artifacts import Artifact, files_of
from kdray.data.text_scores import stderr_of_mean
from kdray.data.tokenize import judge_encoding, prompt_token_counter
from kdray.errors import DataError
from kdray.models import load_tokenizer
from kdray.pools import SamplingConfig
from kdray.pools.base import LIGHT_NUM_CPUS
from kdray.pools.run import generate_dataset
from kdray.stages.context import StageContext

#: The committed dataset of the judge's verdicts (``samples/judge/``).
JUDGEMENTS_KIND = "judgements"


# The verdict: optional quotes/brackets/markdown, an optional word like "Response", then A or
# B not followed by a letter or digit ("A", " B.", "(A)", "**B**", "Response A"; not "Apple").
_VERDICT = re.compile(r"^[\s\"'*(\[]*(?:(?i:response|answer|output|assistant)\s*)?([AB])(?![A-Za-z0-9])")


def parse_verdict(text: str) -> str | None:
    """'A' or 'B' when the judge's output starts with that verdict, else None (a tie)."""
    match = _VERDICT.match(text)
    return match.group(1) if match else None


def judge_requests(items: list[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """Two judge prompts per item ``{"id", "prompt", "student", "reference"}``: id ``ID|ab``
    has the student's answer as A and the reference's as B; ``ID|ba`` swaps them."""
    out = []
    for item in items:
        for order, (a, b) in (("ab", (item["student"], item["reference"])),
                              ("ba", (item["reference"], item["student"]))):
            out.append({"id": f"{item['id']}|{order}", "item": item["id"], "order": order,
                        "prompt": template.format(prompt=item["prompt"], a=a, b=b)})
    return out


def judge_summary(verdicts: dict[str, tuple[str | None, str | None]]) -> dict[str, Any]:
    """Rates over ``{item: (verdict with the student as A, verdict with the student as B)}``
    (:func:`pair_summary` of their counts)."""
    return pair_summary(Counter(verdicts.values()))


def pair_summary(pairs: Counter) -> dict[str, Any]:
    """Rates over the items' verdict pairs, counted: ``{(verdict with the student as A, verdict
    with the student as B): items}``, a verdict being ``"A"``, ``"B"`` or None (a tie).

    ``win_rate`` = (student wins + ties / 2) / comparisons, over both orders (two comparisons
    per item); ``position_consistency`` = the share of items whose verdict names the same
    answer in both orders (both ties included); ``first_position_bias`` /
    ``second_position_bias`` = the share of items judged A (B) in both orders.

    ``win_rate_stderr``: the standard error of the win rate with the item as the unit (an item's
    score is its two comparisons' mean, :func:`~kdray.data.text_scores.stderr_of_mean` over the
    items), since the two orders of one prompt are not independent: the clustered standard
    error of Miller 2024, "Adding Error Bars to Evals" (arXiv:2411.00640). None below 2 items.
    """
    n = sum(pairs.values())
    wins = sum(count * ((ab == "A") + (ba == "B")) for (ab, ba), count in pairs.items())
    losses = sum(count * ((ab == "B") + (ba == "A")) for (ab, ba), count in pairs.items())
    comparisons = 2 * n
    ties = comparisons - wins - losses
    # an item's score: its wins and half its ties over its two comparisons
    item = {(ab, ba): ((ab == "A") + (ba == "B") + ((ab is None) + (ba is None)) / 2) / 2 for ab, ba in pairs}
    total = sum(count * item[pair] for pair, count in pairs.items())
    squares = sum(count * item[pair] ** 2 for pair, count in pairs.items())

    def share(*kinds: tuple[str | None, str | None]) -> float | None:
        return sum(pairs.get(kind, 0) for kind in kinds) / n if n else None

    return {
        "items": n,
        "comparisons": comparisons,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate": total / n if n else None,  # = (wins + ties / 2) / comparisons
        "win_rate_stderr": stderr_of_mean(total, squares, n),
        "position_consistency": share(("A", "B"), ("B", "A"), (None, None)),
        "first_position_bias": share(("A", "A")),
        "second_position_bias": share(("B", "B")),
        "verdicts": {order: {k: sum(count for pair, count in pairs.items() if pair[i] == key)
                             for k, key in (("A", "A"), ("B", "B"), ("tie", None))}
                     for i, order in enumerate(("student_first", "student_second"))},
    }


#: Held-out rows per task making judge requests (:func:`judge_requests_dataset`): a task's
#: worker loads the judge's tokenizer once (seconds: torch and transformers), so a small judge
#: is one task.
JUDGE_TASK_ROWS = 1024

_judge_counters: dict[tuple[str, Any], Any] = {}


def _judge_batch(student: dict[str, np.ndarray], reference: dict[str, np.ndarray], *, template: str,
                 judge_model: str, encoding: Any, room: int, sides: str) -> dict[str, np.ndarray]:
    """The judge requests (:func:`judge_requests`) of paired answers rows, row i of ``student``
    (``_row``, ``id``, ``prompt``, ``response``) beside row i of ``reference`` (``_row``,
    ``response``), for the items whose two prompts both fit the judge's ``room`` tokens: two
    rows per kept item, ``_row``, ``id`` (``ID|ab``, ``ID|ba``), ``item``, ``order`` and
    ``prompt``. In a Ray Data task; the judge's tokenizer loads once per worker.

    Raises:
        DataError: a row pairs two different held-out rows: the two answers datasets (``sides``
            names them) are not in one order.
    """
    rows = np.asarray(student["_row"], dtype=np.int64)
    theirs = np.asarray(reference["_row"], dtype=np.int64)
    if not np.array_equal(rows, theirs):
        i = int(np.flatnonzero(rows != theirs)[0])
        raise DataError(
            f"the answers of {sides} are not in one row order (held-out row {rows[i]} beside row {theirs[i]}), so "
            "they cannot be paired for the judge; delete both directories (or run the job with --restart) and kdray "
            "writes them again; if it happens again, report it as a kdray bug with the job's events.jsonl")
    items = [{"id": str(i), "prompt": str(p), "student": str(s), "reference": str(r)}
             for i, p, s, r in zip(student["id"], student["prompt"], student["response"], reference["response"])]
    requests = judge_requests(items, template)  # an item's two requests side by side
    key = (judge_model, encoding)
    if requests and key not in _judge_counters:
        _judge_counters[key] = prompt_token_counter(load_tokenizer(judge_model, need_pad=False), encoding)
    tokens = np.asarray(_judge_counters[key]([q["prompt"] for q in requests]) if requests else [], dtype=np.int64)
    keep = np.repeat((tokens.reshape(-1, 2) <= room).all(axis=1), 2)  # an item is judged in both orders or none
    kept = [q for q, k in zip(requests, keep) if k]
    return {"_row": np.repeat(rows, 2)[keep],
            **{name: np.asarray([q[name] for q in kept], dtype=object) for name in ("id", "item", "order", "prompt")}}


def _pieces(artifact: Artifact, rows: int, size: int) -> list[list[tuple[str, int, int]]]:
    """The first ``rows`` rows of a committed dataset, in its order, cut into runs of ``size``
    rows: each run as the pieces ``(file, its first row there, rows)`` holding it, from the
    files' footers (no row is read)."""
    import pyarrow.parquet as pq

    runs: list[list[tuple[str, int, int]]] = [[] for _ in range(-(-rows // size))]
    start = 0  # the dataset's row number of the file's first row
    for path in files_of(artifact.path, artifact.info):
        end = start + pq.ParquetFile(path).metadata.num_rows
        at = start
        while at < min(end, rows):
            stop = min(end, rows, (at // size + 1) * size)
            runs[at // size].append((path, at - start, stop - at))
            at = stop
        if end >= rows:
            break
        start = end
    return runs


def _judge_run(batch: dict[str, np.ndarray], **build: Any) -> dict[str, np.ndarray]:
    """A run of rows of each answers dataset (its :func:`_pieces` as JSON, ``student`` and
    ``reference``), read from their files, as judge requests (:func:`_judge_batch`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def read(side: str, columns: list[str]) -> dict[str, np.ndarray]:
        table = pa.concat_tables([pq.read_table(path, columns=columns).slice(first, n)
                                  for path, first, n in json.loads(str(batch[side][0]))])
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}

    return _judge_batch(read("student", ["_row", "id", "prompt", "response"]), read("reference", ["_row", "response"]),
                        **build)


def judge_requests_dataset(student: Artifact, reference: Artifact, items: int, **build: Any) -> Any:
    """The judge requests (:func:`_judge_batch`, given ``build``: ``template``, ``judge_model``,
    ``encoding``, ``room``) of the first ``items`` held-out rows, as a lazy dataset.

    The answers datasets ``student`` and ``reference`` (:func:`~kdray.stages.evaluate.evaluate_models`) each hold one
    row per held-out row in the held-out dataset's order, so row i of one pairs with row i of
    the other: no shuffle. Each Ray Data task reads :data:`JUDGE_TASK_ROWS` of them from both
    datasets' files (where they are, from the footers: :func:`_pieces`) and checks every pair.

    Raises:
        DataError: an answers dataset holds fewer than ``items`` rows.
    """
    import ray.data

    for artifact in (student, reference):
        if artifact.rows < items:
            raise DataError(f"{artifact.path} holds {artifact.rows} answers, not the {items} the judge compares; "
                            "delete it (or run the job with --restart) and kdray writes it again")
    runs = [{"student": json.dumps(s), "reference": json.dumps(r)}
            for s, r in zip(_pieces(student, items, JUDGE_TASK_ROWS), _pieces(reference, items, JUDGE_TASK_ROWS))]
    return ray.data.from_items(runs, override_num_blocks=len(runs)).map_batches(
        _judge_run, batch_size=1, batch_format="numpy", num_cpus=LIGHT_NUM_CPUS,
        fn_kwargs=dict(build, sides=f"{student.path} and {reference.path}"))


def _verdict_pair(group: dict[str, np.ndarray]) -> Any:
    """An item's two judged requests as one row: each order's judge prompt, output and verdict
    (null: a tie), as a table of strings (a group of ties alone would type its verdicts null)."""
    import pyarrow as pa

    columns: dict[str, Any] = {"_row": pa.array([int(group["_row"][0])], pa.int64()),
                               "id": pa.array([str(group["item"][0])], pa.string())}
    at = {str(order): i for i, order in enumerate(group["order"])}
    for order, name in (("ab", "student_first"), ("ba", "student_second")):
        i = at[order]
        text = str(group["response"][i])
        columns[f"{name}_judge_prompt"] = pa.array([str(group["prompt"][i])], pa.string())
        columns[f"{name}_output"] = pa.array([text], pa.string())
        columns[f"{name}_verdict"] = pa.array([parse_verdict(text)], pa.string())
    return pa.table(columns)


def verdict_counts(files: list[Path]) -> dict[str, Any]:
    """The marker's ``pairs`` of a judgements dataset: its items counted by verdict pair
    (:func:`pair_summary`), by Arrow's group-by file by file (at most nine counts each)."""
    import pyarrow.parquet as pq

    columns = ["student_first_verdict", "student_second_verdict"]
    pairs: Counter = Counter()
    for path in files:
        counted = pq.read_table(path, columns=columns).group_by(columns).aggregate([([], "count_all")])
        pairs.update({(ab, ba): n for ab, ba, n in zip(*(counted.column(c).to_pylist()
                                                        for c in (*columns, "count_all")))})
    return {"pairs": [[ab, ba, n] for (ab, ba), n in pairs.items()]}


def judge(ctx: StageContext, heldout: Artifact, answers: dict[str, Artifact]) -> dict[str, Any]:
    """``evaluation.judge``: the judge model (served by its pool, greedy) compares the distilled
    student's held-out answers with the reference's, in both orders, on the first
    ``max_prompts`` held-out rows (all: null).

    The two answers datasets, each in the held-out rows' order, are paired row by row (no
    shuffle; every pair is checked to be one held-out row) and turned into judge prompts in Ray
    Data tasks (:func:`judge_requests_dataset`); prompts whose judge prompt does not fit the
    judge's ``max_model_len`` are skipped and counted. The judge, maybe of another model
    family, reads them through its own chat template (:func:`kdray.data.tokenize.judge_encoding`).
    Its verdicts are paired by item (a group-by, once the judge pool is gone:
    :meth:`~kdray.stages.context.StageContext.materialize`) and written, one row per item, to the
    committed dataset ``samples/judge/``.

    Args:
        heldout: the committed held-out rows.
        answers: the answers datasets (:func:`~kdray.stages.evaluate.evaluate_models`) of ``student_after`` and the reference.

    Returns:
        :func:`pair_summary` plus ``model``, ``reference`` and ``skipped_too_long``.

    Raises:
        DataError: the two answers datasets hold their rows in different orders, or too few
            (:func:`judge_requests_dataset`).
    """
    from ray.data.context import ShuffleStrategy

    cfg = ctx.spec.evaluation.judge
    items = min(cfg.max_prompts or heldout.rows, heldout.rows)
    # The judge only generates: it needs no pad token.
    encoding = judge_encoding(ctx.spec.data.chat_template, load_tokenizer(cfg.model.model, need_pad=False))
    requests = judge_requests_dataset(
        answers["student_after"], answers[cfg.reference], items, template=cfg.template, judge_model=cfg.model.model,
        encoding=encoding, room=cfg.model.max_model_len - cfg.max_new_tokens,
    ).materialize()  # the object store's, not the driver's
    judged = requests.count() // 2
    pairs: Counter = Counter()
    if judged:
        with ctx.phase("evaluate", 2 * judged, f"LLM judge, student_after vs {cfg.reference}"):
            # An item's two verdicts are paired by a group-by, whose sort tasks need whole CPUs:
            # the verdicts are materialized first, and the judge pool's placement groups removed.
            verdicts = ctx.materialize("evaluate", lambda hub: generate_dataset(
                requests, cfg.model, ctx.spec.generation, SamplingConfig.greedy(cfg.max_new_tokens),
                encoding=encoding, progress=hub))
            del requests  # the verdicts carry its columns: its blocks can leave the object store
            verdicts.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
            paired = verdicts.groupby("_row").map_groups(_verdict_pair, batch_format="numpy")
            written = ctx.write("evaluate", lambda hub: paired, ctx.out / "samples" / "judge", JUDGEMENTS_KIND,
                                {"model": cfg.model.model, "reference": cfg.reference}, summarise=verdict_counts,
                                expect_rows=judged)
        pairs = Counter({(ab, ba): n for ab, ba, n in written.info["pairs"]})
    else:  # nothing to judge: no verdicts of an earlier run stay behind
        shutil.rmtree(ctx.out / "samples" / "judge", ignore_errors=True)
    summary = pair_summary(pairs)
    summary.update(model=cfg.model.model, reference=cfg.reference, skipped_too_long=items - judged)
    ctx.reporter.message(
        f"evaluate: judge win rate of student_after vs {cfg.reference}: "
        + (f"{summary['win_rate']:.3f} over {summary['comparisons']} comparisons" if summary["comparisons"]
           else f"no comparisons ({items - judged} prompts too long for the judge)"))
    return summary
