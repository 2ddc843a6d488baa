"""The commands that show what there is: ``list`` (the registered components and their
parameters, with the ranges they accept) and ``report`` (the leaderboards of a store's results)."""

from __future__ import annotations

import argparse
import dataclasses

from antipers.registry import REGISTRIES


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
                bounds = ""
                if p.range is not None:
                    note = f"; {p.range.note}" if p.range.note else ""
                    bounds = f"  ({p.range.bounds}{note})"
                print(f"      {p.name}: {p.type_name} {default}{bounds}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from antipers.report import write_report

    report = write_report(args.store, args.out, args.boards)
    print(report.summary())
    return 0
