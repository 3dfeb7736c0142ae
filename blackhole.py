#!/usr/bin/env python3
"""blackhole.py: an SMTP server that accepts every message and forgets it.

One module, standard library only.  Run it::

    python3 blackhole.py -c blackhole.ini

or embed it in a test suite::

    with blackhole.Server(mode="bounce") as server:
        smtplib.SMTP(*server.address).sendmail(...)

The contract is SPEC.md; section numbers in comments refer to it.
"""

# ###########################################################################
# Header and exports
# ###########################################################################

import argparse
import base64
import binascii
import collections
import configparser
import hashlib
import io
import ipaddress
import itertools
import logging
import mmap                 # not lazily: the stdlib may be unreadable once privileges drop
import os
import random
import re
import select
import selectors
import signal
import socket
import socketserver
import stat
import ssl
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

__version__ = "1.0.0"

__all__ = [
    "Config", "ConfigError", "Directive", "Envelope", "Greylist", "Listener", "Server",
    "SenderChecks", "SMTPError", "SMTPHandler", "SMTPServer", "Stats",
    "ThreadingSMTPServer", "TokenBucket", "main", "parse_directives",
    "parse_listen", "parse_params", "parse_path", "parse_proxy_v1",
    "parse_proxy_v2",
]

log = logging.getLogger("blackhole")


# ###########################################################################
# Constants
# ###########################################################################

EX_OK = 0
EX_USAGE = 64           # os.EX_USAGE, which not every platform defines

BOUNCES = {             # section 4.2: code -> enhanced code and text
    450: "4.2.1 Requested mail action not taken: mailbox unavailable",
    451: "4.3.0 Requested action aborted: local error in processing",
    452: "4.3.1 Requested action not taken: insufficient system storage",
    458: "4.3.0 Unable to queue message",
    521: "5.3.2 Machine does not accept mail",
    550: "5.1.1 Requested action not taken: mailbox unavailable",
    551: "5.1.6 User not local",
    552: "5.2.2 Requested mail action aborted: exceeded storage allocation",
    553: "5.1.3 Requested action not taken: mailbox name not allowed",
    571: "5.7.1 Blocked",
}
FAIL_REPLIES = {   # section 4.7; the RCPT texts also end data (10.1)
    ("mail", "fail"): (553, "5.1.7 Sender address rejected"),
    ("mail", "defer"): (451, "4.1.7 Sender address temporarily rejected"),
    ("rcpt", "fail"): (550, "5.1.1 Recipient address rejected"),
    ("rcpt", "defer"): (450, "4.2.1 Recipient temporarily unavailable"),
}
TOO_BIG = (552, "5.3.4 Message size exceeds fixed maximum message size")  # 4.1, 4.2
MODES = ("accept", "bounce", "random")
MAX_DELAY = 60          # seconds; kura/blackhole's cap on any delay

SYNTAX = {              # feeds HELP VERB and the 501 syntax replies
    "AUTH": "AUTH mechanism",
    "BDAT": "BDAT size [LAST]",
    "DATA": "DATA",
    "EHLO": "EHLO domain",
    "ETRN": "ETRN [node]",
    "EXPN": "EXPN list",
    "HELO": "HELO domain",
    "HELP": "HELP [command]",
    "MAIL": "MAIL FROM: <address>",
    "NOOP": "NOOP",
    "QUIT": "QUIT",
    "RCPT": "RCPT TO: <address>",
    "RSET": "RSET",
    "STARTTLS": "STARTTLS",
    "VRFY": "VRFY <address>",
}

MAILING_LISTS = {       # EXPN: made-up member lists of 3, 4 and 6
    "list1": ("shadow", "wednesday", "low-key"),
    "list2": ("jim", "kura", "michael", "tracy"),
    "list3": ("dave", "kevin", "mark", "paul", "ray", "steve"),
}
MAILING_LISTS["all"] = tuple(sorted(set().union(*MAILING_LISTS.values())))

SENDER_ISSUES = (       # section 11, in the order /metrics lists them
    "bare_lf", "bare_cr", "long_line", "unstuffed_dot",
    "8bit_without_8bitmime", "utf8_without_smtputf8", "missing_date",
    "missing_from", "missing_message_id", "no_helo",
)
FAULT_KINDS = ("directive", "greylist", "rate_limit", "connections_per_ip")


# ###########################################################################
# Exceptions
# ###########################################################################

class ConfigError(ValueError):
    """An invalid option; str() is the one line the command line prints."""


class SMTPError(Exception):
    """Raised anywhere below a verb to answer with this reply instead."""

    def __init__(self, code, text, close=False):
        super().__init__(code, text)
        self.code, self.text, self.close = code, text, close

    @classmethod
    def syntax(cls, verb):
        """501: a missing or malformed argument (4.4), with the verb's syntax."""
        return cls(501, "5.5.4 Syntax: " + SYNTAX[verb])

    @classmethod
    def bad_sequence(cls):
        """503: a command out of order (strict mode, 4.4; AUTH, RFC 4954 4)."""
        return cls(503, "5.5.1 Bad sequence of commands")


class _Disconnect(Exception):
    """The session ends now, with no further reply."""


class _Shutdown(Exception):
    """The server is stopping: the client gets 421 and the session ends."""


class _AuthDecided(Exception):
    """A raw `pass=`/`fail=` response decided AUTH at once (kura's form)."""

    def __init__(self, ok):
        super().__init__(ok)
        self.ok = ok


# ###########################################################################
# Configuration
# ###########################################################################

Listener = collections.namedtuple(
    "Listener", "text host port family tls mode delay greylist proxy")
Listener.__doc__ = """One listening address of `listen` or `tls_listen`.

mode, delay and greylist are None unless the listener sets them with a
flag, which then wins over the global option; a mode= or delay= flag also
turns dynamic switches off (4.3).  proxy is the proxy=on flag (12).
"""

_TRUE = ("1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")


def parse_bool(text):
    """Parse an INI boolean (true/false/yes/no/on/off/1/0)."""
    word = str(text).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("must be true or false (yes/no, on/off, 1/0)")


def _parse_int(text, low, high=None):
    text = str(text).strip()
    if not re.fullmatch(r"[-+]?[0-9]+", text):     # int() also takes 1_0 and other scripts' digits
        raise ValueError("must be a whole number")
    value = int(text)
    if value < low or (high is not None and value > high):
        if high is None:
            raise ValueError("must be %d or more" % low)
        raise ValueError("must be between %d and %d" % (low, high))
    return value


def parse_delay(text):
    """Parse `N`, `MIN-MAX` or `MIN, MAX` seconds into (min, max)."""
    parts = re.split(r"\s*[-,]\s*", str(text).strip())
    if len(parts) not in (1, 2) or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError("must be N or MIN-MAX whole seconds")
    low, high = int(parts[0]), int(parts[-1])
    if high > MAX_DELAY:
        raise ValueError("must be between 0 and %d seconds" % MAX_DELAY)
    if low > high:
        raise ValueError("minimum is above maximum")
    return (low, high)


def _choice(text, choices):
    word = str(text).strip().lower()
    if word not in choices:
        raise ValueError("must be %s or %s" % (", ".join(choices[:-1]), choices[-1]))
    return word


def _parse_mode(text):
    return _choice(text, MODES)


def _split_hostport(text):
    """Split `ADDR:PORT` in all the forms of section 3 into (host, port)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("must be ADDR:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("must be ADDR:PORT")
    port = port.strip()
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError("port must be a number from 0 to 65535")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("must be ADDR:PORT ([ADDR]:PORT for IPv6)") from None
    return host or "0.0.0.0", int(port)


def parse_listen(text, tls=False):
    """Parse a `listen` or `tls_listen` value into a tuple of Listeners."""
    listeners = []
    for item in (p.strip() for p in str(text).split(",")):
        if not item:
            continue
        words = item.split()
        host, port = _split_hostport(words[0])
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        flags = {"mode": None, "delay": None, "greylist": None, "proxy": False}
        for word in words[1:]:
            name, sep, value = word.partition("=")
            name = name.lower()
            if not sep or name not in flags:
                raise ValueError("unknown flag %r (mode=, delay=, greylist=, "
                                 "proxy=)" % word)
            try:
                if name == "mode":
                    flags[name] = _parse_mode(value)
                elif name == "delay":
                    flags[name] = parse_delay(value)
                elif name == "greylist":
                    flags[name] = _parse_int(value, 0, 86400)
                else:
                    flags[name] = parse_bool(value)
            except ValueError as exc:
                raise ValueError("%s: %s" % (word, exc)) from None
        listeners.append(Listener(item, host, port, family, tls, **flags))
    seen = set()
    for listener in listeners:
        key = (listener.host, listener.port)
        if listener.port and key in seen:
            raise ValueError("%s:%d is given twice" % key)
        seen.add(key)
    return tuple(listeners)


def parse_hostport(text):
    """Parse `metrics_listen`: one ADDR:PORT."""
    return _split_hostport(str(text).strip())


def parse_rate(text):
    """Parse `rate_limit` as `N/SECONDS` into (N, seconds)."""
    count, sep, seconds = str(text).strip().partition("/")
    try:
        count, seconds = int(count), float(seconds)
    except ValueError:
        raise ValueError("must be N/SECONDS, e.g. 100/60") from None
    if not sep or count < 1 or not 0 < seconds < float("inf"):
        raise ValueError("must be N/SECONDS with N and SECONDS above 0")
    return (count, seconds)


def parse_networks(text):
    """Parse `proxy_trusted`: addresses or CIDR networks."""
    nets = []
    for item in (p.strip() for p in str(text).split(",")):
        if item:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError("%r is not an address or network" % item) from None
    return tuple(nets)


def _parse_hostname(text):
    name = str(text).strip()
    if not name or len(name) > 253 or not re.match(r"^[A-Za-z0-9.\-_\[\]:]+$", name):
        raise ValueError("must be a host name such as mail.example.com")
    return name


def _parse_path(text):
    """A path, made absolute here: -b later changes directory to /."""
    path = str(text).strip()
    if not path:
        raise ValueError("must be a path")
    return os.path.abspath(path)


def _parse_readable(text):
    path = _parse_path(text)
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError("cannot read: %s" % exc.strerror) from None
    return path


def _no_password():
    """For load_cert_chain: an encrypted key fails at once, without the
    interactive pass phrase prompt OpenSSL would otherwise show."""
    return b""


def _pem_has(path, marker):
    """True if the file at path holds marker (a PEM boundary) in its first MiB."""
    try:
        with open(path, "rb") as handle:
            return marker in handle.read(1 << 20)
    except OSError:
        return False


def _parse_name(lookup):
    def parse(text):
        name = str(text).strip()
        try:
            lookup(name)
        except (KeyError, ImportError):
            raise ValueError("no such %s" % lookup.__name__.strip("_")) from None
        return name
    return parse


def _user(name):
    import pwd
    return pwd.getpwnam(name)


def _group(name):
    import grp
    return grp.getgrnam(name)


def _default_hostname():
    """socket.getfqdn() can take seconds: looked up once per process."""
    if _default_hostname.cache is None:
        _default_hostname.cache = socket.getfqdn()
    return _default_hostname.cache


_default_hostname.cache = None

# name: (syntax, default as shown, meaning, parser); `--options` prints it.
OPTIONS = {
    "listen": ("ADDR:PORT [flags], ...", "127.0.0.1:25, 127.0.0.1:587",
               "plain SMTP listeners; flags mode=, delay=, greylist=, proxy=on",
               parse_listen),
    "tls_listen": ("ADDR:PORT [flags], ...", "none",
                   "implicit TLS (SMTPS) listeners; need tls_cert and tls_key",
                   lambda text: parse_listen(text, tls=True)),
    "tls_cert": ("PATH", "none", "PEM certificate (chain)", _parse_readable),
    "tls_key": ("PATH", "none", "PEM private key", _parse_readable),
    "tls_dhparams": ("PATH", "none", "PEM Diffie-Hellman parameters", _parse_readable),
    "starttls": ("BOOL", "true with a certificate", "offer STARTTLS on plain listeners",
                 parse_bool),
    "hostname": ("FQDN", "socket.getfqdn()", "name in the greeting, replies and ids",
                 _parse_hostname),
    "user": ("NAME", "current user", "user to switch to after binding (as root)",
             _parse_name(_user)),
    "group": ("NAME", "user's group", "group to switch to after binding (as root)",
              _parse_name(_group)),
    "pidfile": ("PATH", "none; /tmp/blackhole.pid with -b", "file holding the pid",
                _parse_path),
    "timeout": ("SECONDS (0-180)", "60", "idle time before a client is cut off (0 = never)",
                lambda text: _parse_int(text, 0, 180)),
    "delay": ("N or MIN-MAX (0-60, < timeout)", "0",
              "seconds to wait before the end-of-data reply",
              parse_delay),
    "mode": ("accept|bounce|random", "accept", "reply to each message", _parse_mode),
    "max_message_size": ("BYTES", "512000", "largest message accepted (SIZE)",
                         lambda text: _parse_int(text, 1)),
    "dynamic_switch": ("BOOL", "true", "honour X-Blackhole-Mode/-Delay headers",
                       parse_bool),
    "workers": ("N (1-256)", "1", "worker processes (N > 1: a supervisor forks N)",
                lambda text: _parse_int(text, 1, 256)),
    "pin_cpu": ("BOOL", "true",
                "keep a worker's (or the one process's) threads on one CPU (Linux)",
                parse_bool),
    "max_connections": ("N", "1000", "concurrent sessions per process",
                        lambda text: _parse_int(text, 1)),
    "strict": ("BOOL", "false", "enforce RFC 5321 command sequence and syntax",
               parse_bool),
    "metrics_listen": ("ADDR:PORT", "none", "HTTP /metrics in Prometheus format",
                       parse_hostport),
    "greylist": ("SECONDS (0-86400)", "0", "greylist each (ip, sender, recipient) (0 = off)",
                 lambda text: _parse_int(text, 0, 86400)),
    "max_connections_per_ip": ("N", "0", "sessions per client address (0 = off)",
                               lambda text: _parse_int(text, 0)),
    "rate_limit": ("N/SECONDS", "none", "messages per client address", parse_rate),
    "seed": ("INTEGER", "none", "makes random choices reproducible",
             lambda text: _parse_int(text, -(1 << 63), (1 << 63) - 1)),
    "sender_checks": ("off|count|reply|refuse", "count",
                      "what to do with the sender issues of a message",
                      lambda text: _choice(text, ("off", "count", "reply", "refuse"))),
    "proxy_trusted": ("ADDR or CIDR, ...", "127.0.0.0/8, ::1",
                      "who may send a PROXY protocol header", parse_networks),
}


class Config:
    """Validated, immutable settings (section 3).

    Build one with Config.from_file(path) or Config(**options), where each
    option is a string as in the INI file or an already-parsed Python value.
    Every problem raises ConfigError naming source, option, value and reason.
    """

    _defaults = {
        "listen": "127.0.0.1:25, 127.0.0.1:587", "tls_listen": "",
        "tls_cert": None, "tls_key": None, "tls_dhparams": None,
        "starttls": None, "hostname": None, "user": None, "group": None,
        "pidfile": None, "timeout": 60, "delay": (0, 0), "mode": "accept",
        "max_message_size": 512000, "dynamic_switch": True, "workers": 1, "pin_cpu": True,
        "max_connections": 1000, "strict": False, "metrics_listen": None,
        "greylist": 0, "max_connections_per_ip": 0, "rate_limit": None,
        "seed": None, "sender_checks": "count",
        "proxy_trusted": "127.0.0.0/8, ::1",
    }

    _lists = ("listen", "tls_listen", "proxy_trusted")  # an indented line adds an item

    def __init__(self, source="<options>", **options):
        values = {}                     # in the caller's (the file's) order: its
        for name, value in options.items():     # first problem is the one reported
            if name not in OPTIONS:
                raise ConfigError("%s: %s = %s: unknown option" % (
                    source, name, str(value).replace("\n", "\\n")))
            if value is not None:       # None: the default
                values[name] = self._parse(source, name, _as_text(name, value))
        for name, value in self._defaults.items():
            if name not in values:
                values[name] = None if value is None else \
                    self._parse(source, name, _as_text(name, value))
        for name, value in values.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "source", source)
        self._check(source)

    @classmethod
    def _parse(cls, source, name, text):
        try:
            if "\n" in text.strip():      # the INI's continuation lines
                if name not in cls._lists:
                    raise ValueError("one value only; is the line after it indented?")
                return OPTIONS[name][3](re.sub(r"[\s,]*\n[\s,]*", ", ", text.strip()))
            return OPTIONS[name][3](text)
        except ValueError as exc:
            raise ConfigError("%s: %s = %s: %s" % (
                source, name, text.replace("\n", "\\n"), exc)) from None

    def _check(self, source):
        """Rules that tie options together."""
        def fail(name, reason):
            raise ConfigError("%s: %s = %s: %s" % (
                source, name, _show(getattr(self, name)), reason))
        if bool(self.tls_cert) != bool(self.tls_key):
            fail("tls_key" if self.tls_key else "tls_cert",
                 "tls_cert and tls_key go together")
        if self.tls_cert:
            # OpenSSL's own reasons ("PEM lib") do not say which file is wrong
            if not _pem_has(self.tls_cert, b"-----BEGIN CERTIFICATE-----"):
                fail("tls_cert", "no PEM certificate in it")
            if not _pem_has(self.tls_key, b"PRIVATE KEY-----"):
                fail("tls_key", "no PEM private key in it")
            if _pem_has(self.tls_key, b"ENCRYPTED"):    # PKCS#8 or a Proc-Type header
                fail("tls_key", "is encrypted; blackhole takes no passphrase")
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    self.tls_cert, self.tls_key, password=_no_password)
            except (ssl.SSLError, OSError):
                fail("tls_key", "does not match tls_cert")
        if self.tls_dhparams:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_dh_params(
                    self.tls_dhparams)
            except (ssl.SSLError, OSError):
                fail("tls_dhparams", "no PEM DH parameters in it")
        if self.tls_listen and not self.tls_cert:
            fail("tls_listen", "needs tls_cert and tls_key")
        if self.starttls is None:
            object.__setattr__(self, "starttls", bool(self.tls_cert))
        elif self.starttls and not self.tls_cert:
            fail("starttls", "needs tls_cert and tls_key")
        if not self.listen and not self.tls_listen:
            fail("listen", "no listener given")
        if self.timeout and self.delay[1] >= self.timeout:
            fail("delay", "must be less than timeout (%d)" % self.timeout)
        seen = set()
        for listener in self.listeners():
            key = (listener.host, listener.port)
            if listener.port and key in seen:
                fail("tls_listen", "%s:%d is also in listen" % key)
            seen.add(key)
            if self.timeout and listener.delay and listener.delay[1] >= self.timeout:
                fail("tls_listen" if listener.tls else "listen",
                     "delay= must be less than timeout (%d)" % self.timeout)
        if self.hostname is None:
            object.__setattr__(self, "hostname", _default_hostname())
        if (self.user or self.group) and hasattr(os, "getuid") and os.getuid() != 0:
            if self.user and _user(self.user).pw_uid != os.getuid():
                fail("user", "differs from the current user and not running as root")
            if self.group and _group(self.group).gr_gid != os.getgid():
                fail("group", "differs from the current group and not running as root")

    def __setattr__(self, name, value):
        raise AttributeError("Config is immutable")

    @classmethod
    def from_file(cls, path, **overrides):
        """Read an INI file; a file without a section header is [blackhole]."""
        try:
            with open(path, encoding="utf-8-sig") as handle:     # a BOM is no text
                text = handle.read()
        except OSError as exc:
            raise ConfigError("%s: cannot read: %s" % (path, exc.strerror)) from None
        except UnicodeDecodeError:
            raise ConfigError("%s: is not UTF-8 text" % path) from None
        parser = configparser.ConfigParser(
            interpolation=None, inline_comment_prefixes=("#", ";"),
            default_section="\0none")
        parser.optionxform = str.lower
        offset = 0                      # lines added above the file's own
        if not re.search(r"^\s*\[[^\]\n]*\]\s*(?:[#;].*)?$", text, re.M):
            text, offset = "[blackhole]\n" + text, 1
        try:
            parser.read_string(text, source=path)
        except configparser.Error as exc:
            raise ConfigError("%s: %s" % (path, _ini_error(exc, text, offset))) from None
        for section in parser.sections():
            if section != "blackhole":
                raise ConfigError("%s: unknown section [%s]" % (path, section))
        options = dict(parser.items("blackhole")) if parser.has_section("blackhole") else {}
        options.update(overrides)
        return cls(source=path, **options)

    def listeners(self):
        """Every listener, plain first, in config order."""
        return self.listen + self.tls_listen


def _as_text(name, value):
    """A Python value given to Config, as the INI would spell it: a
    (host, port) pair or a list of them for the listen options, 5.0 for 5."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (tuple, list)):
        if name in ("listen", "tls_listen", "metrics_listen"):
            pairs = [value] if len(value) == 2 and isinstance(value[1], int) else value
            return ", ".join(_pair_text(item) if isinstance(item, (tuple, list))
                             else str(item) for item in pairs)
        joiner = {"delay": "-", "rate_limit": "/"}.get(name, ", ")
        return joiner.join(_as_text(name, item) for item in value)
    return str(value)


