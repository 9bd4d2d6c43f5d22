"""The real-scale check in one command: CUDA tests, engine speed, cache streaming and serving at FLUX.1 size.

    python -m loadtest.gpu_check --out DIR [--part tests|engine|pipeline|serving|all] [--config flux1|tiny]
    make gpu-check                        # = --out out/gpu --part all

Each part writes DIR/<part>.json and DIR/<part>.md (and prints the Markdown). On a CUDA machine the default
config is `flux1` (FLUX.1-dev's architecture, random bf16 weights made on the device, 1024x1024, 512 text
tokens; every part is sized to finish in a few minutes on one H100); elsewhere it is `tiny`, the same code on
a toy model in seconds, which the test suite runs so the check cannot rot. No network, no model hub, no
checkpoint. How to run it on a GPU box without network: docs/results/gpu.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import gpu_bootstrap  # noqa: F401 - first: instgenie.engine importable from a bare checkout

import torch  # noqa: E402

from .gpu_models import CONFIGS, device_info  # noqa: E402

PARTS = ("tests", "engine", "pipeline", "serving")
ROOT = Path(__file__).resolve().parent.parent

#: the test files holding CUDA-guarded tests (named test_cuda_*): side-stream block loader with events and double
#: buffers, pinned host cache, packed varlen attention, the packed sparse forward and streaming on the device
CUDA_TEST_FILES = (
    "tests/engine/tiers/test_loader.py",
    "tests/engine/tiers/test_host_cache.py",
    "tests/engine/transformer/test_attention.py",
    "tests/engine/transformer/test_sparse.py",
    "tests/engine/test_pipeline.py",
)

#: fields every part's JSON carries (the test suite checks them), beside the part's own
COMMON_FIELDS = ("part", "ok", "config", "device", "started", "seconds", "error")


def run_tests(cfg, out: Path, log=print) -> dict:
    """pytest on the CUDA-guarded tests (-k cuda), in a child process; outcomes read from its JUnit XML.

    `cmd` lists the test files for the record; the result keeps every test's outcome, so the XML is not kept."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-tests-") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "loadtest.gpu_bootstrap",
               "-k", "cuda", f"--junitxml={junit}", f"--basetemp={Path(tmp) / 'pytest'}", *CUDA_TEST_FILES]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        cases = list(ET.parse(junit).getroot().iter("testcase")) if junit.exists() else []
    tests = []
    for case in cases:
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = ("failed" if tag == "failure" else tag), (node.get("message") or "")[:300]
        tests.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0)), "message": message})
    counts = {k + "s" if k == "error" else k: sum(t["outcome"] == k for t in tests)
              for k in ("passed", "failed", "error", "skipped")}
    log(f"tests: {counts}")
    return {"command": " ".join(cmd[1:]).replace(tmp, "$TMP"), "returncode": proc.returncode, **counts,
            "tests": tests, "all_ran": counts["skipped"] == 0 and bool(tests),
            "output_tail": (proc.stdout + proc.stderr)[-3000:],
            "passed_ok": proc.returncode == 0 and counts["failed"] == 0 and counts["errors"] == 0}


def tests_markdown(result: dict) -> str:
    lines = [f"`{result['command']}`: {result['passed']} passed, {result['failed']} failed, {result['errors']} errors, "
             f"{result['skipped']} skipped (return code {result['returncode']})", "",
             "| test | outcome | s |", "|---|---|---|"]
    lines += [f"| {t['name']} | {t['outcome']} | {t['seconds']:.2f} |" for t in result["tests"]]
    return "\n".join(lines)


def run_part(part: str, cfg, out: Path, log=print) -> dict:
    """One part: its own result fields plus COMMON_FIELDS; an exception is recorded, not raised."""
    from . import gpu_engine, gpu_pipeline, gpu_serving

    started = time.time()
    t0 = time.monotonic()
    result = {"part": part, "config": cfg.as_dict(), "device": device_info(cfg.device), "started": started,
              "error": None}
    try:
        if part == "tests":
            result.update(run_tests(cfg, out, log))
            result["ok"] = result.pop("passed_ok")
            render = tests_markdown
        elif part == "engine":
            result.update(gpu_engine.run(cfg, log))
            render = gpu_engine.markdown
        elif part == "pipeline":
            result.update(gpu_pipeline.run(cfg, log))
            render = gpu_pipeline.markdown
        elif part == "serving":
            with tempfile.TemporaryDirectory(prefix="gpu-check-store-", dir=out) as store:
                result.update(gpu_serving.run(cfg, Path(store), log))
            render = gpu_serving.markdown
        else:
            raise ValueError(f"unknown part {part!r}; choose from {PARTS}")
        result.setdefault("ok", True)
        md = render(result)
    except Exception as exc:  # noqa: BLE001 - one part's failure is its result; the other parts still run
        import traceback

        result.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
        md = f"**{part} failed**: {result['error']}\n\n```\n{result['traceback']}\n```"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["seconds"] = time.monotonic() - t0
    header = (f"# gpu-check: {part}\n\n{result['device'].get('gpu', result['device']['device'])}, torch "
              f"{result['device']['torch']}, config {cfg.name}, {result['seconds']:.1f} s, "
              f"{'ok' if result['ok'] else 'FAILED'}\n\n")
    (out / f"{part}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{part}.md").write_text(header + md + "\n")
    log(header + md)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for <part>.json and <part>.md")
    ap.add_argument("--part", default="all", choices=(*PARTS, "all"))
    ap.add_argument("--config", default=None, choices=sorted(CONFIGS),
                    help="flux1 on a CUDA machine, tiny elsewhere (default: by the machine)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    name = args.config or ("flux1" if torch.cuda.is_available() else "tiny")
    cfg = CONFIGS[name]
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"config {name} needs a CUDA device; this machine has none (use --config tiny)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = PARTS if args.part == "all" else (args.part,)
    results = [run_part(part, cfg, out, lambda msg: print(msg, file=sys.stderr, flush=True)) for part in parts]
    summary = {"config": name, "parts": {r["part"]: {"ok": r["ok"], "seconds": r["seconds"], "error": r["error"]}
                                         for r in results}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
