"""The markdown table of benchmarks/gpu_matrix.sh: one row per benchmarks/throughput.py log.

    python benchmarks/matrix_table.py OUT.md --title TEXT LOG...

A log is named <attention>_zero<stage>_ckpt-<on|off>.log. Figures are found by their labels
anywhere in it, not by line position, so throughput.py may reorder, reword or add lines as long
as these labelled figures stay: "precision <name>", "samples/s <n>", "step <n> ms",
"peak memory <n> <unit>" and "MFU <n>%". A log without "samples/s" is a failed run; its row
says why. Exits 1 when any run failed, after writing the table.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# Column -> pattern whose first group is the figure; the first match in the log wins.
FIGURES = {
    "precision": r"\bprecision\s+(\w+)",
    "samples/s": r"\bsamples/s\s+([0-9.]+)",
    "step ms": r"\bstep\s+([0-9.]+)\s*ms",
    "peak memory": r"\bpeak memory\s+([0-9.]+\s*[KMGT]i?B)",
    "MFU": r"\bMFU\s+([0-9.]+%)",
}
NAME = re.compile(r"(?P<attention>\w+?)_zero(?P<zero>\d)_ckpt-(?P<ckpt>on|off)\.log$")
COLUMNS = ["attention", "ZeRO", "grad ckpt", *FIGURES]


def figures(text: str) -> dict[str, str]:
    """Each labelled figure of throughput.py's output, "?" where the label is missing."""
    found = {}
    for column, pattern in FIGURES.items():
        match = re.search(pattern, text)
        found[column] = match.group(1) if match else "?"
    return found


def failure(text: str) -> str:
    """A short reason for a run that printed no summary: out of memory, else its last error line."""
    if "OutOfMemoryError" in text or "CUDA out of memory" in text:
        return "out of memory"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    reason = (errors or lines or ["no output"])[-1]
    return reason[:100].replace("|", "/")  # a pipe would split the table cell


def row(log: Path) -> tuple[list[str], bool]:
    """The table row of one log, and whether its run succeeded."""
    match = NAME.search(log.name)
    if match is None:
        raise SystemExit(f"{log}: not named <attention>_zero<stage>_ckpt-<on|off>.log")
    combination = [match["attention"], match["zero"], match["ckpt"]]
    text = log.read_text(errors="replace")
    found = figures(text)
    if found["samples/s"] == "?":
        return [*combination, found["precision"], f"failed: {failure(text)}", "", "", ""], False
    return [*combination, *found.values()], True


def table(title: str, rows: list[list[str]]) -> str:
    lines = [f"## {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="markdown file to write")
    p.add_argument("--title", required=True)
    p.add_argument("logs", nargs="+", type=Path)
    args = p.parse_args()
    results = [row(log) for log in args.logs]
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(table(args.title, [r for r, _ in results]))
    tmp.replace(args.out)
    failed = sum(not ok for _, ok in results)
    print(f"wrote {args.out}: {len(results)} runs, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
