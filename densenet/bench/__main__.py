"""python -m densenet.bench: the benchmark entry point (see densenet/bench/__init__.py)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import List, Optional

from . import __doc__ as package_doc

# Each benchmark module provides add_parser(subparsers) and child(payload) for its fresh processes.
BENCHMARKS = ("step", "e2e", "gpu_check", "loader", "pipeline", "decoders", "index", "plan", "recipes")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        module = importlib.import_module(f"densenet.bench.{argv[1]}")
        print(json.dumps(module.child(json.loads(argv[2]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m densenet.bench", description=package_doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name in BENCHMARKS:
        importlib.import_module(f"densenet.bench.{name}").add_parser(sub)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
