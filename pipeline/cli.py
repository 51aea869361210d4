"""Command lines from typed dataclasses: each field's help text is the flag's documentation.

    @dataclass
    class Args:
        data: list[str] = arg(help="prepared data folders", required=True)
        steps: int = arg(100, help="optimizer steps")

`parse(Args, argv)` gives `--data`, `--steps` (underscores become hyphens; `aliases` adds more names).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Any


def arg(default: Any = dataclasses.MISSING, *, help: str, required: bool = False, choices=None,
        flag: str | None = None, aliases: tuple[str, ...] = (), metavar: str | None = None) -> Any:
    """A dataclass field that is a command-line flag. `flag` overrides the `--field-name` spelling
    (e.g. DeepSpeed's own `--deepspeed_config`); `aliases` adds other spellings."""
    meta = {"help": help, "required": required, "choices": choices, "flag": flag, "aliases": aliases,
            "metavar": metavar}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=None if default is dataclasses.MISSING else default, metadata=meta)


def _base_type(annotation) -> tuple[type, bool]:
    """(element type, is_list) from an annotation such as `int`, `list[str]`, `float | None`."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is list:
        return args[0], True
    if args and origin is not None:  # Optional[X] / X | None
        return _base_type(args[0])
    return annotation, False


def build_parser(cls, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        names = [meta.get("flag") or "--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        kind, is_list = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = not (meta.get("required") or default is None or default is False or default == [])
        help_text = meta["help"] + (f" (default: {default})" if shown else "")
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", help=help_text)
            continue
        parser.add_argument(*names, dest=f.name, type=kind, nargs="+" if is_list else None, default=default,
                            required=meta.get("required", False), choices=meta.get("choices"),
                            metavar=meta.get("metavar"), help=help_text)
    # The deepspeed launcher appends --local_rank=N to every rank's command line; the rank comes from
    # the environment (LOCAL_RANK), so the flag is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    # `deepspeed.add_config_arguments` defines --deepspeed ("enable DeepSpeed"), so commands are often written
    # `script.py --deepspeed --deepspeed_config X`. These stages always run on DeepSpeed: accepted and ignored
    # (without it argparse would call --deepspeed an ambiguous prefix of --deepspeed_config).
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    return parser


def to_dataclass(cls, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def parse(cls, argv: list[str] | None, description: str):
    return to_dataclass(cls, build_parser(cls, description).parse_args(sys.argv[1:] if argv is None else argv))


def run_main(main, stage: str) -> None:
    """A training stage's `__main__`: bad input, a file that cannot be read or written, a checkpoint that
    cannot be saved or a non-finite loss becomes one line
    `STAGE: error: ...` on stderr and exit status 2, not a traceback."""
    from pipeline.training import CheckpointError, NonFiniteLoss

    try:
        main()
    except BrokenPipeError:  # the reader of our stdout left (`... | head`): nothing went wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        sys.exit(1)
    except (ValueError, OSError, NonFiniteLoss, CheckpointError) as e:  # OSError: a file, with its path
        print(f"{stage}: error: {e}", file=sys.stderr)
        sys.exit(2)
