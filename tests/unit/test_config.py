import pytest
from hypothesis import given, strategies as st

from extproc.config import SETTINGS, ConfigError, Settings, parse_url


def test_defaults_need_no_environment():
    s = Settings.from_env({})
    assert s.listen_port == 8080
    assert str(s.anthropic_url) == "https://api.z.ai/api/anthropic"
    assert s.openai_url.path == "/api/coding/paas/v4"
    assert not s.has_upstream_key


@pytest.mark.parametrize("name,value,problem", [
    ("LISTEN_PORT", "eighty", "is not a whole number"),
    ("LISTEN_PORT", "70000", "between 1 and 65535"),
    ("ZAI_TARGET_URL", "api.z.ai/api/anthropic", "must start with https://"),
    ("DEPLOYMENT_VARIANT", "Canary Release", "1-32 characters"),
    ("STREAM_IDLE_TIMEOUT_SECONDS", "-1", "greater than 0"),
    ("LOG_LEVEL", "loud", "one of DEBUG"),
    ("MAX_RETRIES", "-2", "must not be negative"),
])
def test_bad_value_names_variable_problem_and_example(name, value, problem):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value})
    text = str(err.value)
    assert text.startswith(f"{name}={value!r}")
    assert problem in text
    assert f"for example: {name}=" in text


def test_secret_value_is_not_echoed_in_errors(monkeypatch):
    from extproc import config

    monkeypatch.setattr(config, "parse_text", lambda raw: (_ for _ in ()).throw(ValueError("bad")))
    monkeypatch.setattr(config, "SETTINGS", tuple(
        config.Setting(s.env, s.attr, config.parse_text if s.secret else s.parse, s.default,
                       s.example, s.meaning, s.secret) for s in config.SETTINGS))
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"ZAI_API_KEY": "sk-very-secret-value"})
    assert "sk-very-secret-value" not in str(err.value)
    assert "ZAI_API_KEY=<hidden>" in str(err.value)


def test_every_setting_has_an_example_that_parses():
    for setting in SETTINGS:
        name, _, value = setting.example.partition("=")
        assert name == setting.env
        if not value.startswith("<"):
            setting.parse(value)


def test_missing_key_is_reported_with_both_options():
    with pytest.raises(ConfigError) as err:
        Settings.from_env({}).require_upstream_key()
    assert "ZAI_API_KEY" in str(err.value) and "ZAI_API_KEY_FILE" in str(err.value)


@given(host=st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,5}){0,2}", fullmatch=True),
       port=st.integers(1, 65535), path=st.from_regex(r"(/[a-z0-9_]{1,8}){0,3}", fullmatch=True),
       tls=st.booleans())
def test_url_round_trip(host, port, path, tls):
    scheme = "https" if tls else "http"
    url = parse_url(f"{scheme}://{host}:{port}{path}/")
    assert (url.host, url.port, url.path, url.tls) == (host, port, path, tls)
    assert parse_url(str(url)) == url


def test_readme_documents_every_setting():
    from pathlib import Path

    from extproc.config import settings_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    table = settings_table()
    assert all(f"| `{s.env}` |" in table for s in SETTINGS)
    assert table in readme, (
        "README.md's configuration table differs from the settings declared in extproc/config.py; "
        "regenerate it with `.venv/bin/python -m extproc.config --write-readme` "
        "(or print it with `--table`)")


def test_settings_are_the_dataclass_fields_declared_once():
    import dataclasses

    from extproc import config

    fields = {f.name: f for f in dataclasses.fields(Settings)}
    assert [s.attr for s in SETTINGS] == list(fields)
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)
    defaults = Settings()
    for s in SETTINGS:
        assert fields[s.attr].repr is not s.secret
        expected = None if s.default is None else s.parse(s.default)
        assert getattr(defaults, s.attr) == expected, s.env
    assert Settings.from_env({}) == defaults
    assert config.replace_settings_table(config.settings_table()) == config.settings_table()
