"""The browser client's pure parts, tested by Node's built-in test runner.

``gateway/static/tests/*.test.mjs`` import ``gateway/static/fanroute.js`` directly
(the same file the gateway serves) and run it against a fake WebSocket with mocked
timers. This wrapper lets the one test command (``ops/test.sh``) run them; Node comes
from ``ops/setup-browser.sh``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fanroute_js_unit_tests_pass_under_node() -> None:
    node = shutil.which("node")
    assert node is not None, "node is not installed: run ops/setup-browser.sh"
    tests = sorted((ROOT / "gateway/static/tests").glob("*.test.mjs"))
    assert tests, "no Node tests found in gateway/static/tests/"
    result = subprocess.run(
        [node, "--test", *map(str, tests)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"node --test failed:\n{output[-6000:]}"
    assert "# fail 0" in output, output[-3000:]
