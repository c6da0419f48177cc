"""Install the system packages the test suite drives for real, when we are allowed to.

Run by ``make test`` before pytest. As root on Debian it installs what is missing with apt;
otherwise it says what is missing and the tests that need it skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# (command that proves it is installed, Debian packages that provide it, who needs it)
REQUIREMENTS: list[tuple[str, list[str], str]] = [
    ("runsc", ["runsc"], "the gvisor sandbox backend's tests (tests/test_sandbox_gvisor.py)"),
    ("openssl", ["openssl"], "the sandbox egress proxy's TLS tests (a self-signed server)"),
    ("chromium", ["chromium", "chromium-driver"], "the web console tests drive headless Chromium"),
    ("chromedriver", ["chromium", "chromium-driver"], "the web console tests use chromedriver"),
]


def main() -> int:
    missing = [(cmd, pkgs, why) for cmd, pkgs, why in REQUIREMENTS if shutil.which(cmd) is None]
    if not missing:
        return 0
    packages = sorted({p for _c, pkgs, _w in missing for p in pkgs})
    can_apt = os.geteuid() == 0 and shutil.which("apt-get") is not None
    if not can_apt:
        for cmd, pkgs, why in missing:
            print(f"note: {cmd} not found ({why}); install {' '.join(pkgs)} to run those tests")
        return 0
    print(f"installing {' '.join(packages)} for the test suite", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    quiet = {"stdout": subprocess.DEVNULL, "env": env}
    if subprocess.run(["apt-get", "install", "-y", "-q", *packages], **quiet).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], **quiet)
        if subprocess.run(["apt-get", "install", "-y", "-q", *packages], **quiet).returncode:
            print(f"warning: could not install {' '.join(packages)}; dependent tests will skip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
