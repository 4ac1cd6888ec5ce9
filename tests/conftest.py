"""Settings for the whole test session, before any test module is imported.

Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when ``ray`` is first imported, and any module may
import it first (the deploy tests import ``ray.serve.schema``). Set to 0, a local Ray started by a
test keeps every socket on 127.0.0.1; imported without it, the archive tests saw Ray listen on the
machine's other address (docs/distributed.md). Set here, for every Ray a test starts.
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
