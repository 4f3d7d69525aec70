#!/usr/bin/env python3
"""Write BatchKalmanNormFields.h from bkn_export/export/op/op_spec.py (the one declaration).

    python plugins/tensorrt/gen_fields.py           # rewrite the header beside this script
    python plugins/tensorrt/gen_fields.py --check   # exit 1 if the committed header is stale

The rendering lives in :func:`bkn_export.tensorrt_plugin.render_fields_header`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HEADER = Path(__file__).resolve().parent / "BatchKalmanNormFields.h"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the header is stale")
    parser.add_argument("--output", type=Path, default=HEADER, help=f"header to write (default {HEADER})")
    args = parser.parse_args(argv)

    from bkn_export.tensorrt_plugin import render_fields_header

    text = render_fields_header()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != text:
            print(f"{args.output} is stale; run: python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
