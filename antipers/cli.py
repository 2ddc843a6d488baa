"""The ``antipers`` command: its arguments, and the dispatch to the commands in
``antipers.commands`` with one error policy (a user's mistake is one line, exit 2; a
bug keeps its traceback, exit 1)."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import os
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from antipers.cluster import ROLES
from antipers.commands.data import cmd_data_check, cmd_data_synth
from antipers.commands.listing import cmd_list, cmd_report
from antipers.commands.local import cmd_experiment, cmd_protect, cmd_score
from antipers.commands.models import cmd_train_embedder, cmd_train_mini
from antipers.commands.on_ray import cmd_demo, cmd_run, cmd_search, cmd_serve
from antipers.errors import is_user_error
from antipers.registry import REGISTRIES


def _store_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="result store: a folder or a pyarrow.fs URI")


def _device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")


def _assignments_argument(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A repeatable ``KEY=VALUE`` option (``--set``, ``--param``): see ``parse_set``."""
    p.add_argument(flag, action="append", default=[], metavar="KEY=VALUE", help=help)


def _images_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--images",
        choices=("thumbnails", "none"),
        default="thumbnails",
        help="store each experiment's sample images (2 clean, 2 protected, 4 generated "
        "PNGs of at most 128 px) beside its rows (default: thumbnails)",
    )


