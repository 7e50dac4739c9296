"""The protocol document and the codes module say the same thing."""

from __future__ import annotations

import re

from fanroute.codes import CloseCode, ErrorCode, Reconnect, close_code_label, reconnect_rule
from tests.support import ROOT

PROTOCOL = (ROOT / "gateway/PROTOCOL.md").read_text()


def close_table() -> dict[int, str]:
    section = PROTOCOL[PROTOCOL.index("## Close codes") :]
    return {int(code): rule for code, rule in re.findall(r"^\| (\d{4}) \| [^|]+ \| ([^|]+) \|$", section, re.M)}


def test_every_close_code_is_documented_with_its_reconnect_rule():
    table = close_table()
    assert set(table) == {int(c) for c in CloseCode}
    for code, rule in table.items():
        assert rule.strip().split(":")[0].split(",")[0].split(";")[0] == CloseCode(code).reconnect.value, code


def test_every_error_code_is_documented():
    section = PROTOCOL[PROTOCOL.index("Error codes (the `code`") :]
    assert set(re.findall(r"`([a-z_]+)`", section.split("\n\n")[0])) - {"code", "error"} == {c.value for c in ErrorCode}


def test_reconnect_rules():
    assert reconnect_rule(4001) is Reconnect.NEVER and reconnect_rule(4003) is Reconnect.NEVER
    assert reconnect_rule(1012) is Reconnect.PROMPT and reconnect_rule(4029) is Reconnect.LONGEST
    assert reconnect_rule(4999) is Reconnect.BACKOFF and reconnect_rule(None) is Reconnect.BACKOFF


def test_labels_are_bounded():
    assert close_code_label(CloseCode.UNAUTHORIZED) == "4001" and close_code_label(1006) == "1006"
    assert close_code_label(4321) == "other"
