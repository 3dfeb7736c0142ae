"""Configuration (SPEC section 3): parsing, validation and error lines."""

import ipaddress
import os
import re
import socket
import unittest
from unittest import mock

import blackhole
from tests import support

CERTS = support.CERTS
CERT, KEY = support.CERT, support.KEY
EC_CERT = os.path.join(CERTS, "server-ec.pem")
EC_KEY = os.path.join(CERTS, "server-ec.key")
DHPARAMS = os.path.join(CERTS, "dhparams.pem")
MISSING = os.path.join(CERTS, "no-such-file.pem")
V4, V6 = socket.AF_INET, socket.AF_INET6


def current_user_and_group():
    import grp
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name


class ParseListenTest(unittest.TestCase):
    """Every listener form of section 3."""

    def test_forms(self):
        cases = [
            (":25", ("0.0.0.0", 25, V4)),
            ("0.0.0.0:25", ("0.0.0.0", 25, V4)),
            ("127.0.0.1:25", ("127.0.0.1", 25, V4)),
            (":::25", ("::", 25, V6)),
            ("::1:25", ("::1", 25, V6)),
            ("[::1]:25", ("::1", 25, V6)),
            ("[::]:2525", ("::", 2525, V6)),
            ("localhost:25", ("localhost", 25, V4)),
            ("127.0.0.1:0", ("127.0.0.1", 0, V4)),
            ("127.0.0.1:65535", ("127.0.0.1", 65535, V4)),
            ("  127.0.0.1:25  ", ("127.0.0.1", 25, V4)),
        ]
        for text, (host, port, family) in cases:
            with self.subTest(text=text):
                (listener,) = blackhole.parse_listen(text)
                self.assertEqual((listener.host, listener.port, listener.family),
                                 (host, port, family))
                self.assertEqual(listener.text, text.strip())
                self.assertFalse(listener.tls)
                self.assertEqual((listener.mode, listener.delay, listener.greylist,
                                  listener.proxy), (None, None, None, False))

    def test_flags(self):
        cases = [
            ("127.0.0.1:25 mode=bounce", dict(mode="bounce")),
            ("127.0.0.1:25 MODE=Random", dict(mode="random")),
            ("127.0.0.1:25 delay=5", dict(delay=(5, 5))),
            ("127.0.0.1:25 delay=1-3", dict(delay=(1, 3))),
            ("127.0.0.1:25 greylist=30", dict(greylist=30)),
            ("127.0.0.1:25 greylist=0", dict(greylist=0)),
            ("127.0.0.1:25 proxy=on", dict(proxy=True)),
            ("127.0.0.1:25 proxy=off", dict(proxy=False)),
            ("127.0.0.1:25 mode=accept delay=2 greylist=5 proxy=on",
             dict(mode="accept", delay=(2, 2), greylist=5, proxy=True)),
        ]
        for text, flags in cases:
            with self.subTest(text=text):
                (listener,) = blackhole.parse_listen(text)
                expected = dict(mode=None, delay=None, greylist=None, proxy=False)
                expected.update(flags)
                self.assertEqual(dict(mode=listener.mode, delay=listener.delay,
                                      greylist=listener.greylist, proxy=listener.proxy),
                                 expected)
                self.assertEqual((listener.host, listener.port), ("127.0.0.1", 25))

    def test_lists_and_tls(self):
        listeners = blackhole.parse_listen(
            "127.0.0.1:25, [::1]:26 mode=bounce,, localhost:27", tls=True)
        self.assertEqual([(l.host, l.port, l.mode, l.tls) for l in listeners],
                         [("127.0.0.1", 25, None, True), ("::1", 26, "bounce", True),
                          ("localhost", 27, None, True)])
        self.assertEqual(blackhole.parse_listen(""), ())
        # port 0 twice is two ephemeral ports, not the same address twice
        self.assertEqual(len(blackhole.parse_listen("127.0.0.1:0, 127.0.0.1:0")), 2)

    def test_errors(self):
        cases = [
            ("127.0.0.1", "must be ADDR:PORT"),
            ("[::1]", "must be ADDR:PORT"),
            ("::1", "must be ADDR:PORT ([ADDR]:PORT for IPv6)"),
            ("127.0.0.1:", "port must be a number from 0 to 65535"),
            ("127.0.0.1:x", "port must be a number from 0 to 65535"),
            ("127.0.0.1:-1", "port must be a number from 0 to 65535"),
            ("127.0.0.1:65536", "port must be a number from 0 to 65535"),
            ("127.0.0.1:25, 127.0.0.1:25", "127.0.0.1:25 is given twice"),
            (":25, 0.0.0.0:25", "0.0.0.0:25 is given twice"),
            ("[::1]:25, ::1:25 mode=bounce", "::1:25 is given twice"),
            ("127.0.0.1:25 mode=bouce", "mode=bouce: must be accept, bounce or random"),
            ("127.0.0.1:25 delay=61", "delay=61: must be between 0 and 60 seconds"),
            ("127.0.0.1:25 delay=5-3", "delay=5-3: minimum is above maximum"),
            ("127.0.0.1:25 greylist=86401", "greylist=86401: must be between 0 and 86400"),
            ("127.0.0.1:25 proxy=maybe",
             "proxy=maybe: must be true or false (yes/no, on/off, 1/0)"),
            ("127.0.0.1:25 mode",
             "unknown flag 'mode' (mode=, delay=, greylist=, proxy=)"),
            ("127.0.0.1:25 colour=red",
             "unknown flag 'colour=red' (mode=, delay=, greylist=, proxy=)"),
        ]
        for text, reason in cases:
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as caught:
                    blackhole.parse_listen(text)
                self.assertEqual(str(caught.exception), reason)


class ParseValueTest(unittest.TestCase):
    """The small parsers behind the options."""

    def test_parse_delay(self):
        for text, expected in [("0", (0, 0)), ("5", (5, 5)), ("60", (60, 60)),
                               ("1-3", (1, 3)), ("1, 3", (1, 3)), (" 2 - 4 ", (2, 4)),
                               ("3-3", (3, 3)), ("0-60", (0, 60))]:
            with self.subTest(text=text):
                self.assertEqual(blackhole.parse_delay(text), expected)
        for text, reason in [("61", "must be between 0 and 60 seconds"),
                             ("1-61", "must be between 0 and 60 seconds"),
                             ("3-1", "minimum is above maximum"),
                             ("-1", "must be N or MIN-MAX whole seconds"),
                             ("1.5", "must be N or MIN-MAX whole seconds"),
                             ("1-2-3", "must be N or MIN-MAX whole seconds"),
                             ("", "must be N or MIN-MAX whole seconds"),
                             ("soon", "must be N or MIN-MAX whole seconds")]:
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as caught:
                    blackhole.parse_delay(text)
                self.assertEqual(str(caught.exception), reason)

    def test_parse_bool(self):
        for words, expected in [(("1", "yes", "true", "on", "TRUE", " Yes "), True),
                                (("0", "no", "false", "off", "Off"), False)]:
            for word in words:
                with self.subTest(word=word):
                    self.assertIs(blackhole.parse_bool(word), expected)
        for word in ("", "2", "maybe", "enabled"):
            with self.subTest(word=word):
                with self.assertRaises(ValueError) as caught:
                    blackhole.parse_bool(word)
                self.assertEqual(str(caught.exception),
                                 "must be true or false (yes/no, on/off, 1/0)")

    def test_parse_rate(self):
        for text, expected in [("100/60", (100, 60.0)), ("1/0.5", (1, 0.5)),
                               (" 5 / 1 ", (5, 1.0))]:
            with self.subTest(text=text):
                self.assertEqual(blackhole.parse_rate(text), expected)
        for text, reason in [("10", "must be N/SECONDS, e.g. 100/60"),
                             ("a/b", "must be N/SECONDS, e.g. 100/60"),
                             ("1.5/60", "must be N/SECONDS, e.g. 100/60"),
                             ("0/5", "must be N/SECONDS with N and SECONDS above 0"),
                             ("5/0", "must be N/SECONDS with N and SECONDS above 0"),
                             ("5/-1", "must be N/SECONDS with N and SECONDS above 0"),
                             ("5/inf", "must be N/SECONDS with N and SECONDS above 0")]:
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as caught:
                    blackhole.parse_rate(text)
                self.assertEqual(str(caught.exception), reason)

    def test_parse_networks(self):
        self.assertEqual(blackhole.parse_networks("127.0.0.0/8, ::1, 10.1.2.3/24"), (
            ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"),
            ipaddress.ip_network("10.1.2.0/24")))
        self.assertEqual(blackhole.parse_networks(""), ())
        for text in ("10.0.0.0/33", "nope"):
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as caught:
                    blackhole.parse_networks("127.0.0.1, " + text)
                self.assertEqual(str(caught.exception),
                                 "%r is not an address or network" % text)

    def test_parse_hostport(self):
        for text, expected in [("127.0.0.1:9025", ("127.0.0.1", 9025)),
                               (":9025", ("0.0.0.0", 9025)),
                               ("[::1]:9025", ("::1", 9025)),
                               ("localhost:0", ("localhost", 0))]:
            with self.subTest(text=text):
                self.assertEqual(blackhole.parse_hostport(text), expected)


