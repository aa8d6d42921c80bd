"""Run `textseg label` from a YAML file whose keys are the long option names.

A cluster runs it as:  ray job submit --working-dir . -- python jobs/label.py --config jobs/example.yaml
Flags given on the command line override the file's values.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from textseg.cli import (
    EXIT_INTERRUPTED,
    EXIT_JOB_ERROR,
    DefaultsHelpFormatter,
    add_label_arguments,
    interrupted_sentence,
    run_label,
)
from textseg.config import ConfigError, from_yaml_file


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--config", required=True, help="job YAML; keys are `textseg label`'s long options")
    add_label_arguments(parser, positional=False)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    try:
        return run_label(from_yaml_file(args.config, overrides))
    except (ConfigError, ValueError, RuntimeError, OSError) as err:
        print(f"textseg: {err}", file=sys.stderr)
        return EXIT_JOB_ERROR
    except KeyboardInterrupt as err:
        print(f"textseg: {interrupted_sentence(err)}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
