"""The Markdown report as one self-contained HTML page, figures embedded.

The Markdown is rendered by markdown-it-py as CommonMark with pipe tables and raw
HTML switched off: every character the report escaped stays text, so names and
error messages from records cannot become markup.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from markdown_it import MarkdownIt

_IMAGE = re.compile(r'<img src="([^"/\\]+\.png)"')
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 80rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
.wide { overflow-x: auto; margin: 0.5rem 0 1.5rem; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; white-space: nowrap; }
th { background: #f3f3f3; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2rem; }
pre { overflow-x: auto; }
"""


def to_html(markdown: str, figures: Path | None) -> str:
    """``markdown`` as a page; PNGs it links by bare file name are read from ``figures`` and embedded."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)

    def embed(match: re.Match) -> str:
        path = figures / match.group(1) if figures else None
        if path is None or not path.is_file():
            return match.group(0)
        return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = _IMAGE.sub(embed, body)
    # A wide table scrolls in a box of its own, so that the page around it keeps the window's width.
    body = body.replace("<table>", '<div class="wide"><table>').replace("</table>", "</table></div>")
    first = next((line for line in markdown.splitlines() if line.startswith("#")), "ringbench report")
    title = html.escape(first.lstrip("#").strip().replace("\\", ""))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )
