"""Summarize a py-spy raw profile: the functions with the largest share of samples, inclusive and self.

    py-spy record --nonblocking --gil -r 500 -f raw -o w6.spy -- python -m perf.w6 --runs 6000
    python -m perf.spy_top w6.spy [--top 40]

``make profile`` does both for in-process W6. Line numbers are folded into their function: with sampling,
per-line counts are too thin to read, and a function's share is what decides where to optimize.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)")


def summarize(path: Path) -> tuple[int, Counter[str], Counter[str]]:
    """(samples, inclusive count by function, self count by function)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return total, inclusive, own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.spy_top", description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    total, inclusive, own = summarize(args.profile)
    print(f"{total} samples")
    for title, counts in (("inclusive", inclusive), ("self", own)):
        print(f"--- {title}")
        for frame, n in counts.most_common(args.top):
            print(f"{100.0 * n / max(1, total):5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
