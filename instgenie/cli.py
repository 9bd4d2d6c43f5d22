"""The `instgenie` command: run a local mesh, manage templates, edit, and look at models and the cluster."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import grpc

from instgenie import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MESH_MODULE = "instgenie.services.local.mesh"


class UsageError(Exception):
    """A command line that cannot work (a missing input file, say): exit 2, like argparse's own errors."""


def _connection_flags(defaults: bool) -> argparse.ArgumentParser:
    # The same flags before or after the command; after it they only apply when given (SUPPRESS), so they
    # never overwrite one given before it.
    default = None if defaults else argparse.SUPPRESS
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("connection")
    group.add_argument("--address", default=default, metavar="HOST:PORT",
                       help="gateway address (env INSTGENIE_ADDRESS; else $INSTGENIE_HOME/local.json; "
                            "else 127.0.0.1:50051)")
    group.add_argument("--api-key", default=default, metavar="KEY", help="API key (env INSTGENIE_API_KEY)")
    group.add_argument("--scheduler", default=default, metavar="HOST:PORT",
                       help="scheduler address for `status` (env INSTGENIE_SCHEDULER; else local.json; "
                            "else 127.0.0.1:50052)")
    group.add_argument("--tls", action="store_true", default=False if defaults else argparse.SUPPRESS,
                       help="connect with TLS (system root certificates)")
    group.add_argument("--timeout", type=float, default=default, metavar="SECONDS",
                       help="deadline of each call (defaults: 30 s; edits 300 s; waiting for a template 1800 s)")
    group.add_argument("-q", "--quiet", action="store_true", default=False if defaults else argparse.SUPPRESS,
                       help="no progress bars")
    return flags


