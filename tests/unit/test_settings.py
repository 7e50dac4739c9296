"""The settings table (fanroute.settings): argv and environment into config objects,
without starting anything; precedence; errors that name the flag or the variable; one
variable per setting; the config classes' defaults, the generated reference and the
Helm chart's variables held to the table."""

from __future__ import annotations

import dataclasses
import re

import pytest

from fanroute import cli, settings
from fanroute.config import GatewayConfig, RouterConfig
from fanroute.errors import ConfigError
from fanroute.settings import SETTINGS, TOP, explain, of_command, parse
from tests.support import ROOT

SECRET = "s" * 20


@pytest.fixture(scope="module")
def parser():
    return cli.build_parser()


@pytest.fixture(scope="module")
def everything(parser):
    return settings.all_settings(parser)


def load(argv, env=None, parser=None):
    return parse(argv, env or {}, parser or cli.build_parser())


# -- argv and environment into configs ---------------------------------------------------


def test_gateway_arguments_become_a_gateway_config(parser):
    args = load(
        ["gateway", "--routers", "a=tcp://10.0.0.1:7101,b=tcp://10.0.0.2:7101", "--port", "9000",
         "--allowed-origins", "https://a.example, https://b.example", "--cluster-encrypt", "--admin-port", "off"],
        {"FANROUTE_CLUSTER_SECRET": SECRET, "FANROUTE_JWT_AUDIENCE": "fanroute"},
        parser,
    )
    gw = GatewayConfig.from_args(args)
    assert gw.routers == [("a", "tcp://10.0.0.1:7101"), ("b", "tcp://10.0.0.2:7101")]
    assert gw.port == 9000 and gw.admin_port is None
    assert gw.allowed_origins == ["https://a.example", "https://b.example"]
    assert gw.cluster_encrypt is True and gw.cluster_secret == SECRET
    assert gw.jwt_audience == "fanroute" and gw.jwt_issuer is None and gw.api_key is None
    gw.check()


def test_standalone_gives_a_gateway_and_a_router_config(parser):
    args = load(["standalone", "--history-size", "7", "--config", "ns.toml"], {"FANROUTE_SHARDS": "2"}, parser)
    gw = GatewayConfig.from_args(args, routers=[("unused", "inproc://unused")])
    rc = RouterConfig.from_args(args)
    assert (gw.port, gw.admin_port, gw.anonymous) == (8080, 9100, "allow")  # standalone's own defaults
    assert gw.config_file == rc.config_file == "ns.toml"
    assert rc.history_size == 7 and args.shards == 2 and args.demo_feed == 0.0


def test_router_arguments_become_a_router_config(parser):
    args = load(["router", "--name", "router-3", "--history-ttl", "60"], {"FANROUTE_CLUSTER_SECRET": SECRET}, parser)
    rc = RouterConfig.from_args(args)
    assert (rc.name, rc.history_ttl, rc.admin_port, rc.cluster_secret) == ("router-3", 60.0, 9201, SECRET)
    rc.check()


def test_a_flag_wins_over_its_variable_and_the_variable_over_the_default(parser):
    env = {"FANROUTE_PORT": "2000", "FANROUTE_PING_INTERVAL": "3", "FANROUTE_CLUSTER_ENCRYPT": "yes"}
    args = load(["gateway", "--port", "1000"], env, parser)
    assert args.port == 1000  # flag
    assert args.ping_interval == 3.0  # variable
    assert args.ping_timeout == 8.0  # default
    assert args.cluster_encrypt is True
    origins = {o.setting.name: o.source for o in args._origins}
    assert (origins["port"], origins["ping-interval"], origins["ping-timeout"]) == ("flag", "env", "default")


def test_parsing_reads_only_the_environment_it_is_given(monkeypatch, parser):
    monkeypatch.setenv("FANROUTE_PORT", "not a port")
    assert load(["gateway"], {}, parser).port == 8081


def test_unset_settings_give_the_same_config_as_the_classes_defaults(parser):
    args = load(["gateway"], {}, parser)
    assert GatewayConfig.from_args(args) == GatewayConfig(routers=[("tcp://127.0.0.1:7101", "tcp://127.0.0.1:7101")])
    assert RouterConfig.from_args(load(["router"], {}, parser)) == RouterConfig()


