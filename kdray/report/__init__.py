"""A job's report files (report.md and PNG plots from report.json) and the ``kdray report`` /
``kdray compare`` commands: :mod:`.render` (tables, markdown), :mod:`.plots` (matplotlib)."""

from kdray.report.render import render_report

__all__ = ["render_report"]
