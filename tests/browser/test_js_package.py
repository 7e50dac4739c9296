"""fanroute.js as an npm package: its declarations hold for its code, and it installs.

``gateway/static/`` is the package (``package.json`` with ESM ``exports`` and
``types``). TypeScript is the version ``tests/browser/js/package-lock.json`` pins,
installed from the npm registry by ``ops/setup-browser.sh``; nothing here uses the
network: the package is packed and installed from its tarball.

Two checks tie ``fanroute.d.ts`` to ``fanroute.js``: ``tsc --checkJs`` type-checks the
code, whose JSDoc refers to the declared types; and the declarations ``tsc`` infers
from the code must be assignable, export by export, to the hand-written ones — a
name declared but missing from the code, or declared with a type the code does not
have, fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "gateway" / "static"
TSC = ROOT / "tests" / "browser" / "js" / "node_modules" / ".bin" / "tsc"
TS_FLAGS = ["--target", "es2022", "--module", "es2022", "--moduleResolution", "bundler", "--lib", "es2022,dom"]

pytestmark = pytest.mark.timeout(300)


def run(*args: str | Path, cwd: Path) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def tsc() -> Path:
    assert TSC.exists(), "TypeScript is not installed: run ops/setup-browser.sh (ops/test.sh does)"
    return TSC


def test_fanroute_js_type_checks_against_its_declarations(tsc: Path) -> None:
    run(tsc, "--noEmit", "--allowJs", "--checkJs", *TS_FLAGS, STATIC / "fanroute.js", cwd=ROOT)


def test_every_declared_export_is_in_the_code_with_its_declared_type(tsc: Path, tmp_path: Path) -> None:
    # The code under another name, beside the declarations its JSDoc imports.
    shutil.copy(STATIC / "fanroute.js", tmp_path / "impl.js")
    shutil.copy(STATIC / "fanroute.d.ts", tmp_path / "fanroute.d.ts")
    run(tsc, "--allowJs", "--declaration", "--emitDeclarationOnly", *TS_FLAGS, "--outDir", ".", "impl.js", cwd=tmp_path)
    declared = re.findall(r"^export declare (?:const|function|class) (\w+)", (STATIC / "fanroute.d.ts").read_text(), re.M)
    assert {"FanrouteClient", "Subscription", "ClientCore", "tokenTtl"} <= set(declared)
    lines = [
        'import type * as Code from "./impl.js";',
        'import type * as Declared from "./fanroute.js";',
        "declare const code: typeof Code;",
        *(f"export const check_{name}: typeof Declared.{name} = code.{name};" for name in declared),
    ]
    (tmp_path / "check.ts").write_text("\n".join(lines) + "\n")
    run(tsc, "--noEmit", "--strict", *TS_FLAGS, "check.ts", cwd=tmp_path)


def test_the_package_version_is_fanroutes() -> None:
    import tomllib

    package = json.loads((STATIC / "package.json").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert package["version"] == project["version"]
    assert package["type"] == "module"
    assert package["exports"]["."] == {"types": "./fanroute.d.ts", "default": "./fanroute.js"}


CONSUMER_TS = """
import { FanrouteClient, ClientCore, type Subscription, type SubscriptionState } from "fanroute";

const client = new FanrouteClient(["ws://127.0.0.1:8080/ws"], {
  getToken: async ({ reason }) => (reason === "refresh" ? "next" : "first"),
});
const sub: Subscription = client.newSubscription("prices.AAPL", { last: 1, presence: true });
sub.on("presence", ({ subscribers }) => { const n: number = subscribers; void n; });
sub.on("publication", ({ seq, skipped }) => { const s: number = seq + (skipped ?? 0); void s; });
const state: SubscriptionState = sub.state;
const off: () => void = client.subscribe<{ price: number }>("prices.MSFT", (p, { seq }) => void (p.price + seq), { last: 1 });
const count: Promise<number> = client.presenceCount("prices.AAPL");
const core = new ClientCore(["ws://a/"], { fetchToken: true });
void [state, off, count, core.giveToken("t", 0, 3000)];
"""

CONSUMER_MJS = """
import { FanrouteClient, ClientCore, tokenTtl, TOKEN_EXPIRED_REASON } from "fanroute";
import pkg from "fanroute/package.json" with { type: "json" };

class NoSocket { constructor(url) { this.url = url; } send() {} close() {} }
const client = new FanrouteClient("ws://127.0.0.1:1/ws", { WebSocket: NoSocket, getToken: () => "t" });
const sub = client.newSubscription("prices.AAPL", { last: 1 });
sub.subscribe();
if (sub.state !== "subscribing") throw new Error(`state ${sub.state}`);
if (new ClientCore(["u"]).phase !== "idle") throw new Error("core");
if (tokenTtl("a.b.c", 0) !== null || TOKEN_EXPIRED_REASON !== "token expired") throw new Error("helpers");
console.log(`fanroute ${pkg.version} imported`);
"""


def test_npm_pack_installs_into_an_esm_project_that_imports_and_type_checks_it(tsc: Path, tmp_path: Path) -> None:
    npm = shutil.which("npm")
    assert npm is not None, "npm is not installed: run ops/setup-browser.sh"
    out = tmp_path / "dist"
    out.mkdir()
    packed = json.loads(run(npm, "pack", "--json", "--pack-destination", out, STATIC, cwd=tmp_path))
    tarball = out / packed[0]["filename"]
    with tarfile.open(tarball) as tar:
        assert sorted(tar.getnames()) == ["package/fanroute.d.ts", "package/fanroute.js", "package/package.json"]
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text(json.dumps({"name": "app", "private": True, "type": "module"}))
    # A tarball with no dependencies installs without the network.
    run(npm, "install", "--offline", "--no-audit", "--no-fund", tarball, cwd=app)
    (app / "main.mjs").write_text(CONSUMER_MJS)
    assert "fanroute 0.1.0 imported" in run("node", "main.mjs", cwd=app)
    # A bundler resolves the package through its exports; so does tsc with
    # moduleResolution bundler, and Node's own resolution (nodenext).
    (app / "main.ts").write_text(CONSUMER_TS)
    run(tsc, "--noEmit", "--strict", *TS_FLAGS, "main.ts", cwd=app)
    run(tsc, "--noEmit", "--strict", "--module", "nodenext", "--moduleResolution", "nodenext", "--lib", "es2022,dom", "main.ts", cwd=app)
    # And the types do catch a mistake.
    (app / "wrong.ts").write_text('import { FanrouteClient } from "fanroute";\nnew FanrouteClient("ws://x", { getToken: 42 });\n')
    failed = subprocess.run([str(tsc), "--noEmit", "--strict", *TS_FLAGS, "wrong.ts"], cwd=app, capture_output=True, text=True)
    assert failed.returncode != 0 and "TokenContext" in failed.stdout, failed.stdout
