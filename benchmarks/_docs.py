"""Shared by the benchmark scripts: replace one ``## Section`` of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(heading: str, section: str, path: Path = DOCS) -> Path:
    """Replace the section that starts with the line ``heading`` (e.g. ``## Solver``) by
    ``section``, or append it; other sections stay as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    lines = text.splitlines()
    try:
        i = lines.index(heading)
        j = next((n for n in range(i + 1, len(lines)) if lines[n].startswith("## ")), len(lines))
        lines[i:j] = section.rstrip("\n").splitlines() + ([""] if j < len(lines) else [])
        text = "\n".join(lines) + "\n"
    except ValueError:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def cpu_name() -> str:
    """The CPU's model name (for the machine line of a benchmark report)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
