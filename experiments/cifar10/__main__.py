"""The image experiment: train a class-conditional U-Net, then measure when it decides its class.

    python -m experiments.cifar10 train   --config tiny --dataset shapes   # train (or resume)
    python -m experiments.cifar10 analyze --checkpoint checkpoints/tiny-shapes

`train` writes checkpoints, config.json, metrics.jsonl and sample grids into its checkpoint
directory; `analyze` reads them back (jaxdiff_info.training.load_checkpoint). Bad input gets
one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from typing import Sequence

from experiments.cli import HelpFormatter, Parser

PROG = "python -m experiments.cifar10"


def main(argv: Sequence[str] | None = None) -> int:
    from experiments.cifar10 import train

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,analyze}")
    train.add_arguments(commands.add_parser(
        "train", help="train (or resume) a class-conditional U-Net", description=train.__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter))
    analyze_parser = commands.add_parser(
        "analyze", help="track P(class | x_t) along the trained model's generation", formatter_class=HelpFormatter)
    run_analyze = None
    if argv[:1] == ["analyze"]:
        # Imported only when asked for: the analysis lives in its own module.
        try:
            from experiments.cifar10.analyze import add_arguments, run_from_args
        except ImportError as e:
            print(f"{PROG} analyze: error: the analysis is not available ({e}); update this installation",
                  file=sys.stderr)
            return 2
        add_arguments(analyze_parser)
        run_analyze = run_from_args
    a = parser.parse_args(argv)

    from experiments import enable_compilation_cache

    enable_compilation_cache()
    if a.command == "train":
        return train.run_from_args(a)
    return run_analyze(a)


if __name__ == "__main__":
    sys.exit(main())
