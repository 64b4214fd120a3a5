"""Regenerate the committed Python stubs from the .proto sources.

Run `python -m protos.build` after editing a .proto; `python -m protos.build --check` fails when the
committed stubs are stale (the test suite runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Runs grpcio-tools' protoc with the repo root as include path, so imports read `from protos ...`."""
    from grpc_tools import protoc

    sources = sorted(PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_dir / "protos").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs differ")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = []
        for path in generated:
            target = PROTO_DIR / path.name
            if args.check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    stale.append(path.name)
            else:
                target.write_bytes(path.read_bytes())
        if stale:
            print(f"stale generated stubs: {', '.join(stale)}; run `python -m protos.build`", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
