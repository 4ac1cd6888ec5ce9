"""Schema-driven fuzzing: schemathesis cases for every operation of the live app's OpenAPI schema,
against the tiny model repository, with auth off and on (a valid key sent); no case may get a 5xx.
Bounded for CI (``GSA_FUZZ_EXAMPLES`` cases per operation, 6 by default); the larger run is
``benchmarks/fuzz_service.py``."""

from __future__ import annotations

import os

import httpx
import pytest

from conftest import TINY, LiveServer, make_settings

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

KEY = "gsa_fuzz-key-0123456789"
EXAMPLES = int(os.environ.get("GSA_FUZZ_EXAMPLES", "6"))


def _served_names(cases, models: list[str], versions: list[str]):
    """Cases whose path names a served model and version three times in four (random names only
    reach the 404 of the model lookup)."""

    def pick(draw_case):
        case, model, version, keep = draw_case
        params = case.path_parameters or {}
        if not keep:
            if "model_name" in params:
                params["model_name"] = model
            if "version" in params:
                params["version"] = version
        return case

    return st.tuples(cases, st.sampled_from(models), st.sampled_from(versions),
                     st.sampled_from([False, False, False, True])).map(pick)


@pytest.mark.slow
@pytest.mark.parametrize("auth", ["off", "on"])
def test_no_case_gets_a_server_error(model_repo, tmp_path, auth):
    overrides = {"jobs_dir": tmp_path / "jobs", "auth": auth, "api_keys": KEY if auth == "on" else None}
    with LiveServer(make_settings(model_repo, **overrides)) as server:
        headers = {"Authorization": f"Bearer {KEY}"} if auth == "on" else {}
        if auth == "on":
            assert httpx.get(server.url + "/openapi.json").status_code == 401
        schema = schemathesis.openapi.from_dict(httpx.get(server.url + "/openapi.json", headers=headers).json())
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 15
        counts: dict[int, int] = {}
        for operation in operations:

            @seed(0)
            @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=_served_names(operation.as_strategy(), [TINY, TINY, "broken"], ["1", "2", "2"]))
            def check(case) -> None:
                response = case.call(base_url=server.url, headers=headers, timeout=60)
                counts[response.status_code] = counts.get(response.status_code, 0) + 1
                case.validate_response(response, checks=[not_a_server_error], headers=headers)

            check()
        print(f"auth {auth}: {sum(counts.values())} cases over {len(operations)} operations, statuses {sorted(counts.items())}")
        assert sum(counts.values()) >= len(operations)
        assert 401 not in counts  # the key was sent and accepted
