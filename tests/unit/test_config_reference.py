"""The README's configuration reference is generated from the options and must match them."""

from pathlib import Path

import pytest

from kernel_gateway.app import GatewayApp
from kernel_gateway.config_reference import BEGIN, END, render, replace_section
from provisioners.envconfig import env_name

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_is_current():
    reference = render(GatewayApp.instance().classes)
    document = README.read_text()
    assert replace_section(document, reference) == document, "README is stale: run `make docs`"


def test_every_option_names_its_environment_variable():
    for cls in GatewayApp.instance().classes:
        for name, trait in cls.class_own_traits(config=True).items():
            env = env_name(trait)
            if name.endswith("_class"):  # a class, not a value: config file only
                continue
            assert env and env.startswith("GATEWAY_"), f"{cls.__name__}.{name} has no GATEWAY_ variable"
            assert f"(env: {env}" in trait.help, f"{cls.__name__}.{name} help does not name {env}"


def test_replace_section_needs_markers():
    with pytest.raises(ValueError):
        replace_section("no markers here", "x")
    assert replace_section(f"a{BEGIN}old{END}b", "new\n") == f"a{BEGIN}\nnew\n{END}b"
