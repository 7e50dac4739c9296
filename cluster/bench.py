"""``fanroute bench``: benchmarks, side by side with a reference in the same run."""

from __future__ import annotations

import argparse
from typing import Any


def add_bench_commands(parser: argparse.ArgumentParser, flag: Any) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("fanout", help="deliveries/s and latency vs a reference server")
    p.set_defaults(bench_main=lambda args: print("not yet") or 1)
