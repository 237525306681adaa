"""`--name=value` overrides for the plain hyperparameters at the top of a script.

Each script keeps its defaults as commented module-level names (nanoGPT style);
`resolve_config` copies them into a dict, applies the command line and checks it.
The type of each default decides how its value is parsed: `--lr=1` is a float,
`--epochs=3` an int, `--flag=true|false|1|0` a bool, anything else a string.
"""
import difflib
import math
import re
import sys
from pathlib import Path

from utils.errors import UserError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def defaults_from_module(namespace, names):
    """Return {name: namespace[name]} for the listed hyperparameter names."""
    return {name: namespace[name] for name in names}


def _parse_value(name, text, default):
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise UserError(f"--{name}={text}: expected true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise UserError(f"--{name}={text}: expected an integer") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--{name}={text}: expected a number") from None
    return text


def settings_help(defaults, source):
    """The `--help` text: the script's first docstring line, then one line per setting with its
    default and the comment beside it at the top of `source` (the script's file)."""
    try:
        text = Path(source).read_text()
    except (OSError, TypeError):
        text = ""
    comments, last = {}, None
    for line in text.splitlines():
        match = re.match(r"^([a-z_][a-z0-9_]*)\s*=[^#]*(?:#\s*(.*))?$", line)
        more = re.match(r"^\s+#\s*(.*)$", line)
        if match and match.group(1) in defaults and match.group(1) not in comments:
            last = match.group(1)
            comments[last] = (match.group(2) or "").strip()
        elif more and last:  # a comment continued on the next lines
            comments[last] += " " + more.group(1).strip()
        else:
            last = None
    doc = re.search(r'^"""(.*?)$', text, re.M)
    width = max(len(k) for k in defaults) + 2
    lines = [doc.group(1).strip().rstrip('"') if doc else "", "",
             f"usage: --name=value ... (the defaults below are set in {Path(str(source)).name}; "
             "edit them there or override them here)", ""]
    for name, value in defaults.items():
        lines.append(f"  --{name:<{width}}{value!r:<14} {comments.get(name, '')}".rstrip())
    return "\n".join(lines)


def resolve_config(defaults, argv, choices=None):
    """Apply `--name=value` arguments to a copy of `defaults`.

    defaults: {name: default value}; argv: list of strings;
    choices: optional {name: allowed values} checked after parsing.
    An unknown name, a malformed argument or a bad value raises UserError. `--help` (or -h)
    prints settings_help for the calling script and exits with status 0.
    """
    if any(arg in ("--help", "-h") for arg in argv):
        print(settings_help(defaults, sys._getframe(1).f_globals.get("__file__")))
        raise SystemExit(0)
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"argument {arg!r} is not of the form --name=value")
        name, text = arg[2:].split("=", 1)
        name = name.replace("-", "_")
        if name not in defaults:
            close = difflib.get_close_matches(name, list(defaults), n=1)
            hint = f"did you mean --{close[0]}? " if close else ""
            raise UserError(f"unknown setting --{name}; {hint}valid settings: {', '.join(sorted(defaults))}")
        config[name] = _parse_value(name, text, defaults[name])
    for name, allowed in (choices or {}).items():
        if config[name] not in allowed:
            raise UserError(f"--{name}={config[name]}: expected one of {', '.join(map(str, allowed))}")
    return config


def check_ranges(config, rules):
    """Raise UserError on the first setting outside its range.

    rules: {name: (ok, expected)}, ok(value) -> bool and `expected` the words the
    one-line error gives, e.g. {"lr": (lambda v: v > 0, "a number > 0")}. NaN and
    infinite values fail every rule.
    """
    for name, (ok, expected) in rules.items():
        value = config[name]
        if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            raise UserError(f"--{name}={config[name]}: expected {expected}")


def format_config(config):
    """Config as aligned `name = value` lines, for printing at start."""
    width = max(len(k) for k in config)
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in config.items())
