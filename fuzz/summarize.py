"""Summarise campaign logs (fuzz/campaign.sh) as a Markdown table for bench/results/fuzz.md.

python fuzz/summarize.py /tmp/lalic-fuzz
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_STATS_PREFIX = "lalic-fuzz {"


def summarize_log(path: Path) -> dict[str, Any]:
    """The last libFuzzer status line and the last statistics line of one run's log."""
    status: tuple[int, int, int, int] | None = None
    stats: dict[str, Any] = {}
    crashed = False
    for line in path.read_text(errors="replace").splitlines():
        match = _STATUS.match(line)
        if match:
            status = tuple(int(group) for group in match.groups())  # type: ignore[assignment]
        elif line.startswith(_STATS_PREFIX):
            stats = json.loads(line.split(" ", 1)[1])
        elif "Uncaught Python exception" in line or "ERROR: libFuzzer" in line:
            crashed = True
    runs, cov, ft, corpus = status or (0, 0, 0, 0)
    return {
        "log": path.name,
        "target": stats.get("target", "?"),
        "libfuzzer_runs": runs,
        "cov": cov,
        "ft": ft,
        "corpus": corpus,
        "inputs": stats.get("inputs", 0),
        "accepted": stats.get("accepted", 0),
        "elapsed_s": stats.get("elapsed_s", 0.0),
        "inputs_per_s": stats.get("inputs_per_s", 0.0),
        "slowest_input_s": stats.get("slowest_input_s", 0.0),
        "peak_rss_mb": stats.get("peak_rss_mb", 0.0),
        "crashed": crashed,
        "rejections": stats.get("rejections", {}),
    }


def main(argv: list[str] | None = None) -> int:
    """Print the table for every ``*.log`` in the campaign folder."""
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0] if args else "/tmp/lalic-fuzz")
    rows = [summarize_log(path) for path in sorted(folder.glob("*.log"))]
    columns = "run, target, inputs, accepted, time (s), inputs/s, cov, ft, corpus, slowest (s)"
    columns += ", RSS MiB, crash"
    print("| " + " | ".join(columns.split(", ")) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['log']} | {r['target']} | {r['inputs']:,} | {r['accepted']:,} | {r['elapsed_s']:.0f} | "
            f"{r['inputs_per_s']:,.0f} | {r['cov']} | {r['ft']} | {r['corpus']} | {r['slowest_input_s']} | "
            f"{r['peak_rss_mb']:.0f} | {'yes' if r['crashed'] else 'no'} |"
        )
    crashes = sorted(p.name for p in (folder / "crashes").glob("*")) if (folder / "crashes").exists() else []
    print(f"\ncrash artifacts: {crashes or 'none'}")
    for r in rows:
        print(f"\n{r['log']} rejections (top): {json.dumps(r['rejections'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
