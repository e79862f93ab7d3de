"""Generate the Grafana dashboards grafana/dashboards/*.json from scripts/dashboards/.

    python scripts/gen_dashboards.py           # rewrite them
    python scripts/gen_dashboards.py --check   # exit 1 if one is stale (tests/test_dashboards.py)

The dashboards are built with Grafana's Python SDK (grafana-foundation-sdk, a dev dependency).
Edit scripts/dashboards/ and run this script, then python scripts/gen_k8s.py for the ConfigMaps
that copy the JSON; never edit the JSON itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from dashboards import context_scaling, memory, speed
from dashboards.shell import numbered
from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "grafana" / "dashboards"
BUILDERS: tuple[Callable[[], Dashboard], ...] = (
    speed.dashboard,
    memory.dashboard,
    context_scaling.dashboard,
)
COMMAND = "python scripts/gen_dashboards.py"


def render(builder: Dashboard) -> tuple[str, str]:
    """(uid, JSON): keys sorted so that a rebuild writes the same bytes."""
    built = numbered(builder.build())
    text = json.dumps(built, cls=JSONEncoder, sort_keys=True, indent=2, ensure_ascii=False)
    if not built.uid:
        raise ValueError(f"dashboard {built.title!r} has no uid")
    return built.uid, text + "\n"


def generated() -> dict[Path, str]:
    """Each dashboard's file, named after its uid, and its text."""
    files: dict[Path, str] = {}
    for build in BUILDERS:
        uid, text = render(build())
        files[DASHBOARDS / f"{uid}.json"] = text
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    files = generated()
    stale = []
    for path, text in files.items():
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    # gen_k8s.py ships every JSON file there: one this script does not write is kept by hand.
    strays = sorted(set(DASHBOARDS.glob("*.json")) - set(files))
    for path in strays:
        print(
            f"not generated: {path.relative_to(ROOT)} (add it to scripts/dashboards or remove it)"
        )
    if args.check:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run {COMMAND})")
    return 1 if strays or (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