def test_tests_still_build_configs_with_keywords():
    gw = GatewayConfig(routers=[("a", "inproc://a")], port=0, admin_port=0, max_frame=4096)
    assert (gw.port, gw.max_frame, gw.ping_interval) == (0, 4096, 25.0)
    assert GatewayConfig(routers=[]).allowed_origins is not GatewayConfig(routers=[]).allowed_origins
    assert RouterConfig(admin_port=None, history_size=5).history_size == 5


@pytest.mark.parametrize("cls,command", [(GatewayConfig, "gateway"), (RouterConfig, "router")])
def test_config_defaults_are_the_tables(cls, command):
    for f in dataclasses.fields(cls):
        name = f.metadata.get("setting")
        if name is None or f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            continue
        s = settings.setting(name)
        assert command in s.commands, f"{cls.__name__}.{f.name}: {name} is not a setting of {command}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        expected = s.default_for(command)
        assert default == (list(expected) if isinstance(expected, tuple) else expected), f.name


@pytest.mark.parametrize(
    "command,classes,unused",
    [
        ("gateway", (GatewayConfig,), {"cluster-secret-file", "jwt-public-key"}),
        ("router", (RouterConfig,), {"cluster-secret-file"}),
        ("standalone", (GatewayConfig, RouterConfig), {"shards", "demo-feed", "jwt-public-key"}),
    ],
)
def test_every_server_setting_reaches_a_config(command, classes, unused):
    used = {f.metadata["setting"] for cls in classes for f in dataclasses.fields(cls) if "setting" in f.metadata}
    missing = {s.name for s in of_command(command)} - used - unused
    assert not missing, f"settings of {command} that no config takes: {sorted(missing)}"


def test_local_cluster_keeps_the_attribute_names_it_reads(parser):
    args = load(["local-cluster", "--routers", "4"], {"FANROUTE_LOCAL_CLUSTER_GATEWAYS": "3"}, parser)
    assert (args.gateways, args.routers) == (3, 4)
    assert (args.base_port, args.admin_base_port, args.router_base_port) == (8081, 9101, 7101)
    assert (args.ping_interval, args.ping_timeout, args.restart) == (25.0, 8.0, False)


def test_a_switch_alone_is_true(parser):
    args = load(["local-cluster", "--restart"], {}, parser)
    assert args.restart is True
    assert load(["gateway", "--jwt-require-exp", "false"], {}, parser).jwt_require_exp is False


# -- one variable, one setting -------------------------------------------------------------


def test_a_variable_of_another_command_is_not_read(parser):
    # FANROUTE_ROUTERS is the gateway's shard list; local-cluster's count has its own.
    env = {"FANROUTE_ROUTERS": "router-0=tcp://127.0.0.1:7101", "FANROUTE_BENCH_FANOUT_RATE": "garbage"}
    assert load(["local-cluster"], env, parser).routers == 3
    assert load(["gateway"], {"FANROUTE_LOCAL_CLUSTER_ROUTERS": "x"}, parser).routers == [("tcp://127.0.0.1:7101",) * 2]
    assert load(["standalone"], env, parser).port == 8080
    assert load(["gateway"], env, parser).routers == [("router-0", "tcp://127.0.0.1:7101")]


def test_tools_flags_are_scoped_by_their_command(parser):
    env = {"FANROUTE_DEMO_FEED_RATE": "7.5", "FANROUTE_DEMO_FEED_URL": "ws://a/,ws://b/", "FANROUTE_RATE": "1"}
    args = load(["demo-feed", "--symbols", "AAPL"], env, parser)
    assert (args.rate, args.url, args.symbols, args.count, args.seed) == (7.5, "ws://a/,ws://b/", "AAPL", 0, None)
    env = {"FANROUTE_BENCH_FANOUT_RATE": "50", "FANROUTE_BENCH_RECONNECT_RATE": "5"}
    assert load(["bench", "fanout"], env, parser).rate == 50.0
    assert load(["bench", "reconnect"], env, parser).rate == 5.0
    assert load(["bench", "heartbeat"], env, parser).rate == 20.0