def _pair_text(pair):
    """("::1", 25, "mode=bounce") as "[::1]:25 mode=bounce"."""
    host, port, *flags = tuple(pair) + ("", "")[len(pair):]
    text = ("[%s]:%s" if ":" in str(host) else "%s:%s") % (host, port)
    return " ".join([text] + [str(flag) for flag in flags])


def _ini_error(exc, text, offset):
    """A configparser error as `line N: LINE: reason`, numbered as in the file."""
    lineno = getattr(exc, "lineno", None)
    if lineno is None and getattr(exc, "errors", None):
        lineno = exc.errors[0][0]
    if lineno is None:
        return str(exc).splitlines()[0]
    line = text.split("\n")[lineno - 1].strip()
    if isinstance(exc, (configparser.DuplicateOptionError,
                        configparser.DuplicateSectionError)):
        reason = "given twice"
    elif isinstance(exc, configparser.MissingSectionHeaderError):
        reason = "comes before the [blackhole] header"
    else:
        reason = "not OPTION = VALUE"
    return "line %d: %s: %s" % (lineno - offset, line, reason)


def _show(value):
    """An option's value as the user wrote it, for error lines."""
    if isinstance(value, tuple) and all(isinstance(item, Listener) for item in value):
        return ", ".join(item.text for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple) and len(value) == 2 and all(
            isinstance(item, int) for item in value):      # delay
        return "%d" % value[0] if value[0] == value[1] else "%d-%d" % value
    return value


def options_text():
    """The `--options` / `blackhole_config` listing."""
    lines = []
    for name, (syntax, default, meaning, _) in OPTIONS.items():
        lines.append("%s = %s\n    default: %s\n    %s" % (name, syntax, default, meaning))
    return "\n".join(lines) + "\n"


# ###########################################################################
# Protocol helpers: pure functions and small objects the handler asks
# ###########################################################################

_PATH_RE = re.compile(r"^\s*<([^<>]*)>(.*)$")


def parse_path(arg, keyword, strict=False):
    """Split `FROM:<a> params` into (address, params text).

    Returns None for a malformed argument.  Permissive parsing also takes
    a space after the colon and a bare address without brackets.
    """
    head, sep, rest = arg.partition(":")
    if not sep or head.strip().upper() != keyword:
        return None
    if strict and head != head.strip():
        return None
    if strict and rest.startswith(" "):
        return None
    match = _PATH_RE.match(rest)
    if match:
        address, params = match.groups()
        return address, params.strip()
    if strict:
        return None
    words = rest.split(None, 1)
    if not words:
        return None
    return words[0], words[1] if len(words) > 1 else ""


def parse_params(text):
    """Parse `KEY=VALUE KEY` ESMTP parameters into a dict (keys upper-case)."""
    params = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        params[key.upper()] = value if sep else True
    return params


Directive = collections.namedtuple("Directive", "data action value count")
Directive.__doc__ = """One address directive (section 10.1).

action is fail, defer, drop, code or delay; value the code or seconds;
count the K of an xK suffix, or None.
"""

_DIRECTIVE_RE = re.compile(
    r"^(data-)?(fail|defer|drop|421|4[5-9]\d|5[0-5]\d|delay-\d{1,9})(?:x([1-9]\d{0,8}))?\Z",
    re.I | re.A)        # ASCII: no other script's digits or letters, no "\n"


def parse_directives(address):
    """The directives at the start of an address's local part, as a tuple.

    Returns () for an ordinary address: anything before the first `=` that
    is not entirely directives makes the address ordinary, never an error.
    """
    if "=" not in address:
        return ()
    local = address.rpartition("@")[0] if "@" in address else address
    head, sep, _ = local.partition("=")
    if not sep or not head:
        return ()
    plan = []
    for word in head.split("."):
        match = _DIRECTIVE_RE.match(word)
        if not match:
            return ()
        data, action, count = match.groups()
        action = action.lower()
        value = None
        if action.startswith("delay-"):
            action, value = "delay", min(int(action[6:]), MAX_DELAY)
        elif action.isdigit():
            action, value = "code", int(action)
        plan.append(Directive(bool(data), action, value, int(count) if count else None))
    return tuple(plan)


class SenderChecks:
    """Notes the sender issues of one message's data (section 11).

    Fed the same unstuffed segments the DATA/BDAT reader already holds, it
    carries only a pending CR, the current line's length and a bounded
    header buffer across calls, so the result never depends on how the
    client's writes were split.  Ask `issues(...)` at the end.
    """

    long_line = 998     # RFC 5322 2.1.1: octets of content per line

    def __init__(self, eightbit_ok=False):
        self.found = set()
        self.eightbit_ok = eightbit_ok
        self.line_len = 0           # octets of the current, unfinished line
        self.pending_cr = False     # the last octet fed was a CR
        self.header = _HeaderScan()
        # io's C newline decoder notes which endings it saw (CR, LF, CRLF)
        # in one pass over the text, and holds back a CR that ends one
        # segment until the next: both bare checks for the cost of one.
        self.endings = io.IncrementalNewlineDecoder(None, False)

    def feed(self, seg):
        """Check one segment of message content."""
        if not seg:
            return
        found = self.found
        self.header.feed(seg)
        text = None
        if "bare_lf" not in found or "bare_cr" not in found:
            text = seg.decode("latin-1")
            self._line_endings(text)
        if not self.eightbit_ok and not (text or seg).isascii():   # a str knows at once
            found.add("8bit_without_8bitmime")
            self.eightbit_ok = True
        prev_cr = self.pending_cr
        self.pending_cr = seg[-1] == 13
        if "long_line" not in found:
            self._line_lengths(seg, prev_cr)

    def _line_endings(self, text):
        endings = self.endings
        endings.decode(text)
        seen = endings.newlines         # None, one ending, or a tuple of them
        if seen is not None and seen != "\r\n":
            seen = (seen,) if isinstance(seen, str) else seen
            if "\r" in seen:
                self.found.add("bare_cr")
            if "\n" in seen:
                self.found.add("bare_lf")

    def _line_lengths(self, seg, prev_cr):
        limit, size = self.long_line, len(seg)
        first = seg.find(b"\n")
        if first < 0:
            self.line_len += size
            if self.line_len > limit + 1:
                self.found.add("long_line")
            return
        length = self.line_len + first
        if length and (seg[first - 1] == 13 if first else prev_cr):
            length -= 1
        if length > limit:
            self.found.add("long_line")
            return
        start, rfind, find = first + 1, seg.rfind, seg.find
        while size - start > limit:
            end = rfind(b"\n", start, start + limit + 1)
            if end < 0:     # no line end in 999 octets: measure the line
                end = find(b"\n", start)
                if end < 0:
                    break
                if end - start - (seg[end - 1] == 13) > limit:
                    self.found.add("long_line")
                    return
            start = end + 1
        tail = size - seg.rfind(b"\n") - 1
        self.line_len = tail
        if tail > limit + 1:
            self.found.add("long_line")

    def issues(self, envelope, command_bare_lf):
        """The sorted issue names for the message just read."""
        found = self.found
        self.header.finish()        # no empty line: the whole message was header
        if self.line_len > self.long_line + (1 if self.pending_cr else 0):
            found.add("long_line")
        if self.pending_cr:         # the data ended on a CR (BDAT)
            found.add("bare_cr")
        if command_bare_lf:
            found.add("bare_lf")
        if not self.header.has_date:
            found.add("missing_date")
        if not self.header.has_from:
            found.add("missing_from")
        if not self.header.has_message_id:
            found.add("missing_message_id")
        if envelope.utf8_address and not envelope.smtputf8:
            found.add("utf8_without_smtputf8")
        if envelope.no_helo:
            found.add("no_helo")
        return tuple(sorted(found))


def _empty_line(data):
    """The index of the LF that ends the line before the first empty line
    (CRLF or LF) in data, or -1."""
    end = data.find(b"\n\r\n")
    bare = data.find(b"\n\n", 0, end + 1 if end >= 0 else len(data))
    return bare if bare >= 0 else end


