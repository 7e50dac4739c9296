"""The distribution as a user installs it: a fresh virtual environment, `pip install .`."""

from __future__ import annotations

import subprocess
import venv

import pytest

from tests.support import ROOT


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", str(ROOT)], check=True, timeout=600, capture_output=True)
    return py


def run(py, *args: str) -> subprocess.CompletedProcess:
    # Run outside the checkout: python -c puts the working directory on sys.path.
    return subprocess.run([str(py), *args], capture_output=True, text=True, timeout=300, cwd=py.parent)


def installed(py) -> set[str]:
    out = run(py, "-m", "pip", "list", "--format", "freeze").stdout
    return {line.split("==")[0].lower() for line in out.splitlines()}


def test_the_runtime_install_has_no_benchmark_packages_and_imports_as_fanroute(fresh):
    assert not {"rich", "hdrhistogram"} & installed(fresh)
    probe = run(fresh, "-c", "import fanroute.gateway.server, fanroute.router.server, fanroute.client; print('ok')")
    assert probe.stdout.strip() == "ok", probe.stderr
    # A generic name is not claimed: cluster/, gateway/ and router/ are not importable.
    for name in ("cluster", "gateway", "router"):
        assert run(fresh, "-c", f"import {name}").returncode != 0, name
    missing = run(fresh, "-m", "fanroute.cli", "bench", "fanout", "--subscribers", "1")
    assert missing.returncode == 2 and "fanroute[bench]" in missing.stderr


def test_the_bench_extra_runs_fanroute_bench(fresh):
    subprocess.run([str(fresh), "-m", "pip", "install", "-q", f"{ROOT}[bench]"], check=True, timeout=600, capture_output=True)
    help_text = run(fresh, "-m", "fanroute.cli", "bench", "fanout", "--help")
    assert help_text.returncode == 0 and "--subscribers" in help_text.stdout
    reference = run(fresh, "-c", "import fanroute.bench.fanout as f; print(f.REFERENCE_SERVER.is_file())")
    assert reference.stdout.strip() == "True", reference.stderr
