"""Strict loading of .config files, defconfigs, fragments and command-line assignments.

kconfiglib, like the kernel's C tools, only warns about a bad assignment and
carries on with the default. Here every assignment must take effect exactly
as written, or the command stops with one line

    FILE:LINE: SYMBOL: what is wrong (valid: ...)

The lines are parsed here only to locate and check them. The values are
loaded with kconfiglib's own API (load_config, set_value), and afterwards
every assignment is compared with the value kconfiglib ended up with, which
catches the silent fallbacks (unmet dependencies, invisible symbols, choices
won by another member, out-of-range integers).
"""

import difflib
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

import kconfiglib
from kconfiglib import AND, BOOL, HEX, INT, STRING, TRISTATE, expr_str, expr_value, split_expr

from . import schema


class ConfigError(Exception):
    """A user error, shown as one line: WHERE:LINE: SYMBOL: problem (valid: ...)."""

    def __init__(self, where, problem, symbol=None, line=None, valid=None):
        self.where, self.problem, self.symbol, self.line, self.valid = where, problem, symbol, line, valid
        super().__init__(str(self))

    def __str__(self):
        head = self.where if self.line is None else "{}:{}".format(self.where, self.line)
        if self.symbol:
            head += ": " + self.symbol
        tail = " (valid: {})".format(self.valid) if self.valid else ""
        return "{}: {}{}".format(head, self.problem, tail)


# --------------------------------------------------------------------------
# Kconfig


@contextmanager
def _environment(**changes):
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def open_kconfig(srctree=None):
    """Parse the Kconfig tree rooted at srctree/Kconfig (default: the current folder)."""
    srctree = os.path.abspath(srctree or os.getcwd())
    # kconfiglib reads these at construction: srctree makes every `source`
    # relative to our tree, and a stray CONFIG_ would change the prefix of
    # every line of .config.
    with _environment(srctree=srctree, CONFIG_=None, KCONFIG_CONFIG_HEADER=None):
        try:
            return kconfiglib.Kconfig("Kconfig", warn_to_stderr=False)
        except kconfiglib.KconfigError as e:
            message = " ".join(str(e).split())
            raise ConfigError(os.path.join(srctree, "Kconfig"), message) from None
        except OSError as e:
            raise ConfigError(e.filename or "Kconfig", e.strerror or str(e)) from None


def _type_name(sym):
    return kconfiglib.TYPE_TO_STR[sym.orig_type]


def _describe_valid(sym):
    """What values the symbol accepts, for error messages."""
    t = sym.orig_type
    if t is BOOL:
        return "y or n"
    if t is TRISTATE:
        return "y, m or n"
    if t in (INT, HEX):
        kind = "an integer" if t is INT else "a hexadecimal number such as 0x1f"
        for low, high, cond in sym.ranges:
            if expr_value(cond):
                return "{} in [{}, {}]".format(kind, low.str_value, high.str_value)
        return kind
    if sym.name in schema.FLOAT_RANGES:
        return 'a quoted decimal number in {}, e.g. "{}"'.format(
            schema.FLOAT_RANGES[sym.name], _example_float(sym.name))
    if sym.name in schema.STEP_LISTS:
        return 'a quoted list of comma-separated steps >= 1, e.g. "100,250"'
    if sym.name in schema.MODULE_PATHS:
        return 'a quoted dotted parameter-name prefix, e.g. "transformer.h.1.attn"'
    return 'a double-quoted string with \\ and " escaped as \\\\ and \\"'


def _example_float(name):
    interval = schema.FLOAT_RANGES[name]
    return schema.format_number(interval.high / 2 if interval.high_open else interval.high)


# --------------------------------------------------------------------------
# Lines of a configuration file


@dataclass(frozen=True)
class Line:
    """One assignment line: CONFIG_NAME=text, or '# CONFIG_NAME is not set' (text None)."""

    number: int
    name: str
    text: object  # str, or None for "is not set"


# The same patterns kconfiglib uses to recognise assignments (re.match, so a
# prefix match); a line they match must be exactly right or it is refused.
_SET_RE = re.compile(r"CONFIG_([^=]+)=(.*)")
_UNSET_RE = re.compile(r"# CONFIG_([^ ]+) is not set")
_STRING_RE = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPE_RE = re.compile(r"\\(.)")
_INT_RE = re.compile(r"-?[0-9]+")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]+")

