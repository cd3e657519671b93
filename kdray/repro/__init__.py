"""``kdray repro``: every method × seed on the toy world, against the papers' orderings.
:mod:`.harness` (the grid and its CLI), :mod:`.run` (one method × seed in one Ray task),
:mod:`.tables` (statistics, verdicts, tables)."""