class ConfigTest(unittest.TestCase):
    """Config(**options): every option parsed and validated."""

    def test_defaults(self):
        config = blackhole.Config(hostname="bh.test")
        self.assertEqual([(l.host, l.port) for l in config.listen],
                         [("127.0.0.1", 25), ("127.0.0.1", 587)])
        self.assertEqual(config.tls_listen, ())
        expected = dict(
            tls_cert=None, tls_key=None, tls_dhparams=None, starttls=False,
            hostname="bh.test", user=None, group=None, pidfile=None, timeout=60,
            delay=(0, 0), mode="accept", max_message_size=512000, dynamic_switch=True,
            workers=1, pin_cpu=True, max_connections=1000, strict=False,
            metrics_listen=None, greylist=0, max_connections_per_ip=0, rate_limit=None,
            seed=None, sender_checks="count", source="<options>",
            proxy_trusted=(ipaddress.ip_network("127.0.0.0/8"),
                           ipaddress.ip_network("::1/128")))
        for name, value in expected.items():
            with self.subTest(option=name):
                self.assertEqual(getattr(config, name), value)
        self.assertEqual(blackhole.Config().hostname, socket.getfqdn())

    def test_every_option_is_known(self):
        self.assertEqual(set(blackhole.OPTIONS), set(blackhole.Config._defaults))
        text = blackhole.options_text()
        for name, (syntax, default, meaning, _) in blackhole.OPTIONS.items():
            with self.subTest(option=name):
                self.assertIn("%s = %s\n    default: %s\n    %s\n" % (
                    name, syntax, default, meaning), text)

    def test_every_option_parsed(self):
        user, group = current_user_and_group()
        config = blackhole.Config(
            listen="127.0.0.1:2525 mode=bounce, [::1]:2526", tls_listen="127.0.0.1:2465",
            tls_cert=CERT, tls_key=KEY, tls_dhparams=DHPARAMS, starttls="no",
            hostname="mail.example.com", user=user, group=group, pidfile="/tmp/bh.pid",
            timeout="30", delay="1-5", mode="Random", max_message_size="1000",
            dynamic_switch="off", workers="4", pin_cpu="no", max_connections="10", strict="yes",
            metrics_listen="127.0.0.1:9025", greylist="300", max_connections_per_ip="3",
            rate_limit="10/1.5", seed="-42", sender_checks="Refuse",
            proxy_trusted="10.0.0.0/8")
        expected = dict(
            tls_cert=CERT, tls_key=KEY, tls_dhparams=DHPARAMS, starttls=False,
            hostname="mail.example.com", user=user, group=group, pidfile="/tmp/bh.pid",
            timeout=30, delay=(1, 5), mode="random", max_message_size=1000,
            dynamic_switch=False, workers=4, pin_cpu=False, max_connections=10, strict=True,
            metrics_listen=("127.0.0.1", 9025), greylist=300, max_connections_per_ip=3,
            rate_limit=(10, 1.5), seed=-42, sender_checks="refuse",
            proxy_trusted=(ipaddress.ip_network("10.0.0.0/8"),))
        for name, value in expected.items():
            with self.subTest(option=name):
                self.assertEqual(getattr(config, name), value)
        self.assertEqual([(l.host, l.port, l.mode, l.tls) for l in config.listeners()],
                         [("127.0.0.1", 2525, "bounce", False), ("::1", 2526, None, False),
                          ("127.0.0.1", 2465, None, True)])

    def test_python_values(self):
        config = blackhole.Config(delay=(2, 4), timeout=5, strict=True, starttls=False,
                                  rate_limit=(3, 60), metrics_listen=("::1", 9025),
                                  max_message_size=10, dynamic_switch=False,
                                  hostname="bh.test")
        self.assertEqual((config.delay, config.timeout, config.strict, config.rate_limit,
                          config.metrics_listen, config.max_message_size,
                          config.dynamic_switch),
                         ((2, 4), 5, True, (3, 60.0), ("::1", 9025), 10, False))

    def test_limits(self):
        """The smallest and largest values each numeric option takes."""
        cases = [("timeout", "0", 0), ("timeout", "180", 180), ("delay", "59", (59, 59)),
                 ("max_message_size", "1", 1), ("workers", "1", 1), ("workers", "256", 256),
                 ("max_connections", "1", 1), ("greylist", "0", 0),
                 ("greylist", "86400", 86400), ("max_connections_per_ip", "0", 0),
                 ("seed", "0", 0), ("delay", "0-59", (0, 59))]
        for name, text, value in cases:
            with self.subTest(option=name, text=text):
                config = blackhole.Config(hostname="bh.test", **{name: text})
                self.assertEqual(getattr(config, name), value)
        config = blackhole.Config(hostname="bh.test", timeout="0", delay="60")
        self.assertEqual((config.timeout, config.delay), (0, (60, 60)))

    def test_errors(self):
        """Each error is one line: source, option, value as written, reason."""
        cases = [
            (dict(mode="bouce"), "mode = bouce: must be accept, bounce or random"),
            (dict(listen="127.0.0.1"), "listen = 127.0.0.1: must be ADDR:PORT"),
            (dict(listen="127.0.0.1:70000"),
             "listen = 127.0.0.1:70000: port must be a number from 0 to 65535"),
            (dict(listen="127.0.0.1:25, 127.0.0.1:25"),
             "listen = 127.0.0.1:25, 127.0.0.1:25: 127.0.0.1:25 is given twice"),
            (dict(listen="127.0.0.1:25 mode=x"),
             "listen = 127.0.0.1:25 mode=x: mode=x: must be accept, bounce or random"),
            (dict(listen=""), "listen = : no listener given"),
            (dict(tls_listen=":465"), "tls_listen = :465: needs tls_cert and tls_key"),
            (dict(listen="127.0.0.1:2525", tls_listen="127.0.0.1:2525", tls_cert=CERT,
                  tls_key=KEY),
             "tls_listen = 127.0.0.1:2525: 127.0.0.1:2525 is also in listen"),
            (dict(tls_cert=CERT), "tls_cert = %s: tls_cert and tls_key go together" % CERT),
            (dict(tls_key=KEY), "tls_key = %s: tls_cert and tls_key go together" % KEY),
            (dict(tls_cert=MISSING, tls_key=KEY),
             "tls_cert = %s: cannot read: No such file or directory" % MISSING),
            (dict(tls_cert=CERT, tls_key=MISSING),
             "tls_key = %s: cannot read: No such file or directory" % MISSING),
            (dict(tls_cert=CERT, tls_key=EC_KEY), "tls_key = %s: does not match tls_cert"
             % EC_KEY),
            (dict(tls_cert=EC_CERT, tls_key=KEY), "tls_key = %s: does not match tls_cert"
             % KEY),
            (dict(tls_cert=support.CA, tls_key=KEY), "tls_key = %s: does not match tls_cert"
             % KEY),
            (dict(tls_cert=KEY, tls_key=KEY), "tls_cert = %s: no PEM certificate in it" % KEY),
            (dict(tls_cert=CERT, tls_key=CERT), "tls_key = %s: no PEM private key in it"
             % CERT),
            (dict(tls_dhparams=CERT), "tls_dhparams = %s: no PEM DH parameters in it" % CERT),
            (dict(tls_dhparams=MISSING),
             "tls_dhparams = %s: cannot read: No such file or directory" % MISSING),
            (dict(starttls="true"), "starttls = true: needs tls_cert and tls_key"),
            (dict(starttls="maybe"),
             "starttls = maybe: must be true or false (yes/no, on/off, 1/0)"),
            (dict(hostname="bad host"),
             "hostname = bad host: must be a host name such as mail.example.com"),
            (dict(hostname=""), "hostname = : must be a host name such as mail.example.com"),
            (dict(user="no-such-user-bh"), "user = no-such-user-bh: no such user"),
            (dict(group="no-such-group-bh"), "group = no-such-group-bh: no such group"),
            (dict(pidfile=" "), "pidfile =  : must be a path"),
            (dict(timeout="181"), "timeout = 181: must be between 0 and 180"),
            (dict(timeout="-1"), "timeout = -1: must be between 0 and 180"),
            (dict(timeout="1.5"), "timeout = 1.5: must be a whole number"),
            (dict(timeout="1_0"), "timeout = 1_0: must be a whole number"),
            (dict(timeout="\u0661\u0662"), "timeout = \u0661\u0662: must be a whole number"),
            (dict(delay="61"), "delay = 61: must be between 0 and 60 seconds"),
            (dict(delay="5-3"), "delay = 5-3: minimum is above maximum"),
            (dict(delay="soon"), "delay = soon: must be N or MIN-MAX whole seconds"),
            (dict(delay="60"), "delay = 60: must be less than timeout (60)"),
            (dict(delay="1-10", timeout="10"), "delay = 1-10: must be less than timeout (10)"),
            (dict(max_message_size="0"), "max_message_size = 0: must be 1 or more"),
            (dict(max_message_size="big"), "max_message_size = big: must be a whole number"),
            (dict(dynamic_switch="perhaps"),
             "dynamic_switch = perhaps: must be true or false (yes/no, on/off, 1/0)"),
            (dict(pin_cpu="2"), "pin_cpu = 2: must be true or false (yes/no, on/off, 1/0)"),
            (dict(workers="0"), "workers = 0: must be between 1 and 256"),
            (dict(workers="many"), "workers = many: must be a whole number"),
            (dict(max_connections="0"), "max_connections = 0: must be 1 or more"),
            (dict(strict="very"), "strict = very: must be true or false (yes/no, on/off, 1/0)"),
            (dict(metrics_listen="9100"), "metrics_listen = 9100: must be ADDR:PORT"),
            (dict(metrics_listen="127.0.0.1:99999"),
             "metrics_listen = 127.0.0.1:99999: port must be a number from 0 to 65535"),
            (dict(greylist="86401"), "greylist = 86401: must be between 0 and 86400"),
            (dict(max_connections_per_ip="-1"), "max_connections_per_ip = -1: must be 0 or more"),
            (dict(rate_limit="10"), "rate_limit = 10: must be N/SECONDS, e.g. 100/60"),
            (dict(rate_limit="0/60"),
             "rate_limit = 0/60: must be N/SECONDS with N and SECONDS above 0"),
            (dict(seed="x"), "seed = x: must be a whole number"),
            (dict(sender_checks="loud"),
             "sender_checks = loud: must be off, count, reply or refuse"),
            (dict(proxy_trusted="10.0.0.0/33"),
             "proxy_trusted = 10.0.0.0/33: '10.0.0.0/33' is not an address or network"),
            (dict(colour="red"), "colour = red: unknown option"),
        ]
        for options, message in cases:
            with self.subTest(options=options):
                with self.assertRaises(blackhole.ConfigError) as caught:
                    blackhole.Config(source="blackhole.ini", **options)
                self.assertEqual(str(caught.exception), "blackhole.ini: " + message)

    def test_tls_pairs_load(self):
        for cert, key in [(CERT, KEY), (EC_CERT, EC_KEY)]:
            with self.subTest(cert=os.path.basename(cert)):
                config = blackhole.Config(tls_cert=cert, tls_key=key, tls_dhparams=DHPARAMS,
                                          tls_listen="127.0.0.1:0", hostname="bh.test")
                self.assertEqual((config.tls_cert, config.tls_key, config.starttls),
                                 (cert, key, True))

    def test_user_and_group(self):
        user, group = current_user_and_group()
        config = blackhole.Config(user=user, group=group, hostname="bh.test")
        self.assertEqual((config.user, config.group), (user, group))
        # not root: a different user or group cannot be switched to
        with mock.patch("os.getuid", return_value=54321), \
                mock.patch("os.getgid", return_value=54321):
            for option, value in [("user", user), ("group", group)]:
                with self.subTest(option=option):
                    with self.assertRaises(blackhole.ConfigError) as caught:
                        blackhole.Config(source="blackhole.ini", hostname="bh.test",
                                         **{option: value})
                    self.assertEqual(str(caught.exception), "blackhole.ini: %s = %s: "
                                     "differs from the current %s and not running as root"
                                     % (option, value, option))

    def test_config_is_immutable(self):
        config = blackhole.Config(hostname="bh.test")
        with self.assertRaises(AttributeError):
            config.mode = "bounce"


