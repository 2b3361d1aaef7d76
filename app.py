"""The demo page as a Hugging Face Space runs it (`python app.py`): `ctal-demo` with its settings from the
environment.

- `CTAL_DEMO_MODEL`: the model, a Hub id or a folder (default: the `model` folder beside this file).
- `CTAL_DEMO_EXAMPLES`: a folder of example images (default: `demo_examples` beside this file, when present).
- `CTAL_DEMO_UNITS`: units on the colour bars of regression tasks, e.g. `depth=metres` (space-separated pairs;
  default: the units the model's config states).
- `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT`: where to serve (a Space sets them; default 127.0.0.1:7860).

The Space's requirements.txt needs `ctal-hf[demo]` (or this repository with that extra)."""

import os
import sys
from pathlib import Path

from ctal_hf.demo.cli import main

HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def space_arguments() -> list[str]:
    """The `ctal-demo` command line this Space runs."""
    model = os.environ.get("CTAL_DEMO_MODEL") or str(HERE / "model")
    examples_dir = Path(os.environ.get("CTAL_DEMO_EXAMPLES") or HERE / "demo_examples")
    examples = sorted(str(p) for p in examples_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    arguments = [
        "--model",
        model,
        "--host",
        os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        "--port",
        os.environ.get("GRADIO_SERVER_PORT", "7860"),
    ]
    if examples:
        arguments += ["--examples", *examples]
    if os.environ.get("CTAL_DEMO_UNITS", "").split():
        arguments += ["--units", *os.environ["CTAL_DEMO_UNITS"].split()]
    return arguments


if __name__ == "__main__":
    sys.exit(main(space_arguments()))
