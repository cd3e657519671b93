"""POCL's difficulty ranks as stored with a job (``OUTPUT_DIR/curriculum/difficulty.parquet``),
for people to read: one row per training row, easiest first, with its key (``id#sample_index``),
position, ROUGE-L and cross-entropy, their ranks, the fused RRF score, and the student that was
measured. The job itself reuses the measurements (``curriculum/difficulty/``), not this file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def write_difficulty(path: Path, keys: Any, ranks: Any, student: str) -> None:
    """Write ``ranks`` (a :class:`kdray.curriculum.DifficultyRanks` over ``keys``) atomically."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    order = ranks.order
    table = pa.table({
        "key": pa.array(np.asarray(keys, dtype=object)[order], pa.string()),
        "position": pa.array(np.arange(order.size), pa.int64()),
        "rouge_l": ranks.rouge[order], "ce": ranks.ce[order],
        "rank_rouge_l": ranks.rouge_rank[order], "rank_ce": ranks.ce_rank[order], "rrf": ranks.score[order],
        "student": pa.array([student] * order.size, pa.string()),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
