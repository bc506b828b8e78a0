"""Cluster arguments are checked at once, before any box starts."""

from __future__ import annotations

import pytest

from pytest_nsbox import ArgumentTypeError, Cluster, ConfigError, NetworkError


def test_a_number_names_the_nodes_and_a_list_is_taken_as_given() -> None:
    assert Cluster(3).names == ("n1", "n2", "n3")
    assert Cluster(["db1", "db2"], env={"A": "1"}).names == ("db1", "db2")
    assert all(spec.env == {"A": "1"} for spec in Cluster(["a", "b"], env={"A": "1"}).specs.values())


@pytest.mark.parametrize(
    ("nodes", "error", "message"),
    [
        (0, ConfigError, "1 to 64 nodes"),
        (True, ArgumentTypeError, "a number of nodes"),
        ("db1", ArgumentTypeError, "a list of names"),
        (["db1", "db1"], ConfigError, "db1 is given more than once"),
        (["db_1"], ConfigError, "not a valid hostname"),
    ],
)
def test_bad_nodes_are_refused(nodes: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Cluster(nodes)  # type: ignore[arg-type]


@pytest.mark.parametrize("option", ["hostname", "network", "nat", "publish"])
def test_the_clusters_own_options_are_refused(option: str) -> None:
    with pytest.raises(ConfigError, match=f"{option}= is set by the cluster itself"):
        Cluster(2, **{option: "x"})


def test_bad_groups_and_nodes_are_refused_before_the_cluster_is_asked_to_run() -> None:
    cluster = Cluster(["db1", "db2", "db3"])
    with pytest.raises(ConfigError, match="'db2' is in group 1 and group 2"):
        cluster.partition(["db1", "db2"], ["db2"])
    with pytest.raises(ConfigError, match="no node 'db4'"):
        cluster.partition(["db4"])
    with pytest.raises(ArgumentTypeError, match="group 1: expected a list"):
        cluster.partition("db1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="give the groups"):
        cluster.partition()
    with pytest.raises(ConfigError, match="cut from itself"):
        cluster.block("db1", "db1")
    with pytest.raises(ConfigError, match="no node 'x'"):
        cluster.link("db1", "x")
    with pytest.raises(ConfigError, match="no node 'x'"):
        cluster["x"]
    with pytest.raises(NetworkError, match="not running"):  # good arguments: only then the state
        cluster.partition(["db1"], ["db2", "db3"])
