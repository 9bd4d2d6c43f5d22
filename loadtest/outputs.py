"""Where a benchmark's result goes: its JSON and Markdown files (either path may be empty), then the table on stdout."""
from __future__ import annotations

import json
from pathlib import Path


def write_outputs(result: dict, markdown: str, json_path: str | None, md_path: str | None) -> None:
    for path, text in ((json_path, json.dumps(result, indent=1)), (md_path, markdown)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
    print(markdown)
