"""POCL's difficulty measurement as stored with a job (``OUTPUT_DIR/curriculum/difficulty.jsonl``).

One JSON line per training row, easiest first: its key (``id#sample_index``), position,
ROUGE-L and cross-entropy, their ranks, the fused RRF score, and the student that was
measured. A later run over exactly the same rows with the same student reads the order back
instead of measuring again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_difficulty(path: Path, keys: list[str], ranks: Any, student: str) -> None:
    """Write ``ranks`` (a :class:`kdray.curriculum.DifficultyRanks` over ``keys``) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for pos, i in enumerate(int(i) for i in ranks.order):
            fh.write(json.dumps({"key": keys[i], "position": pos, "rouge_l": float(ranks.rouge[i]),
                                 "ce": float(ranks.ce[i]), "rank_rouge_l": float(ranks.rouge_rank[i]),
                                 "rank_ce": float(ranks.ce_rank[i]), "rrf": float(ranks.score[i]),
                                 "student": student}) + "\n")
    os.replace(tmp, path)


def read_difficulty(path: Path, keys: list[str], student: str) -> list[int] | None:
    """The saved easy → hard order of ``keys``, if ``path`` measured exactly these rows with
    this student; None otherwise (measure again)."""
    if not path.exists():
        return None
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        index = {k: i for i, k in enumerate(keys)}
        if (len(records) != len(keys) or any(r["student"] != student for r in records)
                or {r["key"] for r in records} != set(index)):
            return None
        return [index[r["key"]] for r in sorted(records, key=lambda r: r["position"])]
    except (ValueError, KeyError, TypeError):
        return None
