"""bench/RESULTS.md: each benchmark appends its newest figures at the end of its own section."""

from __future__ import annotations

import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def append_to_section(heading: str, text: str, *, intro: str = "", path: str = RESULTS) -> None:
    """Append ``text`` at the end of the ``heading`` section (``"## ..."``) of ``path``, before the
    next ``## `` heading; a missing section is created at the end, starting with ``intro``."""
    existing = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if heading not in existing:
        existing = existing.rstrip("\n") + f"\n\n{heading}\n" + (f"\n{intro.rstrip()}\n" if intro else "")
    head, _, rest = existing.partition(heading)
    cut = rest.find("\n## ")
    section, tail = (rest, "") if cut < 0 else (rest[: cut + 1], rest[cut + 1:])
    new = head + heading + section.rstrip("\n") + "\n\n" + text.strip("\n") + "\n" + ("\n" + tail if tail else "")
    with open(path, "w") as fh:
        fh.write(new)