def build_parser() -> argparse.ArgumentParser:
    common = _connection_flags(defaults=False)
    parser = argparse.ArgumentParser(
        prog="instgenie", parents=[_connection_flags(defaults=True)],
        description="InstGenIE: mask-aware image editing. Register a template once, then edit it many times.")
    parser.add_argument("--version", action="version", version=f"instgenie {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run a local mesh (gateway, scheduler, workers); see `instgenie up --help`")
    up.add_argument("mesh_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    up.set_defaults(handler=_cmd_up)

    templates = commands.add_parser("templates", help="create, list, show and delete templates")
    tcmds = templates.add_subparsers(dest="templates_command", required=True, metavar="COMMAND")

    create = tcmds.add_parser("create", parents=[common], help="register a template (prints its id)")
    create.add_argument("image", metavar="IMAGE", help="PNG, JPEG or WebP at a resolution a model serves")
    create.add_argument("--prompt", required=True, help="what the image shows")
    create.add_argument("--name", default="", help="a label for listings")
    create.add_argument("--steps", type=int, default=0, help="denoising steps (default: the model's)")
    create.add_argument("--seed", type=int, default=0, help="seed of the template's noise trajectory")
    create.add_argument("--mode", choices=("kv", "y", "o"), default=None,
                        help="cache mode (default: the model's): kv (fastest Flux edits), y (half the cache bytes) "
                             "or o (UNet models)")
    create.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    create.add_argument("--model", default="", help="model name (default: the one serving the image's size)")
    create.add_argument("--request-id", default=None,
                        help="idempotency id (default: a fresh one): repeating the command with it never "
                             "registers twice")
    create.add_argument("--no-wait", action="store_true", help="print the id at once, do not wait until ready")
    create.set_defaults(handler=_cmd_templates_create)

    lister = tcmds.add_parser("list", parents=[common], help="the tenant's templates, newest first")
    lister.add_argument("--page-size", type=int, default=0, help="templates per request (default: the server's)")
    lister.add_argument("--json", action="store_true", help="JSON instead of a table")
    lister.set_defaults(handler=_cmd_templates_list)

    get = tcmds.add_parser("get", parents=[common], help="one template")
    get.add_argument("template_id", metavar="ID")
    get.add_argument("--json", action="store_true", help="JSON instead of a table")
    get.set_defaults(handler=_cmd_templates_get)

    delete = tcmds.add_parser("delete", parents=[common], help="delete a template and its cache")
    delete.add_argument("template_id", metavar="ID")
    delete.set_defaults(handler=_cmd_templates_delete)

    edit = commands.add_parser("edit", parents=[common], help="edit the white region of a template's mask")
    edit.add_argument("--template", required=True, metavar="ID", help="template id")
    edit.add_argument("--mask", required=True, metavar="MASK", help="mask image of the template's size; white = edit")
    edit.add_argument("--prompt", required=True, help="what the masked region should show")
    edit.add_argument("--out", required=True, metavar="OUT", help="where to write the edited image (PNG)")
    edit.add_argument("--seed", type=int, default=None, help="seed (default: the server draws one)")
    edit.add_argument("--steps", type=int, default=0, help="must be the template's steps if given")
    edit.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the template's)")
    edit.add_argument("--dilate", type=int, default=0, help="grow the edited region by this many tokens (0-8)")
    edit.add_argument("--request-id", default=None, help="idempotency id (default: a fresh one)")
    edit.set_defaults(handler=_cmd_edit)

    models = commands.add_parser("models", parents=[common], help="models this deployment serves")
    models.add_argument("--json", action="store_true", help="JSON instead of a table")
    models.set_defaults(handler=_cmd_models)

    status = commands.add_parser("status", parents=[common], help="workers and admission (asks the scheduler)")
    status.add_argument("--json", action="store_true", help="JSON instead of a table")
    status.set_defaults(handler=_cmd_status)

    from instgenie.cli_profile import add_parser as add_profile_parser

    add_profile_parser(commands)
    return parser


# -- commands ---------------------------------------------------------------------------------------------------

def _client(args):
    from instgenie.cli_config import gateway_endpoint
    from instgenie.client import Client

    endpoint = gateway_endpoint(args.address, args.api_key)
    args.endpoint = endpoint  # for the error hint if it cannot be reached
    kwargs = {"tls": args.tls}
    if args.timeout is not None:
        kwargs.update(timeout=args.timeout, edit_timeout=args.timeout, create_timeout=args.timeout)
    return Client(endpoint.address, endpoint.api_key, **kwargs)


def _input_file(path: str, what: str) -> Path:
    if not Path(path).is_file():
        raise UsageError(f"{what} {path}: no such file")
    return Path(path)


def _cmd_up(args) -> int:
    return _run_mesh(args.mesh_args)


def _run_mesh(argv: list[str]) -> int:
    # Imported here: the mesh pulls in the whole server stack, which the other commands never need.
    try:
        mesh = importlib.import_module(MESH_MODULE)
    except ModuleNotFoundError as err:
        if err.name and MESH_MODULE.startswith(err.name):
            print(f"error: `instgenie up` needs {MESH_MODULE}, which this installation does not have",
                  file=sys.stderr)
            return EXIT_ERROR
        raise
    return int(mesh.main(list(argv)) or 0)


def _cmd_templates_create(args) -> int:
    from instgenie.cli_render import RegistrationBar, stderr_console

    from instgenie.client.calls import new_request_id

    image = _input_file(args.image, "image")
    # Always an idempotency id (the SDK sends none unless given): a dropped connection is then retried
    # without the risk of registering the template twice.
    options = dict(name=args.name, steps=args.steps, seed=args.seed, guidance_scale=args.guidance,
                   cache_mode=args.mode, model=args.model, request_id=args.request_id or new_request_id())
    with _client(args) as client:
        if args.no_wait:
            operation = client.create_template(image, args.prompt, wait=False, **options)
            print(f"creating template {operation.template_id} ({operation.name})", file=sys.stderr)
            print(operation.template_id)
            return EXIT_OK
        with RegistrationBar(stderr_console(), enabled=not args.quiet) as bar:
            template = client.create_template(image, args.prompt, progress=bar, **options)
    print(template.template_id)
    return EXIT_OK


def _cmd_templates_list(args) -> int:
    from instgenie.cli_render import print_json, stdout_console, templates_table

    with _client(args) as client:
        templates = list(client.iter_templates(args.page_size))
    if args.json:
        print_json(templates)
    elif templates:
        stdout_console().print(templates_table(templates))
    else:
        print("no templates", file=sys.stderr)
    return EXIT_OK


def _cmd_templates_get(args) -> int:
    from instgenie.cli_render import print_json, stdout_console, template_details

    with _client(args) as client:
        template = client.get_template(args.template_id)
    if args.json:
        print_json(template)
    else:
        stdout_console().print(template_details(template))
    return EXIT_OK


def _cmd_templates_delete(args) -> int:
    with _client(args) as client:
        client.delete_template(args.template_id)
    print(f"deleted {args.template_id}")
    return EXIT_OK


def _cmd_edit(args) -> int:
    from instgenie.cli_render import EditBar, edit_summary, stderr_console
    from instgenie.client import Result

    mask = _input_file(args.mask, "mask")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    with _client(args) as client:
        events = client.stream_edit(args.template, mask, args.prompt, seed=args.seed, steps=args.steps,
                                    guidance_scale=args.guidance, dilate=args.dilate, request_id=args.request_id)
        result = None
        with EditBar(stderr_console(), enabled=not args.quiet) as bar:
            for event in events:
                bar(event)
                if isinstance(event, Result):
                    result = event.result
    result.save(out)
    print(edit_summary(result, out))
    return EXIT_OK


def _cmd_models(args) -> int:
    from instgenie.cli_render import models_table, print_json, stdout_console

    with _client(args) as client:
        models = client.list_models()
    if args.json:
        print_json(models)
    elif models:
        stdout_console().print(models_table(models))
    else:
        print("no models served (no workers registered?)", file=sys.stderr)
    return EXIT_OK


def _cmd_status(args) -> int:
    from instgenie.cli_config import scheduler_endpoint
    from instgenie.cli_render import print_json, stdout_console
    from instgenie.cli_status import fetch_cluster_status, status_as_dict, status_view

    endpoint = scheduler_endpoint(args.scheduler)
    args.endpoint = endpoint
    status = fetch_cluster_status(endpoint.address, args.timeout or 30.0, tls=args.tls)
    if args.json:
        print_json(status_as_dict(status))
    else:
        stdout_console().print(status_view(status))
    return EXIT_OK


# -- entry point ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the exit status (0 ok, 1 failed, 2 usage error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["up"]:
        # Everything after `up` belongs to the mesh, --help included.
        return _run_mesh(argv[1:])
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command == "up":  # after global flags (`instgenie --address A up ...`): the rest is the mesh's
            args.mesh_args = argv[argv.index("up") + 1:]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as stop:  # argparse: 2 after printing the usage error, 0 after --help
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    from instgenie.cli_config import ConfigError
    from instgenie.client import InstGenIEError

    try:
        return args.handler(args)
    except InstGenIEError as err:
        print(f"error: {err}{_reach_hint(err, args)}", file=sys.stderr)
        return EXIT_ERROR
    except UsageError as err:
        print(f"instgenie: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        # Leaving the edit stream cancelled the call, which frees the edit's batch slot on the server.
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _reach_hint(err, args) -> str:
    endpoint = getattr(args, "endpoint", None)
    if err.code != grpc.StatusCode.UNAVAILABLE or endpoint is None:
        return ""
    hint = f" (address {endpoint.address} from {endpoint.source}"
    if endpoint.source.endswith("local.json"):
        hint += "; is `instgenie up` running?"
    return hint + ")"


if __name__ == "__main__":
    sys.exit(main())