_LINE_FORMS = "CONFIG_NAME=value, '# CONFIG_NAME is not set', a # comment or a blank line"


def read_lines(path, where=None):
    """The assignment lines of a .config-format file (comments and blanks skipped)."""
    where = where or path
    try:
        # Universal newlines and rstrip(), as kconfiglib reads the file
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(where, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(where, "is a folder, not a configuration file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(where, "not UTF-8 text (byte {} at offset {})".format(
            hex(e.object[e.start]), e.start)) from None
    except OSError as e:
        raise ConfigError(where, e.strerror or str(e)) from None

    lines = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip()
        m = _SET_RE.match(line)
        if m:
            lines.append(Line(number, m.group(1), m.group(2)))
            continue
        m = _UNSET_RE.match(line)
        if m:
            if m.end() != len(line):
                raise ConfigError(where, "text after 'is not set': {!r}".format(line), m.group(1),
                                  number, "# CONFIG_{} is not set".format(m.group(1)))
            lines.append(Line(number, m.group(1), None))
            continue
        if line and not line.lstrip().startswith("#"):
            raise ConfigError(where, "malformed line {!r}".format(line), line=number, valid=_LINE_FORMS)
    return lines


# --------------------------------------------------------------------------
# Typed assignments


@dataclass(frozen=True)
class Assignment:
    where: str  # file (or "<setconfig>") shown in messages
    line: int  # line number, or argument number for the command line
    name: str
    value: str  # as given to kconfiglib: "y"/"n", integer text, or the unescaped string


def _unknown_symbol(kconf, where, line, name):
    names = [s.name for s in kconf.unique_defined_syms]
    close = difflib.get_close_matches(name, names, n=1)
    hint = "did you mean {}?".format(close[0]) if close else "a symbol defined in the Kconfig files"
    return ConfigError(where, "unknown symbol", name, line, hint)


def _unescape_checked(body, where, line, name, sym):
    # kconfiglib turns any "\x" into "x"; only \\ and \" are escapes in .config,
    # so anything else is a typo that would silently lose the backslash.
    for m in _ESCAPE_RE.finditer(body):
        if m.group(1) not in '\\"':
            raise ConfigError(where, "unknown escape {} in the string".format(m.group(0)), name, line,
                              _describe_valid(sym))
    return kconfiglib.unescape(body)


def typed_assignment(kconf, where, line, name, text, from_command_line=False):
    """Check one assignment against the symbol's type; text None means 'is not set'."""
    sym = kconf.syms.get(name)
    if sym is None or not sym.nodes:
        raise _unknown_symbol(kconf, where, line, name)
    t = sym.orig_type

    if text is None:
        if t not in (BOOL, TRISTATE):
            raise ConfigError(where, "'is not set' only applies to bool symbols, not to {} symbols".format(
                _type_name(sym)), name, line, _describe_valid(sym))
        return Assignment(where, line, name, "n")

    if t is BOOL and text not in ("y", "n") or t is TRISTATE and text not in ("y", "m", "n"):
        raise ConfigError(where, "{!r} is not a {} value".format(text, _type_name(sym)), name, line,
                          _describe_valid(sym))
    if t is INT and not _INT_RE.fullmatch(text):
        raise ConfigError(where, "{!r} is not an integer".format(text), name, line, _describe_valid(sym))
    if t is HEX and not _HEX_RE.fullmatch(text):
        raise ConfigError(where, "{!r} is not a hexadecimal number".format(text), name, line,
                          _describe_valid(sym))

    value = text
    if t is STRING:
        m = _STRING_RE.fullmatch(text)
        if m:
            value = _unescape_checked(m.group(1), where, line, name, sym)
        elif from_command_line:
            # setconfig takes strings with or without quotes: text that is not
            # one complete quoted literal is the value itself, quotes and all
            value = text
        else:
            raise ConfigError(where, "{!r} is not a properly quoted string".format(text), name, line,
                              _describe_valid(sym))
        if "\n" in value or "\r" in value:
            raise ConfigError(where, "a string cannot hold a line break: .config has no way to store one",
                              name, line, "text on one line")
        try:
            schema.string_value(name, value)
        except ValueError as e:
            raise ConfigError(where, e.args[0], name, line, e.args[1]) from None
    return Assignment(where, line, name, value)


