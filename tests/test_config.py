"""Configuration refuses mistakes: unknown ``EXPORTER_*`` variables, malformed JSON values
and bad values are one ConfigError line each, naming the variable; never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from _exporter_process import run_cli
from pydantic_settings import SettingsError

from exporter.config import (
    JSON_SETTINGS,
    SETTING_VARIABLES,
    Settings,
    _settings_error_problem,
    load_settings,
    unknown_variables,
)
from exporter.errors import ConfigError


def config_error(monkeypatch: pytest.MonkeyPatch, **variables: str) -> str:
    """The message ``load_settings`` raises with ``variables`` set in the environment."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.exit_code == 2
    return str(caught.value)


def test_the_json_valued_settings_are_the_maps_and_lists() -> None:
    assert set(JSON_SETTINGS) == {
        "analytics_refresh_seconds",
        "proxy_asset_decimals",
        "network_aliases",
        "allowed_hosts",
    }


def test_every_field_has_its_variable() -> None:
    assert "EXPORTER_INFLUX_TOKEN" in SETTING_VARIABLES
    assert len(SETTING_VARIABLES) == len(Settings.model_fields)


@pytest.mark.parametrize(
    ("misspelt", "meant"),
    [
        ("EXPORTER_INFLUX_TOKN", "EXPORTER_INFLUX_TOKEN"),
        ("EXPORTER_DATADIR", "EXPORTER_DATA_DIR"),
        ("EXPORTER_RETENTION", "EXPORTER_RETENTION_DAYS"),
        ("EXPORTER_INGEST_SIGNING_SECRET_PREVIOS", "EXPORTER_INGEST_SIGNING_SECRET_PREVIOUS"),
    ],
)
def test_a_misspelt_variable_names_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch, misspelt: str, meant: str
) -> None:
    message = config_error(monkeypatch, **{misspelt: "x"})
    assert message == (f"invalid configuration: {misspelt} is not a setting: did you mean {meant}?")


def test_a_variable_like_no_setting_says_to_unset_it() -> None:
    (problem,) = unknown_variables({"EXPORTER_WHATEVER_ELSE": "1"})
    assert problem.startswith("EXPORTER_WHATEVER_ELSE is not a setting: unset it")
    assert "did you mean" not in problem


def test_test_suite_variables_and_other_prefixes_are_left_alone() -> None:
    environ = {
        "EXPORTER_TEST_INFLUX_URL": "http://127.0.0.1:8086",
        "EXPORTER_TEST_ANYTHING": "1",
        "EXPORTERS": "1",
        "PATH": "/usr/bin",
        "EXPORTER_LISTEN": "127.0.0.1:1",
        "exporter_data_dir": "lower case is read as the setting too",
    }
    assert unknown_variables(environ) == []


def test_every_unknown_variable_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(monkeypatch, EXPORTER_INFLUX_TOKN="x", EXPORTER_LISTN="y")
    assert message.splitlines() == [
        "invalid configuration: EXPORTER_INFLUX_TOKN is not a setting: "
        "did you mean EXPORTER_INFLUX_TOKEN?",
        "invalid configuration: EXPORTER_LISTN is not a setting: did you mean EXPORTER_LISTEN?",
    ]