class ConfigFileTest(unittest.TestCase):
    """Config.from_file: the INI file of section 3."""

    def load(self, text):
        path = support.write_config(self, text)
        return path, blackhole.Config.from_file(path)

    def assertFileError(self, text, message):
        path = support.write_config(self, text)
        with self.assertRaises(blackhole.ConfigError) as caught:
            blackhole.Config.from_file(path)
        self.assertEqual(str(caught.exception), "%s: %s" % (path, message))

    def test_section_and_sectionless(self):
        body = ("listen = 127.0.0.1:2525 mode=bounce\nmode = random\ndelay = 1, 3\n"
                "hostname = bh.test\n")
        for text in (body, "[blackhole]\n" + body, "# kura/blackhole\n\n" + body,
                     "  [blackhole]\n" + body):
            with self.subTest(text=text):
                path, config = self.load(text)
                self.assertEqual(config.source, path)
                self.assertEqual((config.listen[0].port, config.listen[0].mode, config.mode,
                                  config.delay, config.hostname),
                                 (2525, "bounce", "random", (1, 3), "bh.test"))

    def test_comments(self):
        _, config = self.load(
            "# a comment\n; another\n[blackhole]\n"
            "listen = :2525  # all IPv4\n"
            "mode = bounce ; inline too\n"
            "hostname = bh.test\n"
            "pidfile = /tmp/bh#1;2.pid\n"
            "   ; indented comment\n"
            "timeout = 30\t# after a tab\n")
        self.assertEqual(config.listen[0][1:3], ("0.0.0.0", 2525))
        self.assertEqual(config.mode, "bounce")
        self.assertEqual(config.timeout, 30)
        # without whitespace before it, # or ; is part of the value
        self.assertEqual(config.pidfile, "/tmp/bh#1;2.pid")

    def test_comment_without_whitespace_is_value(self):
        self.assertFileError("hostname = bh.test\nmode = bounce;x\n",
                             "mode = bounce;x: must be accept, bounce or random")

    def test_percent_is_literal(self):
        _, config = self.load("hostname = bh.test\npidfile = /tmp/100%done-%(x)s.pid\n")
        self.assertEqual(config.pidfile, "/tmp/100%done-%(x)s.pid")

    def test_names_are_case_insensitive(self):
        _, config = self.load("[blackhole]\nMODE = Bounce\nHostName = bh.test\n")
        self.assertEqual((config.mode, config.hostname), ("bounce", "bh.test"))

    def test_empty_and_comment_only_files_give_defaults(self):
        for text in ("", "# nothing\n; here\n", "[blackhole]\n"):
            with self.subTest(text=text):
                _, config = self.load(text)
                self.assertEqual([(l.host, l.port) for l in config.listen],
                                 [("127.0.0.1", 25), ("127.0.0.1", 587)])
                self.assertEqual((config.mode, config.timeout), ("accept", 60))

    def test_continuation_lines(self):
        """An indented line adds an item to a list; any other option refuses
        it in one line, not silently (a pidfile named `p.pid\\nmode = x`)."""
        for text in ("listen = 127.0.0.1:2525,\n    127.0.0.1:2526\n",
                     "listen = 127.0.0.1:2525\n    127.0.0.1:2526\n"):
            with self.subTest(text=text):
                _, config = self.load(text)
                self.assertEqual([l.port for l in config.listen], [2525, 2526])
        _, config = self.load("proxy_trusted = 10.0.0.1\n  10.0.0.2\n")
        self.assertEqual([str(n) for n in config.proxy_trusted],
                         ["10.0.0.1/32", "10.0.0.2/32"])
        self.assertFileError("hostname = bh.test\npidfile = /tmp/p.pid\n    mode = bounce\n",
                             "pidfile = /tmp/p.pid\\nmode = bounce: one value only; "
                             "is the line after it indented?")
        self.assertFileError("colour = red\n  blue\n", "colour = red\\nblue: unknown option")

    def test_none_is_the_default(self):
        """Server(option=None), as SPEC 9's keyword arguments: the default."""
        config = blackhole.Config(hostname="bh.test", tls_listen=None, delay=None,
                                  max_message_size=None, mode=None)
        self.assertEqual((config.tls_listen, config.delay, config.max_message_size,
                          config.mode), ((), (0, 0), 512000, "accept"))

    def test_byte_order_mark(self):
        path = support.write_config(self, "")
        with open(path, "wb") as handle:
            handle.write("\ufeff[blackhole]\nmode = bounce\nhostname = bh.test\n".encode())
        self.assertEqual(blackhole.Config.from_file(path).mode, "bounce")

    def test_relative_paths_are_made_absolute(self):
        """-b changes directory to / before it writes the pidfile."""
        config = blackhole.Config(hostname="bh.test", pidfile="run/bh.pid")
        self.assertEqual(config.pidfile, os.path.join(os.getcwd(), "run", "bh.pid"))

    def test_overrides(self):
        path = support.write_config(self, "mode = bounce\nhostname = bh.test\n")
        config = blackhole.Config.from_file(path, mode="random", listen="127.0.0.1:0")
        self.assertEqual((config.mode, config.listen[0].port), ("random", 0))

    def test_every_option_in_a_file(self):
        user, group = current_user_and_group()
        lines = dict(
            listen="127.0.0.1:2525 delay=2, 127.0.0.1:2526", tls_listen="127.0.0.1:2465",
            tls_cert=CERT, tls_key=KEY, tls_dhparams=DHPARAMS, starttls="off",
            hostname="bh.test", user=user, group=group, pidfile="/tmp/bh.pid",
            timeout="0", delay="0-60", mode="bounce", max_message_size="2048",
            dynamic_switch="0", workers="2", pin_cpu="off", max_connections="50", strict="on",
            metrics_listen="[::1]:9025", greylist="60", max_connections_per_ip="5",
            rate_limit="3/0.25", seed="7", sender_checks="off",
            proxy_trusted="192.0.2.0/24, 2001:db8::/32")
        self.assertEqual(set(lines), set(blackhole.OPTIONS))
        _, config = self.load("".join("%s = %s\n" % item for item in lines.items()))
        expected = dict(
            tls_cert=CERT, tls_key=KEY, tls_dhparams=DHPARAMS, starttls=False,
            hostname="bh.test", user=user, group=group, pidfile="/tmp/bh.pid", timeout=0,
            delay=(0, 60), mode="bounce", max_message_size=2048, dynamic_switch=False,
            workers=2, pin_cpu=False, max_connections=50, strict=True,
            metrics_listen=("::1", 9025),
            greylist=60, max_connections_per_ip=5, rate_limit=(3, 0.25), seed=7,
            sender_checks="off", proxy_trusted=(ipaddress.ip_network("192.0.2.0/24"),
                                                ipaddress.ip_network("2001:db8::/32")))
        for name, value in expected.items():
            with self.subTest(option=name):
                self.assertEqual(getattr(config, name), value)
        self.assertEqual([(l.port, l.delay, l.tls) for l in config.listeners()],
                         [(2525, (2, 2), False), (2526, None, False), (2465, None, True)])

    def test_file_errors(self):
        cases = [
            ("mode = bouce\n", "mode = bouce: must be accept, bounce or random"),
            ("[blackhole]\nmode = bouce  # typo\n",
             "mode = bouce: must be accept, bounce or random"),
            ("listen = 127.0.0.1:2525\ncolour = red\n", "colour = red: unknown option"),
            ("[blackhole]\nmode = accept\n[other]\nx = 1\n", "unknown section [other]"),
            ("[Blackhole]\n", "unknown section [Blackhole]"),
            ("mode = accept\nlisten = :25\nmode = bounce\n",
             "line 3: mode = bounce: given twice"),
            ("[blackhole]\nmode = accept\nMode = bounce\n",
             "line 3: Mode = bounce: given twice"),
            ("[blackhole]\n[blackhole]\n", "line 2: [blackhole]: given twice"),
            ("mode = accept\n[blackhole]\n",
             "line 1: mode = accept: comes before the [blackhole] header"),
            ("mode = accept\nthis is not ini\n",
             "line 2: this is not ini: not OPTION = VALUE"),
            ("listen = 127.0.0.1:2525, 127.0.0.1:2525\n",
             "listen = 127.0.0.1:2525, 127.0.0.1:2525: 127.0.0.1:2525 is given twice"),
            ("delay = 30\ntimeout = 20\n", "delay = 30: must be less than timeout (20)"),
        ]
        for text, message in cases:
            with self.subTest(text=text):
                self.assertFileError(text, message)

    def test_missing_file(self):
        path = os.path.join(support.HERE, "no-such-config.ini")
        with self.assertRaises(blackhole.ConfigError) as caught:
            blackhole.Config.from_file(path)
        self.assertEqual(str(caught.exception),
                         "%s: cannot read: No such file or directory" % path)

    def test_not_utf8(self):
        path = support.write_config(self, "")
        with open(path, "wb") as handle:
            handle.write(b"hostname = bh\xff.test\n")
        with self.assertRaises(blackhole.ConfigError) as caught:
            blackhole.Config.from_file(path)
        self.assertEqual(str(caught.exception), "%s: is not UTF-8 text" % path)

    def test_errors_are_one_line(self):
        """Whatever is wrong, the message has no newline (the CLI prints it)."""
        for text in ("[bad\n", "x\n y\n", "=\n", "[blackhole]\n[other\n", "listen =\n"):
            with self.subTest(text=text):
                path = support.write_config(self, text)
                with self.assertRaises(blackhole.ConfigError) as caught:
                    blackhole.Config.from_file(path)
                message = str(caught.exception)
                self.assertTrue(message.startswith(path + ": "), message)
                self.assertNotIn("\n", message)


