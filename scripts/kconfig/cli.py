"""python -m scripts.kconfig COMMAND: the configuration commands behind the Makefile.

Run from the repository root (it is the Kconfig source tree). The .config
path is $KCONFIG_CONFIG, default .config. Every command that writes checks
the whole configuration first (strict.py) and writes atomically; on any
problem it prints one line and exits with status 1, writing nothing.
"""

import argparse
import os
import shutil
import sys
import tempfile

import kconfiglib

from . import diffconfig as diff
from .atomic import read_bytes_or_none, write_bytes_atomically, write_text_atomically
from .settings import DEFAULT_PATH as SETTINGS_PATH
from .settings import write_settings
from .strict import ConfigError, check_run_folder, command_line_layer, load, open_kconfig, read_layer

DEFCONFIG_DIR = "defconfigs"
FRAGMENT_DIR = os.path.join(DEFCONFIG_DIR, "fragments")


def config_path():
    return kconfiglib.standard_config_filename()


def _config_header(kconf):
    return "#\n# Automatically generated file; DO NOT EDIT.\n# {}\n#\n".format(kconf.mainmenu_text)


def _render(write):
    """Text that a kconfiglib writer (write_config, write_min_config) produces."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "out")
        write(path)
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()


def _install(path, text, what):
    """Replace `path` by `text` unless it already holds it; keep the previous version as PATH.old."""
    old = read_bytes_or_none(path)
    if old == text.encode("utf-8"):
        print("No change to {} in {}".format(what, path))
        return False
    if old is not None:
        write_bytes_atomically(path + ".old", old)
    write_text_atomically(path, text)
    print("{} written to {}".format(what[:1].upper() + what[1:], path))
    return True


def save_config(kconf, path):
    return _install(path, _render(lambda p: kconf.write_config(p, header=_config_header(kconf), save_old=False)),
                    "configuration")


def _existing_config():
    path = config_path()
    if not os.path.exists(path):
        raise ConfigError(path, "no such file; create it with `make defconfig` or `make defconfig-<preset>`")
    return path


def load_current(kconf):
    """Load .config strictly; returns its path."""
    path = _existing_config()
    load(kconf, [read_layer(kconf, path)])
    return path


def _available(folder, suffix=""):
    if not os.path.isdir(folder):
        return []
    return sorted(name[:len(name) - len(suffix)] for name in os.listdir(folder)
                  if name.endswith(suffix) and os.path.isfile(os.path.join(folder, name)))


def resolve_preset(name):
    if os.path.isfile(name):
        return name
    path = os.path.join(DEFCONFIG_DIR, name)
    if os.path.isfile(path):
        return path
    raise ConfigError(name, "no such preset", valid=", ".join(_available(DEFCONFIG_DIR)) or "none found")


def resolve_fragment(name):
    if os.path.isfile(name):
        return name
    path = os.path.join(FRAGMENT_DIR, name if name.endswith(".config") else name + ".config")
    if os.path.isfile(path):
        return path
    raise ConfigError(name, "no such fragment", valid=", ".join(_available(FRAGMENT_DIR, ".config")) or "none found")


def _preset_layers(kconf, preset, fragments):
    layers = [read_layer(kconf, resolve_preset(preset))]
    layers += [read_layer(kconf, resolve_fragment(f)) for f in fragments or ()]
    return layers


# --------------------------------------------------------------------------
# Commands


def cmd_defconfig(args):
    kconf = open_kconfig()
    load(kconf, _preset_layers(kconf, args.file, args.fragment))
    save_config(kconf, config_path())


def cmd_check(args):
    kconf = open_kconfig()
    layers = _preset_layers(kconf, args.file, args.fragment)
    load(kconf, layers)
    print("{}: OK".format(" + ".join(layer.where for layer in layers)))


def cmd_olddefconfig(args):
    kconf = open_kconfig()
    save_config(kconf, load_current(kconf))


def cmd_savedefconfig(args):
    kconf = open_kconfig()
    load_current(kconf)
    out = args.out
    text = _render(lambda p: kconf.write_min_config(p, header=""))
    if read_bytes_or_none(out) == text.encode("utf-8"):
        print("No change to minimal configuration in {}".format(out))
    else:
        write_text_atomically(out, text)
        print("Minimal configuration saved to {}".format(out))


def cmd_setconfig(args):
    kconf = open_kconfig()
    path = _existing_config()
    base = read_layer(kconf, path)
    load(kconf, [base])  # the current .config must be valid on its own
    new = command_line_layer(kconf, args.assignments)
    if not new.assignments:
        raise ConfigError("<setconfig>", "nothing to set", valid="NAME=VALUE ..., e.g. SPAM_INTERVAL=500")
    load(kconf, [base, new], check_from=1)
    check_run_folder(kconf, [base, new])
    save_config(kconf, path)


def cmd_settings(args):
    kconf = open_kconfig()
    path = load_current(kconf)
    check_run_folder(kconf, [read_layer(kconf, path)])
    write_settings(kconf, path, args.out)
    print("Settings written to {}".format(args.out))


def cmd_listnewconfig(args):
    kconf = open_kconfig()
    load_current(kconf)
    for sym in kconf.unique_defined_syms:
        # Settable symbols that .config does not mention: added to Kconfig since
        if sym.user_value is None and sym.visibility:
            if sym.orig_type in (kconfiglib.BOOL, kconfiglib.TRISTATE):
                print("CONFIG_{}={}".format(sym.name, kconfiglib.TRI_TO_STR[sym.tri_value]))
            else:
                print(sym.config_string, end="")


def _summary(kconf):
    """A few words on what a loaded preset trains."""
    parts = []
    for prefix in ("MODEL_", "GPT2_", "DATA_", "OPTIM_"):
        chosen = [s.name for s in kconf.unique_defined_syms
                  if s.name.startswith(prefix) and s.choice is not None and s.tri_value == 2]
        parts += chosen
    out_dir = kconf.syms.get("OUT_DIR")
    return ", ".join(parts) + ("; runs in {}".format(out_dir.str_value) if out_dir is not None else "")


def _first_comment(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip().lstrip("#").strip()
            if line.startswith("#") and text:
                return text
    return ""


def cmd_list_defconfigs(args):
    kconf = open_kconfig()
    print("Presets (make defconfig-<name>):")
    for name in _available(DEFCONFIG_DIR):
        layer = read_layer(kconf, os.path.join(DEFCONFIG_DIR, name))
        load(kconf, [layer])
        print("  {:<18} {}".format(name, _summary(kconf)))
    fragments = _available(FRAGMENT_DIR, ".config")
    if fragments:
        print("Fragments (make defconfig-<name> FRAGMENT=<fragment>):")
        for name in fragments:
            print("  {:<18} {}".format(name, _first_comment(os.path.join(FRAGMENT_DIR, name + ".config"))))


def cmd_diffconfig(args):
    files = args.files
    if len(files) == 1:
        raise ConfigError("diffconfig", "give two files (A B), or none to compare .config.old with .config")
    old, new = files if files else (config_path() + ".old", config_path())
    for line in diff.diffconfig(old, new):
        print(line)


def _interactive(edit, kconf, path, what):
    """Run a kconfiglib editor on a temporary copy of .config; install the result only if it is valid.

    The editor (menuconfig or oldconfig) reads and writes $KCONFIG_CONFIG,
    pointed at the copy, so that .config is never half-written nor replaced
    by something the strict check refuses.
    """
    folder = tempfile.mkdtemp(prefix="kconfig-{}-".format(what))
    copy = os.path.join(folder, os.path.basename(path))
    saved = os.environ.get("KCONFIG_CONFIG")
    try:
        original = read_bytes_or_none(path)
        if original is not None:
            with open(copy, "wb") as f:
                f.write(original)
        os.environ["KCONFIG_CONFIG"] = copy
        edit(kconf)
        result = read_bytes_or_none(copy)
        if result is None or result == original:
            print("{}: no change to {}".format(what, path))
            return
        checker = open_kconfig()
        load(checker, [read_layer(checker, copy, where="{} (as saved by {})".format(path, what))])
        _install(path, result.decode("utf-8"), "configuration")
    finally:
        if saved is None:
            os.environ.pop("KCONFIG_CONFIG", None)
        else:
            os.environ["KCONFIG_CONFIG"] = saved
        shutil.rmtree(folder, ignore_errors=True)


def cmd_menuconfig(args):
    import menuconfig  # kconfiglib's curses interface

    kconf = open_kconfig()
    path = config_path()
    if os.path.exists(path):
        load(kconf, [read_layer(kconf, path)])  # refuse to edit a .config that is already wrong
    kconf.config_header = _config_header(kconf)
    _interactive(menuconfig.menuconfig, kconf, path, "menuconfig")


def cmd_oldconfig(args):
    import oldconfig  # kconfiglib's line-oriented prompts

    kconf = open_kconfig()
    path = config_path()
    if os.path.exists(path):
        load(kconf, [read_layer(kconf, path)])

    def ask(kconf):
        # Ask about every visible symbol without a value until nothing
        # changes: an answer can make earlier symbols visible.
        try:
            while True:
                oldconfig.conf_changed = False
                for node in kconf.node_iter():
                    oldconfig.oldconfig(node)
                if not oldconfig.conf_changed:
                    break
        except EOFError:
            raise ConfigError("oldconfig", "standard input ended before every new symbol was answered") from None
        kconf.write_config(header=_config_header(kconf))

    _interactive(ask, kconf, path, "oldconfig")


# --------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, like every other error of these tools
        self.exit(2, "{}: {} (see --help)\n".format(self.prog, message))


def build_parser():
    parser = _Parser(prog="python -m scripts.kconfig", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, fn, help):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = command("defconfig", cmd_defconfig, "write .config from a preset, merging fragments in order")
    p.add_argument("file", help="preset file, or a name in defconfigs/")
    p.add_argument("--fragment", action="append", default=[], metavar="F",
                   help="fragment file, or a name in defconfigs/fragments/ (repeatable; later ones win)")
    p = command("check", cmd_check, "check a configuration file (and fragments) without writing anything")
    p.add_argument("file")
    p.add_argument("--fragment", action="append", default=[], metavar="F")
    command("olddefconfig", cmd_olddefconfig, "rewrite .config with defaults for new symbols")
    command("oldconfig", cmd_oldconfig, "ask for the value of every new symbol, then rewrite .config")
    p = command("savedefconfig", cmd_savedefconfig, "write the minimal configuration of .config")
    p.add_argument("out", nargs="?", default="defconfig")
    command("listnewconfig", cmd_listnewconfig, "list settable symbols that .config does not mention")
    command("list-defconfigs", cmd_list_defconfigs, "list the presets and fragments")
    p = command("diffconfig", cmd_diffconfig, "show the differences between two configurations")
    p.add_argument("files", nargs="*", metavar="FILE", help="A B (default: .config.old .config)")
    p = command("setconfig", cmd_setconfig, "set symbols in .config: NAME=VALUE ...")
    p.add_argument("assignments", nargs="*", metavar="NAME=VALUE")
    p = command("settings", cmd_settings, "generate the typed settings from .config")
    p.add_argument("out", nargs="?", default=SETTINGS_PATH)
    command("menuconfig", cmd_menuconfig, "edit .config in kconfiglib's menuconfig")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except OSError as e:
        print("{}: {}".format(e.filename or args.command, e.strerror or e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("{}: interrupted; nothing written".format(args.command), file=sys.stderr)
        return 130
    return 0
