"""A router takes up an edited namespaces file without a restart (no topic moves)."""

from __future__ import annotations

import trio

from fanroute.config import RouterConfig
from fanroute.router.server import RouterServer
from tests.support import CLUSTER_SECRET, free_port, metric, until
from prometheus_client import generate_latest

NAMESPACES = """
[namespaces.prices]
subscribe = "anyone"
publish = "anyone"
history_size = {size}
"""



async def test_an_edited_namespaces_file_is_reloaded_and_a_broken_one_is_not(nursery, tmp_path):
    path = tmp_path / "namespaces.toml"
    path.write_text(NAMESPACES.format(size=5))
    config = RouterConfig(
        listen=f"tcp://127.0.0.1:{free_port()}", admin_port=None, config_file=str(path),
        cluster_secret=CLUSTER_SECRET, copies=1, gateway_timeout=0.4,
    )
    router = RouterServer(config)
    await nursery.start(router.run)

    def reloads(outcome: str) -> float:
        return metric(generate_latest(router.registry).decode(), "fanroute_router_config_reloads_total", f'outcome="{outcome}"')

    assert router.shard.history_for("prices.EUR") == (5, None)
    path.write_text(NAMESPACES.format(size=7))
    await until(lambda: reloads("ok") == 1, "the edit to be taken up")
    assert router.shard.history_for("prices.EUR") == (7, None)
    path.write_text("this is not toml [")
    await until(lambda: reloads("failed") == 1, "the broken file to be refused")
    assert router.shard.history_for("prices.EUR") == (7, None)  # the last good file stays
