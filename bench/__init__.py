"""Benchmarks: ``python -m bench.<name> --json OUT``; ``bash bench/gpu_check.sh`` runs every GPU one."""


def answer_help_early(build_parser) -> None:
    """``python -m bench.<name> --help`` answers before the module's heavy imports (torch, DALI)."""
    import sys

    if {"-h", "--help"} & set(sys.argv[1:]):
        build_parser().print_help()
        raise SystemExit(0)
