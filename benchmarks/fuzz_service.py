"""Schema-driven fuzzing of a live GSA-Serve: schemathesis cases for every operation of its OpenAPI
schema, sent to a server on 127.0.0.1; prints the count of cases and of 5xx answers.

    python benchmarks/fuzz_service.py --examples 100            # starts a server on models/
    python benchmarks/fuzz_service.py --url http://127.0.0.1:8000 --key $KEY --examples 100

Each operation gets ``--examples`` generated cases (seeded: the same cases each run). A 5xx is a
defect: the case is printed as a curl command.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import httpx
from live_service import start_service  # benchmarks/live_service.py, beside this script

ROOT = Path(__file__).resolve().parents[1]


def fuzz(url: str, headers: dict[str, str], examples: int, seed: int = 0) -> dict:
    """Run the cases; returns counts by operation and status, and the 5xx cases as curl commands."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_dict(httpx.get(url + "/openapi.json", headers=headers, timeout=30).json())
    index = httpx.post(url + "/v2/repository/index", headers=headers, timeout=30).json()
    models = sorted({m["name"] for m in index}) or ["none"]
    versions = sorted({m["version"] for m in index}) or ["1"]

    def served(drawn):  # a served model and version three times in four: random names only reach a 404
        case, model, version, keep = drawn
        params = case.path_parameters or {}
        if not keep:
            params.update({k: v for k, v in (("model_name", model), ("version", version)) if k in params})
        return case

    def strategy(operation):
        return st.tuples(operation.as_strategy(), st.sampled_from(models), st.sampled_from(versions),
                         st.sampled_from([False, False, False, True])).map(served)

    statuses: collections.Counter = collections.Counter()
    per_operation: dict[str, int] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        per_operation[label] = 0

        @hseed(seed)
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy(operation))
        def run(case) -> None:
            response = case.call(base_url=url, headers=headers, timeout=60)
            statuses[response.status_code] += 1
            per_operation[label] += 1
            if response.status_code >= 500:
                failures.append(f"{response.status_code} {case.as_curl_command(headers)}")

        run()
    return {"cases": sum(statuses.values()), "statuses": dict(sorted(statuses.items())),
            "server_errors": sum(n for code, n in statuses.items() if code >= 500),
            "per_operation": per_operation, "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running server (default: start one on --model-dir)")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--key", default=None, help="API key to send (and, when starting a server, to require)")
    parser.add_argument("--examples", type=int, default=100, help="cases per operation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    proc, url = None, args.url
    if url is None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "GSA_LOG_LEVEL": "WARNING", "GSA_ACCESS_LOG": "false",
               "GSA_JOBS_DIR": str(Path(os.environ.get("TMPDIR", "/tmp")) / f"gsa-fuzz-jobs-{os.getpid()}")}
        if args.key:
            env.update(GSA_AUTH="on", GSA_API_KEYS=args.key)
        proc, url = start_service(args.model_dir, env)
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    try:
        t0 = time.perf_counter()
        report = fuzz(url, headers, args.examples, args.seed)
        elapsed = time.perf_counter() - t0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    for label, n in report["per_operation"].items():
        print(f"{n:6d}  {label}")
    print(f"cases: {report['cases']} in {elapsed:.1f} s; statuses: {report['statuses']}")
    print(f"5xx: {report['server_errors']}")
    for line in report["failures"][:20]:
        print("  " + line)
    sys.exit(1 if report["server_errors"] else 0)


if __name__ == "__main__":
    main()