@dataclass
class Layer:
    """One source of assignments, applied on top of the previous layers."""

    where: str
    path: object  # the file kconfiglib loads, or None for command-line assignments
    assignments: list


def read_layer(kconf, path, where=None):
    """A configuration file (a .config, a defconfig or a fragment), checked line by line."""
    where = where or path
    assignments, first_line = [], {}
    for ln in read_lines(path, where):
        a = typed_assignment(kconf, where, ln.number, ln.name, ln.text)
        if a.name in first_line:
            raise ConfigError(where, "assigned twice in this file (first on line {})".format(first_line[a.name]),
                              a.name, a.line, "one assignment per symbol")
        first_line[a.name] = a.line
        assignments.append(a)
    return Layer(where, path, assignments)


def command_line_layer(kconf, args, where="<setconfig>"):
    """NAME=VALUE arguments (CONFIG_ prefix optional; strings with or without quotes)."""
    assignments, first_arg = [], {}
    for number, arg in enumerate(args, 1):
        name, sep, text = arg.partition("=")
        if not sep or not name:
            raise ConfigError(where, "{!r} is not an assignment".format(arg), line=number,
                              valid="NAME=VALUE, e.g. SPAM_INTERVAL=500")
        if name.startswith("CONFIG_"):
            name = name[len("CONFIG_"):]
        a = typed_assignment(kconf, where, number, name, text, from_command_line=True)
        if a.name in first_arg:
            raise ConfigError(where, "given twice (first as argument {})".format(first_arg[a.name]), a.name,
                              number, "one assignment per symbol")
        first_arg[a.name] = number
        assignments.append(a)
    return Layer(where, None, assignments)


# --------------------------------------------------------------------------
# Loading and verification


def load(kconf, layers, check_from=0):
    """Load the layers in order (later assignments win) and verify the result.

    The assignments of layers[check_from:] must all take effect exactly as
    written. Earlier layers are a base that was verified on its own (the
    current .config under `setconfig`): its values may be recomputed, as
    olddefconfig would, when the new assignments change their dependencies.
    """
    for i, layer in enumerate(layers):
        if layer.path is not None:
            kconf.load_config(layer.path, replace=(i == 0))
        else:
            if i == 0:
                kconf.unset_values()
            for a in layer.assignments:
                sym = kconf.syms[a.name]
                if sym.choice and a.value != "n":
                    sym.choice.set_value(a.value)  # the choice mode, as load_config does
                sym.set_value(a.value)
    if kconf.missing_syms:  # cannot happen after read_layer; kept as a guard
        name, _ = kconf.missing_syms[0]
        raise _unknown_symbol(kconf, layers[-1].where, None, name)
    _verify(kconf, layers, check_from)


def _effective(layers):
    """name -> (position, Assignment): the assignment of each symbol that counts (the last one)."""
    effective = {}
    for i, layer in enumerate(layers):
        for a in layer.assignments:
            effective[a.name] = ((i, a.line), a)
    return effective


def _verify(kconf, layers, check_from):
    effective = _effective(layers)

    # The member of each choice set to y last: it wins over earlier files
    winners = {}
    for name, (position, a) in effective.items():
        choice = kconf.syms[name].choice
        if choice is not None and a.value == "y":
            if choice not in winners or position > winners[choice][0]:
                winners[choice] = (position, a)

    # The newest layer first: a fragment's own mistakes are reported before
    # the preset lines that the fragment turned off
    for i in reversed(range(check_from, len(layers))):
        for a in layers[i].assignments:
            if effective[a.name][1] is not a:
                continue  # overridden by a later assignment
            sym = kconf.syms[a.name]
            if sym.choice is not None and a.value == "y":
                (winner_layer, winner_line), winner = winners[sym.choice]
                if winner is not a:
                    if winner_layer == i:
                        raise ConfigError(a.where, "set to y, but {} (line {}) is set to y too and wins the choice "
                                          "{!r}".format(winner.name, winner_line, _prompt(sym.choice)),
                                          a.name, a.line, "exactly one of {} set to y".format(
                                              ", ".join(s.name for s in sym.choice.syms)))
                    continue  # a later file chose another member: later assignments win
            if _turned_off_later(sym, layers[i + 1:]):
                continue  # e.g. a preset's GRAD_CLIP under a fragment that chooses ZClip
            _check_taken(sym, a)

    _check_strings(kconf, layers, effective)
    _check_folders(kconf, layers, effective)
    _check_cross_rules(kconf, layers, effective)


