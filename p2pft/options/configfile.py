"""
C{--config FILE} for the commands that run on the public host (C{p2pft
server}, C{p2pft relay}, the twistd plugins): every option can come from a
TOML file as well, so that a service file stays one short line.

The file's keys are the long option names, as C{--help} shows them::

    port = "tcp:9000:interface=203.0.113.7"
    relay = true                        # a flag: true or false
    relay-max-sessions = 500            # a whole-number option: an integer
    waiting-timeout = 1800.0            # a number option: an integer or a float
    advertise-relay = ["relay.example.org:9001"]   # a repeatable one: an array

Nothing here lists the options: they are read off the Options class (its
flags, its parameters and their coercers, its C{opt_} methods), so an option
added there works in the file with no edit here.  A value from the file goes
through the very handler the command line's would (the same coercer, the
same C{opt_} method, then the same C{postOptions}); an option given on the
command line replaces the file's (a repeatable one as a whole).  Every
failure is one L{usage.UsageError} line that names the file and the key.

This is not the peer's config file (L{p2pft.config}: the default server of
C{send} and C{receive}); the two are read separately and share no keys.
"""

from __future__ import annotations

import getopt
import re
import sys

from twisted.python import reflect, usage

if sys.version_info >= (3, 11):
    import tomllib
else:  # the backport, installed for 3.10 only (setup.cfg)
    import tomli as tomllib

#: Far larger than a config of every option with long endpoint strings
#: (about 1 KiB); a bigger file is a mistake (a log, a device), not a config.
MAX_CONFIG_BYTES = 64 * 1024
#: Options that have no place in the file: they print and exit, or name the
#: file itself.
NOT_IN_FILE = frozenset({"config", "help", "version"})


def read_settings(path: str) -> dict:
    """The TOML table in C{path}, or a UsageError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise usage.UsageError(f"cannot read the config file {path}: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise usage.UsageError(f"{path}: too large for a config file (over {MAX_CONFIG_BYTES // 1024} KiB)")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise usage.UsageError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise usage.UsageError(f"{path}: not valid TOML: {e}") from None


def _toml_type(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    return {int: "an integer", float: "a float", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), "a date or time")


class ConfigFileOptions:
    """
    A mixin for a C{usage.Options} class (put it first among the bases):
    C{--config FILE} and the merge of the file under the command line.
    """

    optParameters = [
        ["config", None, None, "Read options from this TOML file: the keys are the long option "
                               "names (port = \"tcp:9000\", relay = true, advertise-relay = "
                               "[\"HOST:PORT\"]); the command line overrides the file."],
    ]

    def parseOptions(self, options=None) -> None:
        argv = sys.argv[1:] if options is None else list(options)
        path, given = self._command_line(argv)
        from_file: set[str] = set()
        if path is not None:
            for key, value in read_settings(path).items():
                name = self._file_key(path, key)
                # Checked even when the command line overrides it: a broken
                # file shows before the day the override goes.
                values = self._checked(path, key, name, value)
                if name not in given:
                    self._apply(path, name, values)
                    from_file.add(name)
        try:
            super().parseOptions(argv)
        except usage.UsageError as e:
            # A postOptions check of a value that came from the file.
            raise self._named(path, from_file, e) from None

    def _command_line(self, argv: list[str]) -> tuple[str | None, set[str]]:
        """The --config path and the option names the command line sets."""
        try:
            opts, _ = getopt.gnu_getopt(argv, self.shortOpt, self.longOpt)
        except getopt.GetoptError:
            return None, set()  # the real parse says what is wrong
        given, path = set(), None
        for opt, value in opts:
            name = opt[2:] if opt.startswith("--") else opt[1:]
            name = self.synonyms.get(name, self.synonyms.get(name.replace("-", "_"), name))
            given.add(name)
            if name == "config":
                path = value
        if given & {"help", "version"}:
            return None, given  # print that, whatever the file holds
        return path, given

    def _file_key(self, path: str, key: str) -> str:
        if key in NOT_IN_FILE:
            raise usage.UsageError(f"{path}: {key} cannot be set in a config file")
        known = sorted({o.rstrip("=") for o in self.longOpt} - NOT_IN_FILE)
        if key not in known:
            raise usage.UsageError(f"{path}: unknown key {key!r} (known: {', '.join(known)})")
        return self.synonyms.get(key, key)

    def _kind(self, name: str):
        """What the option takes: bool (a flag), list (repeatable), int, float or str."""
        if name in self.longOpt:
            return bool
        if isinstance(self.get(name), list):
            return list
        parameters: list = []
        reflect.accumulateClassList(type(self), "optParameters", parameters)
        for entry in parameters:
            if entry[0] == name and len(entry) > 4 and entry[4] in (int, float):
                return entry[4]
        return str

    def _checked(self, path: str, key: str, name: str, value) -> list:
        """The value as the strings the command line would give (none for
        a false flag, the flag's name for a true one), or a UsageError."""
        kind = self._kind(name)
        wants = {bool: "true or false", list: "a string or an array of strings",
                 int: "a whole number", float: "a number", str: "a string"}[kind]
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is list:
            value = value if isinstance(value, list) else [value]
            ok = all(isinstance(v, str) for v in value)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind) and not isinstance(value, bool)
        if not ok:
            shown = next((v for v in value if not isinstance(v, str)), value) if kind is list else value
            hint = f" (quote it: {key} = \"{value}\")" if kind is str and isinstance(value, int) else ""
            raise usage.UsageError(f"{path}: {key} takes {wants}, not {_toml_type(shown)}{hint}")
        if kind is bool:
            return [None] if value else []
        return [str(v) for v in value] if kind is list else [str(value)]

    def _apply(self, path: str, name: str, values: list) -> None:
        handler = self._dispatch[name]
        for text in values:
            try:
                if isinstance(handler, usage.CoerceParameter):
                    handler.dispatch(name, text)
                else:
                    handler(name, text)
            except usage.UsageError as e:
                raise self._named(path, {name}, e, always=True) from None

    @staticmethod
    def _named(path: str | None, names: set[str], error: usage.UsageError,
               always: bool = False) -> usage.UsageError:
        """C{error} reworded to name the file and key when it is about a
        value from the file ('--port takes ...' -> 'FILE: port takes ...')."""
        message = str(error)
        for name in sorted(names):
            if re.match(rf"--{re.escape(name)}(?![\w-])", message):
                return usage.UsageError(f"{path}: {message[2:]}")
            if re.search(rf"--{re.escape(name)}(?![\w-])", message):
                return usage.UsageError(f"{path}: {name}: {message}")
        if always:
            [name] = names
            return usage.UsageError(f"{path}: {name}: {message}")
        return error
