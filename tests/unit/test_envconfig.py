"""One precedence rule for every option: constructor kwargs > config > environment > default."""

import pytest
from traitlets import Integer, List, TraitError, Unicode
from traitlets.config import Config

from provisioners.envconfig import EnvConfigurable


class Sample(EnvConfigurable):
    number = Integer(7, config=True, help="A number.").tag(env="GATEWAY_TEST_NUMBER")
    names = List(Unicode(), ["root"], config=True, help="Names.").tag(env="GATEWAY_TEST_NAMES")
    port = Integer(1, config=True).tag(env="GATEWAY_PORT")


def test_default_when_nothing_set(monkeypatch):
    monkeypatch.delenv("GATEWAY_TEST_NUMBER", raising=False)
    assert Sample().number == 7
    assert Sample().names == ["root"]


def test_environment_over_default(monkeypatch):
    monkeypatch.setenv("GATEWAY_TEST_NUMBER", "12")
    monkeypatch.setenv("GATEWAY_TEST_NAMES", "alice, bob,")
    assert Sample().number == 12
    assert Sample().names == ["alice", "bob"]


def test_config_over_environment_and_kwargs_over_config(monkeypatch):
    monkeypatch.setenv("GATEWAY_TEST_NUMBER", "12")
    config = Config({"Sample": {"number": 20}})
    assert Sample(config=config).number == 20
    assert Sample(config=config, number=30).number == 30


def test_enterprise_gateway_alias(monkeypatch):
    monkeypatch.delenv("GATEWAY_PORT", raising=False)
    monkeypatch.setenv("EG_PORT", "9999")
    assert Sample().port == 9999
    monkeypatch.setenv("GATEWAY_PORT", "9000")
    assert Sample().port == 9000


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("GATEWAY_TEST_NUMBER", "many")
    with pytest.raises(TraitError, match="GATEWAY_TEST_NUMBER='many'"):
        Sample().number


def test_variable_named_once_shows_in_help():
    assert Sample.class_traits()["number"].help == "A number. (env: GATEWAY_TEST_NUMBER)"
    assert Sample.class_traits()["names"].help == "Names. (env: GATEWAY_TEST_NAMES, comma-separated)"