def _cluster_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="Ray cluster to join: auto, HOST:6379 or ray://HOST:10001 (default: start one here)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        metavar="N",
        help="experiments submitted at once (default: 3 per worker lane)",
    )
    p.add_argument(
        "--workers",
        metavar="N|ROLE=N,...",
        help=f"actors per role (roles: {', '.join(ROLES)}; default 1 each)",
    )
    p.add_argument(
        "--cpus", metavar="X|ROLE=X,...", help="CPUs each worker reserves (default 1, scoring 0.5)"
    )
    p.add_argument(
        "--gpus",
        metavar="X|ROLE=X,...",
        help="GPU share each worker reserves (default on GPU clusters: 0.4, 0.4, 0.2)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="resubmissions of an experiment whose worker died (default 2)",
    )
    p.add_argument("--device", help="worker device: auto (default), cpu, cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _images_argument(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="antipers",
        description="Evaluate privacy defenses against personalized text-to-image diffusion.",
    )
    parser.add_argument(
        "--models-dir", help="folder of local diffusers base models (sets $ANTIPERS_MODELS_DIR)"
    )
    parser.add_argument(
        "--data-dir", help="folder holding celeba-hq/, vggface2/ (sets $ANTIPERS_DATA_DIR)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="tracebacks for every error, user mistakes included (or ANTIPERS_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("experiment", help="run one experiment spec in-process and store its rows")
    p.add_argument("spec", help="experiment spec (YAML or JSON)")
    _store_argument(p)
    _assignments_argument(
        p, "--set", "override a spec field, e.g. --set attack.steps=50 (repeatable)"
    )
    _device_argument(p)
    p.add_argument("--force", action="store_true", help="run even if the store has this spec_id")
    _images_argument(p)
    p.set_defaults(func=cmd_experiment, loads_models=True)

    data = sub.add_parser("data", help="dataset folders: check, synthesize")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser(
        "check",
        help="validate a dataset folder (Anti-DreamBooth layout or per-identity photo folders)",
    )
    p.add_argument("dir")
    p.add_argument("--min-photos", type=int, default=2, help="fewest photos per set (default 2)")
    p.set_defaults(func=cmd_data_check)
    p = dsub.add_parser("synth", help="write synthetic identities in the Anti-DreamBooth layout")
    p.add_argument("--identities", type=int, required=True, help="how many people")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resolution", type=int, default=256, help="photo side in pixels (default 256)")
    p.add_argument("--photos-per-set", type=int, default=4, help="photos in each set (default 4)")
    p.add_argument("--nudge", type=float, default=0.15, help="per-photo latent variation")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_synth)

    p = sub.add_parser(
        "protect", help="protect a folder of one person's photos before publishing them"
    )
    p.add_argument("in_dir", metavar="IN_DIR", help="folder of the person's photos")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where protected PNGs and protect.json go")
    p.add_argument("--defense", required=True, help="defense name (antipers list defenses)")
    _assignments_argument(p, "--param", "defense parameter, e.g. --param eps=8 (repeatable)")
    p.add_argument(
        "--base-model",
        required=True,
        metavar="NAME|PATH",
        help="registered base model (sd21-base, ...) or a diffusers folder",
    )
    p.add_argument("--resolution", type=int, default=512, help="working size in pixels (512)")
    p.add_argument("--seed", type=int, default=0)
    _device_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=cmd_protect, loads_models=True)

    p = sub.add_parser("score", help="score a folder of generated images against reference photos")
    p.add_argument("generated", metavar="GENERATED_DIR", help="images to judge")
    p.add_argument(
        "--references", required=True, metavar="REF_DIR", help="clean photos of the person"
    )
    p.add_argument("--metrics", default="fdfr,ism", help="comma-separated (antipers list metrics)")
    p.add_argument("--backend", help="face backend for the identity metrics (offline)")
    p.add_argument("--identity", help="the person's name in the gallery (default: REF_DIR's name)")
    p.add_argument("--gallery", metavar="DIR", help="folder of identity folders (linkability)")
    p.add_argument("--protected", metavar="DIR", help="protected photos (budget metrics)")
    p.add_argument("--clean", metavar="DIR", help="their clean originals, same names order")
    p.add_argument("--resolution", type=int, default=512, help="images are resized to this")
    p.add_argument("--out", metavar="FILE.parquet", help="write the rows here")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "run", help="run a campaign on Ray workers; rerun to finish an interrupted one"
    )
    p.add_argument("campaign", metavar="CAMPAIGN.yaml", help="campaign spec (campaigns/*.yaml)")
    _store_argument(p)
    _cluster_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "search", help="a Ray Tune search over spec fields (budgets, CAP ratios) on identities"
    )
    p.add_argument("search", metavar="SEARCH.yaml", help="search spec (tune/*.yaml)")
    _store_argument(p)
    p.add_argument("--address", help="Ray cluster to join (default: start one here)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "report", help="leaderboards from a store: index.html, leaderboard.md, CSV and Parquet"
    )
    _store_argument(p)
    p.add_argument("--out", required=True, metavar="DIR", help="report folder (written atomically)")
    p.add_argument(
        "--boards", metavar="reports/boards.yaml", help="ranking and checks (default: shipped)"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="the online robustness-scoring service (Ray Serve, HTTP)")
    p.add_argument("--config", metavar="serve/scoring.yaml", help="Serve config (default: tiny)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--address", help="Ray cluster to join (default: start one here)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on Ray with the tiny model and synthetic people (minutes, CPU)",
    )
    p.add_argument("--out", default="antipers-demo", help="result store (default antipers-demo/)")
    _cluster_arguments(p)
    p.set_defaults(func=cmd_demo)

    models = sub.add_parser(
        "models", help="antipers' own models: train mini-faces and its face embedder"
    )
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = msub.add_parser(
        "train-mini",
        help="train mini-faces (the shipped weights, by default settings); resumes from DIR/work",
    )
    p.add_argument("--out", required=True, help="writes DIR/mini-faces and DIR/work (checkpoints)")
    _device_argument(p)
    p.add_argument("--seed", type=int, help="default 0 (the shipped weights)")
    p.add_argument("--pool", type=int, help="training faces (default 24576)")
    p.add_argument("--vae-steps", type=int, help="VAE optimizer steps (default 1000)")
    p.add_argument("--unet-steps", type=int, help="UNet optimizer steps (default 3200)")
    p.set_defaults(func=cmd_train_mini, loads_models=True)
    p = msub.add_parser(
        "train-embedder",
        help="train mini-faces-embedder, the face embedder IDDM optimizes against on "
        "mini-faces (the shipped weights, by default settings); resumes from DIR/work-embedder",
    )
    p.add_argument(
        "--out", required=True, help="writes DIR/mini-faces-embedder and DIR/work-embedder"
    )
    _device_argument(p)
    p.add_argument("--seed", type=int, help="default 0 (the shipped weights)")
    p.add_argument("--people", type=int, help="synthetic people to tell apart (default 2048)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 2000)")
    p.set_defaults(func=cmd_train_embedder)

    p = sub.add_parser("list", help="registered components with their parameters and defaults")
    p.add_argument("kind", nargs="?", choices=list(REGISTRIES), help="one kind only")
    p.set_defaults(func=cmd_list)
    return parser


