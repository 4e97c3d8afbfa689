"""The demo behind `make demo`: list the backbones and show VGG16's Keras-named layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def main() -> int:
    for args in (["backbones"], ["layers", "--backbone", "vgg16"]):
        print(f"$ transfer {' '.join(args)}", flush=True)
        code = subprocess.call([str(BIN / "transfer"), *args])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