class _HeaderScan:
    """Finds the end of a message's header and the few fields we look at.

    Keeps at most max_header octets; a longer header is looked at a block
    of complete lines at a time.
    """

    max_header = 65536
    partial_keep = 80   # of a line cut by max_header: enough for any field name

    def __init__(self):
        self.buf = bytearray(b"\n")    # a virtual line end before line one
        self.done = False
        self.has_date = self.has_from = self.has_message_id = False
        self.mode = self.delay = None

    def feed(self, seg):
        if self.done:
            return
        buf = self.buf
        if len(buf) == 1:               # the first segment: the usual whole header
            if seg[:1] == b"\n" or seg[:2] == b"\r\n":
                self._end(b"\n")        # the first line is empty: no header
                return
            end = _empty_line(seg)
            if end >= 0:
                self._end(b"\n" + seg[:end + 1])
                return
        else:
            tail = bytes(buf[-2:])
            end = _empty_line(tail + seg[:2])   # an empty line straddling the two
            if end >= 0:
                end += len(buf) - len(tail)
            else:
                end = _empty_line(seg)
                if end >= 0:
                    end += len(buf)
            if end >= 0:
                if end >= len(buf):
                    buf += seg[:end + 1 - len(buf)]
                self._end(bytes(buf[:end + 1]))
                return
        buf += seg
        if len(buf) > self.max_header:
            last = buf.rfind(b"\n")
            if last > 0:
                self._scan(bytes(buf[:last + 1]))
                self.buf = bytearray(buf[last:last + 1 + self.partial_keep])
            else:
                del buf[self.partial_keep:]

    def finish(self):
        """No empty line came: the whole message was header."""
        if not self.done:
            self._end(bytes(self.buf) + b"\n")

    def _end(self, block):
        self._scan(block)
        self.done, self.buf = True, None

    def _scan(self, block):
        # find, not `in`: bytes `in` first tries its operand as an int and
        # builds the TypeError it raises (2-9x slower on 3.11-3.13)
        lower = block.lower()
        self.has_date = self.has_date or lower.find(b"\ndate:") >= 0
        self.has_from = self.has_from or lower.find(b"\nfrom:") >= 0
        self.has_message_id = self.has_message_id or lower.find(b"\nmessage-id:") >= 0
        if lower.find(b"\nx-blackhole-") >= 0:
            for name in ("mode", "delay"):
                field = b"\nx-blackhole-%s:" % name.encode()
                at = lower.find(field)
                if at >= 0:
                    start = at + len(field)
                    end = lower.find(b"\n", start)
                    value = lower[start:end].strip().decode("latin-1")
                    setattr(self, name, value)


class Envelope:
    """One message as `on_message` and `Server.messages` see it (section 9)."""

    __slots__ = ("peer", "helo", "mail_from", "mail_options", "rcpt_tos",
                 "data", "reply", "issues", "size", "smtputf8", "eightbit",
                 "utf8_address", "no_helo", "refused", "sender_plan",
                 "rcpt_plans")

    def __init__(self, peer=None, helo=None):
        self.peer, self.helo = peer, helo
        self.mail_from = None
        self.mail_options = {}
        self.rcpt_tos = []
        self.data = None
        self.reply = None
        self.issues = ()
        self.size = 0
        self.smtputf8 = self.eightbit = self.utf8_address = False
        self.no_helo = False
        self.refused = 0            # recipients refused in this transaction
        self.sender_plan = ()
        self.rcpt_plans = []

    def __repr__(self):
        return "<Envelope from=%r to=%r size=%d reply=%r>" % (
            self.mail_from, self.rcpt_tos, self.size, self.reply)


class TokenBucket:
    """Per-key token buckets: `rate` tokens per `per` seconds (section 10.3).

    Buckets start full and refill continuously; the table is bounded by
    dropping the least recently used key.
    """

    max_keys = 100000

    def __init__(self, rate, per, clock=time.monotonic):
        self.rate, self.per, self.clock = rate, per, clock
        self._buckets = collections.OrderedDict()
        self._lock = threading.Lock()

    def take(self, key):
        """Take one token for key; False when there is none."""
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.pop(key, (self.rate, now))
            tokens = min(self.rate, tokens + (now - then) * self.rate / self.per)
            ok = tokens >= 1
            self._buckets[key] = (tokens - 1 if ok else tokens, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return ok


class Greylist:
    """Greylisting of (ip, sender, recipient) triples (section 10.2).

    `check(triple)` returns 0 to accept, else the period (for the 451 text).
    The table is bounded (oldest triple dropped first).
    """

    max_triples = 100000
    accept_for = 24 * 3600      # seconds a passed triple stays accepted

    def __init__(self, period, clock=time.monotonic):
        self.period, self.clock = period, clock
        self._table = collections.OrderedDict()
        self._lock = threading.Lock()

    def check(self, triple):
        now = self.clock()
        with self._lock:
            entry = self._table.get(triple)
            if entry is None or (entry[1] is not None and now > entry[1]):
                self._table[triple] = [now, None]
                self._table.move_to_end(triple)
                if len(self._table) > self.max_triples:
                    self._table.popitem(last=False)
                return self.period
            first, until = entry
            if until is None:
                if now - first < self.period:
                    return self.period
                entry[1] = now + self.accept_for
            return 0

    def __len__(self):
        return len(self._table)


_PROXY_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"  # a v2 header's first 12 octets
_PROXY_V1_MAX = 107             # octets of a v1 header, CRLF included (its spec, 2.1)
_PROXY_V2_MAX = 16 + 65535      # a v2 header: 16 fixed octets and a 16-bit length


def parse_proxy_v1(data):
    """Parse a PROXY protocol v1 header at the start of `data`.

    Returns (source, length): source is (host, port), or None for
    `PROXY UNKNOWN`; length is the header's octets.  Returns None while
    `data` holds only the beginning of a header; raises ValueError for an
    invalid one.
    """
    if not data.startswith(b"PROXY "[:len(data)]):
        raise ValueError("not a PROXY header")
    end = data.find(b"\r\n", 0, _PROXY_V1_MAX)
    if end < 0:
        if len(data) >= _PROXY_V1_MAX:
            raise ValueError("PROXY v1 header too long")
        return None
    words = data[:end].split(b" ")
    if len(words) >= 2 and words[1] == b"UNKNOWN":
        return None, end + 2
    if len(words) != 6 or words[1] not in (b"TCP4", b"TCP6") or \
            b"%" in words[2] + words[3]:    # ipaddress takes scope ids, any text
        raise ValueError("malformed PROXY v1 header")
    try:
        src = ipaddress.ip_address(words[2].decode("ascii"))
        dst = ipaddress.ip_address(words[3].decode("ascii"))
        ports = [int(w) for w in words[4:6]]
    except (ValueError, UnicodeDecodeError):
        raise ValueError("malformed PROXY v1 address") from None
    version = 4 if words[1] == b"TCP4" else 6
    if src.version != version or dst.version != version:
        raise ValueError("PROXY v1 address does not match its family")
    if any(not 0 <= p <= 65535 or str(p).encode() != w
           for p, w in zip(ports, words[4:6])):
        raise ValueError("malformed PROXY v1 port")
    return (str(src), ports[0]), end + 2


def parse_proxy_v2(data):
    """Parse a PROXY protocol v2 header at the start of `data`.

    Same contract as parse_proxy_v1; the v2 LOCAL command, and the
    UNSPEC/UNIX families, give a None source.
    """
    sig = _PROXY_V2_SIG
    if not data.startswith(sig[:len(data)]):
        raise ValueError("not a PROXY v2 header")
    if len(data) < 16:
        return None
    ver_cmd, family, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if ver_cmd >> 4 != 2 or ver_cmd & 0xF > 1:
        raise ValueError("bad PROXY v2 version or command")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    if ver_cmd & 0xF == 0:              # LOCAL: a health check by the balancer
        return None, total
    body = data[16:total]
    if family >> 4 == 1:
        if length < 12:
            raise ValueError("PROXY v2 IPv4 block too short")
        return (str(ipaddress.IPv4Address(body[:4])),
                struct.unpack("!H", body[8:10])[0]), total
    if family >> 4 == 2:
        if length < 36:
            raise ValueError("PROXY v2 IPv6 block too short")
        return (str(ipaddress.IPv6Address(body[:16])),
                struct.unpack("!H", body[32:34])[0]), total
    if family >> 4 in (0, 3):
        return None, total
    raise ValueError("bad PROXY v2 address family")


def _parse_proxy(data):
    """Dispatch to v1 or v2 by the first octet."""
    if data[:1] == b"P":
        return parse_proxy_v1(data)
    if data[:1] == b"\r":
        return parse_proxy_v2(data)
    if not data:
        return None
    raise ValueError("not a PROXY header")


def _feed(checks, header):
    """What the DATA and BDAT readers hand each segment to: the checks
    (which scan the header too), the header scan alone, or nothing."""
    scanner = checks if checks is not None else header
    return scanner.feed if scanner is not None else None


_LF_DOT = re.compile(rb"\n\.")
# the end of data: CRLF.CRLF, or LF.LF after a bare LF; never a mix (4.2)
_END_OF_DATA = re.compile(rb"\n\.(?:(?<=\r\n\.)\r\n|(?<!\r\n\.)\n)")
_LONE_DOT = re.compile(rb"\n\.[^.]")     # a line-leading dot the sender did not double
_DOT_GAP = 512          # octets per dot below which a regex beats memchr hops
_DOT_STRETCH = 8192     # how far the regex searches before hops resume


def _find_line_dot(window, start):
    """The index of the LF before the first line-leading dot at or after
    start, or -1.

    memchr hops from dot to dot settle it while dots are sparse (a
    generated body, base64).  Where they come more often than every
    `_DOT_GAP` octets (prose, a header full of host names), a regex search
    for LF-dot takes the next `_DOT_STRETCH` octets; it is twice as fast
    as bytes.find's for two octets, and slower than memchr on sparse dots.
    """
    find, first, hops = window.find, start, 0
    while True:
        dot = find(b".", start)
        if dot < 0:
            return -1
        if window[dot - 1] == 10:
            return dot - 1
        start, hops = dot + 1, hops + 1
        if hops > 8 and start - first < hops * _DOT_GAP:
            stop = start + _DOT_STRETCH
            match = _LF_DOT.search(window, start, stop)
            if match:
                return match.start()
            if stop >= len(window):
                return -1
            start = first = stop - 1    # an LF there may begin LF-dot
            hops = 0


def _hostport(host, port):
    """An address as log lines show it: host:port, [v6]:port."""
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def _trusted(peer, networks):
    """Whether peer may send a PROXY header (proxy_trusted, section 12)."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in net for net in networks)


# ###########################################################################
# Counters and per-process state
# ###########################################################################

_LAST_NS = [0]          # _unique_ns()'s last answer in this process
_LAST_NS_LOCK = threading.Lock()


def _unique_ns():
    """time.time_ns(), but never the same twice in a process: two servers
    made within one tick of a coarse clock (Windows) would share message ids."""
    with _LAST_NS_LOCK:
        _LAST_NS[0] = max(time.time_ns(), _LAST_NS[0] + 1)
        return _LAST_NS[0]


class Stats:
    """Counters of section 8 in an array of 64-bit integers.

    The array may be a slice of shared memory, so a supervisor can sum its
    workers' counters; one lock per process keeps increments exact.
    """

    names = (
        "connections_total", "connections_active", "messages_accepted",
        "messages_bounced", "messages_too_big", "bytes_received",
        "auth_success", "auth_failure", "tls_success", "tls_failure",
        "timeouts") + tuple("faults_" + k for k in FAULT_KINDS) + tuple(
        "sender_issues_" + i for i in SENDER_ISSUES)
    size = len(names) * 8

    def __init__(self, buffer=None):
        self._array = memoryview(buffer if buffer is not None
                                 else bytearray(self.size)).cast("q")
        self._index = {name: i for i, name in enumerate(self.names)}
        self._lock = threading.Lock()

    def add(self, name, amount=1):
        with self._lock:
            self._array[self._index[name]] += amount

    def set(self, name, value):
        with self._lock:
            self._array[self._index[name]] = value

    def message(self, result, size, issues):
        """Count one message whose data was received (section 8, 11); a
        result of None is counted later, with add()."""
        index, array = self._index, self._array
        with self._lock:
            if result is not None:
                array[index["messages_" + result]] += 1
            array[index["bytes_received"]] += size
            for issue in issues:
                array[index["sender_issues_" + issue]] += 1

    def as_dict(self):
        return dict(zip(self.names, self._array.tolist()))

    @classmethod
    def summed(cls, stats_list):
        total = dict.fromkeys(cls.names, 0)
        for stats in stats_list:
            for name, value in stats.as_dict().items():
                total[name] += value
        return total


def _counters_line(counters):
    """The SIGUSR1 log line."""
    return "counters: " + " ".join("%s=%d" % item for item in counters.items())


def metrics_text(counters):
    """Prometheus text exposition of the counters (section 8)."""
    c = counters
    out = []

    def metric(name, kind, doc, samples):
        out.append("# HELP blackhole_%s %s" % (name, doc))
        out.append("# TYPE blackhole_%s %s" % (name, kind))
        for labels, value in samples:
            out.append("blackhole_%s%s %d" % (name, labels, value))

    metric("connections_total", "counter", "SMTP connections accepted.",
           [("", c["connections_total"])])
    metric("connections_active", "gauge", "SMTP sessions open now.",
           [("", c["connections_active"])])
    metric("messages_total", "counter", "Messages whose data was received.",
           [('{result="%s"}' % r, c["messages_" + r])
            for r in ("accepted", "bounced", "too_big")])
    metric("bytes_received_total", "counter", "Message octets received.",
           [("", c["bytes_received"])])
    metric("auth_total", "counter", "AUTH decisions.",
           [('{result="%s"}' % r, c["auth_" + r]) for r in ("success", "failure")])
    metric("tls_handshakes_total", "counter", "TLS handshakes.",
           [('{result="%s"}' % r, c["tls_" + r]) for r in ("success", "failure")])
    metric("timeouts_total", "counter", "Sessions ended by the timeout.",
           [("", c["timeouts"])])
    metric("faults_total", "counter", "Injected failures.",
           [('{kind="%s"}' % k, c["faults_" + k]) for k in FAULT_KINDS])
    metric("sender_issues_total", "counter", "Messages with each sender issue.",
           [('{issue="%s"}' % i, c["sender_issues_" + i]) for i in SENDER_ISSUES])
    return "\n".join(out) + "\n"


def _digest(*parts):
    """A short key for a table that client strings would otherwise fill.

    sha256, not hash(): the same on every run and in every process (10.4)."""
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).digest()


class _Shared:
    """What every session of one process shares: counters and tables."""

    max_counts = 100000     # address directive xK counts and seeded sequences
    tls_refusals = 10       # 421s a second sent over TLS, each at a handshake's cost;
                            # more refused clients of a tls_listen port are just closed

    def __init__(self, config, stats=None, capture=0, on_message=None):
        self.config = config
        self.stats = stats or Stats()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.sessions = {}              # thread -> handler (socket until set up)
        self.idle = {}                  # thread -> _Parked, between sessions
        self.per_ip = collections.Counter()
        self._active = 0                # sessions admitted and open
        self.awaiting_header = 0        # connections yet to send their PROXY header
        self.greylists = {}             # period -> Greylist
        self.rate = TokenBucket(*config.rate_limit) if config.rate_limit else None
        self.tls_refused = TokenBucket(self.tls_refusals, 1.0)
        self.counts = collections.OrderedDict()
        self.ids = itertools.count(1)
        self.id_prefix = "%x.%d" % (_unique_ns(), os.getpid())
        self.messages = collections.deque(maxlen=capture) if capture else None
        self.arrived = threading.Condition()
        self.on_message = on_message
        self.keep_data = bool(capture or on_message)

    def message_id(self):
        return f"<{self.id_prefix}.{next(self.ids)}@{self.config.hostname}>"

    def greylist_for(self, period):
        with self.lock:
            if period not in self.greylists:
                self.greylists[period] = Greylist(period)
            return self.greylists[period]

    def count(self, *key):
        """How many times key was seen, this time included (xK, seeds).

        A seed's key holds the sender and every recipient (up to
        max_recipients x max_address characters); the table keeps a digest."""
        key = _digest(*key)
        with self.lock:
            seen = self.counts.pop(key, 0) + 1
            self.counts[key] = seen
            if len(self.counts) > self.max_counts:
                self.counts.popitem(last=False)
            return seen

    def rng(self, sender, rcpts):
        """The random source for one end of data (section 10.4)."""
        seed = self.config.seed
        if seed is None:
            return random
        sender = sender or ""       # DATA without MAIL, in permissive mode
        sequence = self.count("seed", sender, *rcpts) - 1
        return random.Random(_digest(str(seed), sender, *rcpts, str(sequence)))

    def open_session(self, peer):
        """Admit a session: None, or the 421 that refuses it (section 10.3)."""
        config, stats = self.config, self.stats
        stats.add("connections_total")
        with self.lock:
            if self._active >= config.max_connections:
                return "4.7.0 %s Too many connections, try again later" % config.hostname
            if config.max_connections_per_ip and \
                    self.per_ip[peer] >= config.max_connections_per_ip:
                stats.add("faults_connections_per_ip")
                return "4.7.0 %s Too many connections from your address" % config.hostname
            self._active += 1
            self.per_ip[peer] += 1
        stats.add("connections_active")
        return None

    def await_header(self):
        """Count a connection that has yet to send its PROXY header (12):
        False when max_connections of them wait already.  (Admitted sessions
        do not count here: a full server still answers 421 after the header.)"""
        with self.lock:
            if self.awaiting_header >= self.config.max_connections:
                return False
            self.awaiting_header += 1
            return True

    def header_read(self):
        with self.lock:
            self.awaiting_header -= 1

    def close_session(self, peer):
        with self.lock:
            self._active -= 1
            self.per_ip[peer] -= 1
            if not self.per_ip[peer]:
                del self.per_ip[peer]
        self.stats.add("connections_active", -1)

    def reap(self):
        """Cut off every session whose awaited line is overdue (4.5)."""
        now = time.monotonic()
        with self.lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            deadline = getattr(session, "deadline", None)
            if deadline is not None and now > deadline:
                session.kick(now)

    def deliver(self, envelope):
        """Hand a finished envelope to capture and on_message."""
        if self.messages is not None:
            with self.arrived:
                self.messages.append(envelope)
                self.arrived.notify_all()
        if self.on_message is not None:
            try:
                self.on_message(envelope)
            except Exception:
                log.exception("on_message raised")


# ###########################################################################
# The SMTP session
# ###########################################################################

_BOUNCE_CODES = tuple(sorted(BOUNCES))
_VERBS = {}     # handler class -> {verb: "smtp_VERB"}


def _wire_verbs(handler_class):
    """The verbs a handler class answers, each to its smtp_VERB method name.

    A client's verb is only looked up in this table, so no other
    attribute is ever reachable from the wire."""
    verbs = _VERBS.get(handler_class)
    if verbs is None:
        verbs = _VERBS[handler_class] = {
            name[5:]: name for name in dir(handler_class)
            if name.startswith("smtp_") and name[5:].isalpha() and name[5:].isupper()}
    return verbs


_TOO_LONG = object()    # _readline's answer for a line over the limit
_MAIL_PARAMS = frozenset(("SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"))
_RCPT_PARAMS = frozenset(("NOTIFY", "ORCPT"))
_PARAM_VALUES = {       # RFC 1870, 6152 and 3030, 3461
    "SIZE": re.compile(r"[0-9]{1,20}\Z"),
    "BODY": re.compile(r"(?:7BIT|8BITMIME|BINARYMIME)\Z", re.I),
    "RET": re.compile(r"(?:FULL|HDRS)\Z", re.I),
}
_DELAY_RE = re.compile(r"^(\d+)\s*(?:,\s*(\d+))?$", re.A)


def _delay_seconds(digits):
    """X-Blackhole-Delay's whole seconds, at most MAX_DELAY however many
    digits (int() refuses over 4300)."""
    digits = digits.lstrip("0")
    return MAX_DELAY if len(digits) > len(str(MAX_DELAY)) else \
        min(int(digits or "0"), MAX_DELAY)


def _without_smtputf8(arg):
    """VRFY's or EXPN's argument without RFC 6531's SMTPUTF8 parameter."""
    words = arg.rsplit(None, 1)
    return words[0] if len(words) == 2 and words[1].upper() == "SMTPUTF8" else arg


