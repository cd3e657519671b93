"""Stage 6, evaluate: held-out answers of each model through the pools, scored by ROUGE-L,
exact match and response length, and an LLM judge's verdicts.

ROUGE-L is the F-measure of the ``rouge-score`` package (its default tokenizer: lower-case,
split on non-alphanumerics), as in the DistiLLM and POCL evaluations. Exact match compares
whitespace-normalised strings, for tasks whose answers are verifiable.

The LLM judge compares the distilled student with a reference model pairwise, once in each
answer order (student as A, then as B), since LLM judges favour a position (Zheng et al.
2023, arXiv:2306.05685, "position bias"). A verdict is the first letter the judge writes,
A or B; anything else counts as a tie. The win rate counts a tie as half a win.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from kdray.data.artifacts import Artifact, files_of
from kdray.data.text_scores import STDERR_SCORES, exact_match, paired_difference, response_length, rouge_l, score_summary
from kdray.data.tokenize import judge_encoding, prompt_token_counter
from kdray.errors import DataError
from kdray.models import load_tokenizer
from kdray.pools import SamplingConfig
from kdray.pools.base import LIGHT_NUM_CPUS
from kdray.pools.run import generate_dataset
from kdray.spec import ModelSpec
from kdray.stages.context import StageContext


#: The committed dataset of a model's held-out answers (``samples/LABEL/``).
ANSWERS_KIND = "answers"
#: The committed dataset of the judge's verdicts (``samples/judge/``).
JUDGEMENTS_KIND = "judgements"
#: The columns of an answers dataset: the held-out row (``_row``, ``id``, ``prompt``, its gold
#: response ``gold``), the model's greedy ``response`` and the row's scores.
ANSWER_COLUMNS = ["_row", "id", "prompt", "response", "gold", "rougeL", "exact_match", "length"]
#: An answers row's bytes per token, at most (~4 B of text per token of prompt, answer and gold).
ANSWER_ROW_BYTES_PER_TOKEN = 12


def score_answers(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch of a pool's held-out answers (``response``, the gold ``gold``) with each row's
    ROUGE-L, exact match and length: the :data:`ANSWER_COLUMNS` (a Ray Data task's map)."""
    pairs = [(str(p), str(g)) for p, g in zip(batch["response"], batch["gold"])]
    out = {c: batch[c] for c in ANSWER_COLUMNS[:5]}
    out["rougeL"] = np.asarray([rouge_l(p, g) for p, g in pairs], dtype=np.float64)
    out["exact_match"] = np.asarray([exact_match(p, g) for p, g in pairs], dtype=np.float64)
    out["length"] = np.asarray([response_length(p) for p, _ in pairs], dtype=np.int64)
    return out


def answer_scores(files: list[Path]) -> dict[str, Any]:
    """The marker's ``scores`` of an answers dataset: its rows' mean scores and the standard
    errors of ROUGE-L and exact match (:func:`~kdray.data.text_scores.score_summary`), summed
    file by file in the driver (three numbers per row of one file at a time)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    sums, squares, n = {"rougeL": 0.0, "exact_match": 0.0, "length": 0.0}, dict.fromkeys(STDERR_SCORES, 0.0), 0
    for path in files:
        table = pq.read_table(path, columns=list(sums))
        n += table.num_rows
        for name in sums:
            sums[name] += float(pc.sum(table.column(name)).as_py() or 0.0)
        for name in squares:
            column = table.column(name)
            squares[name] += float(pc.sum(pc.multiply(column, column)).as_py() or 0.0)
    return {"scores": score_summary(sums, squares, n)}


#: The pairs of models whose scores a report compares prompt by prompt (:func:`paired_scores`).
PAIRED = (("student_after", "student_before"), ("student_after", "teacher"))


def _score_rows(answers: Artifact) -> Iterator[tuple[int, tuple[float, ...]]]:
    """(``_row``, its :data:`STDERR_SCORES`) of an answers dataset, a file's batch at a time."""
    import pyarrow.parquet as pq
    for path in files_of(answers.path, answers.info):
        for batch in pq.ParquetFile(path).iter_batches(columns=["_row", *STDERR_SCORES]):
            rows, *scores = (batch.column(i).to_pylist() for i in range(batch.num_columns))
            yield from zip(rows, zip(*scores))


