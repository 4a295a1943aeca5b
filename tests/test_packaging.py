"""Packaging, read from pyproject.toml without building (scripts/check_wheel.sh builds and installs a wheel): the
distribution name is ours on PyPI, setuptools applies the configuration without warnings, and every data
folder under farmer/ is a package whose files the package data ships."""

from __future__ import annotations

import warnings
from fnmatch import fnmatch
from pathlib import Path

import pytest
from setuptools import find_namespace_packages
from setuptools.config.pyprojecttoml import apply_configuration, read_configuration
from setuptools.dist import Distribution

from farmer.hub import DISTRIBUTION
from farmer.pretrained import HUB_INSTALL

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = read_configuration(ROOT / "pyproject.toml", expand=False)  # the TOML as written (no tomllib on 3.10)


def test_the_distribution_is_farmer_flow_imported_as_farmer() -> None:
    # `farmer` on PyPI is an unrelated project: `pip install farmer` would install it.
    project = PYPROJECT["project"]
    assert project["name"] == DISTRIBUTION == "farmer-flow"
    assert project["scripts"] == {"farmer": "farmer.cli:main"}
    assert "hub" in project["optional-dependencies"] and HUB_INSTALL == "pip install 'farmer-flow[hub]'"


def test_setuptools_applies_the_configuration_without_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. the deprecated license table of setuptools < 77
        apply_configuration(Distribution(), ROOT / "pyproject.toml")


def test_every_data_folder_is_a_package_and_its_files_are_package_data() -> None:
    """setuptools warns ("Package would be ignored") about a folder that Python can import but that is not among
    the packages; found as namespace packages, the data folders are shipped by their package-data patterns."""
    packages = set(find_namespace_packages(str(ROOT), include=PYPROJECT["tool"]["setuptools"]["packages"]["find"]
                                           ["include"]))
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]
    data = [p for p in (ROOT / "farmer").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert any(p.name == "model.safetensors" for p in data)
    for file in data:
        package = ".".join(file.parent.relative_to(ROOT).parts)
        assert package in packages, f"{file.parent} is not found as a package"
        owners = [(name, file.relative_to(ROOT.joinpath(*name.split(".")))) for name in patterns
                  if package == name or package.startswith(name + ".")]
        assert any(fnmatch(str(relative), pattern) for name, relative in owners for pattern in patterns[name]), \
            f"{file.relative_to(ROOT)} is not package data"
