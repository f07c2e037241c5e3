"""Times contenders in this interpreter for a parent benchmark run in another one.

The throughput runner starts ``python -m benchmarks._child SPEC`` with a newer
Python when a contender needs one (anyiostream needs 3.12). SPEC is the JSON
written by :func:`benchmarks._harness.measure_in_child`; the answer is one JSON
line on stdout. Not meant to be run by hand.
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

from . import _harness as h


def main(argv: list[str]) -> int:
    # Imported here: the registry imports every contender module.
    from .peers import PEER_DISTRIBUTIONS
    from .throughput import REGISTRY

    spec = json.loads(argv[0])
    where = h.backend(spec["backend"])
    known = {ct.name: ct for ct in REGISTRY}
    results: dict[str, dict[str, Any]] = {}
    # Warm every contender up before timing any, as the parent does: imports and
    # first-use caches are paid here, and a broken contender is caught early.
    ready = []
    for name in spec["names"]:
        try:
            h.measure(
                where,
                known[name].run,
                spec["warmup_items"],
                spec["workers"],
                timeout=spec["timeout"],
            )
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        else:
            ready.append(name)
    for name in ready:
        try:
            seconds = h.measure(
                where,
                known[name].run,
                spec["items"][name],
                spec["workers"],
                timeout=spec["timeout"],
            )
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        else:
            results[name] = {"seconds": seconds}
    answer = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "source": h.source_info(),
        "versions": h.machine_info(PEER_DISTRIBUTIONS)["versions"],
        "results": results,
    }
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
