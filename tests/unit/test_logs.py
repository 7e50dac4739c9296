"""Log lines (fanroute.logs): one JSON object per line with stable names, or text for a terminal."""

from __future__ import annotations

import io
import logging

import orjson
import pytest

from fanroute import logs


@pytest.fixture
def logger():
    log = logging.getLogger("fanroute.tests.logs")
    yield log
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    logging.getLogger("fanroute").setLevel(logging.NOTSET)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_an_event_is_one_json_line_with_stable_field_names(logger):
    out = io.StringIO()
    assert logs.setup("debug", "json", out) == "json"
    logs.event(
        logger, logging.INFO, "connection_closed", "connection closed",
        connection="c1", user="al\nice", topic=None, code=4003, reason='say "bye"',
    )
    (line,) = lines(out)
    record = orjson.loads(line)
    assert record["event"] == "connection_closed" and record["message"] == "connection closed"
    assert record["level"] == "info" and record["logger"] == "fanroute.tests.logs"
    assert record["connection"] == "c1" and record["user"] == "al\nice" and record["code"] == 4003
    assert record["reason"] == 'say "bye"'
    assert "topic" not in record  # a field that does not apply is left out
    assert record["ts"].endswith("Z") and record["ts"][10] == "T"


def test_plain_records_and_exceptions_stay_one_line(logger):
    out = io.StringIO()
    logs.setup("info", "json", out)
    logger.info("hello %s", "world")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("it failed")
    logger.debug("not shown")
    first, second = (orjson.loads(line) for line in lines(out))
    assert first["message"] == "hello world" and "event" not in first
    assert second["level"] == "error" and "ValueError: boom" in second["error"]


def test_text_lines_carry_the_event_and_quote_what_could_forge_a_line(logger):
    out = io.StringIO()
    assert logs.setup("info", "text", out) == "text"
    logs.event(logger, logging.WARNING, "auth_failed", "token refused", user="eve\nINFO fake", reason="expired")
    (line,) = lines(out)
    assert "WARNING fanroute.tests.logs: token refused [event=auth_failed" in line
    assert 'user="eve\\nINFO fake"' in line and "reason=expired" in line


def test_an_event_below_the_level_costs_nothing(logger):
    out = io.StringIO()
    logs.setup("info", "json", out)
    logs.event(logger, logging.DEBUG, "connection_opened", "connection opened", connection="c1")
    assert out.getvalue() == ""


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_text_on_a_terminal_and_json_elsewhere():
    assert logs.resolve("auto", Tty()) == "text"
    assert logs.resolve("auto", io.StringIO()) == "json"
    assert logs.resolve("json", Tty()) == "json"


def test_setup_replaces_its_handler_instead_of_doubling_lines(logger):
    out = io.StringIO()
    logs.setup("info", "json", out)
    logs.setup("info", "json", out)
    logger.info("once")
    assert len(lines(out)) == 1


def test_debug_is_fanroutes_own_and_libraries_stay_at_info(logger):
    out = io.StringIO()
    logs.setup("debug", "json", out)
    logging.getLogger("pynng.nng").debug("Pipe callback event 1")
    logging.getLogger("pynng.nng").info("shown")
    logger.debug("mine")
    assert [orjson.loads(line)["message"] for line in lines(out)] == ["shown", "mine"]
