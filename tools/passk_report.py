"""pass@K report over scored-sample JSONL files of one or more runs.

    python tools/passk_report.py --run base=base.jsonl --run simko=simko.jsonl --out report/

Writes passk.md, passk.csv and passk.png into --out and prints the Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from simko_tune.metrics import passk_report


def _run_argument(value: str) -> tuple[str, Path]:
    label, sep, path = value.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=path.jsonl, got {value!r}")
    return label, Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run",
        type=_run_argument,
        action="append",
        required=True,
        metavar="NAME=path.jsonl",
        help="a run's scored samples; repeat to overlay several runs",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the report files")
    parser.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=None,
        help="K values (default: 1, 2, 4, ... up to each benchmark's samples per problem)",
    )
    args = parser.parse_args(argv)
    runs = dict(args.run)
    if len(runs) != len(args.run):
        parser.error("each --run NAME must be different")
    report = passk_report(runs, args.out, ks=args.ks)
    print(report.markdown.read_text(), end="")
    print(f"wrote {report.markdown}, {report.csv}, {report.plot}")


if __name__ == "__main__":
    main()
