"""No dead knobs: every Kconfig symbol changes what the code does, and the code reads no
setting that Kconfig does not define.

A symbol is live when its name appears (as a whole word) in a .py file of the
project outside tests/ and scripts/kconfig/, or when it determines the value
of a live symbol through Kconfig itself: its defaults, selects, ranges,
prompt conditions or dependencies (GPT2_TINY picks GPT2_N_LAYER's default).
By convention the settings object is always called `cfg`.
"""

import ast
import re
from pathlib import Path

import kconfiglib

from scripts.kconfig.strict import open_kconfig

REPO = Path(__file__).resolve().parents[1]
SKIPPED = {"tests", "generated", "runs", "data_cache", "__pycache__"}


def project_python_files(skip_config_tools):
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).parts
        if any(part.startswith(".") or part in SKIPPED for part in parts[:-1]):
            continue
        if skip_config_tools and parts[:2] == ("scripts", "kconfig"):
            continue
        yield path


def _symbols_in(expr):
    return {item.name for item in kconfiglib.expr_items(expr)
            if isinstance(item, kconfiglib.Symbol) and item.nodes}


def influences(sym):
    """The symbols whose values decide the value of `sym` (or whether it has one)."""
    exprs = [sym.direct_dep, sym.rev_dep, sym.weak_rev_dep]
    for value, cond in sym.defaults:
        exprs += [value, cond]
    for low, high, cond in sym.ranges:
        exprs += [low, high, cond]
    for node in sym.nodes:
        exprs.append(node.dep)
        if node.prompt:
            exprs.append(node.prompt[1])
    if sym.choice is not None:
        exprs.append(sym.choice.direct_dep)
        for node in sym.choice.nodes:
            exprs.append(node.dep)
            if node.prompt:
                exprs.append(node.prompt[1])
        for default, cond in sym.choice.defaults:
            exprs.append(cond)
    names = set()
    for expr in exprs:
        names |= _symbols_in(expr)
    return names - {sym.name}


def test_every_kconfig_symbol_is_read_by_code_or_decides_a_live_symbol():
    kconf = open_kconfig(REPO)
    symbols = {sym.name: sym for sym in kconf.unique_defined_syms}
    words = set()
    for path in project_python_files(skip_config_tools=True):
        words |= set(re.findall(r"\b[A-Z][A-Z0-9_]*\b", path.read_text(encoding="utf-8")))
    live = set(symbols) & words
    frontier = list(live)
    while frontier:
        for name in influences(symbols[frontier.pop()]):
            if name not in live:
                live.add(name)
                frontier.append(name)
    dead = sorted(set(symbols) - live)
    assert not dead, "Kconfig symbols that no code reads and that decide no live symbol: " + ", ".join(dead)


def settings_read_by_code():
    """(file, line, NAME) for every cfg.NAME and getattr(cfg, "NAME") with an UPPER_CASE name."""
    found = []
    for path in project_python_files(skip_config_tools=False):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg":
                name = node.attr
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                  and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id == "cfg"
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                name = node.args[1].value
            if name and re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
                found.append((path.relative_to(REPO), node.lineno, name))
    return found


def test_every_setting_the_code_reads_is_a_kconfig_symbol():
    kconf = open_kconfig(REPO)
    defined = {sym.name for sym in kconf.unique_defined_syms}
    reads = settings_read_by_code()
    unknown = ["{}:{}: cfg.{}".format(path, line, name) for path, line, name in reads if name not in defined]
    assert not unknown, "settings read by code but not defined in Kconfig: " + "; ".join(unknown)