def _prompt(sc):
    for node in sc.nodes:
        if node.prompt:
            return node.prompt[0]
    return sc.name or "choice"


def _unmet(expr):
    """The parts of an &&-expression that are n, as text."""
    parts = [expr_str(part) for part in split_expr(expr, AND) if not expr_value(part)]
    return " && ".join(parts) or expr_str(expr)


def _prompt_condition(sym):
    conditions = [node.prompt[1] for node in sym.nodes if node.prompt]
    if not conditions:
        return None
    return " || ".join(_unmet(c) for c in conditions)


def _current(sym):
    return sym.str_value if sym.orig_type not in (BOOL, TRISTATE) else kconfiglib.TRI_TO_STR[sym.tri_value]


def _turned_off_later(sym, later_layers) -> bool:
    """A setting of an earlier file whose dependency a later file turned off: the later
    file wins, as in the kernel's merge of fragments, and the setting is dropped. The
    dependency must be unmet and name a symbol that a later file set (or a member of
    that symbol's choice, since choosing another member turns it off)."""
    if sym.config_string or expr_value(sym.direct_dep) or not later_layers:
        return False
    later = {a.name for layer in later_layers for a in layer.assignments}
    for dep in kconfiglib.expr_items(sym.direct_dep):
        names = {dep.name} | ({m.name for m in dep.choice.syms} if getattr(dep, "choice", None) else set())
        if names & later:
            return True
    return False


def _check_taken(sym, a):
    """The assignment took effect exactly as written, or a ConfigError saying why not."""
    if not sym.config_string:
        if not expr_value(sym.direct_dep):
            unmet = _unmet(sym.direct_dep)
            raise ConfigError(a.where, "has no effect: it depends on {}, which is not met".format(unmet),
                              a.name, a.line, "remove the line, or first make {} true".format(unmet))
        raise ConfigError(a.where, "has no effect: it cannot be set in this configuration", a.name, a.line,
                          "remove the line")

    t = sym.orig_type
    if t in (INT, HEX):
        base = 10 if t is INT else 16
        for low, high, cond in sym.ranges:
            if expr_value(cond):
                if not int(low.str_value, base) <= int(a.value, base) <= int(high.str_value, base):
                    raise ConfigError(a.where, "{} is out of range".format(a.value), a.name, a.line,
                                      _describe_valid(sym))
                break
        taken = int(sym.str_value, base) == int(a.value, base)
    elif t in (BOOL, TRISTATE):
        taken = sym.tri_value == kconfiglib.STR_TO_TRI[a.value]
    else:
        taken = sym.str_value == a.value
    if taken:
        return

    current = _current(sym)
    if sym.choice is not None and a.value == "n":
        raise ConfigError(a.where, "a choice member cannot be switched off; the choice {!r} needs one member "
                          "set to y".format(_prompt(sym.choice)), a.name, a.line,
                          "set another of {} to y".format(", ".join(s.name for s in sym.choice.syms if s is not sym)))
    if not sym.visibility:
        condition = _prompt_condition(sym)
        why = "only settable if {}".format(condition) if condition else "it has no prompt"
        raise ConfigError(a.where, "cannot be set here: its value is fixed to {} ({})".format(current, why),
                          a.name, a.line, "remove the line" + (", or first make {} true".format(condition)
                                                               if condition else ""))
    if t in (BOOL, TRISTATE) and expr_value(sym.rev_dep):
        raise ConfigError(a.where, "is forced to {} by 'select' from {}".format(current, expr_str(sym.rev_dep)),
                          a.name, a.line, "remove the line")
    raise ConfigError(a.where, "was loaded as {!r}, not {!r}".format(current, a.value), a.name, a.line,
                      _describe_valid(sym))


def _blame(layers, effective, names):
    """Where to point for a problem involving `names`: the latest assignment to one of them."""
    assigned = [effective[n] for n in names if n in effective]
    if not assigned:
        return layers[0].where if layers else "<defaults>", None, names[0], False
    _, a = max(assigned, key=lambda item: item[0])
    return a.where, a.line, a.name, True