def _printable(text):
    """Client text fit to echo in a reply: control characters (a bare CR
    would break the reply line, RFC 5321 4.2) and octets that were not
    UTF-8 become "?"."""
    return "".join(c if c.isprintable() else "?" for c in text)


class SMTPHandler(socketserver.StreamRequestHandler):
    """One SMTP session over one connection (section 4).

    Methods for the server: setup(), handle() (the whole session), finish().

    Methods that may be overridden: smtp_VERB(arg), one per wire verb (a
    client's verb reaches only smtp_ methods named in ASCII capitals, see
    _wire_verbs); reply(code, *lines), the one place replies are built;
    ehlo_keywords(); _auth_MECHANISM(initial) for each of auth_mechanisms.

    Class variables: the limits below, each with its reason.

    A verb answers with reply() or by raising SMTPError(code, text) from
    anywhere below it.  Reply texts are literals where they are sent (grep
    the text, e.g. "Rate limit exceeded"); shared ones are BOUNCES,
    FAIL_REPLIES, TOO_BIG and SYNTAX.  The socket is read in blocks into
    one buffer shared by commands and message data, so terminators are
    found with bytes.find; StreamRequestHandler's rfile and wfile are
    never made (setup() and finish() do not call super()).
    """

    disable_nagle_algorithm = True  # section 7: else ~40 ms per pipelined message
    read_size = 65536               # octets asked of each recv() in message data
    command_read_size = 4096        # and for commands: what an idle session's recv()
                                    # holds (85 KB after a burst, at 64 KB)
    max_line = 12288                # any command line; the excess is discarded (4.4)
    max_strict_line = 512           # RFC 5321 4.5.3.1.4, enforced with strict
    max_unknown = 10                # unknown commands before the session is closed
    max_recipients = 1000           # RCPTs per transaction, refused ones too (so one
                                    # cannot flush the greylist); RFC 5321 4.5.3.1.8: 100
    auth_mechanisms = ("CRAM-MD5", "LOGIN", "PLAIN")    # EHLO's order; smtp_AUTH takes these
    max_address = 256               # octets of a path, RFC 5321 4.5.3.1.3: else
                                    # 1000 recipients of 12 KB would keep 12 MB a session
    max_params = 16                 # ESMTP parameters of a MAIL: a 12 KB line of
                                    # one-letter ones kept 430 KB a transaction
    final_write_timeout = 1.0       # seconds for a last 421 to a client not reading
    max_queued = 256                # replies held for one write (4.6): `EXPN all` is
                                    # 13 lines, ~35x its size, so a pipelined flood
                                    # is bounded

    # ----- session life ------------------------------------------------------

    def setup(self):
        """Create every session attribute; reset() makes the Envelope."""
        server = self.server
        self.shared = server.shared
        self.config = config = server.config
        self.listener = listener = server.listener
        self.hostname = config.hostname
        self.sock = self.request
        self.peer, self.peer_port = self.client_address[:2]
        self._buf = b""                 # bytes received, not yet used
        self._pos = 0                   # first unused octet in _buf
        self._out = []                  # replies not yet written
        self._command_read = min(self.command_read_size, self.read_size)
        self._timeout = config.timeout or None
        self.deadline = None            # when the line awaited now is overdue
        self.timed_out = False          # the reaper cut the session off
        self.writing = False            # blocked in sendall (stop() looks)
        self._last_crlf = True          # the last command line ended with CRLF
        self._debug = log.isEnabledFor(logging.DEBUG)
        self.tls = False
        self.helo = None
        self.authenticated = False
        self.unknown = 0
        self.closing = False
        self.counted = False            # in the session counts (open_session)
        self.command_bare_lf = False    # section 11: since the last end of data
        self.mode = listener.mode or config.mode
        self.delay = listener.delay or config.delay
        self.greylist = listener.greylist if listener.greylist is not None \
            else config.greylist
        self.switches = config.dynamic_switch and not (listener.mode or listener.delay)
        self.verbs = _wire_verbs(type(self))
        self.envelope = None
        self.bdat = None                # (SenderChecks, header, parts) during BDAT
        if self.disable_nagle_algorithm:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            except OSError:
                pass
        with self.shared.lock:
            self.shared.sessions[threading.current_thread()] = self

    def handle(self):
        try:
            try:
                self._session()
            except socket.timeout:
                self.shared.stats.add("timeouts")
                if self._debug:
                    log.debug("%s timed out", self.peer)
                self._last_reply(421, "4.4.2 %s Error: timeout exceeded" % self.hostname)
            except _Shutdown:
                self._last_reply(*self._shutting_down())
            else:
                self._last_flush()
        except (_Disconnect, OSError, ssl.SSLError) as exc:
            if self._debug:
                log.debug("%s disconnected: %s", self.peer, exc or type(exc).__name__)
        except Exception:
            log.exception("session with %s failed", self.peer)
            self._last_reply(451, "4.3.0 Requested action aborted: local error in processing")

    def finish(self):
        self._leave()
        if self.sock is not self.request:      # a TLS socket of our own
            try:
                self.sock.setblocking(False)    # send close_notify, never wait
                self.sock.unwrap()
            except (OSError, ValueError):
                pass
            self.sock.close()
        if self._debug:
            log.debug("%s closed", self.peer)

    def _session(self):
        if self.listener.proxy:
            if not self.shared.await_header():
                self.shared.stats.add("connections_total")
                raise _Disconnect("max_connections reached before the PROXY header")
            try:
                self._read_proxy_header()
            finally:
                self.shared.header_read()
        refusal = self.shared.open_session(self.peer)
        self.counted = refusal is None
        if self._debug:
            log.debug("%s connected to %s", self.peer,
                      _hostport(*self.server.server_address[:2]))
        if self.listener.tls:       # TLS from the first octet: the 421 too
            if refusal and not self.shared.tls_refused.take(None):
                raise _Disconnect("refused: %s (closed: too many for TLS)" % refusal)
            self._start_tls(self.final_write_timeout if refusal else None)
        if refusal:
            if self._debug:
                log.debug("%s refused: %s", self.peer, refusal.split(" ", 2)[-1])
            self._last_reply(421, refusal)
            return
        self.reset()
        self.reply(220, "%s ESMTP" % self.hostname)
        while not self.closing:
            self.handle_one_command()

    def _shutting_down(self):
        return 421, "4.3.2 %s Service shutting down" % self.hostname    # section 2

    def _leave(self):
        """Leave the session counts before the last reply is written, so
        a client that read it may scrape or connect again (section 8)."""
        if self.counted:
            self.counted = False
            self.shared.close_session(self.peer)

    def reset(self):
        """Clear the transaction: a fresh Envelope (RSET, HELO, end of data)."""
        self.envelope = Envelope(self.peer, self.helo)
        self.bdat = None

    # ----- reading and writing -----------------------------------------------

    def _recv(self, size):
        """One block of at most size octets; never b"" (the end raises)."""
        if self._out:
            self._flush()
        try:
            data = self.sock.recv(size)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError):
            data = b""
        if not data:
            if self.timed_out:
                raise socket.timeout("timed out")
            if self.shared.stopping.is_set():
                raise _Shutdown()
            raise _Disconnect("connection closed by client")
        return data

    def _start_clock(self):
        """Start the timeout for the line now awaited (section 4.5).

        Sockets stay blocking (no poll() before each recv); the accept
        loop's reaper shuts down the reading side of overdue sessions.
        """
        if self._timeout:
            self.deadline = time.monotonic() + self._timeout

    def kick(self, now):
        """Called by the reaper when the deadline passed: wake the session
        blocked on a read (it answers 421); a second kick also closes the
        writing side of one stuck writing to a client that does not read."""
        deadline = self.deadline
        if deadline is None or deadline > now:      # the line came meanwhile
            return
        how = socket.SHUT_RDWR if self.timed_out else socket.SHUT_RD
        self.timed_out = True
        self.deadline = now + (self._timeout or 0)
        _shutdown(self.sock, how)

    def _readline(self, limit):
        """One command line, CRLF or LF included, or _TOO_LONG.

        The timeout bounds the whole line, not each recv; a line over
        `limit` octets is discarded as it arrives, never buffered.
        """
        buf, pos = self._buf, self._pos
        if pos < len(buf):      # pipelined: the line may be here already
            end = buf.find(b"\n", pos)
            if 0 <= end < pos + limit:
                if self.shared.stopping.is_set():   # no recv() is left to notice
                    raise _Shutdown()
                self._pos = end + 1
                return buf[pos:end + 1]
            buf, end = buf[pos:], (end - pos if end >= 0 else -1)
        else:                   # the usual: a client awaiting each reply
            buf, end = b"", -1
        self._buf, self._pos = b"", 0   # keep nothing used while waiting (a BDAT chunk)
        self._start_clock()
        too_long = False
        while end < 0 or too_long or end >= limit:
            if end >= 0:        # the end of an overlong line
                self._buf, self._pos = buf[end + 1:], 0
                self.deadline = None
                return _TOO_LONG
            if len(buf) > limit:
                too_long, buf = True, b""
            start = len(buf)
            buf += self._recv(self._command_read)
            end = buf.find(b"\n", start)
        self._buf, self._pos = buf, end + 1
        self.deadline = None
        return buf[:end + 1]

    def reply(self, code, *lines):
        """Queue a reply; the last line uses a space, the others a dash."""
        # f-strings here and elsewhere on the per-message path (message ids,
        # the end of data): a third of the cost of % on 3.11; % elsewhere.
        if len(lines) <= 1:
            text = f"{code} {lines[0] if lines else ''}\r\n"
        else:
            dash = f"\r\n{code}-"
            text = f"{code}-{dash.join(lines[:-1])}\r\n{code} {lines[-1]}\r\n"
        if self._debug:
            for line in text.splitlines():
                log.debug("%s < %s", self.peer, line)
        out = self._out
        out.append(text.encode("utf-8", "surrogateescape"))
        if len(out) >= self.max_queued:
            self._flush()

    def _flush(self):
        """Write every queued reply at once (section 4.6)."""
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self.writing = True         # stop() cuts off a client that does not read
            if self.deadline is None:   # and so does the reaper
                self._start_clock()
                self.sock.sendall(data)
                self.deadline = None
            else:
                self.sock.sendall(data)
            self.writing = False

    def _last_reply(self, code, text):
        """A reply before closing, to a client that may not be reading."""
        self.reply(code, text)
        self._last_flush()

    def _last_flush(self):
        """Write what is queued before closing: out of the session counts
        first (section 8), and within final_write_timeout, as a session no
        longer counted must not linger on a client that does not read."""
        self._leave()
        self.closing = True
        try:
            self.sock.settimeout(self.final_write_timeout)
            self._flush()
        except (OSError, ValueError):
            self._out.clear()

    def _wait(self, seconds):
        """Sleep for a delay, but never hold up shutdown."""
        if seconds > 0:
            self._flush()
            self.deadline = None
            if self.shared.stopping.wait(min(seconds, MAX_DELAY)):
                raise _Shutdown()

    # ----- commands ----------------------------------------------------------

    def handle_one_command(self):
        """Read one command, dispatch it to smtp_VERB, send what it raised."""
        line = self._readline(self.max_line)
        try:
            if line is _TOO_LONG:
                raise self._unknown(500, "5.5.2 Line too long")
            self._last_crlf = line[-2:] == b"\r\n"
            if not self._last_crlf:
                self.command_bare_lf = True
            text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
            verb, _, arg = text.partition(" ")
            name = verb.upper() if verb.isascii() else ""     # "ſ".upper() is "S"
            if self._debug:     # an unknown verb may be a password sent out of turn (5)
                log.debug("%s > %r", self.peer, self._loggable(name, arg, text, line))
            if self.config.strict and name != "AUTH" and len(line) > self.max_strict_line:
                raise self._unknown(500, "5.5.2 Line too long")
            method = self.verbs.get(name)
            if method is None:
                raise self._unknown()
            getattr(self, method)(arg.strip())
        except SMTPError as err:
            self.reply(err.code, err.text)
            if err.close:
                self.closing = True

    def _loggable(self, name, arg, text, line):
        """A command line for the debug log, without credentials (5)."""
        if name == "AUTH":      # as smtp_AUTH reads it
            mechanism = arg.strip().partition(" ")[0]
            return "AUTH " + (mechanism if mechanism.upper() in self.auth_mechanisms
                              else "(unknown mechanism)")
        return text if name in self.verbs else "(unknown, %d octets)" % len(line)

    def _unknown(self, code=502, text="5.5.2 Command not recognised"):
        """The SMTPError for an unknown or overlong command; the
        max_unknown-th of a session closes it (4.1)."""
        self.unknown += 1
        if self.unknown >= self.max_unknown:
            return SMTPError(502, "5.5.3 Too many unknown commands", close=True)
        return SMTPError(code, text)

    def ehlo_keywords(self):
        """The EHLO extensions, from the session's real state."""
        keywords = [
            "PIPELINING", "SIZE %d" % self.config.max_message_size, "8BITMIME",
            "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN", "CHUNKING", "HELP", "VRFY",
            "EXPN", "ETRN", "AUTH " + " ".join(self.auth_mechanisms)]
        if self._starttls_offered():
            keywords.append("STARTTLS")
        return keywords

    def _starttls_offered(self):
        return bool(self.config.starttls and not self.tls and self.server.tls_context)

    def _help_verbs(self):
        verbs = sorted(self.verbs)
        if not self._starttls_offered():
            verbs.remove("STARTTLS")
        return verbs

    def smtp_HELO(self, arg):
        if not arg and self.config.strict:
            raise SMTPError.syntax("HELO")
        self.helo = arg
        self.reset()
        self.reply(250, self.hostname)

    def smtp_EHLO(self, arg):
        if not arg and self.config.strict:
            raise SMTPError.syntax("EHLO")
        self.helo = arg
        self.reset()
        self.reply(250, self.hostname, *self.ehlo_keywords())

    def smtp_MAIL(self, arg):
        address, params, plan = self._sender(arg)
        env = self.envelope
        if env.mail_from is not None or env.rcpt_tos or env.refused or self.bdat:
            self.reset()        # a new transaction (permissive); else env is fresh
            env = self.envelope
        env.mail_from, env.mail_options, env.sender_plan = address, params, plan
        env.smtputf8 = "SMTPUTF8" in params
        env.eightbit = env.smtputf8 or str(params.get("BODY", "")).upper() in (
            "8BITMIME", "BINARYMIME")
        env.utf8_address = not address.isascii()
        env.no_helo = self.helo is None
        self.reply(250, "2.1.0 OK")

    def _sender(self, arg):
        """MAIL's checks, in order: (address, params, directives), or SMTPError."""
        strict, env = self.config.strict, self.envelope
        if strict and (self.helo is None or env.mail_from is not None):
            raise SMTPError.bad_sequence()
        path = parse_path(arg, "FROM", strict)
        if path is None:
            raise SMTPError.syntax("MAIL")
        address, params = path[0], parse_params(path[1])
        if self._too_long(address):
            raise SMTPError(501, "5.1.7 Sender address too long")
        if len(params) > self.max_params:
            raise SMTPError(501, "5.5.4 Too many parameters")
        if strict:
            self._check_params(params, _MAIL_PARAMS)
        size = params.get("SIZE")
        if isinstance(size, str) and size.isascii() and size.isdigit() and \
                (len(size) > 20 or int(size) > self.config.max_message_size):
            raise SMTPError(*TOO_BIG)
        rate = self.shared.rate
        if rate is not None and not rate.take(self.peer):
            self.shared.stats.add("faults_rate_limit")
            raise SMTPError(451, "4.7.1 Rate limit exceeded, try again later")
        plan = parse_directives(address)
        if plan:
            self._act_now(plan, address, "mail")
        return address, params, plan

    def smtp_RCPT(self, arg):
        env = self.envelope
        try:
            address, plan = self._recipient(env, arg)
        except SMTPError:
            env.refused += 1        # whatever the reason: 554 if none is accepted (4.7)
            raise
        env.rcpt_tos.append(address)
        env.rcpt_plans.append(plan)
        self.reply(250, "2.1.5 OK")

    def _recipient(self, env, arg):
        """RCPT's checks, in order: (address, directives), or SMTPError."""
        strict = self.config.strict
        if strict and env.mail_from is None:
            raise SMTPError.bad_sequence()
        path = parse_path(arg, "TO", strict)
        if path is None:
            raise SMTPError.syntax("RCPT")
        address = path[0]
        if self._too_long(address):
            raise SMTPError(501, "5.1.3 Recipient address too long")
        if strict:
            if not address:
                raise SMTPError.syntax("RCPT")
            self._check_params(parse_params(path[1]), _RCPT_PARAMS)
        if len(env.rcpt_tos) + env.refused >= self.max_recipients:
            raise SMTPError(452, "4.5.3 Too many recipients")
        env.utf8_address = env.utf8_address or not address.isascii()
        plan = parse_directives(address)
        if plan:
            self._act_now(plan, address, "rcpt")
        if self.greylist:
            greylist = self.shared.greylist_for(self.greylist)
            if greylist.check(_digest(self.peer, env.mail_from or "", address)):
                self.shared.stats.add("faults_greylist")
                raise SMTPError(451, "4.7.1 Greylisted, try again in %d seconds"
                                % self.greylist)
        return address, plan

    def _too_long(self, address):
        """Over max_address octets (a character of UTF-8 may take four)."""
        return len(address) > self.max_address or (not address.isascii() and len(
            address.encode("utf-8", "surrogateescape")) > self.max_address)

    @staticmethod
    def _check_params(params, known):
        """Strict mode refuses parameters the verb does not define, and
        values its extension does not allow."""
        for name, value in params.items():
            if name not in known:
                raise SMTPError(555, "5.5.4 Unsupported parameter: %s" % _printable(name))
            pattern = _PARAM_VALUES.get(name)
            if pattern is not None and not (isinstance(value, str) and pattern.match(value)):
                raise SMTPError(501, "5.5.4 Malformed parameter: %s" % _printable(name))

    def _check_recipients(self):
        """Strict mode: DATA and BDAT need MAIL and a RCPT (4.4).  Any mode:
        a transaction whose every RCPT was refused gets 554 (4.7)."""
        env = self.envelope
        if self.config.strict and (env.mail_from is None or
                                   not (env.rcpt_tos or env.refused)):
            raise SMTPError.bad_sequence()
        if env.refused and not env.rcpt_tos:
            raise SMTPError(554, "5.5.1 No valid recipients")

    def smtp_DATA(self, arg):
        if arg and self.config.strict:
            raise SMTPError.syntax("DATA")
        if self.config.strict and (self.bdat is not None or str(
                self.envelope.mail_options.get("BODY", "")).upper() == "BINARYMIME"):
            raise SMTPError.bad_sequence()     # BINARYMIME needs BDAT (RFC 3030 3)
        self._check_recipients()
        self.reply(354, "End data with <CR><LF>.<CR><LF>")
        checks, header, parts = self._message_readers()
        dot_issue = self._read_data(checks, header, parts)
        if dot_issue and checks is not None:
            checks.found.add("unstuffed_dot")
        self._end_of_data(checks, header, parts)

    def smtp_BDAT(self, arg):
        words = arg.split()
        if not 1 <= len(words) <= 2 or not (words[0].isascii() and words[0].isdigit()) or \
                len(words[0]) > 20 or \
                (len(words) == 2 and words[1].upper() != "LAST"):
            raise SMTPError.syntax("BDAT")
        size, last = int(words[0]), len(words) == 2
        try:
            self._check_recipients()
        except SMTPError:
            self._read_exact(size, None, None, None)   # RFC 3030: read, then refuse
            self.bdat = None
            self.envelope.size = 0
            raise
        if self.bdat is None:
            self.bdat = self._message_readers()
        checks, header, parts = self.bdat
        self._read_exact(size, checks, header, parts)
        if last:
            self._end_of_data(checks, header, parts)
        else:
            self.reply(250, "2.0.0 %d octets received" % size)

    def smtp_RSET(self, arg):
        if arg and self.config.strict:
            raise SMTPError.syntax("RSET")
        self.reset()
        self.reply(250, "2.0.0 OK")

    def smtp_NOOP(self, arg):
        self.reply(250, "2.0.0 OK")

    def smtp_QUIT(self, arg):
        if arg and self.config.strict:
            raise SMTPError.syntax("QUIT")
        self.reply(221, "2.0.0 Goodbye")
        self.closing = True

    def smtp_HELP(self, arg):
        verbs = self._help_verbs()
        if not arg:
            self.reply(250, "Supported commands: " + " ".join(verbs))
        elif arg.upper() in verbs:
            self.reply(250, "Syntax: " + SYNTAX[arg.upper()])
        else:
            raise SMTPError(501, "Supported commands: " + " ".join(verbs))

    def smtp_VRFY(self, arg):
        arg = _without_smtputf8(arg)
        if not arg:
            raise SMTPError.syntax("VRFY")
        start = arg.find("<")       # "Bob <bob@example.com>": the mailbox
        mailbox = arg[start + 1:].partition(">")[0] if start >= 0 else arg.strip("<>")
        address = "<%s>" % _printable(mailbox)
        if "pass=" in arg:
            self.reply(250, "2.0.0 %s OK" % address)
        elif "fail=" in arg:
            raise SMTPError(550, "5.7.1 %s unknown" % address)
        else:
            self.reply(252, "2.0.0 Will attempt delivery")

    def smtp_EXPN(self, arg):
        members = MAILING_LISTS.get(_without_smtputf8(arg).strip("<>").lower())
        if not members:
            raise SMTPError(550, "5.7.1 Not authorised")
        self.reply(250, *("%s <%s@%s>" % (name.title(), name, self.hostname)
                          for name in members))

    def smtp_ETRN(self, arg):
        self.reply(250, "2.0.0 Queueing started")

    # ----- message data ------------------------------------------------------

    def _message_readers(self):
        """(SenderChecks or None, header scan or None, parts list or None)."""
        env = self.envelope
        checks = header = None
        if self.config.sender_checks != "off":
            checks = SenderChecks(eightbit_ok=env.eightbit)
            header = checks.header
        elif self.switches:
            header = _HeaderScan()
        return checks, header, [] if self.shared.keep_data else None

    def _read_data(self, checks, header, parts):
        """Stream DATA content to its end (4.2); True if a dot was unstuffed
        from a line that had only one (section 11).

        The end is CRLF.CRLF, or LF.LF after a bare LF, never a mix (no SMTP
        smuggling).  Content is counted and fed to the checks, and kept only
        when `parts` is a list.  Each block is handled whole, in C: a block
        without a line-leading dot (_find_line_dot) is content as it came;
        one with dots is searched for the end (_END_OF_DATA), unstuffed with
        one replace() and searched once for a lone dot (_LONE_DOT), so a
        client sending a dot on every line costs no Python per line.  Only
        the last octets of a block with dots wait for the next read, and the
        next block is searched with the two octets before it.
        """
        limit, feed = self.config.max_message_size, _feed(checks, header)
        window = (b"\r\n" if self._last_crlf else b"\0\n") + self._buf[self._pos:]
        self._buf, self._pos = b"", 0
        pos, size, dot_issue = 2, 0, False
        self._start_clock()
        while True:
            hit = _find_line_dot(window, pos)       # the LF before the first dot
            end_of_data = _END_OF_DATA.search(window, hit) if hit >= 0 else None
            if end_of_data:
                end = end_of_data.start() + 1       # content up to here
            elif hit >= 0:                          # a dot's line may go on
                end = max(pos, len(window) - 3)
            else:
                end = len(window)
            if end > pos:
                if hit < end - 1 and hit >= 0:      # dots to unstuff before `end`
                    lead = 1 if pos else 0          # the LF before a dot at pos
                    seg = window[pos - lead:end].replace(b"\n.", b"\n")[lead:]
                    dot_issue = dot_issue or bool(_LONE_DOT.search(window, hit, end + 1))
                elif feed is not None or parts is not None:
                    seg = window[pos:end]
                else:
                    seg = None
                size += end - pos if seg is None else len(seg)
                if feed is not None:
                    feed(seg)
                if parts is not None:
                    parts.append(seg)
                    if size > limit:
                        parts = None        # too big: counted, no longer kept
            if end_of_data:
                self._buf = window[end_of_data.end():]
                break
            data = self._recv(self.read_size)
            if data.find(b"\n") >= 0:
                self._start_clock()
            if end == len(window) and len(data) > 1 and data[0] != 10 and data[0] != 46:
                window, pos = data, 0       # nothing to carry over: no copy
            elif end >= 2:
                window, pos = window[end - 2:] + data, 2
            else:       # a block read without the octets before it: none matter
                window, pos = b"\0\0"[end:] + window + data, 2
        self.deadline = None
        self.envelope.size = size
        return dot_issue

    def _read_exact(self, count, checks, header, parts):
        """Read one BDAT chunk of `count` octets (RFC 3030).

        As in DATA, the timeout runs until a line ends (4.5), so a client
        trickling octets into a chunk is cut off too."""
        env, feed = self.envelope, _feed(checks, header)
        self._start_clock()
        while count:
            buf, pos = self._buf, self._pos
            if pos >= len(buf):
                buf, pos = self._recv(self.read_size), 0
                if buf.find(b"\n") >= 0:
                    self._start_clock()
            seg = buf[pos:pos + count]
            self._buf, self._pos = buf, pos + len(seg)
            count -= len(seg)
            env.size += len(seg)
            if feed is not None:
                feed(seg)
            if parts is not None and env.size <= self.config.max_message_size:
                parts.append(seg)
        self.deadline = None

    def _end_of_data(self, checks, header, parts):
        """Count, wait and send the reply to a message (10.1, 11)."""
        env, shared = self.envelope, self.shared
        if header is not None:
            header.finish()
        issues = env.issues = checks.issues(env, self.command_bare_lf) if checks else ()
        self.command_bare_lf = False
        if parts is not None and env.size <= self.config.max_message_size:
            env.data = b"".join(parts)
        result, code, text, delay = self._decide(env, header)
        if issues and self._debug:
            log.debug("%s sender issues: %s", self.peer, ", ".join(issues))
        if delay:       # the result once the delay is over; the octets now
            shared.stats.message(None, env.size, issues)
            try:
                self._wait(delay)
            except _Shutdown:       # stopped in the delay: this 421 is the reply
                result, (code, text) = "bounced", self._shutting_down()
            finally:                # and counted if writing before the wait fails
                shared.stats.add("messages_" + result)
        else:
            shared.stats.message(result, env.size, issues)
        if issues and code and self.config.sender_checks == "reply":
            text += f" (sender issues: {', '.join(issues)})"
        if code is None:            # drop: the reply a sender never gets
            shared.deliver(env)
            self._flush()           # earlier pipelined commands keep their replies (4.6)
            raise _Disconnect("drop requested by address")
        env.reply = f"{code} {text}"
        self.reply(code, text)
        shared.deliver(env)
        self.reset()
        if code == 421:
            self.closing = True

    def _decide(self, env, header):
        """(result, code, text, seconds to wait) for a message, in the order
        of section 10.1: size, data- directives, refuse, then the mode.
        A code of None means drop."""
        config, shared = self.config, self.shared
        rng = shared.rng(env.mail_from, env.rcpt_tos)     # every end of data counts
        if env.size > config.max_message_size:
            return ("too_big", *TOO_BIG, 0)
        mode, (low, high) = self.mode, self.delay
        if self.switches and header is not None and (header.mode or header.delay):
            mode, (low, high) = self._switches(header, mode, (low, high))
        delay = rng.randint(low, high) if high > low else low
        decided = None
        if env.sender_plan or any(env.rcpt_plans):
            for address, plan in [(env.mail_from, env.sender_plan)] + list(
                    zip(env.rcpt_tos, env.rcpt_plans)):
                wait, directive = self._plan(plan, address, "data")
                delay += wait
                if directive is not None:
                    shared.stats.add("faults_directive")
                    decided = (None, None) if directive.action == "drop" else \
                        self._directive_reply(directive, "rcpt")
                    break
        if decided is None and env.issues and config.sender_checks == "refuse":
            decided = 550, "5.6.0 Message refused, sender issues: " + ", ".join(env.issues)
        if decided is None:
            decided = self._mode_reply(mode, rng)
        code, text = decided
        return ("accepted" if code == 250 else "bounced"), code, text, min(delay, MAX_DELAY)

    def _mode_reply(self, mode, rng):
        if mode == "accept" or (mode == "random" and rng.randrange(len(BOUNCES) + 1) == 0):
            return 250, f"2.0.0 OK: queued as {self.shared.message_id()}"
        code = rng.choice(_BOUNCE_CODES)
        return code, BOUNCES[code]

    @staticmethod
    def _switches(header, mode, delay):
        """X-Blackhole-Mode and X-Blackhole-Delay (section 4.3)."""
        if header.mode in MODES:
            mode = header.mode
        match = _DELAY_RE.match(header.delay or "")
        if match:
            low = _delay_seconds(match.group(1))
            high = _delay_seconds(match.group(2)) if match.group(2) else low
            if low <= high:
                delay = (low, high)
        return mode, delay

    # ----- address directives (section 10.1) ---------------------------------

    def _plan(self, plan, address, stage):
        """(seconds to wait, the directive that decides or None) for a stage."""
        data = stage == "data"
        acting = [d for d in plan if d.data == data]
        if not acting:
            return 0, None
        seen = self.shared.count(stage, address) if any(
            d.count for d in acting) else 1
        delay = 0
        for directive in acting:
            if directive.count is not None and seen > directive.count:
                continue
            if directive.action == "delay":
                delay += directive.value
            else:
                return min(delay, MAX_DELAY), directive
        return min(delay, MAX_DELAY), None

    def _act_now(self, plan, address, stage):
        """Carry out MAIL or RCPT directives: wait, then raise the reply."""
        wait, directive = self._plan(plan, address, stage)
        self._wait(wait)
        if directive is not None:
            self.shared.stats.add("faults_directive")
            if directive.action == "drop":
                self._flush()       # earlier pipelined commands keep their replies (4.6)
                raise _Disconnect("drop requested by address")
            code, text = self._directive_reply(directive, stage)
            raise SMTPError(code, text, close=code == 421)

    @staticmethod
    def _directive_reply(directive, stage):
        if directive.action in ("fail", "defer"):
            return FAIL_REPLIES[stage, directive.action]
        code = directive.value
        return code, BOUNCES.get(code, "%d.0.0 Failure requested by address" % (code // 100))

    # ----- AUTH (section 5) --------------------------------------------------

    def smtp_AUTH(self, arg):
        if self.authenticated:
            raise SMTPError(503, "5.5.1 Already authenticated")
        if self.config.strict and (self.helo is None or self.envelope.mail_from is not None):
            raise SMTPError.bad_sequence()     # RFC 4954 4
        if not arg:
            raise SMTPError.syntax("AUTH")
        mechanism, _, initial = arg.partition(" ")
        method = getattr(self, "_auth_" + mechanism.upper().replace("-", "_"), None) \
            if mechanism.upper() in self.auth_mechanisms else None
        if method is None:
            raise SMTPError(504, "5.5.4 Unrecognized authentication type")
        try:
            ok = b"fail=" not in method(initial.strip())
        except _AuthDecided as decided:
            ok = decided.ok
        self.shared.stats.add("auth_success" if ok else "auth_failure")
        if not ok:
            raise SMTPError(535, "5.7.8 Authentication failed")
        self.authenticated = True
        self.reply(235, "2.7.0 Authentication successful")

    def _auth_PLAIN(self, initial):
        return self._decode(initial) if initial else self._challenge("")

    def _auth_LOGIN(self, initial):
        user = self._decode(initial) if initial else self._challenge("VXNlcm5hbWU6")
        return user + b"\0" + self._challenge("UGFzc3dvcmQ6")

    def _auth_CRAM_MD5(self, initial):
        if initial:     # server-first: only kura's raw pass=/fail= may come here
            self._decode(initial)
            raise SMTPError.syntax("AUTH")
        challenge = "<%d.%d@%s>" % (random.getrandbits(48), time.time(), self.hostname)
        return self._challenge(base64.b64encode(challenge.encode()).decode())

    def _challenge(self, text):
        """Send a 334 challenge and decode the client's one-line answer."""
        self.reply(334, text)
        line = self._readline(self.max_line)
        if line is _TOO_LONG:
            raise SMTPError(500, "5.5.2 Line too long")
        return self._decode(line.decode("utf-8", "surrogateescape").strip())

    @staticmethod
    def _decode(text):
        """A base64 response, or a raw pass=/fail= that decides at once."""
        if text == "*":
            raise SMTPError(501, "5.7.0 Authentication cancelled")
        if text == "=":
            return b""
        try:
            if len(text) % 4:   # before 3.13 b64decode ignores excess padding: "fail="
                raise binascii.Error("not a multiple of 4 characters")
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            if "fail=" in text:
                raise _AuthDecided(False) from None
            if "pass=" in text:
                raise _AuthDecided(True) from None
            raise SMTPError(501, "5.5.2 Cannot decode response") from None

    # ----- TLS (section 6) and PROXY (section 12) ----------------------------

    def smtp_STARTTLS(self, arg):
        if arg:
            raise SMTPError.syntax("STARTTLS")
        if self.tls:
            raise SMTPError(503, "5.5.1 TLS already active")
        if not self._starttls_offered():
            raise SMTPError(454, "4.7.0 TLS not available")
        self.reply(220, "2.0.0 Ready to start TLS")
        self._flush()
        self._buf, self._pos = b"", 0   # pipelined after STARTTLS: never executed
        self._start_tls()
        self.helo = None
        self.authenticated = False
        self.reset()

    def _start_tls(self, refused_wait=None):
        """Wrap the socket and shake hands in this thread, under the timeout.

        A client refused at once gets `refused_wait` seconds by the socket's
        own timeout (so even with timeout = 0), and its failure is no event."""
        sock = self.server.tls_context.wrap_socket(
            self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = sock
        if refused_wait is None:
            self._start_clock()
        else:
            sock.settimeout(refused_wait)
        try:
            sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            if refused_wait is not None or self.shared.stopping.is_set():
                raise _Disconnect("TLS handshake failed: %s" % exc) from None
            self.shared.stats.add("tls_failure")
            if self.timed_out:
                self.shared.stats.add("timeouts")
                log.info("TLS handshake with %s timed out", self.peer)
                raise _Disconnect("TLS handshake timed out") from None
            log.info("TLS handshake with %s failed: %s", self.peer,
                     getattr(exc, "reason", None) or exc)
            raise _Disconnect("TLS handshake failed") from None
        self.deadline = None
        self.tls = True
        self.shared.stats.add("tls_success")
        if self._debug:
            log.debug("%s TLS %s %s", self.peer, sock.version(), sock.cipher()[0])

    def _read_proxy_header(self):
        """Read a PROXY v1/v2 header without reading past it (12)."""
        if not _trusted(self.peer, self.config.proxy_trusted):
            log.info("closed %s: not in proxy_trusted", self.peer)
            raise _Disconnect("untrusted PROXY sender")
        self._start_clock()
        taken = b""
        while True:
            try:
                peek = self.sock.recv(_PROXY_V2_MAX - len(taken), socket.MSG_PEEK)
                result = _parse_proxy(taken + peek) if peek else None
            except ValueError as exc:
                log.info("closed %s: %s", self.peer, exc)
                raise _Disconnect("bad PROXY header") from None
            if not peek:
                if self.timed_out:
                    self.shared.stats.add("timeouts")
                    log.info("closed %s: no PROXY header in time", self.peer)
                raise _Disconnect("closed before the PROXY header")
            if result is None:
                taken += self.sock.recv(len(peek))
                continue
            self._recv_exactly(result[1] - len(taken))
            break
        self.deadline = None
        if result[0] is not None:
            if self._debug:
                log.debug("%s port %d: PROXY header for %s port %d",
                          self.peer, self.peer_port, *result[0])
            self.peer, self.peer_port = result[0]

    def _recv_exactly(self, count):
        while count > 0:
            data = self.sock.recv(count)
            if not data:
                raise _Disconnect("closed in the PROXY header")
            count -= len(data)


# ###########################################################################
# Servers
# ###########################################################################

def _tls_context(config, less_secure=False):
    """The server context of section 6."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # a timeout or stop wakes a session by shutting down the socket's reading
    # side; OpenSSL 3 would take that EOF for a truncation and end the TLS
    # session with an alert, so the 421 could not be sent
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    # TLS 1.2 renegotiation a client starts: a handshake's CPU per request
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    if not less_secure:
        context.options |= ssl.OP_SINGLE_DH_USE | ssl.OP_SINGLE_ECDH_USE
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:"
                        "ECDHE+AES:!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES")
    context.load_cert_chain(config.tls_cert, config.tls_key, password=_no_password)
    if config.tls_dhparams:
        context.load_dh_params(config.tls_dhparams)
    return context


class SMTPServer(socketserver.TCPServer):
    """One listener: its socket, settings and the state it shares.

    handle_request() runs one whole session inline, which suits tests;
    ThreadingSMTPServer serves sessions concurrently.
    """

    allow_reuse_address = True
    request_queue_size = 1024   # listen backlog; socketserver's 5 refuses bursts (7)

    def __init__(self, listener, config, shared=None, tls_context=None,
                 handler=SMTPHandler):
        self.listener, self.config = listener, config
        self.shared = shared if shared is not None else _Shared(config)
        self.tls_context = tls_context
        self.address_family = listener.family
        super().__init__((listener.host, listener.port), handler, bind_and_activate=False)
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def server_bind(self):
        if self.address_family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

    def process_request(self, request, client_address):
        """Serve one session inline, then leave the registry (which a
        session's setup() joins) once its socket is closed."""
        try:
            super().process_request(request, client_address)
        finally:
            with self.shared.lock:
                self.shared.sessions.pop(threading.current_thread(), None)

    def handle_error(self, request, client_address):
        log.exception("error serving %s", client_address)


class _ThreadPerRequest(socketserver.ThreadingMixIn):
    """A thread per connection, each registered in shared.sessions so that
    stop() can close its socket and join it.  process_request() is replaced,
    so socketserver's own thread list and daemon_threads are never used;
    only process_request_thread() is inherited.

    A thread whose session ended waits up to idle_seconds for the next
    connection: starting a thread costs about 100 us of CPU, a seventh of
    a session with one message.
    """

    idle_seconds = 1.0      # how long a finished session's thread waits for another
    max_idle = 64           # threads kept waiting, at most

    def process_request(self, request, client_address):
        shared, job = self.shared, (self, request, client_address)
        with shared.lock:
            if shared.idle:
                thread, parked = shared.idle.popitem()
                shared.sessions[thread] = request
                parked.hand(job)
                return
        thread = threading.Thread(target=_session_thread, args=(shared, job), daemon=True)
        with shared.lock:
            shared.sessions[thread] = request
        try:
            thread.start()
        except RuntimeError:        # cannot start a new thread
            with shared.lock:
                del shared.sessions[thread]
            self.shutdown_request(request)


class _Parked:
    """A session thread waiting for its next connection."""

    def __init__(self):
        self.job = None
        self.ready = threading.Lock()
        self.ready.acquire()

    def hand(self, job):
        """Give the thread a (server, request, address), or None to end it;
        the caller has already taken it out of the idle table."""
        self.job = job
        self.ready.release()

    def wait(self, seconds, shared):
        """The next job, or None once nothing came for `seconds`."""
        seconds = min(max(seconds, 0), threading.TIMEOUT_MAX)
        if not self.ready.acquire(timeout=seconds):
            with shared.lock:
                if shared.idle.pop(threading.current_thread(), None) is self:
                    return None
            self.ready.acquire()        # handed a job just now: it is on its way
        job, self.job = self.job, None
        return job


def _session_thread(shared, job):
    """Serve one session, then wait for another while there is one.

    The thread leaves the registry that stop() joins only once the session's
    socket is closed, and joins the idle table in the same step, so stop()
    always finds it in one or the other."""
    me, parked = threading.current_thread(), None
    while job is not None:
        server, request, client_address = job
        try:
            server.process_request_thread(request, client_address)
        except BaseException:
            with shared.lock:
                shared.sessions.pop(me, None)
            raise
        with shared.lock:
            shared.sessions.pop(me, None)
            if shared.stopping.is_set() or len(shared.idle) >= server.max_idle:
                return
            parked = parked or _Parked()
            shared.idle[me] = parked
        job = parked.wait(server.idle_seconds, shared)


class ThreadingSMTPServer(_ThreadPerRequest, SMTPServer):
    """One listener serving each session in its own thread."""


class _MetricsHandler(BaseHTTPRequestHandler):
    """GET /metrics in Prometheus text format (section 8); 404 otherwise.

    The request is read whole first, bounded in size and time, so a slow
    or huge one costs a thread for seconds and a few KB, not 6 MB a minute.
    """

    timeout = 10                # seconds for each write of the answer
    request_time = 5.0          # seconds for the whole request; then it is closed
    max_request = 8192          # octets of request line and headers; more is closed
    server_version = "blackhole/" + __version__

    def setup(self):
        super().setup()
        head, whole = b"", False
        deadline = time.monotonic() + self.request_time
        try:
            while not whole:
                whole = b"\r\n\r\n" in head or b"\n\n" in head
                left = deadline - time.monotonic()
                if whole or left <= 0 or len(head) > self.max_request:
                    break
                self.connection.settimeout(left)
                data = self.connection.recv(4096)
                if not data:
                    break
                head += data
        except OSError:
            pass
        self.connection.settimeout(self.timeout)
        self.rfile.close()      # an empty request is closed with no answer
        self.rfile = io.BytesIO(head if whole and len(head) <= self.max_request else b"")

    def do_GET(self, head=False):
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "Not Found")
            return
        body = metrics_text(self.server.counters()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_HEAD(self):
        """What uptime checkers send: GET's headers, no body."""
        self.do_GET(head=True)

    def log_message(self, format, *args):
        log.debug("metrics %s: " + format, self.client_address[0], *args)


class _MetricsServer(_ThreadPerRequest, HTTPServer):
    """The `metrics_listen` HTTP server; `counters` returns the numbers."""

    allow_reuse_address = True
    request_queue_size = 128
    max_clients = 16            # requests served at once; more are closed at once

    def __init__(self, address, shared, counters):
        self.shared, self.counters = shared, counters
        self.clients = 0
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        HTTPServer.__init__(self, address, _MetricsHandler)

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)   # skip HTTPServer's getfqdn()
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        with self.shared.lock:
            full = self.clients >= self.max_clients
            self.clients += not full
        if full:
            socketserver.TCPServer.shutdown_request(self, request)     # not counted
        else:
            super().process_request(request, client_address)

    def shutdown_request(self, request):
        """Every counted request ends here once: served, or its thread
        could not start."""
        with self.shared.lock:
            self.clients -= 1
        super().shutdown_request(request)


def _serve(servers, wake, stopping, watch_fd=None, reap=None, interval=None):
    """Accept connections on every listener until woken or stopping.

    One thread for all listeners; the wake socket makes stop() prompt, with
    no poll interval.  Every `interval` seconds it calls reap() to cut off
    overdue sessions.  watch_fd, when given, ends serving at EOF (a worker
    watching its supervisor).
    """
    with selectors.DefaultSelector() as selector:
        for server in servers:
            server.socket.setblocking(False)
            selector.register(server.socket, selectors.EVENT_READ, server)
        selector.register(wake, selectors.EVENT_READ, None)
        if watch_fd is not None:
            selector.register(watch_fd, selectors.EVENT_READ, None)
        next_reap = time.monotonic() + (interval or 0)
        failed, quiet_until = 0, 0.0    # accept errors since the last line about them
        while not stopping.is_set():
            events = selector.select(interval)
            if reap is not None and time.monotonic() >= next_reap:
                reap()
                next_reap = time.monotonic() + interval
            for key, _ in events:
                server = key.data
                if server is None:
                    return
                try:
                    request, client_address = server.get_request()
                except (BlockingIOError, InterruptedError):
                    continue        # another worker took it
                except OSError as exc:       # out of file descriptors: back off,
                    failed += 1             # and say so once in a while
                    if time.monotonic() >= quiet_until:
                        log.error("accept failed: %s%s", exc, " (%d times)" % failed
                                  if failed > 1 else "")
                        failed, quiet_until = 0, time.monotonic() + 10
                    stopping.wait(0.05)
                    continue
                try:
                    server.process_request(request, client_address)
                except Exception:
                    server.handle_error(request, client_address)
                    server.shutdown_request(request)


def _shutdown(sock, how):
    """shutdown() on the OS socket, also under an SSLSocket (whose own
    shutdown() would end TLS and make the last 421 impossible)."""
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


# ###########################################################################
# The embeddable Server
# ###########################################################################

class Server:
    """A whole blackhole: every listener of a Config, served in threads.

    Methods for the caller: start(), stop() (both idempotent; also a context
    manager), wait_for(count, timeout).  Attributes: address,
    tls_address, addresses, metrics_address, stats, messages (with
    `capture`), config.  Methods for blackhole's own command line: bind()
    (before privileges drop), and serve(wake, watch_fd), which start() and
    each worker run in a thread.

    Server(config=None, capture=0, on_message=None, less_secure=False,
    **options): options are those of Config, as INI strings or Python
    values; without a listen option the server listens on 127.0.0.1 on an
    ephemeral port.  less_secure is `-ls`: no single-use (EC)DH keys.
    """

    handler = SMTPHandler   # a subclass here serves every listener
    stuck_after = 0.03      # seconds: stop() gives up on a session still writing
                            # after two of them: its client does not read

    def __init__(self, config=None, capture=0, on_message=None, less_secure=False,
                 **options):
        if config is None:
            if options.get("listen") is None:
                options["listen"] = "127.0.0.1:0"
            config = Config(**options)
        elif options:
            raise TypeError("give either a Config or options, not both")
        if isinstance(capture, bool) or not isinstance(capture, int) or capture < 0:
            raise ValueError("capture = %r: must be a whole number of messages, 0 or more"
                             % (capture,))
        self.config = config
        self.shared = _Shared(config, capture=capture, on_message=on_message)
        self.tls_context = _tls_context(config, less_secure) if config.tls_cert else None
        self.servers = []
        self.metrics = None
        self.counters = None            # a supervisor sums its workers' counters
        self._thread = None
        self._wake = None
        self._lock = threading.RLock()  # one start() or stop() at a time
        self._busy = None               # "start" or "stop" while in it: a nested call returns
        self._stop_after_start = False  # a signal handler's stop() came mid-start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def __repr__(self):
        return "<blackhole.Server %s>" % (", ".join(
            _hostport(*s.server_address[:2]) for s in self.servers) or "unbound")

    def bind(self):
        """Bind every listener (and metrics_listen); ConfigError if one fails."""
        if self.servers or self.metrics:
            return self
        config = self.config
        try:
            for listener in config.listeners():
                option = "tls_listen" if listener.tls else "listen"
                try:
                    self.servers.append(ThreadingSMTPServer(
                        listener, config, self.shared, self.tls_context, self.handler))
                except OSError as exc:
                    raise ConfigError("%s: %s = %s: cannot bind: %s" % (
                        config.source, option, listener.text.split()[0],
                        exc.strerror or exc)) from None
            if config.metrics_listen:
                try:
                    self.metrics = _MetricsServer(
                        config.metrics_listen, self.shared,
                        lambda: (self.counters or self.shared.stats.as_dict)())
                except OSError as exc:
                    raise ConfigError("%s: metrics_listen = %s:%d: cannot bind: %s" % (
                        config.source, *config.metrics_listen, exc.strerror or exc)) from None
        except BaseException:
            self._close_listeners()
            raise
        return self

    def start(self):
        """Bind and serve in a background thread; returns once serving."""
        with self._lock:
            if self._thread is not None or self._busy:
                return self
            self._busy = "start"
            try:
                self.bind()
                self.shared.stopping.clear()
                self._wake = socket.socketpair()    # not a pipe: Windows selects sockets
                self._thread = threading.Thread(target=self.serve, args=(self._wake[0],),
                                                name="blackhole-accept", daemon=True)
                self._thread.start()
            finally:
                self._busy = None
                stop, self._stop_after_start = self._stop_after_start, False
            if stop:
                self.stop()
        return self

    def serve(self, wake, watch_fd=None):
        """Accept connections in this thread until stop() writes to wake."""
        servers = self.servers + ([self.metrics] if self.metrics else [])
        timeout = self.config.timeout
        _serve(servers, wake, self.shared.stopping, watch_fd,
               self.shared.reap if timeout else None,
               min(1.0, timeout / 10) if timeout else None)

    def stop(self, grace=1.5):
        """Close listeners, send 421 to live sessions, join every thread.

        Safe from any thread, on_message and signal handlers included; a
        call made while this thread is in stop() returns at once (one made
        in start() is done when start() ends), and so does one from
        on_message while another thread stops the server (that stop waits
        for the callback).
        """
        if self.shared.stopping.is_set() and threading.current_thread() in self.shared.sessions:
            return
        with self._lock:
            if self._busy:
                self._stop_after_start = self._busy == "start"
                return
            self._busy = "stop"
            try:
                self.shared.stopping.set()
                wake, self._wake = self._wake, None
                if wake is not None:
                    wake[1].send(b"x")
                thread, self._thread = self._thread, None
                if thread is not None and thread is not threading.current_thread():
                    thread.join()
                self._close_listeners()
                if wake is not None:
                    for sock in wake:
                        sock.close()
                self._close_sessions(grace)
            finally:
                self._busy = None

    def _close_after_fork(self):
        """In a forked child: close this server's sockets; its threads did
        not survive the fork."""
        self._close_listeners()
        if self._wake is not None:
            for sock in self._wake:
                sock.close()
        self._wake = self._thread = None

    def _close_listeners(self):
        for server in self.servers + ([self.metrics] if self.metrics else []):
            server.server_close()
        self.servers, self.metrics = [], None

    def _close_sessions(self, grace):
        """Wake every session blocked on a read (it says 421 and ends), then
        end the threads waiting between sessions.

        Sessions are waited for up to `grace` seconds, in rounds of
        `stuck_after`; one found writing at the end of two rounds in a row
        is writing to a client that does not read, and its socket is shut.
        A session in on_message or a delay is waited for: its client reads.
        One blocked in on_message past a second `grace` is left running.
        """
        shared = self.shared
        with shared.lock:
            sessions = list(shared.sessions.items())
        for _, session in sessions:
            _shutdown(getattr(session, "sock", session), socket.SHUT_RD)
        me = threading.current_thread()     # on_message's session: it ends after
        sessions = [(t, s) for t, s in sessions if t is not me]     # its reply
        deadline, writing = time.monotonic() + grace, set()
        while sessions and time.monotonic() < deadline:
            until = min(deadline, time.monotonic() + self.stuck_after)
            for thread, _ in sessions:
                thread.join(max(until - time.monotonic(), 0))
            sessions = [(thread, session) for thread, session in sessions
                        if thread.is_alive()]
            stuck = writing
            writing = {thread for thread, session in sessions
                       if getattr(session, "writing", False)}
            for thread, session in sessions:
                if thread in stuck and thread in writing:
                    _shutdown(session.sock, socket.SHUT_RDWR)
        for thread, session in sessions:
            _shutdown(getattr(session, "sock", session), socket.SHUT_RDWR)
        deadline = time.monotonic() + grace     # only on_message can still block
        for thread, _ in sessions:
            thread.join(max(deadline - time.monotonic(), 0))
        stuck = [thread.name for thread, _ in sessions if thread.is_alive()]
        if stuck:
            log.warning("stop(): left running after %.1f s, blocked in on_message? %s",
                        2 * grace, ", ".join(stuck))
        with shared.lock:
            idle, shared.idle = shared.idle, {}
        for parked in idle.values():
            parked.hand(None)
        for thread in idle:
            thread.join()

    # ----- what tests ask ----------------------------------------------------

    @property
    def addresses(self):
        """Every plain listener's bound (host, port), in config order."""
        return [s.server_address[:2] for s in self.servers if not s.listener.tls]

    @property
    def address(self):
        """The first plain listener's bound (host, port)."""
        addresses = self.addresses
        return addresses[0] if addresses else None

    @property
    def tls_address(self):
        """The first TLS listener's bound (host, port)."""
        for server in self.servers:
            if server.listener.tls:
                return server.server_address[:2]
        return None

    @property
    def metrics_address(self):
        return self.metrics.server_address[:2] if self.metrics else None

    @property
    def stats(self):
        """The counters of section 8, as a dict."""
        return (self.counters or self.shared.stats.as_dict)()

    @property
    def messages(self):
        """The last `capture` envelopes (a deque; clear() empties it).  While
        mail arrives, iterate over list(server.messages), which is atomic."""
        if self.shared.messages is None:
            raise AttributeError("messages needs Server(capture=N)")
        return self.shared.messages

    def wait_for(self, count, timeout=5.0):
        """Block until `messages` holds count envelopes; return them."""
        messages = self.messages
        if count > messages.maxlen:
            raise ValueError("wait_for(%d): capture keeps %d messages at most"
                             % (count, messages.maxlen))
        with self.shared.arrived:
            if not self.shared.arrived.wait_for(lambda: len(messages) >= count, timeout):
                raise TimeoutError("%d of %d messages after %ss" % (
                    len(messages), count, timeout))
            return list(messages)


# ###########################################################################
# Command line
# ###########################################################################

class _Formatter(logging.Formatter):
    """`blackhole: MESSAGE` at INFO, `blackhole: LEVEL: MESSAGE` otherwise."""

    def format(self, record):
        text = super().format(record)
        if record.levelno == logging.INFO:
            return "blackhole: " + text
        level = {logging.CRITICAL: "error"}.get(record.levelno, record.levelname.lower())
        return "blackhole: %s: %s" % (level, text)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EX_USAGE, "blackhole: %s (see --help)\n" % message)


def _arguments(argv):
    parser = _ArgumentParser(
        prog="blackhole", description="An SMTP server that accepts every message "
        "and forgets it.")
    add = parser.add_argument
    add("-v", "--version", action="version", version="blackhole " + __version__)
    add("-c", "--conf", metavar="FILE", help="the config file (default: built-in defaults)")
    add("-t", "--test", action="store_true",
        help="validate the config and test-bind every listener, then exit")
    add("-d", "--debug", action="store_true", help="log every connection, command and reply")
    add("-b", "--background", action="store_true", help="run in the background (daemonize)")
    add("-q", "--quiet", action="store_true", help="suppress warnings")
    add("-ls", "--less-secure", action="store_true",
        help="leave out single-use (EC)DH keys; kept for kura/blackhole command lines")
    add("--options", action="store_true", help="print every config option and exit")
    return parser.parse_args(argv)


def _warn(args, message):
    if not args.quiet:
        log.warning(message)


def _drop_privileges(config):
    """Switch to user/group when root (section 7); ConfigError if it fails."""
    if not hasattr(os, "getuid") or os.getuid() != 0:
        return
    try:
        if config.user:
            entry = _user(config.user)
            uid, gid = entry.pw_uid, entry.pw_gid
        else:
            uid, gid = None, None
        if config.group:
            gid = _group(config.group).gr_gid
        if gid is not None:
            os.setgroups([gid])
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
    except (OSError, KeyError) as exc:
        option = "user" if config.user else "group"
        raise ConfigError("%s: %s = %s: cannot switch to it: %s" % (
            config.source, option, getattr(config, option),
            getattr(exc, "strerror", None) or exc)) from None


def _write_pidfile(path, source):
    try:
        with open(path, "w") as handle:
            handle.write("%d\n" % os.getpid())
    except OSError as exc:
        raise ConfigError("%s: pidfile = %s: cannot write: %s" % (
            source, path, exc.strerror)) from None


def _check_pidfile(path, source):
    """-t: the pidfile's folder must exist and, unless root, be writable."""
    folder = os.path.dirname(os.path.abspath(path))
    reason = None
    if not os.path.isdir(folder):
        reason = "No such directory: " + folder
    elif hasattr(os, "getuid") and os.getuid() != 0 and not os.access(folder, os.W_OK):
        reason = "Permission denied: " + folder
    if reason:
        raise ConfigError("%s: pidfile = %s: cannot write: %s" % (source, path, reason))


def _remove_pidfile(path):
    if path:
        try:
            with open(path) as handle:
                if handle.read().strip() != str(os.getpid()):
                    return
            os.remove(path)
        except (OSError, ValueError):
            pass


def _daemonize():
    """Double fork; the launching process waits for the daemon's word.

    Returns the pipe the daemon writes "ok" (or an error line) to; the
    launcher exits 0 on "ok", else prints the line and exits 64.  Standard
    output and error stay open when they are files, so the log is kept.
    """
    read_fd, write_fd = os.pipe()
    if os.fork():
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            word = pipe.read().decode("utf-8", "replace")
        try:
            os.wait()
        except ChildProcessError:
            pass
        if word == "ok":
            os._exit(EX_OK)
        sys.stderr.write(word or "blackhole: the daemon stopped before serving\n")
        sys.stderr.flush()
        os._exit(EX_USAGE)
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(EX_OK)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):    # `-b 2>>log` keeps its log; a terminal or pipe is let go
        if fd == 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
            os.dup2(null, fd)
    os.close(null)
    return write_fd


def _listening(server):
    for srv in server.servers:
        listener, config = srv.listener, server.config
        host, port = srv.server_address[:2]
        flags = ["mode=" + (listener.mode or config.mode)]
        delay = listener.delay or config.delay
        if delay != (0, 0):
            flags.append("delay=%s" % _show(delay))
        if listener.greylist:
            flags.append("greylist=%d" % listener.greylist)
        if listener.proxy:
            flags.append("proxy=on")
        log.info("listening on %s (%s, %s)", _hostport(host, port),
               "smtps" if listener.tls else "smtp", ", ".join(flags))
    if server.metrics:
        log.info("metrics on http://%s:%d/metrics", *server.metrics_address)


class _Signals:
    """Signal handlers that only set flags; the main loop acts on them.

    The kernel may hand a signal to any thread, and Python runs the handler
    in the main thread only when that thread wakes: set_wakeup_fd makes the
    signal itself write the byte that ends wait().  (A lock or Event slept
    through signals taken by another thread, and Event.set() in a handler
    deadlocked when a second signal landed inside it.)
    """

    def __init__(self):
        self.stop = self.usr1 = False
        self._wake, self._waker = socket.socketpair()   # a socket: Windows wants one
        for sock in (self._wake, self._waker):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._waker.fileno())
        for name, attr in (("SIGTERM", "stop"), ("SIGINT", "stop"), ("SIGHUP", "stop"),
                           ("SIGUSR1", "usr1"), ("SIGCHLD", None)):
            if not hasattr(signal, name):
                continue
            if name == "SIGHUP" and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
                continue        # nohup: a closed terminal must not stop it
            signal.signal(getattr(signal, name), self._handler(attr))

    def _handler(self, attr):
        def handler(signum, frame):
            if attr is not None:        # SIGCHLD only wakes wait()
                setattr(self, attr, True)
            try:
                self._waker.send(b"\0")    # a wait() that ran before this ends too
            except OSError:
                pass
        return handler

    def close(self):
        self._wake.close()
        self._waker.close()

    def wait(self, timeout=None):
        """Sleep until a signal arrives, or for timeout seconds."""
        select.select([self._wake], [], [], None if timeout is None else max(timeout, 0))
        try:
            while self._wake.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass


def _cpus_to_pin(count):
    """pin_cpu: the CPU for each of `count` processes, or None to leave
    them to the scheduler.

    A CPython process runs one thread's Python at a time.  When its threads
    hand the GIL to each other across CPUs, each hand-over wakes another
    CPU and makes the thread that gave it up wait to get it back: at 50
    sessions on 2 CPUs that doubled the CPU per message.  On one CPU a
    thread keeps the GIL until it blocks.  Workers take the CPUs this
    process may use in order, a single process the one it runs on; more
    workers than CPUs, a free-threaded build or one CPU: no pinning.
    Linux only (os.sched_setaffinity).
    """
    if not hasattr(os, "sched_setaffinity") or \
            not getattr(sys, "_is_gil_enabled", lambda: True)():
        return None
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except OSError:
        return None
    if len(allowed) < 2:
        return None
    if count > len(allowed):
        log.info("pin_cpu: %d workers on %d CPUs: left to the scheduler", count, len(allowed))
        return None
    if count == 1:
        cpu = _current_cpu()
        return [cpu if cpu in allowed else allowed[0]]
    return allowed[:count]


def _current_cpu():
    """The CPU this process last ran on (/proc/self/stat field 39), or None."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def _pin(cpu):
    """Keep this thread, and every thread it starts from now on, on cpu."""
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:          # a cpuset that changed under us
        log.info("pin_cpu: cannot keep threads on CPU %d: %s", cpu, exc)
        return
    log.debug("threads kept on CPU %d (pin_cpu)", cpu)


def _run(server, signals):
    """Serve in this process until SIGTERM, SIGINT or SIGHUP."""
    cpus = _cpus_to_pin(1) if server.config.pin_cpu else None
    if cpus:
        _pin(cpus[0])               # before any thread starts: they inherit it
    server.start()
    try:
        while not signals.stop:
            signals.wait()
            if signals.usr1:
                signals.usr1 = False
                log.info("%s", _counters_line(server.stats))
    finally:
        server.stop()


def _supervise(server, signals):
    """workers = N: fork N workers on the bound sockets and keep them alive."""
    count = server.config.workers
    memory = mmap.mmap(-1, Stats.size * count)
    slots = [Stats(memoryview(memory)[i * Stats.size:(i + 1) * Stats.size])
             for i in range(count)]
    server.counters = lambda: Stats.summed(slots)
    watch_read, watch_write = os.pipe()
    workers, starts, backoff = {}, {}, [0.0] * count
    cpus = _cpus_to_pin(count) if server.config.pin_cpu else None
    due = {}                            # worker index -> when to restart it
    metrics = None
    if server.metrics:
        # only the supervisor serves /metrics; workers close their copy
        metrics = Server(server.config)
        metrics.servers, metrics.metrics = [], server.metrics
        metrics.counters = server.counters

    def spawn(index):
        # a SIGTERM to a new worker waits, blocked, until it has its own handlers
        mask = signal.pthread_sigmask(signal.SIG_BLOCK,
                                      {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(watch_write)
                if metrics:         # the supervisor's, once it serves
                    metrics._close_after_fork()
                _worker(server, slots[index], watch_read, mask, signals,
                        cpus[index] if cpus else None)
                code = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        workers[pid] = index
        starts[index] = time.monotonic()

    try:
        for index in range(count):
            spawn(index)
        if metrics:
            server.metrics = None
            metrics.start()
        while not signals.stop:
            now = time.monotonic()
            for index, when in list(due.items()):
                if now >= when:
                    del due[index]
                    slots[index].set("connections_active", 0)     # its sessions died with it
                    spawn(index)
            signals.wait(min(due.values()) - now if due else None)
            if signals.stop:        # workers ended by the same Ctrl-C are not restarted
                break
            if signals.usr1:
                signals.usr1 = False
                log.info("%s", _counters_line(server.counters()))
            for pid, status in _reap(workers):
                index = workers.pop(pid)
                lived = time.monotonic() - starts[index]
                backoff[index] = 0.1 if lived > 5 else min(max(backoff[index] * 2, 0.1), 5)
                how = ("was killed by signal %d" % os.WTERMSIG(status)
                       if os.WIFSIGNALED(status) else
                       "exited with status %d" % os.WEXITSTATUS(status))
                log.warning("worker %d (pid %d) %s; restarting in %.1fs",
                            index, pid, how, backoff[index])
                due[index] = time.monotonic() + backoff[index]
    finally:
        for pid in workers:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 1.5
        while workers and time.monotonic() < deadline:
            for pid, _ in _reap(workers):
                workers.pop(pid)
            if workers:
                signals.wait(0.05)
        for pid in workers:
            _kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(watch_write)
        os.close(watch_read)
        if metrics:
            metrics.stop()
        server.stop()


def _reap(workers):
    for pid in list(workers):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if done:
            yield pid, status


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _worker(server, stats, watch_fd, mask=None, parent_signals=None, cpu=None):
    """One worker: serve the inherited listeners until told or orphaned."""
    if cpu is not None:
        _pin(cpu)                   # before its threads start: they inherit it
    for sig in ("SIGCHLD", "SIGUSR1"):
        if hasattr(signal, sig):
            signal.signal(getattr(signal, sig), signal.SIG_DFL)
    if server.metrics:
        server.metrics.server_close()
        server.metrics = None
    shared = _Shared(server.config, stats)
    server.shared = shared
    for srv in server.servers:
        srv.shared = shared
    signals = _Signals()
    if parent_signals is not None:
        parent_signals.close()
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    server._wake = socket.socketpair()
    thread = threading.Thread(target=server.serve, args=(server._wake[0], watch_fd),
                              daemon=True)
    server._thread = thread
    thread.start()
    while not signals.stop and thread.is_alive():
        signals.wait(1.0)
        if signals.usr1:
            signals.usr1 = False
            log.info("%s", _counters_line(stats.as_dict()))
    server.stop()


def main(argv=None):
    """The `blackhole` command; returns the exit status."""
    for fd in (0, 1, 2):        # started with one closed (`<&-`): a socket must not
        try:                    # take its number, for -b to replace with /dev/null
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    args = _arguments(argv)
    if args.options:
        sys.stdout.write(options_text())
        return EX_OK
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.debug else logging.INFO)
    log.propagate = False
    source = args.conf or "<defaults>"
    pipe = None
    try:
        config = Config.from_file(args.conf) if args.conf else Config(source=source)
        server = Server(config, less_secure=args.less_secure)
        pidfile = config.pidfile or ("/tmp/blackhole.pid" if args.background else None)
        if args.background and not hasattr(os, "fork"):
            raise ConfigError("-b: cannot run in the background on this platform")
        if args.test:
            if pidfile:
                _check_pidfile(pidfile, source)
            server.bind()
            server._close_listeners()
            sys.stdout.write("blackhole: %s syntax is OK\nblackhole: %s test was successful\n"
                             % (source, source))
            return EX_OK
        if args.less_secure:
            _warn(args, "-ls leaves out single-use (EC)DH keys")
        if config.timeout == 0:
            _warn(args, "timeout = 0: idle clients are never cut off")
        if config.tls_cert and not config.tls_dhparams:
            _warn(args, "TLS without tls_dhparams: only ECDHE key exchange")
        if hasattr(os, "getuid") and os.getuid() == 0 and not config.user:
            _warn(args, "running as root without user/group")
        threading.stack_size(256 * 1024)    # thousands of idle sessions stay cheap
        server.bind()
        if args.background:
            pipe = _daemonize()
        _drop_privileges(config)
        if pidfile:
            _write_pidfile(pidfile, source)
    except ConfigError as exc:
        if pipe is not None:
            os.write(pipe, ("blackhole: %s\n" % exc).encode())
            os._exit(EX_USAGE)
        sys.stderr.write("blackhole: %s\n" % exc)
        return EX_USAGE
    try:
        signals = _Signals()    # before `listening on`: a SIGTERM after it stops cleanly
        _listening(server)
        if pipe is not None:
            os.write(pipe, b"ok")
            os.close(pipe)
        if config.workers > 1 and hasattr(os, "fork"):
            _supervise(server, signals)
        else:
            _run(server, signals)
        log.info("stopped")
    finally:
        _remove_pidfile(pidfile)
    return EX_OK


def config_main(argv=None):
    """The `blackhole_config` command: print every option."""
    sys.stdout.write(options_text())
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