def paired_scores(answers: dict[str, Artifact]) -> dict[str, Any]:
    """For each :data:`PAIRED` ``(A, B)`` among ``answers``: A's scores minus B's on the same
    held-out prompts (:func:`~kdray.data.text_scores.paired_difference`), by ``"A - B"``, read
    side by side a batch at a time; a pair whose rows (``_row``) do not line up is left out."""
    out = {}
    for a, b in (pair for pair in PAIRED if set(pair) <= set(answers)):
        rows = itertools.zip_longest(_score_rows(answers[b]), _score_rows(answers[a]))
        lined_up = itertools.takewhile(lambda pair: None not in pair and pair[0][0] == pair[1][0], rows)
        difference = paired_difference((x, y) for (_, x), (_, y) in lined_up)
        if 0 < difference["n"] == answers[a].rows == answers[b].rows:
            out[f"{a} - {b}"] = difference
    return out


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
    """
    n = sum(pairs.values())
    wins = sum(count * ((ab == "A") + (ba == "B")) for (ab, ba), count in pairs.items())
    losses = sum(count * ((ab == "B") + (ba == "A")) for (ab, ba), count in pairs.items())
    comparisons = 2 * n
    ties = comparisons - wins - losses

    def share(*kinds: tuple[str | None, str | None]) -> float | None:
        return sum(pairs.get(kind, 0) for kind in kinds) / n if n else None

    return {
        "items": n,
        "comparisons": comparisons,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate": (wins + ties / 2) / comparisons if comparisons else None,
        "position_consistency": share(("A", "B"), ("B", "A"), (None, None)),
        "first_position_bias": share(("A", "A")),
        "second_position_bias": share(("B", "B")),
        "verdicts": {order: {k: sum(count for pair, count in pairs.items() if pair[i] == key)
                             for k, key in (("A", "A"), ("B", "B"), ("tie", None))}
                     for i, order in enumerate(("student_first", "student_second"))},
    }


def _as_gold(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Held-out rows with their response as ``gold`` (the pool adds its own ``response``)."""
    batch["gold"] = batch.pop("response")
    return batch


def answers_dataset(ctx: StageContext, heldout: Artifact, model: ModelSpec, progress: Any = None) -> Any:
    """``model``'s greedy answers to the committed held-out rows, scored per row in Ray Data
    tasks (:func:`score_answers`), as a lazy dataset of :data:`ANSWER_COLUMNS`."""
    # renamed in a light task, as every task beside a pool (kdray.pools.base.LIGHT_NUM_CPUS)
    rows = heldout.read(["_row", "id", "prompt", "response"]).map_batches(
        _as_gold, batch_format="numpy", num_cpus=LIGHT_NUM_CPUS)
    answered = generate_dataset(rows, model, ctx.spec.generation, SamplingConfig.greedy(ctx.spec.evaluation.max_new_tokens),
                                encoding=ctx.prompt_encoding(), progress=progress)
    return answered.map_batches(score_answers, batch_format="numpy", num_cpus=LIGHT_NUM_CPUS)


def evaluate_models(ctx: StageContext, models: list[tuple[str, ModelSpec]], heldout: Artifact) -> dict[str, Artifact]:
    """Greedy answers of each ``(label, model)`` to the held-out prompts through its pool (all
    at once where the cluster has room: :meth:`StageContext.each_pool`), scored in Ray Data
    tasks and written by them to the committed dataset ``samples/LABEL/``
    (:data:`ANSWER_COLUMNS`, in the held-out rows' order). Every model (the teacher too) sees
    the job's prompt encoding (:meth:`StageContext.prompt_encoding`), the one it was distilled on.

    Returns:
        The answers datasets by label; each marker's ``scores`` holds the mean ``rougeL``,
        ``exact_match`` and ``mean_length`` (words) over its ``n`` rows (:func:`answer_scores`).
    """
    row_bytes = ANSWER_ROW_BYTES_PER_TOKEN * (ctx.spec.data.max_prompt_tokens + 2 * ctx.spec.training.max_seq_len)

    def write(label: str, model: ModelSpec, release: bool) -> Artifact:
        ctx.reporter.message(f"evaluate: {label} answers {heldout.rows} prompts ({model.model})")
        return ctx.write("evaluate", lambda hub: answers_dataset(ctx, heldout, model, hub), ctx.out / "samples" / label,
                         ANSWERS_KIND, {"label": label, "model": model.model}, summarise=answer_scores,
                         row_bytes=row_bytes, expect_rows=heldout.rows, release=release)

    return ctx.each_pool(models, "evaluate", write)


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

    The answers datasets ``student`` and ``reference`` (:func:`evaluate_models`) each hold one
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
        answers: the answers datasets (:func:`evaluate_models`) of ``student_after`` and the reference.

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