def _check_strings(kconf, layers, effective):
    """Float, step-list and module-path values, including the Kconfig defaults."""
    for name in (*schema.FLOAT_RANGES, *schema.STEP_LISTS, *schema.MODULE_PATHS):
        sym = kconf.syms.get(name)
        if sym is None or not sym.nodes or not sym.config_string:
            continue
        try:
            schema.string_value(name, sym.str_value)
        except ValueError as e:
            where, line, _, assigned = _blame(layers, effective, [name])
            problem = e.args[0] + ("" if assigned else " (the Kconfig default)")
            raise ConfigError(where, problem, name, line, e.args[1]) from None


def _check_folders(kconf, layers, effective):
    """OUT_DIR and DATA_DIR are folders a run may write into (schema.check_safe_folder)."""
    for name in schema.SAFE_FOLDERS:
        sym = kconf.syms.get(name)
        if sym is None or not sym.nodes or not sym.config_string:
            continue
        try:
            schema.check_safe_folder(name, sym.str_value, kconf.srctree or os.getcwd())
        except ValueError as e:
            where, line, _, assigned = _blame(layers, effective, [name])
            problem = e.args[0] + ("" if assigned else " (the Kconfig default)")
            raise ConfigError(where, problem, name, line, e.args[1]) from None


def check_run_folder(kconf, layers):
    """Refuse a configuration whose OUT_DIR holds another run: a folder with checkpoints
    or metrics and a settings.py (kept there by the trainer) whose settings differ in
    more than schema.RESUMABLE_CHANGES. Called by setconfig and settings, before
    anything is written; the trainer makes the same check against its checkpoint."""
    from .settings import SettingsError, load_settings

    sym = kconf.syms.get("OUT_DIR")
    if sym is None or not sym.config_string or not sym.str_value.strip():
        return
    folder = os.path.expanduser(sym.str_value)
    kept = os.path.join(folder, "settings.py")
    checkpoints = os.path.join(folder, "checkpoints")
    has_run = os.path.isfile(os.path.join(folder, "metrics.jsonl")) or (
        os.path.isdir(checkpoints) and any(n.startswith("ckpt_") for n in os.listdir(checkpoints)))
    if not has_run or not os.path.isfile(kept):
        return
    try:
        saved = load_settings(kept, check_fresh=False).as_dict()
    except SettingsError:
        return  # not ours to judge; the trainer still compares with the checkpoint
    # the trainer checks the global batch that BATCH_SIZE and GRAD_ACCUM_STEPS make with the processes
    changed = schema.settings_diff(saved, typed_values(kconf), ignore=schema.GLOBAL_BATCH_FACTORS)
    if not changed:
        return
    effective = _effective(layers)
    where, line, name, _ = _blame(layers, effective, changed)  # the setting that makes it another run
    shown = ", ".join("{}={!r} there".format(k, saved.get(k)) for k in changed[:3])
    more = ", ..." if len(changed) > 3 else ""
    raise ConfigError(where, "OUT_DIR {} holds a run with different settings ({}{})".format(
        sym.str_value, shown, more), name, line,
        "a new OUT_DIR in the same command (make compare: OUT=<another folder>), or the run's settings to resume it")


def _check_cross_rules(kconf, layers, effective):
    values = typed_values(kconf)
    for rule in schema.CROSS_RULES:
        args = [values.get(name) for name in rule.symbols]
        if any(v is None for v in args):
            continue
        if not rule.holds(*args):
            where, line, name, _ = _blame(layers, effective, list(rule.symbols))
            problem = rule.problem.format(**dict(zip(rule.symbols, args)))
            raise ConfigError(where, problem, name, line, rule.valid)


# --------------------------------------------------------------------------
# Typed values (shared with the settings generator)


def typed_value(sym):
    """The symbol's value as Python: bool, int, float (float symbols), str, or None without a value."""
    if not sym.config_string:
        return None
    t = sym.orig_type
    if t in (BOOL, TRISTATE):
        return sym.tri_value != 0
    if t is INT:
        return int(sym.str_value, 10) if sym.str_value else None
    if t is HEX:
        return int(sym.str_value, 16) if sym.str_value else None
    return schema.string_value(sym.name, sym.str_value)


def python_type(sym):
    t = sym.orig_type
    if t in (BOOL, TRISTATE):
        return bool
    if t in (INT, HEX):
        return int
    return float if sym.name in schema.FLOAT_RANGES else str


def typed_values(kconf):
    return {sym.name: typed_value(sym) for sym in kconf.unique_defined_syms}
