"""Upgrade every declared dependency (but torch and torchvision) to its newest release, and print the versions.

A new user's `pip install -e .` on a machine without, say, click gets click's newest release; a
test machine whose Python already has an older one keeps it (pip only installs what is missing).
So the tests run against the newest release of each dependency the registries offer, within the
ranges setup.cfg declares, and the log says which versions were tested. torch and torchvision stay
as installed: a CUDA build is gigabytes, and their pair must match.
"""
from __future__ import annotations

import configparser
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

KEPT = {"torch", "torchvision"}


def declared(setup_cfg: Path) -> list[str]:
    """Every requirement of install_requires and of each extra, as written (ranges included)."""
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    lines = config["options"]["install_requires"].splitlines()
    for extra in config["options.extras_require"].values():
        lines += extra.splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


def main() -> int:
    requirements = declared(Path(__file__).resolve().parents[1] / "setup.cfg")
    upgraded = [r for r in requirements if name_of(r) not in KEPT]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--upgrade", *upgraded], check=True)
    print("dependencies tested (newest releases within setup.cfg's ranges; torch and torchvision as installed):")
    for name in sorted({name_of(r) for r in requirements}):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"  {name:<16} {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
