"""How the `instgenie` CLI shows things: tables and JSON on stdout, progress bars on stderr."""
from __future__ import annotations

import dataclasses
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Iterable

from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from instgenie.client import (Accepted, EditResult, Keepalive, Model, Operation, Queued, Started, Template,
                              TemplateState)
from instgenie.client import Progress as StepProgress


def stdout_console() -> Console:
    # Piped output gets a wide fixed width so table cells (ids above all) are not wrapped or cut.
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(value) -> None:
    def default(obj):
        if isinstance(obj, datetime):
            return obj.isoformat()
        if isinstance(obj, BaseException):
            return str(obj)
        raise TypeError(f"cannot show {type(obj).__name__} as JSON")

    data = [_plain(v) for v in value] if isinstance(value, list) else _plain(value)
    sys.stdout.write(json.dumps(data, indent=2, default=default) + "\n")


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def templates_table(templates: Iterable[Template]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "NAME", "STATE", "MODEL", "SIZE", "STEPS", "MODE", "CACHE", "CREATED"):
        table.add_column(column, no_wrap=True)
    for t in templates:
        table.add_row(t.template_id, t.name or "-", str(t.state), t.model, f"{t.width}x{t.height}", str(t.steps),
                      str(t.cache_mode), decimal(t.cache_bytes) if t.cache_bytes else "-", _when(t.create_time))
    return table


def template_details(t: Template) -> Table:
    table = Table.grid(padding=(0, 2))
    rows = [("id", t.template_id), ("name", t.name or "-"), ("state", str(t.state)), ("model", t.model),
            ("size", f"{t.width}x{t.height}"), ("steps", str(t.steps)), ("prompt", t.prompt),
            ("cache mode", str(t.cache_mode)), ("cache", decimal(t.cache_bytes) if t.cache_bytes else "-"),
            ("created", _when(t.create_time)), ("updated", _when(t.update_time)), ("operation", t.operation)]
    if t.state == TemplateState.FAILED or t.error_message:
        rows.append(("error", t.error_message))
    for key, value in rows:
        table.add_row(key, value)
    return table


def models_table(models: Iterable[Model]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("MODEL", "SIZE", "STEPS", "MAX STEPS", "GUIDANCE", "SCALE", "WORKERS"):
        table.add_column(column, no_wrap=True)
    for m in models:
        table.add_row(m.name, f"{m.width}x{m.height}", str(m.default_steps), str(m.max_steps), m.guidance,
                      f"{m.default_guidance_scale:g}", str(m.workers))
    return table


def edit_summary(result: EditResult, path: Path) -> str:
    text = (f"wrote {path}: seed {result.seed}, {result.steps} steps, mask {result.mask_ratio:.1%} computed, "
            f"{result.total_seconds:.2f} s (queue {result.queue_seconds:.2f} s), worker {result.worker or '-'}")
    if result.degraded_reason:
        text += f", degraded: {result.degraded_reason}"
    return text


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not enabled)


def _stop(progress: Progress, failed: bool) -> None:
    # A bar of a call that failed says nothing the error line does not; take it off the screen.
    if failed:
        progress.live.transient = True
        if not progress.console.is_terminal:
            progress.console.quiet = True  # not even the blank line a non-terminal gets for a transient bar
    progress.stop()


class RegistrationBar:
    """A bar over a template's registration steps; pass it as create_template's `progress` callback."""

    def __init__(self, console: Console, enabled: bool = True):
        self._progress = _progress(console, enabled)
        self._task = None

    def __enter__(self) -> RegistrationBar:
        self._progress.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _stop(self._progress, failed=exc_type is not None)

    def __call__(self, operation: Operation) -> None:
        total = operation.total_steps or None
        description = f"template {operation.template_id}: {operation.state}"
        if self._task is None:
            self._task = self._progress.add_task(description, total=total)
        self._progress.update(self._task, description=description, total=total, completed=operation.steps_done)


class EditBar:
    """A bar over an edit's denoising steps, showing acceptance, queue position and the worker on the way."""

    def __init__(self, console: Console, enabled: bool = True):
        self._progress = _progress(console, enabled)
        self._task = None

    def __enter__(self) -> EditBar:
        self._progress.start()
        self._task = self._progress.add_task("sending", total=None)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _stop(self._progress, failed=exc_type is not None)

    def __call__(self, event) -> None:
        update = {}
        if isinstance(event, Accepted):
            update["description"] = f"accepted (about {event.predicted_seconds:.1f} s)"
        elif isinstance(event, Queued):
            update["description"] = f"queued (position {event.position})"
        elif isinstance(event, Started):
            update["description"] = f"running on {event.worker} (batch {event.batch_size}, cache {event.cache_tier})"
        elif isinstance(event, StepProgress):
            update.update(description=f"denoising (batch {event.batch_size})", total=event.total_steps,
                          completed=event.step)
        elif isinstance(event, Keepalive):
            pass  # the elapsed-time column keeps moving on its own
        self._progress.update(self._task, **update)