def test_every_setting_has_help_a_flag_and_a_variable(everything):
    for s in everything:
        assert s.help.strip(), s.name
        assert re.fullmatch(r"FANROUTE_[A-Z0-9_]+", s.env), s.name
        assert s.env == "FANROUTE_" + s.name.upper().replace("-", "_"), s.name
        assert s.commands and all(c == TOP or c.split()[0] in settings.COMMANDS for c in s.commands), s.name
        if not s.env_only:
            assert s.flag.startswith("--"), s.name


def test_no_two_settings_share_a_variable(everything):
    seen: dict[str, settings.Setting] = {}
    for s in everything:
        other = seen.setdefault(s.env, s)
        assert other is s, f"{s.env} is both {other.name} ({other.commands}) and {s.name} ({s.commands})"
    # The collisions this table resolved stay resolved.
    envs = {s.env: s for s in everything}
    assert envs["FANROUTE_ROUTERS"].commands == ("gateway",)
    assert "FANROUTE_RATE" not in envs and "FANROUTE_GATEWAYS" not in envs
    assert {"FANROUTE_DEMO_FEED_RATE", "FANROUTE_BENCH_FANOUT_RATE", "FANROUTE_LOCAL_CLUSTER_ROUTERS"} <= set(envs)


def test_a_command_has_each_flag_once(parser):
    for path, p in settings.parsers(parser):
        flags = [s.flag for s in getattr(p, "settings", ())]
        assert len(flags) == len(set(flags)), path


def test_the_table_is_one_definition_per_name():
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,env,needles",
    [
        (["standalone", "--port", "abc"], {}, ["--port", "'abc'"]),
        (["standalone"], {"FANROUTE_PORT": "abc"}, ["FANROUTE_PORT", "--port", "'abc'"]),
        (["standalone", "--ping-interval", "nan"], {}, ["--ping-interval"]),
        (["gateway", "--cluster-encrypt", "maybe"], {}, ["--cluster-encrypt", "true or false"]),
        (["standalone", "--shards", "0"], {}, ["--shards", "at least 1"]),
        (["standalone"], {"FANROUTE_SHARDS": "0"}, ["--shards", "FANROUTE_SHARDS"]),
        (["local-cluster"], {"FANROUTE_LOCAL_CLUSTER_ROUTERS": "many"}, ["FANROUTE_LOCAL_CLUSTER_ROUTERS", "--routers"]),
        (["demo-feed"], {"FANROUTE_DEMO_FEED_RATE": "fast"}, ["FANROUTE_DEMO_FEED_RATE", "--rate"]),
        (["bench", "fanout", "--targets", "nginx"], {}, ["--targets", "nginx"]),
        (["standalone"], {"FANROUTE_LOG_LEVEL": "loud"}, ["FANROUTE_LOG_LEVEL", "--log-level"]),
        (["standalone", "--bogus"], {}, ["--bogus"]),
        (["standalone", "--admin-port"], {}, ["--admin-port"]),
    ],
)
def test_a_bad_value_names_the_flag_or_the_variable(argv, env, needles, parser):
    with pytest.raises(ConfigError) as info:
        load(argv, env, parser)
    message = str(info.value)
    assert all(n in message for n in needles), message
    assert "\n" not in message


def test_a_config_check_names_the_variable_the_value_came_from(parser):
    args = load(["gateway", "--admin-port", "off"], {"FANROUTE_PORT": "99999", "FANROUTE_CLUSTER_SECRET": SECRET}, parser)
    with pytest.raises(ConfigError) as info:
        GatewayConfig.from_args(args).check()
    assert explain(str(info.value), args) == "--port must be a port number from 0 to 65535, not 99999 (from FANROUTE_PORT)"
    # A value from a flag is named by the check alone; --admin-port is not --port.
    args = load(["gateway", "--port", "99999"], {"FANROUTE_ADMIN_PORT": "1"}, parser)
    assert explain("--port must be a port number", args) == "--port must be a port number"


