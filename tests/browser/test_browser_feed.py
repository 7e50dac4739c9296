"""The demo market feed behind the ticker page: its random walk and its flags.

The feed end to end (publishing into a gateway, rendered by the ticker page) is
covered by ``tests/browser/test_browser.py``.
"""

from __future__ import annotations

import argparse
import random

import pytest

from fanroute import cli
from fanroute.demo_feed import DEFAULT_SYMBOLS, RandomWalk, add_arguments, build_parser, run_args


def test_random_walk_is_reproducible_and_stays_a_price() -> None:
    a = RandomWalk(DEFAULT_SYMBOLS, random.Random(3))
    b = RandomWalk(DEFAULT_SYMBOLS, random.Random(3))
    for _ in range(500):
        for symbol in DEFAULT_SYMBOLS:
            pa, pb = a.step(symbol), b.step(symbol)
            assert pa["price"] == pb["price"]
            assert pa["price"] > 0 and round(pa["price"], 2) == pa["price"]
            assert pa["symbol"] == symbol and pa["open"] == a.open[symbol]
    # A walk, not a constant: every symbol moved.
    assert all(a.price[s] != a.open[s] for s in DEFAULT_SYMBOLS)


def test_steps_are_small() -> None:
    walk = RandomWalk(["AAPL"], random.Random(1))
    before = walk.price["AAPL"]
    for _ in range(100):
        after = walk.step("AAPL")["price"]
        assert abs(after / before - 1) < 0.02
        before = after


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rate", "0"], "--rate"),
        (["--count", "-1"], "--count"),
        (["--symbols", "a b"], "--symbols"),
        (["--symbols", ","], "--symbols"),
        (["--url", ","], "--url"),
    ],
)
def test_bad_flags_stop_with_one_sentence(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_args(build_parser().parse_args(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fanroute demo-feed: ") and message in err and "\n" not in err


def test_flags_plug_into_the_cli_with_environment_variables() -> None:
    # What `fanroute demo-feed` does: its flags read FANROUTE_DEMO_FEED_*, names that
    # no other command's settings share.
    env = {"FANROUTE_DEMO_FEED_RATE": "7.5", "FANROUTE_DEMO_FEED_URL": "ws://127.0.0.1:8081/,ws://127.0.0.1:8082/",
           "FANROUTE_RATE": "not read by demo-feed"}
    args = cli.parse_args(["demo-feed", "--symbols", "AAPL"], env)
    assert args.rate == 7.5
    assert args.url == "ws://127.0.0.1:8081/,ws://127.0.0.1:8082/"
    assert args.symbols == "AAPL" and args.count == 0 and args.seed is None
