"""The one command line of the project, and what every entry point does with a known error.

    python -m experts.train DATA_ROOT [--profile NAME | profile=NAME] [key=value ...] [--flags]

Every entry point (`experts.train`, `ensemble.fit`, `ensemble.evaluate`, `data_prep.*`,
`experts.cluster_split`, `experts.check_pretrained`, `experts.export_onnx`, `bench/*.py`,
`infer.py`) parses its arguments with `CommandLine` and is wrapped by `entry_point`:

* `--help` prints the command's docstring and its flags, and exits with status 0;
* a command that reads the config takes the profile as `--profile NAME` or `profile=NAME`,
  and `key=value` overrides (see `configs.load_config`), in any order, before or after its
  flags and its positional argument (the data root, for most);
* a bad argument, and every known error (`common.errors.UserError`: data layout, label file,
  config, weights, missing file, an output that cannot be written), ends the command with one
  line on stderr, `error: <message>`, and exit status 2. Any other exception is a bug: it
  keeps its traceback.

    @entry_point
    def main(argv=None) -> int:
        parser = CommandLine("python -m ensemble.fit", __doc__, positional="DATA_ROOT")
        parser.add_argument("--flag", ...)             # the command's own flags
        args = parser.parse_args(argv)
        cfg = configs.config_from(args, data_root=args.positional)   # profile + overrides -> Config

(The parser only splits the arguments; `configs.config_from` builds the config, so that this
module, below `configs`, never imports it.)
"""
from __future__ import annotations

import argparse
import functools
import re
import sys

from common.errors import UsageError, UserError

EXIT_KNOWN_ERROR = 2
# `key=value`: a config key (letters, digits, `_`, dots and the `*` of `expert.*.key`) before
# the first `=`; a path that happens to hold a `=` further on (`runs/lr=0.1`) is still a
# positional argument.
OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_.*]*=")


class CommandLine(argparse.ArgumentParser):
    """argparse with the project's conventions (see the module docstring).

    `positional` names the one positional argument of a command that reads the config
    (`DATA_ROOT`, `IMAGE_DIR`; None: it takes none); `required` says whether it must be given.
    `config=False`: a command that does not read the config (its positionals are its own
    `add_argument`s, and `--profile` / `key=value` are not accepted).

    After `parse_args`, a config command's namespace also holds `positional` (str or None),
    `profile` (None when not given), `overrides` (the `key=value` strings) and `config_argv`
    (profile and overrides as `key=value` strings, to pass on to another command).
    """

    def __init__(self, prog: str, doc: str | None, *, positional: str | None = None,
                 required: bool = True, config: bool = True):
        super().__init__(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.config, self.positional, self.positional_required = config, positional, required
        if config:
            shown = f"{positional}|key=value" if positional else "key=value"
            self.add_argument("arguments", nargs="*", metavar=shown,
                              help=(f"the {positional} and " if positional else "")
                              + "config overrides such as train.epochs=3 or profile=NAME "
                                "(the keys: configs/__init__.py), in any order")
            self.add_argument("--profile", metavar="NAME",
                              help="config profile: configs/NAME.yaml or a YAML file (the same as profile=NAME)")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        # intermixed: the positional and the key=value overrides may come before or after the flags
        parsed = self.parse_intermixed_args(args, namespace)
        if self.config:
            self._split_config_arguments(parsed)
        return parsed

    def _split_config_arguments(self, parsed: argparse.Namespace) -> None:
        tokens = parsed.__dict__.pop("arguments")
        overrides = [t for t in tokens if OVERRIDE.match(t)]
        positionals = [t for t in tokens if not OVERRIDE.match(t)]
        profiles = [o.split("=", 1)[1] for o in overrides if o.startswith("profile=")]
        overrides = [o for o in overrides if not o.startswith("profile=")]
        if parsed.profile is not None:
            profiles.insert(0, parsed.profile)
        if len(set(profiles)) > 1:
            self.error(f"two different profiles given: {profiles}")
        if len(positionals) > (1 if self.positional else 0):
            expected = f"one {self.positional}" if self.positional else "no positional argument"
            self.error(f"expected {expected}, got {positionals}")
        if self.positional and self.positional_required and not positionals:
            self.error(f"{self.positional} is missing")
        parsed.profile = profiles[0] if profiles else None
        parsed.overrides = overrides
        parsed.positional = positionals[0] if positionals else None
        parsed.config_argv = ([f"profile={parsed.profile}"] if parsed.profile else []) + overrides

    def error(self, message: str):
        """A usage error is a known error like any other: one line, exit status 2."""
        raise UsageError(f"{self.prog}: {message} (see --help)")


def entry_point(main):
    """Wrap a command's `main(argv=None) -> exit status`: a known error (`UserError`) becomes
    `error: <message>` on one line of stderr and exit status 2, also when `main` is called
    in-process; any other exception propagates with its traceback."""
    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except UserError as err:
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
            return EXIT_KNOWN_ERROR
    return run
