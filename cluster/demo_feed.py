"""A demo market feed: random-walk prices published to ``prices.<SYMBOL>``.

It feeds the market ticker page (``/ticker.html`` on a gateway's client port) and is a
small example of a back-end publisher written with the Python client SDK:

    python -m fanroute.demo_feed --url ws://127.0.0.1:8080/ --rate 5

Each symbol moves by a geometric random walk (about 0.2 % per step); every payload is
``{"symbol", "price", "open", "ts"}`` where ``open`` is the first price of the run, so
a page that joins late can still show the change. With several URLs (a comma list)
the SDK rotates to another gateway when one goes away.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import trio

from fanroute.client import Client
from fanroute.errors import FanrouteError
from fanroute.protocol import ProtocolError, check_topic

log = logging.getLogger("fanroute.demo_feed")

DEFAULT_SYMBOLS = ("AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "TSLA", "META", "BTC-USD")
# Rough starting prices, so the table looks like a market and not like 100.00 × 8.
START_PRICES = {
    "AAPL": 189.50, "MSFT": 415.20, "GOOG": 172.40, "AMZN": 186.10,
    "NVDA": 121.80, "TSLA": 248.50, "META": 512.30, "BTC-USD": 67250.00,
}
STEP_VOLATILITY = 0.002


class RandomWalk:
    """Prices for a set of symbols; pure (no I/O), seeded for reproducible runs."""

    def __init__(self, symbols: Sequence[str], rng: random.Random) -> None:
        self.rng = rng
        self.open = {s: START_PRICES.get(s, round(rng.uniform(20, 500), 2)) for s in symbols}
        self.price = dict(self.open)

    def step(self, symbol: str) -> dict[str, object]:
        price = self.price[symbol] * math.exp(STEP_VOLATILITY * self.rng.gauss(0.0, 1.0))
        self.price[symbol] = price = max(0.01, round(price, 2))
        return {"symbol": symbol, "price": price, "open": self.open[symbol], "ts": int(time.time() * 1000)}


async def run(
    urls: Sequence[str],
    rate: float,
    symbols: Sequence[str] = DEFAULT_SYMBOLS,
    *,
    token: str | None = None,
    count: int | None = None,
    seed: int | None = None,
) -> int:
    """Publish ``rate`` updates per second for each symbol (forever, or ``count`` rounds).

    Returns the number of publications the cluster acknowledged.
    """
    walk = RandomWalk(symbols, random.Random(seed))
    period = 1.0 / rate
    acked = 0
    async with Client(list(urls), token=token) as client:
        await client.wait_connected()
        log.info("demo feed: %d symbols at %g/s each via %s", len(symbols), rate, client.url)
        next_round = trio.current_time()
        rounds = 0
        while count is None or rounds < count:
            for symbol in symbols:
                try:
                    await client.publish(f"prices.{symbol}", walk.step(symbol), timeout=10.0)
                    acked += 1
                except (FanrouteError, trio.TooSlowError) as exc:
                    # A gateway went away mid-publication: the SDK reconnects; the
                    # ticker only misses one tick of a random walk.
                    log.warning("publish on prices.%s failed: %s", symbol, exc)
            rounds += 1
            next_round += period
            await trio.sleep_until(max(next_round, trio.current_time()))
    return acked


def _plain_flag(parser: argparse.ArgumentParser, flag: str, kind: Callable[[str], Any], default: Any, help: str) -> None:
    parser.add_argument(flag, type=kind, default=default, help=f"{help} (default {default})")


def add_arguments(parser: argparse.ArgumentParser, flag: Callable[..., None] = _plain_flag) -> None:
    """The feed's flags. ``fanroute demo-feed`` passes its own ``flag`` helper, which
    also reads each flag from its ``FANROUTE_*`` environment variable."""
    flag(parser, "--url", str, "ws://127.0.0.1:8080/", "gateway WebSocket URL, or a comma-separated list to rotate through")
    flag(parser, "--rate", float, 2.0, "price updates per second, for each symbol")
    flag(parser, "--symbols", str, ",".join(DEFAULT_SYMBOLS), "comma-separated symbols, published on prices.<SYMBOL>")
    flag(parser, "--token", str, "", "JWT for gateways that require one")
    flag(parser, "--count", int, 0, "stop after this many rounds of updates; 0 runs until stopped")
    flag(parser, "--seed", int, None, "random seed, for a reproducible walk")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fanroute demo-feed",
        description="Publish random-walk prices to prices.<SYMBOL> (for the ticker demo page).",
    )
    add_arguments(parser)
    return parser


def run_args(args: argparse.Namespace) -> int:
    """Run the feed from parsed flags (see :func:`add_arguments`); returns an exit status."""
    urls = [u.strip() for u in args.url.split(",") if u.strip()]
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    if not urls:
        print("fanroute demo-feed: --url is empty", file=sys.stderr)
        return 2
    if not 0 < args.rate <= 10000:
        print("fanroute demo-feed: --rate must be between 0 and 10000 updates per second", file=sys.stderr)
        return 2
    if args.count < 0:
        print("fanroute demo-feed: --count must be 0 (no limit) or more", file=sys.stderr)
        return 2
    if not symbols:
        print("fanroute demo-feed: --symbols is empty", file=sys.stderr)
        return 2
    for symbol in symbols:
        try:
            check_topic(f"prices.{symbol}")
        except ProtocolError:
            print(f"fanroute demo-feed: --symbols: {symbol!r} cannot be part of a topic name", file=sys.stderr)
            return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        acked = trio.run(
            partial(run, urls, args.rate, symbols, token=args.token or None, count=args.count or None, seed=args.seed)
        )
    except KeyboardInterrupt:
        return 130
    log.info("demo feed: %d publications acknowledged", acked)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
