"""The settings table (``prefork.settings.OPTIONS``) is the one definition of
every ``prefork serve`` option: the parser, the -c file keys, the defaults,
the help, HUP's restart-only list and README's options table all come from it.

These tests fail when something is added beside the table instead of to it:
a parser option with no row, a row with no bad-value case here, a default
written a second time, a README table that was not regenerated.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from prefork import _fastio_common, _fastio_py, cli
from prefork.cli import build_parser, config_from_args
from prefork.errors import EXIT_USAGE, ConfigError
from prefork.settings import (
    CONFIG_FILE,
    FILE_KEYS,
    OPTIONS,
    OPTIONS_BY_KEY,
    RESTART_ONLY,
    Address,
    Config,
    options_markdown,
)
from prefork.tls import SniCertificate

from support import assert_one_line_error, run

pytestmark = pytest.mark.timeout(60)

README = Path(__file__).resolve().parent.parent / "README.md"
VALUE_KEYS = {option.key for option in OPTIONS if not option.switch}
SWITCH_KEYS = {option.key for option in OPTIONS if option.switch}


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


def long_flag(key: str) -> str:
    return OPTIONS_BY_KEY[key].flags[-1]


def config_from(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(["serve", *argv]))


# -- the parser is the table ------------------------------------------------------

# What users type: flags and metavars (None: a switch). Changing one changes
# the command line, which must not happen by accident.
CLI_SURFACE = {
    ("-c", "--config"): "FILE",
    ("-b", "--bind"): "ADDR",
    ("-w", "--workers"): "N",
    ("-k", "--worker-class"): "CLASS",
    ("--threads",): "T",
    ("--loop",): "LOOP",
    ("--backlog",): "N",
    ("--graceful-timeout",): "S",
    ("--reuse-port",): None,
    ("--max-requests",): "N",
    ("--max-requests-jitter",): "J",
    ("--max-connections",): "N",
    ("--max-buffer",): "BYTES",
    ("--idle-timeout",): "S",
    ("--timeout",): "S",
    ("--handler",): "NAME",
    ("--handler-type",): "TYPE",
    ("--unix-mode",): "MODE",
    ("--proxy-protocol",): None,
    ("--forwarded-allow-ips",): "LIST",
    ("--certfile",): "FILE",
    ("--keyfile",): "FILE",
    ("--ca-certs",): "FILE",
    ("--verify-client",): "MODE",
    ("--tls-min-version",): "V",
    ("--ciphers",): "LIST",
    ("--alpn",): "PROTOS",
    ("--sni",): "NAME=CERT[,KEY]",
    ("--tls-handshake-timeout",): "S",
    ("--max-conns-per-ip",): "N",
    ("--conn-rate-per-ip",): "N[/s]",
    ("--conn-burst-per-ip",): "N",
    ("--per-ip-table",): "N",
    ("--udp-allow-low-ports",): None,
    ("--udp-rate",): "N[/s]",
    ("--udp-burst",): "N",
    ("--udp-rate-prefix",): "V4,V6",
    ("--udp-rate-table",): "N",
    ("--udp-public",): None,
    ("--pid",): "FILE",
    ("--metrics",): "HOST:PORT",
    ("--log-level",): "LEVEL",
    ("--log-file",): "FILE",
    ("--access-log",): "FILE",
    ("--user",): "USER",
    ("--group",): "GROUP",
    ("--umask",): "MASK",
}


def test_every_serve_option_has_a_row_and_every_row_an_option():
    parser_options = {
        tuple(action.option_strings): action
        for action in serve_parser()._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    }
    table = {option.flags: option for option in (CONFIG_FILE, *OPTIONS)}
    assert set(parser_options) == set(table)
    for flags, action in parser_options.items():
        assert action.dest == table[flags].key
        assert action.metavar == table[flags].metavar
        assert action.default is None  # "not given": the defaults are Config's


def test_the_command_line_is_unchanged():
    surface = {option.flags: option.metavar for option in (CONFIG_FILE, *OPTIONS)}
    assert surface == CLI_SURFACE


def test_file_keys_are_the_long_names():
    assert FILE_KEYS == {option.flags[-1][2:] for option in OPTIONS}
    assert len(FILE_KEYS) == len(OPTIONS)


def test_restart_only_comes_from_the_table_and_matches_the_arbiter():
    from prefork.server import arbiter

    assert RESTART_ONLY == tuple(option.key for option in OPTIONS if option.restart_only)
    assert set(RESTART_ONLY) == {
        "binds",
        "backlog",
        "reuse_port",
        "metrics",
        "pid_file",
        "unix_mode",
        "udp_rate_table",
        "per_ip_table",
    }
    assert set(arbiter.RESTART_ONLY) == set(RESTART_ONLY)


def test_worker_classes_and_handlers_are_the_registries():
    from prefork.server.handlers import BUILTIN
    from prefork.server.workers import WORKER_CLASSES

    for option in OPTIONS:
        assert set(option.worker_classes) <= set(WORKER_CLASSES), option.key
    for name in WORKER_CLASSES:
        assert f"{name}:" in OPTIONS_BY_KEY["worker_class"].help
    for name in BUILTIN:
        assert name in OPTIONS_BY_KEY["handler"].help


# -- one default, in the table ----------------------------------------------------


def test_config_defaults_are_the_tables():
    assert [f.name for f in fields(Config)] == [option.key for option in OPTIONS]
    config = Config()
    for option in OPTIONS:
        if option.default_factory is not None:
            expected = option.default_factory()
        else:
            expected = option.default
        assert getattr(config, option.key) == expected, option.key


def test_nothing_given_is_the_default_config():
    assert config_from() == Config()


def test_hot_loop_defaults_are_shared():
    assert OPTIONS_BY_KEY["max_connections"].default is _fastio_common.DEFAULT_MAX_CONNECTIONS
    assert OPTIONS_BY_KEY["max_buffer"].default is _fastio_common.DEFAULT_MAX_BUFFER
    assert OPTIONS_BY_KEY["idle_timeout"].default is _fastio_common.DEFAULT_IDLE_TIMEOUT
    loop = inspect.signature(_fastio_py.EventLoop).parameters
    assert loop["max_connections"].default == Config().max_connections
    assert loop["max_buffer"].default == Config().max_buffer
    assert loop["idle_timeout"].default == Config().idle_timeout


@pytest.mark.parametrize(
    "option",
    [option for option in OPTIONS if not option.switch and option.default is not None],
    ids=lambda option: option.key,
)
def test_the_default_help_shows_parses_back_to_it(option):
    assert option.read(option.shown_default(), option.label) == option.default


def test_cli_writes_no_serve_default():
    source = inspect.getsource(cli)
    assert "OPTION_DEFAULTS" not in source
    for option in OPTIONS:
        shown = option.shown_default()
        if shown is not None:
            assert f"default {shown}" not in source, option.key
            assert f"default: {shown}" not in source, option.key


def test_serve_help_shows_every_default():
    result = run("serve", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for option in OPTIONS:
        shown = option.shown_default()
        if shown is not None:
            assert f"default: {shown}" in text, option.key
        assert option.flags[-1] in text


# -- every value: good ones arrive, bad ones are one line and exit 2 --------------

# A valid value other than the default for every option that takes one, and
# what it becomes.
GOOD_VALUES = {
    "binds": ("[::1]:0", (Address("tcp", "::1", 0),)),
    "workers": ("3", 3),
    "worker_class": ("sync", "sync"),
    "threads": ("4", 4),
    "loop": ("asyncio", "asyncio"),
    "backlog": ("100", 100),
    "graceful_timeout": ("1.5", 1.5),
    "max_requests": ("10", 10),
    "max_requests_jitter": ("5", 5),
    "max_connections": ("10", 10),
    "max_buffer": ("64K", 65536),
    "idle_timeout": ("2.5", 2.5),
    "timeout": ("0", 0.0),
    "handler": ("discard", "discard"),
    "handler_type": ("stream", "stream"),
    "unix_mode": ("600", 0o600),
    "forwarded_allow_ips": ("10.0.0.0/8, ::1", ("10.0.0.0/8", "::1")),
    "certfile": ("server.pem", "server.pem"),
    "keyfile": ("server.key", "server.key"),
    "ca_certs": ("clients-ca.pem", "clients-ca.pem"),
    "verify_client": ("required", "required"),
    "tls_min_version": ("1.3", "1.3"),
    "ciphers": ("ECDHE+AESGCM", "ECDHE+AESGCM"),
    "alpn": ("h2, http/1.1", ("h2", "http/1.1")),
    "sni": ("Example.com=ex.pem,ex.key", (SniCertificate("example.com", "ex.pem", "ex.key"),)),
    "tls_handshake_timeout": ("2.5", 2.5),
    "max_conns_per_ip": ("10", 10),
    "conn_rate_per_ip": ("5/s", 5.0),
    "conn_burst_per_ip": ("20", 20),
    "per_ip_table": ("65536", 65536),
    "udp_rate": ("2.5/s", 2.5),
    "udp_burst": ("3", 3),
    "udp_rate_prefix": ("32,64", (32, 64)),
    "udp_rate_table": ("1024", 1024),
    "pid_file": ("prefork.pid", "prefork.pid"),
    "metrics": ("127.0.0.1:9100", Address("tcp", "127.0.0.1", 9100)),
    "log_level": ("DEBUG", "debug"),
    "log_file": ("prefork.log", "prefork.log"),
    "access_log": ("access.log", "access.log"),
    "user": (str(os.getuid()), os.getuid()),
    "group": (str(os.getgid()), os.getgid()),
    "umask": ("027", 0o027),
}

# At least one bad value for every option that takes one; the error must
# quote it (lower case where the option folds case).
BAD_VALUES = {
    "binds": ["", "127.0.0.1", "[::1]:99999", "proxy:udp://127.0.0.1:0", "tls:udp://127.0.0.1:0"],
    "workers": ["0", "1.5", "5000"],
    "worker_class": ["", "gevent"],
    "threads": ["0", "many", "99999"],
    "loop": ["", "trio"],
    "backlog": ["0", "4294967296"],
    "graceful_timeout": ["-1", "inf", "soon"],
    "max_requests": ["-1", "1e3", "99999999999999999999"],
    "max_requests_jitter": ["-5", "x"],
    "max_connections": ["0", "4294967296"],
    "max_buffer": ["0", "1T", "64KB", "-1K", "17179869184G"],
    "idle_timeout": ["-1", "forever", "1e400"],
    "timeout": ["-0.5", "nan"],
    "handler": ["", "nope", "os:", "1mod:x"],
    "handler_type": ["", "coroutine", "Protocol"],
    "unix_mode": ["rw", "777", "1777"],
    "forwarded_allow_ips": ["", "10.0.0.0/33"],
    "certfile": [""],
    "keyfile": [""],
    "ca_certs": [""],
    "verify_client": ["", "always"],
    "tls_min_version": ["1.1", "tls1.3"],
    "ciphers": ["no-such-cipher"],
    "alpn": ["", "h2,,http/1.1"],
    "sni": ["example.com", "=cert.pem", "example.com="],
    "tls_handshake_timeout": ["-1", "never"],
    "max_conns_per_ip": ["-1", "ten", "4294967296"],
    "conn_rate_per_ip": ["-1", "fast", "10/m"],
    "conn_burst_per_ip": ["0", "x"],
    "per_ip_table": ["1000", "8", "33554432"],
    "udp_rate": ["-1", "fast", "10/m"],
    "udp_burst": ["0", "x"],
    "udp_rate_prefix": ["24", "33,56", "24,65", "a,b"],
    "udp_rate_table": ["1000", "8", "33554432"],
    "pid_file": [""],
    "metrics": ["unix:/tmp/m.sock", "localhost", "127.0.0.1:99999"],
    "log_level": ["", "loud"],
    "log_file": [""],
    "access_log": [""],
    "user": ["", "no-such-user-here"],
    "group": ["", "no-such-group-here"],
    "umask": ["", "abc", "0o1000"],
}

BAD_CASES = [(key, text) for key, texts in BAD_VALUES.items() for text in texts]


def test_every_value_option_has_good_and_bad_cases():
    assert set(GOOD_VALUES) == VALUE_KEYS
    assert set(BAD_VALUES) == VALUE_KEYS


@pytest.mark.parametrize("key", sorted(GOOD_VALUES))
def test_a_good_value_arrives_from_the_command_line_and_the_file(tmp_path, key):
    option = OPTIONS_BY_KEY[key]
    text, expected = GOOD_VALUES[key]
    assert getattr(config_from(f"{option.flags[-1]}={text}"), key) == expected
    for spelling in (option.name, option.name.replace("-", "_")):
        path = tmp_path / "prefork.toml"
        path.write_text(f"{spelling} = {json.dumps(text)}\n")
        assert getattr(config_from("-c", str(path)), key) == expected


@pytest.mark.parametrize(("key", "text"), BAD_CASES, ids=[f"{k}={t}" for k, t in BAD_CASES])
def test_a_bad_value_is_one_line_naming_the_option(key, text):
    option = OPTIONS_BY_KEY[key]
    with pytest.raises(ConfigError) as caught:
        config_from(f"{option.flags[-1]}={text}")
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_USAGE
    assert "\n" not in message
    assert message.startswith(f"{option.label}: "), message
    assert repr(text) in message or text in message, message


@pytest.mark.parametrize(("key", "text"), BAD_CASES, ids=[f"{k}={t}" for k, t in BAD_CASES])
def test_a_bad_value_in_the_file_names_the_file_and_key(tmp_path, key, text):
    option = OPTIONS_BY_KEY[key]
    path = tmp_path / "bad.toml"
    path.write_text(f"{option.name.replace('-', '_')} = {json.dumps(text)}\n")
    with pytest.raises(ConfigError) as caught:
        config_from("-c", str(path))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {option.name}: "), message


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("workers", "0"),
        ("max_buffer", "1T"),
        ("forwarded_allow_ips", "10.0.0.0/33"),
        ("unix_mode", "777"),
        ("metrics", "localhost"),
        ("user", "no-such-user-here"),
    ],
)
def test_a_bad_value_stops_prefork_serve_with_one_line_and_exit_2(key, text):
    flag = long_flag(key)
    result = run("serve", "-b", "127.0.0.1:0", "-w", "1", f"{flag}={text}")
    assert_one_line_error(result, 2, flag, text)


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ("threads = 0", "threads"),
        ('idle-timeout = "forever"', "idle-timeout"),
        ('max_buffer = "64KB"', "max-buffer"),
        ('forwarded_allow_ips = ["10.0.0.0/8", 7]', "forwarded-allow-ips"),
        ('proxy_protocol = "yes"', "proxy-protocol"),
        ("reuse-port = 1", "reuse-port"),
        ("bind = 5", "bind"),
    ],
)
def test_a_bad_file_value_stops_prefork_serve_with_one_line_and_exit_2(tmp_path, line, name):
    path = tmp_path / "bad.toml"
    path.write_text(line + "\n")
    assert_one_line_error(run("serve", "-c", str(path)), 2, f"{path}: {name}:")


@pytest.mark.parametrize("key", sorted(SWITCH_KEYS))
def test_a_switch_is_on_when_given_and_takes_true_or_false_from_the_file(tmp_path, key):
    option = OPTIONS_BY_KEY[key]
    assert getattr(config_from(option.flags[-1]), key) is True
    path = tmp_path / "prefork.toml"
    for value in ("true", "false"):
        path.write_text(f"{option.name} = {value}\n")
        assert getattr(config_from("-c", str(path)), key) is (value == "true")
    path.write_text(f'{option.name} = "yes"\n')
    with pytest.raises(ConfigError, match=f"{option.name}: expected true or false"):
        config_from("-c", str(path))


def test_the_command_line_wins_over_the_file_and_the_file_over_the_defaults(tmp_path):
    path = tmp_path / "prefork.toml"
    path.write_text(
        'bind = ["127.0.0.1:0", "unix:x.sock"]\n'
        "workers = 3\n"
        "backlog = 100\n"
        "graceful_timeout = 2.5\n"
        "reuse-port = true\n"
        'forwarded-allow-ips = ["10.0.0.0/8", "::1"]\n'
    )
    config = config_from("-c", str(path), "-w", "2", "--backlog", "50")
    assert config.workers == 2 and config.backlog == 50
    assert config.graceful_timeout == 2.5 and config.reuse_port is True
    assert [a.kind for a in config.binds] == ["tcp", "unix"]
    assert config.forwarded_allow_ips == ("10.0.0.0/8", "::1")
    assert config.threads == Config().threads and config.timeout == Config().timeout


# -- README.md's options table ------------------------------------------------------


def readme_options() -> str:
    text = README.read_text()
    begin, end = "<!-- options:begin -->\n", "<!-- options:end -->"
    assert begin in text and end in text, "README.md has no options:begin/end markers"
    return text[text.index(begin) + len(begin) : text.index(end)]


def test_readme_lists_every_option():
    section = readme_options()
    for option in (CONFIG_FILE, *OPTIONS):
        assert f"`{option.flags[-1]}" in section, option.key


def test_readme_options_table_is_generated_from_the_settings():
    assert readme_options() == options_markdown(), (
        "README.md's options table is stale: paste the output of "
        "`python -m prefork.settings --markdown` between its options markers"
    )


def test_the_markdown_command_prints_the_table():
    result = subprocess.run(
        [sys.executable, "-m", "prefork.settings", "--markdown"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == options_markdown()
