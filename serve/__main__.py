"""`python -m bnfold.serve MODEL [options]`: the same service and options as `bnfold serve`."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bnfold.errors import BnfoldError
from bnfold.serve.config import add_arguments, from_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnfold serve",
                                     description="serve ONNX models over the Open Inference Protocol v2 (HTTP)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        from bnfold.serve.launch import serve

        return serve(from_args(args))
    except BnfoldError as exc:
        print(f"bnfold serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bnfold serve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
