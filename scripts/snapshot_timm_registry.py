"""Write deploycomp/frontend/timm_registry.json: deploycomp's verdict on every model timm registers
in the modules it reads (its spec, or the one-line refusal), for the installed timm and the current
checks. ``timm_spec`` answers from it without importing timm (about 3 s), so an unsupported name is
refused in well under a second. Re-run after upgrading timm or changing ``unsupported_part``; a
stale snapshot is ignored (and ``tests/test_sources.py`` fails until it is re-written).

    .venv/bin/python scripts/snapshot_timm_registry.py
"""

from __future__ import annotations

import json
import time
from importlib import metadata

import timm

from deploycomp.frontend.timm_models import SNAPSHOT, TIMM_MODULES, checks_version, live_verdict


def main() -> None:
    start = time.perf_counter()
    names = sorted({n for module in TIMM_MODULES if not module.startswith("proxy")
                    for n in timm.list_models(module=module)})
    models = {name: live_verdict(name) for name in names}
    SNAPSHOT.write_text(json.dumps({"timm": metadata.version("timm"), "checks": checks_version(),
                                    "models": models}, indent=0, sort_keys=True) + "\n")
    refused = sum("refusal" in v for v in models.values())
    print(f"{len(models)} timm models ({refused} refused) in {time.perf_counter() - start:.0f} s -> {SNAPSHOT}")


if __name__ == "__main__":
    main()
