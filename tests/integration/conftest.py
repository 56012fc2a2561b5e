"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from tests.servers import redis_cluster


@pytest.fixture(scope="module")
def redis_store(tmp_path_factory):
    """Two Redis "nodes" (network namespaces) beside one redis-server, for the module's engines."""
    with redis_cluster(tmp_path_factory.mktemp("redis"), nodes=2) as running:
        yield running