class ShippedConfigTest(unittest.TestCase):
    """blackhole.ini: working, and documenting every option."""

    path = os.path.join(support.ROOT, "blackhole.ini")

    def test_loads(self):
        config = blackhole.Config.from_file(self.path)
        self.assertEqual([(l.host, l.port) for l in config.listen],
                         [("127.0.0.1", 2525), ("127.0.0.1", 2587)])
        self.assertEqual((config.tls_cert, config.user, config.pidfile, config.seed),
                         (None, None, None, None))

    def test_every_option_documented(self):
        with open(self.path) as handle:
            lines = handle.read().splitlines()
        self.assertIn("[blackhole]", lines)
        for name in blackhole.OPTIONS:
            with self.subTest(option=name):
                pattern = re.compile(r"^(# )?%s = \S" % name)
                found = [i for i, line in enumerate(lines) if pattern.match(line)]
                self.assertEqual(len(found), 1, "%s should appear once" % name)
                above = lines[found[0] - 1]
                self.assertTrue(above.startswith("# ") and not pattern.match(above),
                                "%s has no explanation above it" % name)


class ListenerDelayBoundaryTest(unittest.TestCase):
    """3: a listener's delay= must be less than timeout, as the global delay."""

    def test_equal_to_timeout_is_refused(self):
        with self.assertRaises(blackhole.ConfigError) as caught:
            blackhole.Config(listen="127.0.0.1:0 delay=10", timeout=10)
        self.assertEqual(str(caught.exception), "<options>: listen = 127.0.0.1:0 delay=10: "
                         "delay= must be less than timeout (10)")
        blackhole.Config(listen="127.0.0.1:0 delay=9", timeout=10)