def _import_model_stack() -> None:
    """Import torch's, diffusers' and transformers' model classes with the collector
    paused, then freeze what they made. The ~600k objects they create trigger about
    nine full collections as the heap grows, 1-1.5 s of a command's start-up on 2 CPU
    cores; frozen, they are not scanned by the collections training triggers either."""
    import gc

    from antipers.models.local import folder_classes

    gc.disable()
    try:
        folder_classes()
    finally:
        gc.freeze()
        gc.enable()


def main(argv: Sequence[str] | None = None, *, fast_start: bool = False) -> int:
    """``fast_start`` (the console script's): a command that loads models imports them
    first with the collector paused (``_import_model_stack``), so a mistake in its
    arguments that only the command finds is reported after the imports; a test's
    process is left as it is."""
    import logging

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # bitsandbytes (pulled in by peft) warns at import about an optional CPU kernel
    # package; it has no bearing on antipers, which never quantizes.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.models_dir:
        os.environ["ANTIPERS_MODELS_DIR"] = str(Path(args.models_dir).expanduser().absolute())
    if args.data_dir:
        os.environ["ANTIPERS_DATA_DIR"] = str(Path(args.data_dir).expanduser().absolute())
    debug = args.debug or os.environ.get("ANTIPERS_DEBUG", "") not in ("", "0")
    try:
        if fast_start and getattr(args, "loads_models", False):
            _import_model_stack()
        return args.func(args)
    except KeyboardInterrupt:
        # every finished experiment is already stored; a rerun does the rest
        print(
            "interrupted: finished work is stored; run the same command to go on", file=sys.stderr
        )
        return 130
    except Exception as exc:
        user = is_user_error(exc)
        if debug or not user:
            traceback.print_exc()
        if not user:
            print("antipers: internal error (a bug): please report the traceback", file=sys.stderr)
            return 1
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _needs_normal_exit() -> bool:
    """A thread that is not a daemon still runs (Python's exit waits for it), a profiler
    writes its results after the command returns, or the user asked."""
    others = (t for t in threading.enumerate() if t is not threading.main_thread())
    return (
        any(t.is_alive() and not t.daemon for t in others)
        or sys.getprofile() is not None
        or os.environ.get("ANTIPERS_NORMAL_EXIT", "") not in ("", "0")
    )


def _flush_everything(code: int) -> int:
    """Python's streams, then C's (a native library's output buffered in stdio); a
    stream that cannot take its last bytes fails a successful exit, as CPython's own
    exit does (status 120)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with the descriptor closed
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120
    # Windows: CDLL(None) names no C library (TypeError)
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).fflush(None)
    return code


def console_main() -> NoReturn:
    """The console script: ``main``, then an exit that skips the interpreter's teardown.

    Tearing down the modules torch, diffusers and transformers import takes about 1.5 s
    on 2 CPU cores, at every command, after its work is written (measured on a
    ``protect`` of 38 s). What must happen at exit still does: the ``atexit`` handlers
    (``ray.shutdown``, temporary folders' finalizers, logging's flush) run, once (running
    them clears them), and the streams are flushed. ``_needs_normal_exit`` lists when
    Python's own exit is taken instead (``ANTIPERS_NORMAL_EXIT=1`` forces it).
    """
    code = main(fast_start=True)
    if _needs_normal_exit():
        sys.exit(code)
    atexit._run_exitfuncs()
    os._exit(_flush_everything(code))


if __name__ == "__main__":
    console_main()
