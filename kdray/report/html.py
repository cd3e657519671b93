"""A job's report.md as one self-contained HTML page: what the service's web page shows.

The markdown is rendered by markdown-it-py (CommonMark with GitHub's tables, the dialect
report.md is written in: :mod:`kdray.report.render`), with raw HTML off, so a job's name or a
model path in the report is text, never markup. The report's plots (``![what](loss.png)``)
are put in the page as ``data:`` URIs, so the page needs nothing else from the service: it
can be shown in a sandboxed frame, and saved.
"""

from __future__ import annotations

import base64
import html
import re
from typing import Callable

#: The images a report's page takes in: a plain PNG file name in the job's output directory
#: (the report's plots), nothing with a path or a scheme.
PLOT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}\.png")
#: The page's look: readable tables and plots no wider than the page.
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1rem 1.5rem; line-height: 1.4; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""
#: The page's Content-Security-Policy: no script, no request; its own style and data: images.
#: Sent as a header and put in the page (a page shown through ``srcdoc`` has no headers).
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
#: The most bytes of plots one page takes in (a report's four plots are well under 1 MiB).
MAX_PAGE_PLOT_BYTES = 32 << 20


def report_page(markdown: str, title: str, read_plot: Callable[[str], bytes | str]) -> str:
    """``markdown`` (a report.md) as an HTML document titled ``title``.

    Each plot it shows (a name matching :data:`PLOT_NAME`) is read once by ``read_plot(name)``
    and inlined, up to :data:`MAX_PAGE_PLOT_BYTES` in all; a plot that cannot be
    (``read_plot`` gives why, a str), one beyond that, or another image, is shown as its
    description and why. Links open in a new browsing context (``<base target="_blank">``).
    """
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    read: dict[str, bytes | str] = {}
    taken = 0  # the bytes inlined so far
    for token in tokens:
        for child in token.children or []:
            if child.type != "image":
                continue
            src = str(child.attrGet("src") or "")
            if src not in read:
                read[src] = read_plot(src) if PLOT_NAME.fullmatch(src) else "not a plot of the job's output directory"
                if isinstance(read[src], bytes):
                    taken += len(read[src])
                    if taken > MAX_PAGE_PLOT_BYTES:
                        taken -= len(read[src])
                        read[src] = f"the page's plots are over {MAX_PAGE_PLOT_BYTES >> 20} MiB"
            data = read[src]
            if isinstance(data, str):
                child.type, child.tag, child.children = "text", "", None
                child.content = f"[{child.content or src}: {src} is not shown: {data}]"
            else:
                child.attrSet("src", "data:image/png;base64," + base64.b64encode(data).decode("ascii"))
    body = md.renderer.render(tokens, md.options, {})
    return (f'<!doctype html>\n<html><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">'
            f'<base target="_blank"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body>\n{body}</body></html>\n")