class ConfigCornersTest(unittest.TestCase):

    def test_encrypted_key_is_refused_without_a_prompt(self):
        key = os.path.join(support.CERTS, "server-encrypted.key")
        with self.assertRaises(blackhole.ConfigError) as caught:
            blackhole.Config(tls_cert=support.CERT, tls_key=key, hostname=support.HOST)
        self.assertEqual(str(caught.exception), "<options>: tls_key = %s: is encrypted; "
                         "blackhole takes no passphrase" % key)

    def test_listener_delay_is_held_to_the_timeout(self):
        with self.assertRaises(blackhole.ConfigError) as caught:
            blackhole.Config(listen="127.0.0.1:0 delay=50", timeout=10, hostname=support.HOST)
        self.assertEqual(str(caught.exception), "<options>: listen = 127.0.0.1:0 delay=50: "
                         "delay= must be less than timeout (10)")

    def test_an_indented_bracket_is_a_continuation_not_a_section(self):
        path = support.write_config(self, "listen = 127.0.0.1:0,\n    [::1]:0\nhostname = x\n")
        config = blackhole.Config.from_file(path)
        self.assertEqual([(item.host, item.port) for item in config.listen],
                         [("127.0.0.1", 0), ("::1", 0)])


if __name__ == "__main__":
    unittest.main()
