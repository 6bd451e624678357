"""bench.grpc_floor: each floor server answers a real tritonclient.grpc call with a decodable response."""
from __future__ import annotations

import numpy as np
import pytest

from bnfold.bench import grpc_floor


def test_every_installed_floor_kind_answers_tritonclient_and_the_missing_ones_are_named(capsys) -> None:
    rows = grpc_floor.compare(requests=20, rounds=1)
    kinds = [kind for kind, _, _ in rows]
    assert kinds[:2] == ["aio", "sync"]              # grpcio's two servers are always there
    assert ("h2" in kinds) == grpc_floor._installed("h2")
    for _, p50, cpu in rows:                          # time_client decoded every answer's "logits"
        assert np.isfinite(p50) and p50 > 0 and 0 < cpu < 1000


def test_serving_one_kind_needs_grpc_port_and_answer() -> None:
    with pytest.raises(SystemExit) as refused:
        grpc_floor.main(["--kind", "sync"])
    assert refused.value.code == 2