def test_a_file_error_names_the_flag_that_gave_the_file(parser):
    args = load(["router"], {"FANROUTE_CONFIG": "/etc/ns.toml"}, parser)
    message = explain("config file /etc/ns.toml cannot be read: No such file or directory", args)
    assert message == "--config: config file /etc/ns.toml cannot be read: No such file or directory (from FANROUTE_CONFIG)"


def test_unknown_variables_suggest_the_settings_with_that_flag(everything):
    found = settings.unknown_variables({"FANROUTE_RATE": "1", "FANROUTE_PORT": "1", "HOME": "/"}, everything)
    assert list(found) == ["FANROUTE_RATE"]
    assert "FANROUTE_DEMO_FEED_RATE" in found["FANROUTE_RATE"] and "FANROUTE_BENCH_FANOUT_RATE" in found["FANROUTE_RATE"]
    assert settings.unknown_variables({"FANROUTE_JWT_PUBLIC_KEY": "pem"}, everything) == {}


# -- generated from the table --------------------------------------------------------------


def test_the_reference_is_up_to_date(everything):
    path = ROOT / settings.REFERENCE_PATH
    assert path.read_text() == settings.reference(everything), (
        f"{settings.REFERENCE_PATH} is stale: run  fanroute --list-settings > {settings.REFERENCE_PATH}"
    )


def test_list_settings_prints_the_reference(capsys, parser, everything):
    with pytest.raises(SystemExit) as info:
        load(["--list-settings"], {}, parser)
    assert info.value.code == 0
    assert capsys.readouterr().out == settings.reference(everything)


def test_help_shows_each_flags_variable_and_this_commands_default(parser):
    sub = dict(settings.parsers(parser))
    assert "FANROUTE_PORT; default 8080" in " ".join(sub["standalone"].format_help().split())
    assert "FANROUTE_PORT; default 8081" in " ".join(sub["gateway"].format_help().split())
    assert "FANROUTE_BENCH_FANOUT_RATE" in " ".join(sub["bench fanout"].format_help().split())


# -- the Helm chart ------------------------------------------------------------------------

TEMPLATES = ROOT / "helm/fanroute/templates"
ROLES = {"gateway-deployment.yaml": "gateway", "router-statefulset.yaml": "router"}


def chart_variables(template: str) -> tuple[set[str], set[str]]:
    """The FANROUTE_* variables and the flags a workload template sets, with those of
    the _helpers.tpl definitions it includes."""
    text = (TEMPLATES / template).read_text()
    helpers = (TEMPLATES / "_helpers.tpl").read_text()
    for name in re.findall(r'include "([\w.]+)"', text):
        start = helpers.find(f'define "{name}"')
        if start >= 0:
            end = helpers.find("define ", start + 1)
            text += helpers[start : end if end > 0 else None]
    return set(re.findall(r"name:\s*(FANROUTE_\w+)", text)), set(re.findall(r"^\s*-\s*(--[\w-]+)", text, re.M))


@pytest.mark.parametrize("template,command", sorted(ROLES.items()))
def test_every_variable_the_chart_sets_is_a_setting_of_that_role(template, command):
    variables, flags = chart_variables(template)
    assert variables, f"{template}: no FANROUTE_* variables found"
    mine = of_command(command) + of_command(TOP)
    unknown = variables - {s.env for s in mine}
    assert not unknown, f"{template} sets {sorted(unknown)}, which `fanroute {command}` does not have"
    assert flags <= {s.flag for s in mine}, f"{template} passes {sorted(flags - {s.flag for s in mine})}"


def test_the_chart_sets_the_settings_it_must():
    gateway, flags = chart_variables("gateway-deployment.yaml")
    router, _ = chart_variables("router-statefulset.yaml")
    assert {"FANROUTE_CLUSTER_SECRET", "FANROUTE_PORT", "FANROUTE_ADMIN_PORT", "FANROUTE_INBOX", "FANROUTE_ADVERTISE"} <= gateway
    assert "--routers" in flags or "FANROUTE_ROUTERS" in gateway
    assert {"FANROUTE_CLUSTER_SECRET", "FANROUTE_NAME", "FANROUTE_LISTEN", "FANROUTE_ADMIN_PORT"} <= router