@pytest.mark.parametrize("field", ["analytics_refresh_seconds", "proxy_asset_decimals"])
def test_malformed_json_names_the_variable_and_the_parse_error(
    monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    variable = f"EXPORTER_{field.upper()}"
    message = config_error(monkeypatch, **{variable: "{'1h': 30}"})
    assert len(message.splitlines()) == 1
    assert message.startswith(f"invalid configuration: {variable} is not valid JSON (")
    assert "line 1 column 2" in message
    assert "expected JSON such as {" in message


def test_json_of_the_wrong_shape_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(monkeypatch, EXPORTER_ANALYTICS_REFRESH_SECONDS="[30]")
    assert message.startswith("invalid configuration: EXPORTER_ANALYTICS_REFRESH_SECONDS: ")
    assert "dictionary" in message


def test_a_bad_value_inside_json_names_the_variable_and_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = config_error(monkeypatch, EXPORTER_ANALYTICS_REFRESH_SECONDS='{"1h": "soon"}')
    assert message.startswith(
        "invalid configuration: EXPORTER_ANALYTICS_REFRESH_SECONDS (key 1h): "
    )
    assert len(message.splitlines()) == 1


def test_each_bad_value_is_one_line_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = config_error(monkeypatch, EXPORTER_DURABILITY="sometimes", EXPORTER_LOG_LEVEL="loud")
    lines = message.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("invalid configuration: EXPORTER_DURABILITY: ")
    assert lines[1] == (
        "invalid configuration: EXPORTER_LOG_LEVEL: must be one of debug, info, warning, error"
    )


def test_a_model_rule_keeps_its_own_message(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(monkeypatch, EXPORTER_LISTEN="0.0.0.0:9402")
    assert message.startswith("invalid configuration: refusing to listen on 0.0.0.0:9402 ")


def test_a_refused_secret_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(monkeypatch, EXPORTER_INGEST_SIGNING_SECRET=" hunter2-secret ")
    assert "EXPORTER_INGEST_SIGNING_SECRET" in message
    assert "hunter2" not in message


def test_a_value_pydantic_settings_cannot_decode_names_its_variable() -> None:
    error = SettingsError(
        'error parsing value for field "proxy_asset_decimals" from source "EnvSettingsSource"'
    )
    error.__cause__ = ValueError("Expecting value: line 1 column 1 (char 0)")
    assert _settings_error_problem(error) == (
        "EXPORTER_PROXY_ASSET_DECIMALS cannot be read: Expecting value: line 1 column 1 (char 0)"
    )


def test_overrides_are_validated_like_the_environment() -> None:
    with pytest.raises(ConfigError, match="^invalid configuration: EXPORTER_LISTEN: "):
        load_settings(listen="no-port")


def test_valid_environment_and_overrides_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EXPORTER_ANALYTICS_REFRESH_SECONDS", '{"1h": 10}')
    monkeypatch.setenv("EXPORTER_TEST_INFLUX_URL", "http://127.0.0.1:8086")
    settings = load_settings(data_dir=str(tmp_path))
    assert settings.analytics_refresh_seconds == {"1h": 10.0}
    assert str(settings.data_dir) == str(tmp_path)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "EXPORTER_INFLUX_TOKN",
            "t",
            "EXPORTER_INFLUX_TOKN is not a setting: did you mean EXPORTER_INFLUX_TOKEN?",
        ),
        (
            "EXPORTER_PROXY_ASSET_DECIMALS",
            "{eip155:56/0x55: 18}",
            "EXPORTER_PROXY_ASSET_DECIMALS is not valid JSON (",
        ),
    ],
)
def test_check_config_reports_the_mistake_in_one_line(
    variable: str, value: str, expected: str
) -> None:
    result = run_cli("check-config", **{variable: value})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"facilitator-exporter: invalid configuration: {expected}")
    assert result.stdout == ""


def test_the_v1_write_api_needs_no_org_and_takes_a_user_or_a_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """v1: URL alone (1.x without auth), a user name and password, or a token; no org."""
    monkeypatch.setenv("EXPORTER_INFLUX_URL", "http://127.0.0.1:8086")
    monkeypatch.setenv("EXPORTER_INFLUX_API", "v1")
    assert load_settings().influx_org is None
    monkeypatch.setenv("EXPORTER_INFLUX_USERNAME", "writer")
    monkeypatch.setenv("EXPORTER_INFLUX_PASSWORD", "pw")
    monkeypatch.setenv("EXPORTER_INFLUX_RETENTION_POLICY", "autogen")
    settings = load_settings()
    assert (settings.influx_username, settings.influx_retention_policy) == ("writer", "autogen")


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        (
            {"EXPORTER_INFLUX_API": "v3"},
            "EXPORTER_INFLUX_API: Input should be 'v2' or 'v1'",
        ),
        (
            {"EXPORTER_INFLUX_API": "v1", "EXPORTER_INFLUX_PASSWORD": "pw"},
            "EXPORTER_INFLUX_PASSWORD is set without EXPORTER_INFLUX_USERNAME",
        ),
        (
            {
                "EXPORTER_INFLUX_API": "v1",
                "EXPORTER_INFLUX_USERNAME": "writer",
                "EXPORTER_INFLUX_TOKEN": "t0ken",
            },
            "EXPORTER_INFLUX_USERNAME and EXPORTER_INFLUX_TOKEN are both set",
        ),
        (
            {"EXPORTER_INFLUX_API": "v1", "EXPORTER_INFLUX_USERNAME": "a:b"},
            "EXPORTER_INFLUX_USERNAME: must not contain ':'",
        ),
        (
            {"EXPORTER_INFLUX_USERNAME": "writer", "EXPORTER_INFLUX_RETENTION_POLICY": "rp"},
            "EXPORTER_INFLUX_USERNAME, EXPORTER_INFLUX_RETENTION_POLICY only apply to the v1 "
            "write API",
        ),
        (
            {"EXPORTER_INFLUX_API": "v2", "EXPORTER_INFLUX_TOKEN": "t0ken"},
            "the InfluxDB store needs EXPORTER_INFLUX_ORG",
        ),
    ],
    ids=["unknown-api", "password-alone", "user-and-token", "colon", "v1-only", "v2-org"],
)
def test_influx_api_mistakes_are_one_line(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], says: str
) -> None:
    """Each wrong combination of the InfluxDB API settings is refused up front, in one line,
    and never echoes a password."""
    message = config_error(
        monkeypatch, EXPORTER_INFLUX_URL="http://127.0.0.1:8086", **variables
    )
    assert says in message
    assert len(message.splitlines()) == 1
    assert "pw" not in message.replace("EXPORTER_INFLUX_PASSWORD", "")
