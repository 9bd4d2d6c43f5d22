"""`instgenie profile` with object-store reads measured against a local S3 server, as the local mesh's workers read.

    python -m loadtest.profile_local --model digits --out loadtest/profiles/digits-16px@cpu.json
    python -m loadtest.profile_local --model flux-small --out loadtest/profiles/flux-small-seed0@cpu.json

Starts the JuiceFS S3 gateway the tests and `instgenie up` use (services/common/testing_s3.py) in a temporary
directory, runs `instgenie profile --threads 1 --s3-endpoint ...` (the full default grid) in a subprocess, prints
its report and stops the server. Extra arguments go to `instgenie profile`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(model: str, out: Path, models_dir: str = "var/models", extra: list[str] = ()) -> int:
    from instgenie.services.common.testing_s3 import S3Server

    with tempfile.TemporaryDirectory(prefix="profile-s3-") as tmp, S3Server(Path(tmp)) as s3:
        s3.store("instgenie").close()
        return subprocess.run([sys.executable, "-m", "instgenie.cli", "profile", "--model", model, "--models-dir",
                               models_dir, "--threads", "1", "--s3-endpoint", s3.endpoint, "--s3-access-key",
                               s3.access_key, "--s3-secret-key", s3.secret_key, "--out", str(out), *extra],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--models-dir", default="var/models")
    ap.add_argument("--out", required=True)
    args, extra = ap.parse_known_args(argv)
    return run(args.model, Path(args.out), args.models_dir, extra)


if __name__ == "__main__":
    raise SystemExit(main())
