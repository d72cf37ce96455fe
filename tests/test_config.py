"""The service configuration: validation, errors naming the field, the README's example."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import load_config, parse_config
from ml.errors import ConfigError

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> dict[str, Any]:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"```yaml\n(dicom:.*?)```", text, re.S)
    assert match, "README.md lost its example configuration"
    data: dict[str, Any] = yaml.safe_load(match.group(1))
    return data


def test_the_readme_example_is_a_valid_configuration() -> None:
    settings = parse_config(readme_example(), "README.md")
    assert settings.dicom.port == 11112 and settings.hl7.port == 2575
    assert [d.name for d in settings.destinations] == ["pacs"]
    assert settings.routing.rules, "default routing rules are loaded"


def test_unknown_and_wrong_fields_are_named() -> None:
    data = readme_example()
    data["dicom"]["prot"] = 104
    data["export"]["max_attempts"] = "many"
    with pytest.raises(ConfigError) as err:
        parse_config(data, "site.yaml")
    assert "site.yaml" in str(err.value)
    assert "dicom.prot: Extra inputs are not permitted" in str(err.value)
    assert "export.max_attempts" in str(err.value)


def test_destinations_are_required_and_unique() -> None:
    data = readme_example()
    data["destinations"] = data["destinations"] * 2
    with pytest.raises(ConfigError, match="destination names must be unique"):
        parse_config(data)
    data["destinations"] = []
    with pytest.raises(ConfigError, match="destinations"):
        parse_config(data)


def test_load_config_resolves_relative_paths_and_names_bad_files(tmp_path: Path) -> None:
    data = readme_example()
    data["storage"]["root"] = "state"
    path = tmp_path / "site" / "oncopacs.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data))
    settings = load_config(path)
    assert settings.storage.root == path.parent / "state"
    assert not (path.parent / "state").exists(), "loading has no side effects"
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("dicom: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
