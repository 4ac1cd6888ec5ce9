"""Container healthcheck: exit 0 when the service on this host answers ready, else 1.

The image's HEALTHCHECK and docker-compose.yml run it as ``python /usr/local/bin/gsa-healthcheck``;
the port comes from ``GSA_PORT`` (default 8000), as for the service. Standard library only, so the
slim image needs no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('GSA_PORT', '8000')}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("GSA_HEALTHCHECK_TIMEOUT_S", "2"))) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:  # HTTPError (the 400 "not ready") is a URLError
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
