"""The public surface: what ``from pytest_nsbox import ...`` offers."""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest

import pytest_nsbox
from pytest_nsbox import errors


def test_all_is_sorted_and_unique() -> None:
    assert pytest_nsbox.__all__ == sorted(pytest_nsbox.__all__)
    assert len(set(pytest_nsbox.__all__)) == len(pytest_nsbox.__all__)


@pytest.mark.parametrize("name", pytest_nsbox.__all__)
def test_every_public_name_is_importable(name: str) -> None:
    module = importlib.import_module("pytest_nsbox")
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from pytest_nsbox import {name}", namespace)
    assert namespace[name] is getattr(pytest_nsbox, name)


def test_every_error_class_is_exported() -> None:
    assert set(errors.__all__) <= set(pytest_nsbox.__all__)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from pytest_nsbox import *", namespace)
    namespace.pop("__builtins__", None)
    assert sorted(namespace) == pytest_nsbox.__all__


def test_version_matches_the_installed_distribution() -> None:
    assert pytest_nsbox.__version__ == importlib.metadata.version("pytest-nsbox")


def test_pytest_plugin_entry_point_is_registered() -> None:
    entry_points = importlib.metadata.entry_points(group="pytest11")
    assert any(ep.name == "nsbox" and ep.value == "pytest_nsbox.plugin" for ep in entry_points)
