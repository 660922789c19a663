"""`dpbench` command line: list, run, reproduce, report, compare, train, bench, prepare.

Exit codes: 0 success, 1 a notebook failed, 2 bad input (`UserError`, one line on stderr,
nothing in results/ changed).
"""

from __future__ import annotations

import argparse
import os
import sys

from dpbench.errors import EXIT_USER_ERROR, UserError
from dpbench.workbench import params, runner, scheduling

EXIT_FAILED = 1


class _Parser(argparse.ArgumentParser):
    """argparse, but usage mistakes are UserErrors so they print as one line."""

    def error(self, message: str):  # noqa: D102 - argparse API
        raise UserError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser. `bench` is listed here but parsed by dpbench.training.bench itself, so
    building this parser never imports torch."""
    parser = _Parser(prog="dpbench", description="Run, cache and report the dpbench notebooks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    sub.add_parser("list", help="notebooks, their profiles and the last run's status")

    run = sub.add_parser("run", help="run one notebook (and any missing upstream)")
    run.add_argument("notebook", help="notebook name as in notebooks/ (NN_name, without .ipynb)")
    _profile(run)
    run.add_argument(
        "-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
        help="override a parameter; VALUE is parsed as YAML (numbers, true/false, [lists])",
    )
    run.add_argument("--force", action="store_true", help="rerun even if an identical ok run exists")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--dry-run", action="store_true",
                     help="run the profile's code path at toy size on the CPU (stand-in data, random weights) "
                          "into results/dryrun/; lists what the CPU cannot exercise")
    _download(run)

    rep = sub.add_parser("reproduce", help="run every notebook of a profile, in dependency order")
    _profile(rep)
    rep.add_argument("--force", action="store_true", help="rerun even cached notebooks")
    rep.add_argument("--no-progress", action="store_true", help="no progress bars")
    _download(rep)
    rep.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="run up to N notebooks at once (isolated kernels; timing notebooks run alone)")

    report = sub.add_parser("report", help="write results/<profile>/report.html: our numbers beside the papers'")
    _profile(report)
    report.add_argument("--summary", action="store_true",
                        help="after the report's path, print the summary table (claims, ours, verdicts)")
    report.add_argument("-o", "--output", help="write the HTML here instead of results/<profile>/report.html")
    report.add_argument("--references", help="paper values CSV (default references/paper_values.csv)")

    compare = sub.add_parser("compare", help="metric differences between two results folders, with a plot")
    from dpbench.workbench.compare import add_cli_arguments as _compare_arguments

    _compare_arguments(compare)

    train = sub.add_parser("train", help="data-parallel DP training from a YAML config (torchrun underneath)")
    from dpbench.workbench.launch import add_cli_arguments as _train_arguments  # stdlib-only module

    _train_arguments(train)

    sub.add_parser("bench", help="speed and memory benchmark (see `dpbench bench --help`)", add_help=False)

    prep = sub.add_parser("prepare", help="download and verify the data sets and pretrained weights a profile needs")
    from dpbench.workbench.prepare import add_cli_arguments as _prepare_arguments  # argparse only at import

    _prepare_arguments(prep)
    return parser


def _download(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--download", action="store_true",
                        help="fetch missing torchvision data sets into the data root (needs network; "
                             "same as DPBENCH_DOWNLOAD=1)")


def _profile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True,
                        help="smoke, cpu, gpu, or gpu-quick (~6 min on one GPU: notebook 01's bench and crossover only)")


def _bench(argv: list[str]) -> int:
    """Hand `dpbench bench ...` to dpbench.training.bench, imported only now (it needs torch)."""
    try:
        from dpbench.training import bench
    except ModuleNotFoundError as exc:
        if exc.name == "dpbench.training.bench":
            raise UserError("`dpbench bench` is not available: dpbench/training/bench.py is missing from this installation") from None
        raise
    parser = _Parser(prog="dpbench bench", description="Speed and memory of the clipping methods.")
    bench.add_cli_arguments(parser)
    return int(bench.cli(parser.parse_args(argv)) or 0)


def _list() -> int:
    r = runner.Runner()
    names = params.list_notebooks(r.repo)
    if not names:
        print(f"no notebooks in {r.repo / 'notebooks'}")
        return 0
    width = max(len(n) for n in names)
    # smoke, cpu and gpu always; an optional profile (gpu-quick) only where some notebook has it
    shown = [p for p in params.PROFILES
             if p in ("smoke", "cpu", "gpu") or any(p in params.list_profiles(r.repo, nb) for nb in names)]
    print(f"{'notebook':<{width}}  " + "  ".join(f"{p:<24}" for p in shown))
    for nb in names:
        have = params.list_profiles(r.repo, nb)
        cells = [(r.status(p, nb) if p in have else "(no params)") for p in shown]
        print(f"{nb:<{width}}  " + "  ".join(f"{c:<24}" for c in cells))
    print(f"results: {r.results}")
    return 0


def _finish(results) -> int:
    print(scheduling.failure_summary(results), file=sys.stderr)
    return 0 if all(r.ok for r in results) else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 a notebook failed, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return _bench(argv[1:])
        args = build_parser().parse_args(argv)
        if getattr(args, "download", False):
            os.environ["DPBENCH_DOWNLOAD"] = "1"  # seen by the pre-flight check and by every kernel
        if args.command == "list":
            return _list()
        if args.command == "run" and args.dry_run:
            from dpbench.workbench import dryrun

            if args.param:
                raise UserError("--dry-run takes no -p overrides: it derives its parameters from the profile "
                                f"(add params/{args.notebook}/{args.profile}-dryrun.yaml to change them)")
            return _finish(dryrun.run([args.notebook], args.profile, progress=not args.no_progress))
        if args.command == "prepare":
            from dpbench.workbench import prepare

            return prepare.cli(args)
        if args.command == "run":
            return _finish(scheduling.run_notebook(args.notebook, args.profile, args.param, force=args.force,
                                               progress=not args.no_progress))
        if args.command == "reproduce":
            return _finish(scheduling.reproduce(args.profile, force=args.force, progress=not args.no_progress,
                                            jobs=args.jobs))
        if args.command == "train":
            from dpbench.workbench import launch

            return launch.cli(args)
        if args.command == "report":
            from dpbench.workbench import report

            rep = report.build(args.profile, references=args.references)
            path = report.write(rep, args.output)
            print(path)
            if args.summary:
                print()
                print(report.text_summary(rep))
                print(f"report: {path}")
            return 0
        if args.command == "compare":
            from dpbench.workbench import compare

            return compare.cli(args)
        raise UserError(f"unknown command {args.command!r}")  # unreachable: argparse checks it
    except SystemExit as exc:  # argparse's --help; keep main() returning an int
        return exc.code if isinstance(exc.code, int) else 0
    except UserError as exc:
        msg = " ".join(str(exc).split())  # always one line
        print(f"dpbench: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
