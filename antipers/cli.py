"""The ``antipers`` command."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from antipers.errors import UserError, is_user_error
from antipers.registry import REGISTRIES


class CLIError(UserError):
    """A user mistake: printed as ``error: ...`` with exit status 2."""


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    from antipers.spec import non_string_key

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--set {item!r}: expected KEY=VALUE, e.g. --set defense.eps=6")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise CLIError(f"--set {item!r}: cannot parse the value ({exc})") from None
        bad = non_string_key(out[key], ())
        if bad is not None:
            raise CLIError(f"--set {item!r}: key {bad[1]!r} is not a name; keys are strings")
    return out


def _print_rows(rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    if (df["status"] == "error").any():
        print(f"FAILED {rows[0]['spec_id']}:\n{rows[0]['error']}")
        return
    agg = df[df["image_index"] == -1]
    cols = ["spec_id", "identity", "defense", "attack", "metric", "value", "backend"]
    print(agg[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"({len(df)} rows: {len(agg)} aggregates + per-image values)")


def cmd_experiment(args: argparse.Namespace) -> int:
    from antipers.pipeline import RunContext, run_and_store
    from antipers.results import ResultStore
    from antipers.spec import load_spec

    spec = load_spec(args.spec)
    if args.set:
        spec = spec.override(_parse_set(args.set))
    print(f"experiment {spec.spec_id}: {spec.describe()}", file=sys.stderr)
    store = ResultStore(args.store)
    context = RunContext(device=_device(args.device))
    rows, ran = run_and_store(
        spec,
        store,
        context,
        force=args.force,
        progress=lambda stage: print(f"  [{spec.spec_id}] {stage}", file=sys.stderr),
        images=args.images == "thumbnails",
    )
    if not ran:
        print(
            f"already in {args.store}: {spec.spec_id} (use --force to run again)", file=sys.stderr
        )
    _print_rows(rows)
    return 1 if any(r["status"] == "error" for r in rows) else 0


def _device(name: str | None) -> Any:
    from antipers.device import pick_device

    try:
        return pick_device(name)
    except RuntimeError as exc:
        raise CLIError(str(exc)) from None


def cmd_data_check(args: argparse.Namespace) -> int:
    from antipers.data.folders import open_folder
    from antipers.data.identity import DatasetError

    try:
        dataset = open_folder(args.dir, args.min_photos)
    except DatasetError as exc:
        print("\n".join(exc.problems))
        return 1
    problems = dataset.check()
    layout = type(dataset).__name__
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s) ({layout}):")
        print("\n".join(f"  {p}" for p in problems))
        return 1
    identities = dataset.identities()
    print(f"{args.dir}: ok ({layout}), {len(identities)} identities")
    for identity in identities:
        counts = {k: len(v) for k, v in dataset.photo_sets(identity).items()}
        print(f"  {identity}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from antipers.data.synthetic import SyntheticDataset, face_generator
    from antipers.images import write_png

    if args.identities < 1:
        raise CLIError(f"--identities: expected a positive number, got {args.identities}")
    if args.resolution < 8:
        raise CLIError(f"--resolution: expected at least 8 pixels, got {args.resolution}")
    if args.photos_per_set < 1:
        raise CLIError(f"--photos-per-set: expected at least 1, got {args.photos_per_set}")
    try:
        dataset = SyntheticDataset(args.identities, args.photos_per_set, args.nudge, args.seed)
    except ValueError as exc:  # the dataset's own checks, named by their flags
        flags = {"n_identities": "--identities", "nudge": "--nudge", "seed": "--seed"}
        message = str(exc)
        for field, flag in flags.items():
            message = message.replace(f"synthetic.{field}", flag)
        raise CLIError(message) from None
    face_generator()  # the synth extra, checked before any folder is written
    out = Path(args.out)
    for identity in dataset.identities():
        photos = dataset.load(identity, args.resolution)
        for name, images in [
            ("set_A", photos.set_A),
            ("set_B", photos.set_B),
            ("set_C", photos.set_C),
        ]:
            write_png(images, [out / identity / name / f"{i:02d}.png" for i in range(len(images))])
        print(f"  {out / identity}", file=sys.stderr)
    print(f"wrote {args.identities} synthetic identities to {out}")
    return 0


def cmd_protect(args: argparse.Namespace) -> int:
    import logging

    from antipers.protect import ProtectError, plan, protect_folder

    if args.resolution < 8 or args.resolution % 8:
        raise CLIError(f"--resolution: expected a positive multiple of 8, got {args.resolution}")
    try:
        params = _parse_set(args.param)
    except CLIError as exc:
        raise CLIError(str(exc).replace("--set", "--param")) from None
    try:
        p = plan(
            Path(args.in_dir),
            Path(args.out_dir),
            args.defense,
            params,
            args.base_model,
            args.overwrite,
        )
    except ProtectError as exc:
        raise CLIError(str(exc)) from None
    device = _device(args.device)
    for name in ("antipers.defenses", "antipers.protect"):  # progress on stderr
        logging.getLogger(name).setLevel(logging.INFO)
    print(
        f"protecting {len(p.photos)} photos from {args.in_dir} with {p.defense.name}",
        file=sys.stderr,
    )
    report = protect_folder(p, Path(args.out_dir), args.resolution, args.seed, device)
    for photo in report["photos"]:
        print(
            f"  {Path(photo['output']).name}: L-inf {photo['linf_255']:.0f}/255, "
            f"PSNR {photo['psnr_db']:.2f} dB, SSIM {photo['ssim']:.4f}"
        )
    print(f"wrote {len(report['photos'])} protected photos and protect.json to {args.out_dir}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from antipers.score import ScoreError, ScoreJob, parse_metrics, run_score, write_rows

    if args.resolution < 8:
        raise CLIError(f"--resolution: expected at least 8, got {args.resolution}")
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    optional = {
        k: Path(getattr(args, k)) if getattr(args, k) else None
        for k in ("gallery", "protected", "clean")
    }
    try:
        job = ScoreJob(
            generated=Path(args.generated),
            references=Path(args.references),
            metrics=parse_metrics(names, args.backend),
            resolution=args.resolution,
            identity=args.identity or "",
            **optional,
        )
        rows = run_score(job)
    except ScoreError as exc:
        raise CLIError(str(exc)) from None
    import pandas as pd

    df = pd.DataFrame(rows)
    agg = df[df["image_index"] == -1]
    cols = ["metric", "value", "unit", "backend", "status"]
    print(agg[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for _, row in agg[agg["status"] != "ok"].iterrows():
        print(f"{row['metric']}: {row['status']}: {row['error']}", file=sys.stderr)
    if args.out:
        print(f"wrote {len(rows)} rows to {write_rows(rows, Path(args.out))}")
    return 0


def _per_role(text: str | None, flag: str, whole: bool = False) -> dict[str, float] | None:
    """``2`` (every role) or ``attack=2,scoring=0.5`` -> {role: value}."""
    from antipers.cluster import ROLES

    if not text:
        return None
    out: dict[str, float] = {}
    for item in text.split(","):
        role, sep, value = item.rpartition("=")
        roles = [role.strip()] if sep else list(ROLES)
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise CLIError(f"{flag} {text!r}: unknown role {bad[0]!r}; roles: {', '.join(ROLES)}")
        try:
            number = float(value)
        except ValueError:
            raise CLIError(f"{flag} {text!r}: {value!r} is not a number") from None
        if number < 0 or (whole and (number < 1 or number != int(number))):
            kind = "a whole number >= 1" if whole else "a number >= 0"
            raise CLIError(f"{flag} {text!r}: expected {kind}, got {value!r}")
        out.update(dict.fromkeys(roles, number))
    return out


def _run_options(args: argparse.Namespace) -> Any:
    from antipers.cluster.commands import RunOptions

    if args.max_in_flight is not None and args.max_in_flight < 1:
        raise CLIError(f"--max-in-flight: expected >= 1, got {args.max_in_flight}")
    if args.retries < 0:
        raise CLIError(f"--retries: expected >= 0, got {args.retries}")
    if args.device and args.device != "auto":
        import torch

        try:  # the workers pick the device; only the name can be checked here
            torch.device(args.device)
        except RuntimeError:
            raise CLIError(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None
    return RunOptions(
        address=args.address,
        max_in_flight=args.max_in_flight,
        retries=args.retries,
        workers=_per_role(args.workers, "--workers", whole=True),
        cpus=_per_role(args.cpus, "--cpus"),
        gpus=_per_role(args.gpus, "--gpus"),
        device=args.device,
        progress=not args.no_progress,
        images=args.images == "thumbnails",
    )


def _cluster_call(fn: Any, *a: Any) -> Any:
    from antipers.cluster.runtime import ClusterError

    try:
        return fn(*a)
    except ClusterError as exc:
        raise CLIError(str(exc)) from None


def cmd_run(args: argparse.Namespace) -> int:
    from antipers.campaign import load_campaign
    from antipers.cluster.commands import print_report, run
    from antipers.results import ResultStore

    campaign = load_campaign(args.campaign)  # every check before Ray starts
    options = _run_options(args)
    store = ResultStore(args.store)
    report = _cluster_call(run, campaign, store, options)
    print_report(report, store, campaign)
    return 0 if report.failed == 0 else 1


def cmd_search(args: argparse.Namespace) -> int:
    from antipers.cluster.commands import search
    from antipers.results import ResultStore
    from antipers.search import load_search

    spec = load_search(args.search)  # every check before Ray starts
    return _cluster_call(search, spec, ResultStore(args.store), args.address, args.resume)


def cmd_serve(args: argparse.Namespace) -> int:
    from antipers.cluster.commands import serve_forever

    if args.port is not None and not 1 <= args.port <= 65535:
        raise CLIError(f"--port: expected 1..65535, got {args.port}")
    return _cluster_call(serve_forever, args.config, args.host, args.port, args.address)


def cmd_demo(args: argparse.Namespace) -> int:
    from antipers.cluster.commands import demo

    report = _cluster_call(demo, args.out, _run_options(args))
    return 0 if report.failed == 0 else 1


def _train_config(cls: Any, args: argparse.Namespace, names: tuple[str, ...]) -> Any:
    """The defaults, with the options the user gave; a bad value is a CLI error."""
    try:
        return cls(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def cmd_train_mini(args: argparse.Namespace) -> int:
    from antipers.models.train_mini import MiniTrainConfig, train_mini

    config = _train_config(MiniTrainConfig, args, ("seed", "pool", "vae_steps", "unet_steps"))
    folder = train_mini(Path(args.out), config, _device(args.device))
    print(f"wrote {folder} (checkpoints and loss log in {Path(args.out) / 'work'})")
    return 0


def cmd_train_embedder(args: argparse.Namespace) -> int:
    from antipers.models.train_embedder import EmbedderTrainConfig, train_embedder

    config = _train_config(EmbedderTrainConfig, args, ("seed", "people", "steps"))
    folder = train_embedder(Path(args.out), config, _device(args.device))
    print(f"wrote {folder} (checkpoints and loss log in {Path(args.out) / 'work-embedder'})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from antipers.report import write_report

    report = write_report(args.store, args.out, args.boards)
    print(report.summary())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(REGISTRIES)
    for kind in kinds:
        registry = REGISTRIES[kind]
        print(f"{kind}:")
        for name in registry.names():
            cls = registry.get(name)
            doc = (cls.__doc__ or "").strip().split("\n")[0]
            print(f"  {name:<14} {doc}")
            for p in registry.params(name):
                default = "(required)" if p.default is dataclasses.MISSING else f"= {p.default!r}"
                print(f"      {p.name}: {p.type_name} {default}")
    return 0


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
        help="actors per role (roles: defense, attack, scoring; default 1 each)",
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
    p.add_argument("--store", required=True, help="result store: a folder or a pyarrow.fs URI")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set attack.steps=50 (repeatable)",
    )
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--force", action="store_true", help="run even if the store has this spec_id")
    _images_argument(p)
    p.set_defaults(func=cmd_experiment)

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
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="defense parameter, e.g. --param eps=8 (repeatable)",
    )
    p.add_argument(
        "--base-model",
        required=True,
        metavar="NAME|PATH",
        help="registered base model (sd21-base, ...) or a diffusers folder",
    )
    p.add_argument("--resolution", type=int, default=512, help="working size in pixels (512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=cmd_protect)

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
    p.add_argument("--store", required=True, help="result store: a folder or a pyarrow.fs URI")
    _cluster_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "search", help="a Ray Tune search over spec fields (budgets, CAP ratios) on identities"
    )
    p.add_argument("search", metavar="SEARCH.yaml", help="search spec (tune/*.yaml)")
    p.add_argument("--store", required=True, help="result store: a folder or a pyarrow.fs URI")
    p.add_argument("--address", help="Ray cluster to join (default: start one here)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "report", help="leaderboards from a store: index.html, leaderboard.md, CSV and Parquet"
    )
    p.add_argument("--store", required=True, help="result store: a folder or a pyarrow.fs URI")
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
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, help="default 0 (the shipped weights)")
    p.add_argument("--pool", type=int, help="training faces (default 24576)")
    p.add_argument("--vae-steps", type=int, help="VAE optimizer steps (default 1000)")
    p.add_argument("--unet-steps", type=int, help="UNet optimizer steps (default 3200)")
    p.set_defaults(func=cmd_train_mini)
    p = msub.add_parser(
        "train-embedder",
        help="train mini-faces-embedder, the face embedder IDDM optimizes against on "
        "mini-faces (the shipped weights, by default settings); resumes from DIR/work-embedder",
    )
    p.add_argument(
        "--out", required=True, help="writes DIR/mini-faces-embedder and DIR/work-embedder"
    )
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, help="default 0 (the shipped weights)")
    p.add_argument("--people", type=int, help="synthetic people to tell apart (default 2048)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 2000)")
    p.set_defaults(func=cmd_train_embedder)

    p = sub.add_parser("list", help="registered components with their parameters and defaults")
    p.add_argument("kind", nargs="?", choices=list(REGISTRIES), help="one kind only")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
