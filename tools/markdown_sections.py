"""Replacing one `## ` section of a Markdown file (docs/BENCHMARKS.md, docs/RESULTS.md), used by
the benchmark and sweep tools so that each rewrites only its own section."""

from __future__ import annotations

import re
from pathlib import Path

from alchemist_jax.runtime.io import atomic_write_bytes


def write_section(path: Path, heading: str, section: str, title: str) -> None:
    """Writes `section` (text that starts with the line `heading`, e.g. "## Scoring
    throughput") into the Markdown file `path` in place of the section with that heading (up to
    the next `## ` line), or at the end when there is none; a new file starts with `# title`.
    The file is replaced atomically."""
    path = Path(path)
    text = path.read_text() if path.exists() else f"# {title}\n\n"
    pattern = re.compile(re.escape(heading) + r"\n.*?(?=\n## |\Z)", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip() + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    atomic_write_bytes(path, (text.rstrip() + "\n").encode())
    print(f"wrote {path}")
