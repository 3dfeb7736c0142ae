"""Hostile clients (issue 5): bytes, time, volume, protocol abuse, fuzzing.

Whatever one client does, the others are served and the process keeps its
size: threads and file descriptors return to where they started.
"""

import base64
import io
import itertools
import logging
import os
import random
import re
import select
import socket
import ssl
import struct
import sys
import threading
import time
import tracemalloc
import unittest
from unittest import mock

import blackhole
from tests.support import (CA, CERT, HOST, KEY, TIMEOUT, RawClient, ServerTestCase,
                           small_send_buffer, wait_until)

try:
    import resource
except ImportError:         # not POSIX
    resource = None

H = HOST.encode()
UNKNOWN = b"502 5.5.2 Command not recognised\r\n"
TOO_LONG = b"500 5.5.2 Line too long\r\n"
OK = b"250 2.0.0 OK\r\n"
TIMED_OUT = b"421 4.4.2 " + H + b" Error: timeout exceeded\r\n"
QUEUED = re.compile(rb"^250 2\.0\.0 OK: queued as <[^<>@\s]+@" + re.escape(H) + rb">\r\n$")
# RFC 5321 4.2: a code, a space or a dash, text without control characters, CRLF
REPLY_LINE = re.compile(rb"^\d{3}[ -][^\x00-\x08\x0a-\x1f\x7f]*\r\n$")
MESSAGE = (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hostile\r\n"
           b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n"
           b"\r\nHello.\r\n")
HAS_PROC_FD = os.path.isdir("/proc/self/fd")


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _resources():
    """(threads, open fds) of this process, the server's included."""
    return threading.active_count(), _fds() if HAS_PROC_FD else 0


def _reset(sock):
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _recv_exactly(client, count):
    """count octets of replies from a RawClient (its buffer first)."""
    data, client.buf = client.buf, b""
    while len(data) < count:
        chunk = client.sock.recv(65536)
        if not chunk:
            break
        data += chunk
    data, client.buf = data[:count], data[count:]
    return data


def _trickle(client, octets):
    """Send octets one every 0.3 s, for at most 4 s, until the server answers;
    returns when it started."""
    started = time.monotonic()
    for octet in octets:
        if time.monotonic() - started > 4:
            break
        try:
            client.send(bytes([octet]))
        except OSError:
            break
        if select.select([client.sock], [], [], 0.3)[0]:
            break
    return started


def _start_message(client, last):
    """EHLO, MAIL, RCPT and `last` (DATA, or BDAT and part of its chunk) in
    one send; reads their replies (a 354 to DATA, none yet to BDAT)."""
    client.send(b"EHLO localhost\r\nMAIL FROM:<a@example.com>\r\n"
                b"RCPT TO:<b@example.com>\r\n" + last)
    for _ in range(4 if last.startswith(b"DATA") else 3):
        client.reply()


def _client_hello():
    """The first flight of a real TLS client, as bytes."""
    context = ssl.create_default_context(cafile=CA)
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class _Concurrently:
    """Run callables in threads and collect (result, exception) pairs."""

    def __init__(self, testcase):
        self.testcase = testcase
        self.threads = []
        self.results = {}

    def start(self, name, func, *args):
        def run():
            try:
                self.results[name] = (func(*args), None)
            except BaseException as exc:    # reported by the test, not the thread
                self.results[name] = (None, exc)
        thread = threading.Thread(target=run, name="hostile-" + name, daemon=True)
        thread.start()
        self.threads.append(thread)
        self.testcase.addCleanup(thread.join, TIMEOUT)

    def join(self):
        for thread in self.threads:
            thread.join(TIMEOUT * 2)
        return self.results


class _LeakCheck:
    """A mixin: threads and fds come back to their level before a test.

    A thread between sessions waits 50 ms for the next, not a second, so
    that the level comes back soon."""

    def setUp(self):
        patcher = mock.patch.object(blackhole.ThreadingSMTPServer, "idle_seconds", 0.05)
        patcher.start()
        self.addCleanup(patcher.stop)
        super().setUp()
        self.baseline = self.settle(self.server)

    def settle(self, server):
        """The baseline once server's accept thread is in full swing.

        start() returns before that thread has made its selector; one whole
        session later it has, and the session's own thread has ended.
        """
        before = set(threading.enumerate())
        client = RawClient(server.address)
        try:
            client.line()
            client.cmd(b"QUIT")
            client.closed()
        finally:
            client.close()
        # the warm-up session's thread has ended (an earlier test's may end too)
        wait_until(lambda: set(threading.enumerate()) <= before, message="warm-up session")
        return _resources()

    def assertBackToBaseline(self, what):
        try:
            # at most the baseline: a thread left by an earlier test may end meanwhile
            wait_until(lambda: all(now <= then for now, then in zip(_resources(),
                                                                    self.baseline)))
        except AssertionError:
            self.fail("(threads, fds) %r after %s, %r before" % (
                _resources(), what, self.baseline))


# ###########################################################################
# Bytes
# ###########################################################################

class BytesTest(_LeakCheck, ServerTestCase):
    """Invalid UTF-8, NUL, control characters and very long lines."""

    def transaction(self, client):
        client.send(b"HELO localhost\r\nMAIL FROM:<a@example.com>\r\n"
                    b"RCPT TO:<b@example.com>\r\nDATA\r\n")
        self.assertEqual(client.reply(), b"250 " + H + b"\r\n")
        self.assertEqual(client.reply(), b"250 2.1.0 OK\r\n")
        self.assertEqual(client.reply(), b"250 2.1.5 OK\r\n")
        self.assertEqual(client.reply(), b"354 End data with <CR><LF>.<CR><LF>\r\n")

    def test_bad_bytes_in_commands(self):
        client = self.raw()
        transcript = [
            (b"\xff\xfe\xfd", UNKNOWN),
            (b"NOOP\x00", UNKNOWN),
            (b"\x00", UNKNOWN),
            (b"\x1b[31mNOOP", UNKNOWN),
            (b"NO\x7fOP", UNKNOWN),
            (b"\xef\xbb\xbfNOOP", UNKNOWN),             # a UTF-8 byte order mark
            (b"\t\x0b\x0c\x01", UNKNOWN),
            (b"NOOP\rRSET", UNKNOWN),                  # a bare CR is not a line end
            (b"NOOP \xc3\x28\x00\x1b", OK),            # arguments are not looked at
            (b"HELO \xff\xfe", b"250 " + H + b"\r\n"),
            (b"MAIL FROM:<\xc3\x28\xa0@example.com>", b"250 2.1.0 OK\r\n"),
            (b"RCPT TO:<a\x00b\x01@example.com>", b"250 2.1.5 OK\r\n"),
            (b"VRFY \x01\x02\xff", b"252 2.0.0 Will attempt delivery\r\n"),
            (b"RSET \xed\xa0\x80", OK),                 # an encoded surrogate
            # echoed text: a bare CR would split the reply line (RFC 5321 4.2)
            (b"VRFY pass=a\rb\x00\x1b[2J\xff\xc3\xa9",
             b"250 2.0.0 <pass=a?b??[2J?\xc3\xa9> OK\r\n"),
            (b"VRFY <fail=\x07\xed\xa0\x80>", b"550 5.7.1 <fail=????> unknown\r\n"),
        ]
        for line, expected in transcript:
            with self.subTest(line=line):
                self.assertEqual(client.cmd(line), expected)
        self.transaction(client)
        client.send(b"Subject: \xff\x00\x1b\r\n\r\n\x00\x01\xfe\xff\r\n.\r\n")
        self.assertRegex(client.reply(), QUEUED)
        self.assertEqual(client.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")

    def test_bad_bytes_in_strict_parameters(self):
        client = self.raw(self.start_server(strict=True))
        self.assertTrue(client.cmd(b"EHLO localhost").endswith(b" PLAIN\r\n"))
        self.assertEqual(client.cmd(b"MAIL FROM:<a@example.com> \x1b[2J=1"),
                         b"555 5.5.4 Unsupported parameter: ?[2J\r\n")
        self.assertEqual(client.cmd(b"MAIL FROM:<a@example.com> \xff\x00"),
                         b"555 5.5.4 Unsupported parameter: ??\r\n")
        self.assertEqual(client.cmd(b"NOOP"), OK)

    def test_100_kb_line_without_newline(self):
        client = self.raw()
        client.send(b"X" * 100000)
        client.send(b"Y" * 100000)
        self.assertEqual(client.cmd(b""), TOO_LONG)
        # pipelined behind another one: the excess never leaks into the next command
        client.send(b"NOOP " + b"Z" * 100000 + b"\r\nNOOP\r\n")
        self.assertEqual(client.reply(), TOO_LONG)
        self.assertEqual(client.reply(), OK)
        self.assertEqual(client.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")

    def test_megabyte_header_line_in_data(self):
        header = b"X-Long: " + b"h" * 1000000 + b"\r\nSubject: long\r\n\r\nbody\r\n.\r\n"
        small = self.server                               # max_message_size 512000
        large = self.start_server(max_message_size=2000000)
        for server, expected in ((small, b"552 5.3.4 Message size exceeds fixed "
                                  b"maximum message size\r\n"), (large, None)):
            with self.subTest(max_message_size=server.config.max_message_size):
                client = self.raw(server)
                self.transaction(client)
                client.send(header)
                reply = client.reply()
                if expected:
                    self.assertEqual(reply, expected)
                else:
                    self.assertRegex(reply, QUEUED)
                self.assertEqual(client.cmd(b"NOOP"), OK)
                self.assertEqual(server.stats["bytes_received"], len(header) - 3)
                self.assertEqual(server.stats["sender_issues_long_line"], 1)

    def test_pipelined_replies_in_bounded_memory(self):
        """64 KB of pipelined `EXPN all` asks for 1.2 MB of replies: they go
        out in writes of max_queued, not all kept for one."""
        batch = b"EXPN all\r\n" * 6500
        client = self.raw()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        try:
            start = tracemalloc.get_traced_memory()[0]
            client.send(batch)
            first = client.reply()
            same = sum(client.reply() == first for _ in range(6499))    # none kept here
            peak = tracemalloc.get_traced_memory()[1] - start
        finally:
            tracemalloc.stop()
        self.assertTrue(first.startswith(b"250-"), first)
        self.assertEqual(same, 6499)
        self.assertLess(peak, 512 * 1024, "peak %d octets traced" % peak)

    def test_ten_megabyte_data_line_in_bounded_memory(self):
        chunk = b"x" * 65536
        count = 160                                     # 10 MiB in one line
        size = len(chunk) * count + 2                  # the line and its CRLF
        large = self.start_server(max_message_size=size + 1)
        for server, expected in (
                (self.server, b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"),
                (large, None)):
            with self.subTest(max_message_size=server.config.max_message_size):
                client = self.raw(server)
                self.transaction(client)
                tracemalloc.start()
                self.addCleanup(tracemalloc.stop)
                try:
                    start = tracemalloc.get_traced_memory()[0]
                    for _ in range(count):
                        client.send(chunk)
                    client.send(b"\r\n.\r\n")
                    reply = client.reply()
                    peak = tracemalloc.get_traced_memory()[1] - start
                finally:
                    tracemalloc.stop()
                if expected:
                    self.assertEqual(reply, expected)
                else:
                    self.assertRegex(reply, QUEUED)
                self.assertEqual(server.stats["bytes_received"], size)
                self.assertLess(peak, 2 * 1024 * 1024, "peak %d octets traced" % peak)
                self.assertEqual(client.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")


# ###########################################################################
# Time
# ###########################################################################

class TimeTest(_LeakCheck, ServerTestCase):
    """Clients that stall in each state are cut off after `timeout` (4.5)."""

    options = {"timeout": 1, "tls_listen": "127.0.0.1:0", "tls_cert": CERT,
               "tls_key": KEY}

    def stalled(self, start, address=None, reply=True):
        """Connect, run start(client), then wait for the server to close.

        Returns (what the server sent after start, seconds from the end of
        start to the close).
        """
        client = RawClient(address or self.server.address)
        self.addCleanup(client.close)
        if reply:
            self.assertEqual(client.line(), b"220 " + H + b" ESMTP\r\n")
        started = start(client)
        client.closed()
        client.close()
        return client.buf, time.monotonic() - started

    @staticmethod
    def idle(client):
        return time.monotonic()

    @staticmethod
    def trickle(client):
        """One byte every 0.3 s, never a whole line, until the server answers."""
        return _trickle(client, itertools.repeat(ord("N")))

    @staticmethod
    def mid_data(client):
        _start_message(client, b"DATA\r\n")
        client.send(b"Subject: stalled\r\n\r\nhalf a li")
        return time.monotonic()

    @staticmethod
    def mid_bdat(client):
        _start_message(client, b"BDAT 1000 LAST\r\nonly ten..")
        return time.monotonic()

    @staticmethod
    def data_trickle(client):
        """Octets inside DATA, never a whole line, until the server answers."""
        _start_message(client, b"DATA\r\n")
        return _trickle(client, itertools.repeat(ord("x")))

    @staticmethod
    def bdat_trickle(client):
        """BDAT content has no lines to wait for: a trickle is cut off too."""
        _start_message(client, b"BDAT 100000 LAST\r\n")
        return _trickle(client, itertools.repeat(ord("x")))

    @staticmethod
    def mid_auth(client):
        client.send(b"AUTH LOGIN\r\n")
        client.reply()
        return time.monotonic()

    @staticmethod
    def tls_silent(client):
        return time.monotonic()

    @staticmethod
    def tls_half_hello(client):
        client.send(_client_hello()[:40])
        return time.monotonic()

    @staticmethod
    def tls_trickle(client):
        return _trickle(client, _client_hello())

    @staticmethod
    def starttls_silent(client):
        client.send(b"STARTTLS\r\n")
        client.reply()
        return time.monotonic()

    def test_stalled_clients_are_cut_off(self):
        plain, tls = self.server.address, self.server.tls_address
        cases = {       # name: (what the client does, listener, 421 allowed)
            "idle": (self.idle, plain, True),
            "trickle": (self.trickle, plain, True),
            "mid-DATA": (self.mid_data, plain, True),
            "mid-BDAT": (self.mid_bdat, plain, True),
            "DATA trickle": (self.data_trickle, plain, True),
            "BDAT trickle": (self.bdat_trickle, plain, True),
            "mid-AUTH": (self.mid_auth, plain, True),
            "TLS silent": (self.tls_silent, tls, False),
            "TLS half hello": (self.tls_half_hello, tls, False),
            "TLS trickle": (self.tls_trickle, tls, False),
            "STARTTLS silent": (self.starttls_silent, plain, False),
        }
        group = _Concurrently(self)
        started = time.monotonic()
        for name, (start, address, _) in cases.items():
            group.start(name, self.stalled, start, address, address == plain)
        results = group.join()
        total = time.monotonic() - started
        for name, (_, _, reply) in cases.items():
            with self.subTest(name):
                (sent, elapsed), error = results.get(name, ((None, None), "no result"))
                self.assertIsNone(error)
                if reply:       # the protocol allows one: exactly the 421 of 4.5
                    self.assertEqual(sent, TIMED_OUT)
                else:           # mid-handshake: no SMTP reply can be read
                    self.assertNotIn(b"421", sent)
                self.assertGreater(elapsed, 0.8)
                self.assertLess(elapsed, 2.5)   # the trickles would run 4 s if kept alive
        self.assertLess(total, 4.5)
        self.assertGreaterEqual(self.server.stats["timeouts"], len(cases))
        self.assertBackToBaseline("stalled clients")
        with self.smtp() as client:             # and everyone else is still served
            self.assertEqual(client.sendmail("a@example.com", ["b@example.com"], MESSAGE), {})


class StopTest(ServerTestCase):
    """stop() within 2 s (SPEC 2) even while sessions work through pipelined
    input they have already read, debug logging each reply line."""

    def test_pipelined_input_is_not_worked_through(self):
        logger = logging.getLogger("blackhole")
        handler = logging.StreamHandler(io.StringIO())
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        self.addCleanup(logger.setLevel, level)
        self.addCleanup(logger.removeHandler, handler)
        server = self.start_server()        # reads the level as sessions start
        batch = b"EXPN all\r\n" * 6000     # 60 KB: 6,000 replies of 6 lines each
        clients = [self.raw(server) for _ in range(4)]
        for client in clients:
            client.sock.sendall(batch)      # never read: replies pile up unsent
        wait_until(lambda: server.stats["connections_active"] == 4, message="4 sessions")
        started = time.monotonic()
        server.stop()
        self.assertLess(time.monotonic() - started, 2.0)


# ###########################################################################
# Volume
# ###########################################################################

@unittest.skipUnless(HAS_PROC_FD, "counts file descriptors in /proc/self/fd (Linux)")
class VolumeTest(_LeakCheck, ServerTestCase):
    """Many sessions at once, many short ones, resets, the connection cap."""

    options = {"capture": 1000}
    sessions = 300

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if resource is not None:    # 2 fds a session here: client and server ends
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = 4 * cls.sessions + 256
            if soft != resource.RLIM_INFINITY and soft < want:
                if hard != resource.RLIM_INFINITY:
                    want = min(want, hard)
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                cls.addClassCleanup(resource.setrlimit, resource.RLIMIT_NOFILE,
                                    (soft, hard))

    def assertServesMail(self):
        with self.smtp() as client:
            self.assertEqual(client.sendmail("a@example.com", ["b@example.com"], MESSAGE), {})

    def test_300_concurrent_sessions(self):
        clients = [RawClient(self.server.address) for _ in range(self.sessions)]
        for client in clients:
            self.addCleanup(client.close)
        for client in clients:      # every session is open and greeted at once
            self.assertEqual(client.line(), b"220 " + H + b" ESMTP\r\n")
        self.assertGreaterEqual(threading.active_count(), self.baseline[0] + self.sessions)
        for index, client in enumerate(clients):
            client.send(b"HELO localhost\r\nMAIL FROM:<a%d@example.com>\r\n"
                        b"RCPT TO:<b@example.com>\r\nDATA\r\n%s.\r\nQUIT\r\n"
                        % (index, MESSAGE))
        ids = set()
        for client in clients:
            client.closed()
            lines = client.buf.split(b"\r\n")
            self.assertEqual(lines[:4] + lines[5:], [
                b"250 " + H, b"250 2.1.0 OK", b"250 2.1.5 OK",
                b"354 End data with <CR><LF>.<CR><LF>", b"221 2.0.0 Goodbye", b""])
            self.assertRegex(lines[4] + b"\r\n", QUEUED)
            ids.add(lines[4])
            client.close()
        self.assertEqual(len(ids), self.sessions)
        self.assertEqual(sorted(m.mail_from for m in self.server.messages),
                         sorted("a%d@example.com" % i for i in range(self.sessions)))
        self.assertBackToBaseline("%d concurrent sessions" % self.sessions)

    def test_2000_connect_and_close_cycles(self):
        total = self.server.stats["connections_total"] + 2000
        for _ in range(2000):
            socket.create_connection(self.server.address, timeout=TIMEOUT).close()
        wait_until(lambda: self.server.stats["connections_total"] == total,
                   message="2000 connections counted")
        self.assertBackToBaseline("2000 connect-and-close cycles")
        self.assertServesMail()
        self.assertBackToBaseline("one message")

    def test_200_resets_mid_data(self):
        for _ in range(200):
            client = RawClient(self.server.address)
            try:
                client.send(b"HELO localhost\r\nMAIL FROM:<a@example.com>\r\n"
                            b"RCPT TO:<b@example.com>\r\nDATA\r\n")
                for _ in range(5):
                    client.line()
                self.assertEqual(client.buf, b"")
                client.send(b"Subject: reset\r\n\r\n" + b"partial\r\n" * 100)
            finally:
                _reset(client.sock)
        wait_until(lambda: self.server.stats["connections_active"] == 0,
                   message="every reset session ended")
        self.assertBackToBaseline("200 resets mid-DATA")
        self.assertEqual(len(self.server.messages), 0)
        self.assertServesMail()

    def test_max_connections(self):
        server = self.start_server(max_connections=3)
        self.baseline = self.settle(server)
        first = [self.raw(server) for _ in range(3)]
        started = time.monotonic()
        refused = RawClient(server.address)
        self.addCleanup(refused.close)
        self.assertEqual(refused.line(),
                         b"421 4.7.0 " + H + b" Too many connections, try again later\r\n")
        self.assertTrue(refused.closed())
        self.assertLess(time.monotonic() - started, 1.0)
        refused.close()
        for client in first:        # the admitted ones keep working
            self.assertEqual(client.cmd(b"NOOP"), OK)
        self.assertEqual(first[0].cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
        self.assertTrue(first[0].closed())
        first[0].close()
        wait_until(lambda: server.stats["connections_active"] == 2,
                   message="the slot to be freed")
        again = self.raw(server)            # the freed slot is taken
        self.assertEqual(again.cmd(b"NOOP"), OK)
        for client in first[1:] + [again]:
            client.close()
        self.assertBackToBaseline("max_connections")


# ###########################################################################
# Protocol abuse
# ###########################################################################

class AcceptFailureTest(unittest.TestCase):
    """Out of file descriptors: the accept loop backs off and logs once in a
    while, not 20 lines a second."""

    def test_one_line_for_many_failures(self):
        calls = []

        def no_descriptors(server):
            calls.append(1)
            raise OSError(24, "Too many open files")

        with mock.patch.object(blackhole.ThreadingSMTPServer, "get_request", no_descriptors):
            with self.assertLogs("blackhole", "ERROR") as logs:
                with blackhole.Server(hostname=HOST) as server:
                    client = RawClient(server.address)     # never accepted
                    self.addCleanup(client.close)
                    wait_until(lambda: len(calls) >= 5, message="five failed accepts")
        self.assertEqual(logs.output, ["ERROR:blackhole:accept failed: [Errno 24] "
                                       "Too many open files"])


class ReadSizeTest(ServerTestCase):
    """A session awaiting a command asks recv() for command_read_size
    octets, not read_size: an idle session's buffer stays small."""

    def test_commands_small_data_large(self):
        sizes, recv = [], blackhole.SMTPHandler._recv

        def recording(handler, size):
            sizes.append(size)
            return recv(handler, size)

        with mock.patch.object(blackhole.SMTPHandler, "_recv", recording):
            client = self.raw()
            self.assertEqual(client.cmd(b"NOOP"), b"250 2.0.0 OK\r\n")
            self.assertEqual(client.cmd(b"DATA")[:4], b"354 ")
            client.send(b"x" * 100000 + b"\r\n.\r\n")
            self.assertRegex(client.reply(), QUEUED)
        handler_class = blackhole.SMTPHandler
        # NOOP, DATA and the command after the message; the message between
        self.assertEqual(sizes[:2] + sizes[-1:], [handler_class.command_read_size] * 3)
        self.assertEqual(set(sizes[2:-1]), {handler_class.read_size})


class DotStuffingTest(ServerTestCase):
    """A dot on every line costs no Python per line: the content is checked
    and kept a block at a time (a client sending `..` lines used 60 times
    the CPU of prose, and starved every other session)."""

    options = {"capture": 1}

    def test_checks_and_capture_take_blocks_not_lines(self):
        feeds = []
        feed = blackhole.SenderChecks.feed

        def counted(checks, seg):
            feeds.append(len(seg))
            feed(checks, seg)

        lines = 20000
        content = b"Subject: dots\r\n\r\n" + b"..\r\n" * lines + b".x\r\n"
        with mock.patch.object(blackhole.SenderChecks, "feed", counted):
            client = self.raw()
            client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
                        + content + b".\r\n")
            replies = [client.reply() for _ in range(4)]
        self.assertRegex(replies[3], QUEUED)
        self.assertLess(len(feeds), 50, "one feed per line-leading dot")
        envelope = self.server.messages[-1]
        self.assertEqual(envelope.data, b"Subject: dots\r\n\r\n" + b".\r\n" * lines + b"x\r\n")
        self.assertEqual(sum(feeds), len(envelope.data))
        self.assertEqual(envelope.issues, ("missing_date", "missing_from", "missing_message_id",
                                           "no_helo", "unstuffed_dot"))


class AbuseTest(ServerTestCase):
    """Misuse of the protocol: each answered as the SPEC says."""

    options = {"capture": 10, "tls_cert": CERT, "tls_key": KEY}

    def test_tenth_unknown_command_closes(self):
        client = self.raw()
        lines = [b"FOO", b"", b"\xff", b"X" * 40, b"SETUP", b"_FLUSH", b"SMTP_NOOP",
                 b"DO_NOOP", b"UNKNOWN"]
        for line in lines:
            with self.subTest(line=line):
                self.assertEqual(client.cmd(line), UNKNOWN)
        self.assertEqual(client.cmd(b"NOOP"), OK)     # known ones do not count
        self.assertEqual(client.cmd(b"HANDLE"), b"502 5.5.3 Too many unknown commands\r\n")
        self.assertTrue(client.closed())
        self.assertEqual(client.buf, b"")

    def test_burst_of_10000_pipelined_noops(self):
        client = self.raw()
        client.send(b"NOOP\r\n" * 10000 + b"VRFY <pass=last@example.com>\r\nQUIT\r\n")
        self.assertEqual(_recv_exactly(client, len(OK) * 10000), OK * 10000)
        self.assertEqual(client.reply(), b"250 2.0.0 <pass=last@example.com> OK\r\n")
        self.assertEqual(client.reply(), b"221 2.0.0 Goodbye\r\n")
        self.assertTrue(client.closed())

    def test_starttls_command_injection(self):
        client = self.raw()
        self.assertTrue(client.cmd(b"EHLO localhost").endswith(b"250 STARTTLS\r\n"))
        client.send(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<injected@example.com>\r\n")
        self.assertEqual(client.line(), b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(client.buf, b"")
        context = ssl.create_default_context(cafile=CA)
        client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
        # the first reply inside TLS answers EHLO: NOOP and MAIL were never run
        ehlo = client.cmd(b"EHLO localhost")
        self.assertTrue(ehlo.startswith(b"250-" + H + b"\r\n"), ehlo)
        self.assertNotIn(b"STARTTLS", ehlo)
        self.assertEqual(client.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 OK\r\n")
        self.assertEqual(client.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        client.send(MESSAGE + b".\r\n")
        self.assertRegex(client.reply(), QUEUED)
        self.assertIsNone(self.server.messages[-1].mail_from)

    def test_smtp_smuggling(self):
        client = self.raw()
        client.send(b"HELO localhost\r\nMAIL FROM:<a@example.com>\r\n"
                    b"RCPT TO:<b@example.com>\r\nDATA\r\n")
        for _ in range(4):
            client.reply()
        smuggled = (b"Subject: smuggling\r\n\r\nhi\n.\r\n"
                    b"MAIL FROM:<evil1@example.com>\r\nRCPT TO:<v@example.com>\r\n"
                    b"DATA\r\none\r\n.\n"
                    b"MAIL FROM:<evil2@example.com>\r\nRCPT TO:<v@example.com>\r\n"
                    b"DATA\r\ntwo\r\n")
        client.send(smuggled + b".\r\nNOOP\r\n")
        self.assertRegex(client.reply(), QUEUED)
        self.assertEqual(client.reply(), OK)       # NOOP, not a smuggled MAIL's 250
        self.server.wait_for(1)
        self.assertEqual(len(self.server.messages), 1)
        message = self.server.messages[0]
        self.assertEqual(message.mail_from, "a@example.com")
        self.assertEqual(message.rcpt_tos, ["b@example.com"])
        self.assertIn(b"MAIL FROM:<evil1@example.com>\r\n", message.data)
        self.assertIn(b"MAIL FROM:<evil2@example.com>\r\n", message.data)
        self.assertTrue(message.data.endswith(b"two\r\n"))

    def test_auth_with_12_kb_of_base64(self):
        client = self.raw()
        blob = base64.b64encode(b"\0user\0" + b"p" * 9210)      # 12,288 characters
        self.assertEqual(len(blob), 12288)
        self.assertEqual(client.cmd(b"AUTH PLAIN " + blob), TOO_LONG)
        self.assertEqual(client.cmd(b"AUTH PLAIN"), b"334 \r\n")
        self.assertEqual(client.cmd(blob), TOO_LONG)
        self.assertEqual(client.cmd(b"AUTH LOGIN"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(client.cmd(blob), TOO_LONG)
        fits = base64.b64encode(b"\0user\0" + b"p" * 9198)       # the line is 12,285
        self.assertEqual(len(b"AUTH PLAIN " + fits + b"\r\n"), 12285)
        self.assertEqual(client.cmd(b"AUTH PLAIN " + fits),
                         b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(client.cmd(b"NOOP"), OK)
        self.assertEqual(self.server.stats["auth_success"], 1)


# ###########################################################################
# Randomized sessions
# ###########################################################################

class _ErrorRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


_VERBS = ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT",
          "HELP", "VRFY", "EXPN", "ETRN", "AUTH", "STARTTLS")


class FuzzTest(ServerTestCase):
    """Seeded random sessions: every reply well-formed, no handler raises."""

    sessions = 50
    commands = 40

    def setUp(self):
        super().setUp()
        self.strict = self.start_server(strict=True, max_message_size=20000)
        self.errors = _ErrorRecords()
        logger = logging.getLogger("blackhole")
        logger.addHandler(self.errors)
        self.addCleanup(logger.removeHandler, self.errors)
        if not logger.isEnabledFor(logging.ERROR):
            level = logger.level
            logger.setLevel(logging.ERROR)
            self.addCleanup(logger.setLevel, level)

    @staticmethod
    def garbage(rng, size):
        return bytes(rng.randrange(256) for _ in range(size)).replace(b"\n", b"")

    def address(self, rng):
        return rng.choice((
            b"<a@example.com>", b"<>", b"a@example.com", b"<\xc3\xa9@example.com>",
            b"<" + self.garbage(rng, 10).replace(b"=", b"") + b">", b"<a b@c>", b"<<a>>",
            b"<" + b"l" * rng.choice((64, 300, 600)) + b"@example.com>", b"",
            b": <a@example.com>", b"<a@example.com> SIZE=100 BODY=8BITMIME",
            b"<a@example.com> SIZE=99999999", b"<a@example.com> X=\xff FOO",
            b"<a@example.com> " + self.garbage(rng, 8).replace(b"\r", b""),
            b"<pass=me@example.com>"))

    def command(self, rng):
        """(line, what to send after a 354/334, or BDAT octets)."""
        kind = rng.randrange(14)
        if kind == 0:
            return rng.choice((b"HELO", b"EHLO", b"helo", b"EhLo")) + rng.choice((
                b" localhost", b"", b" " + self.garbage(rng, 8), b" [127.0.0.1]")), None
        if kind == 1:
            return rng.choice((b"MAIL FROM:", b"MAIL FROM: ", b"mail from:", b"MAIL TO:",
                               b"MAIL")) + self.address(rng), None
        if kind == 2:
            return rng.choice((b"RCPT TO:", b"RCPT TO: ", b"rcpt to:", b"RCPT FROM:",
                               b"RCPT")) + self.address(rng), None
        if kind == 3:
            body = rng.choice((MESSAGE, b"", b"..dot\r\n.x\r\n", b"bare\nlf\n",
                               b"cr\ronly\r\n", self.garbage(rng, 300) + b"\r\n",
                               b"X-Blackhole-Mode: bounce\r\n\r\nx\r\n",
                               b"y" * 30000 + b"\r\n"))
            # CRLF before the dot: after a bare-LF DATA line, "\n.\r\n" is no end (4.2)
            return rng.choice((b"DATA", b"data", b"DATA x")), body + b"\r\n.\r\n"
        if kind == 4:
            size = rng.choice((0, 1, 10, 1000))
            last = rng.choice((b"", b" LAST", b" last"))
            if rng.random() < 0.3:
                return b"BDAT " + rng.choice((b"-1", b"x", b"", b"1 2", b"10 FIRST",
                                             b"1e3")), None
            return b"BDAT %d%s" % (size, last), self.garbage(rng, size).ljust(size, b".")
        if kind == 5:
            mechanism = rng.choice((b"PLAIN", b"LOGIN", b"CRAM-MD5", b"XOAUTH2", b"",
                                    b"PLAIN " + base64.b64encode(b"\0u\0p"),
                                    b"PLAIN =", b"LOGIN " + self.garbage(rng, 10)))
            answer = rng.choice((b"*", b"=", base64.b64encode(self.garbage(rng, 20)),
                                 b"fail=x", b"pass=x", self.garbage(rng, 20)))
            return b"AUTH " + mechanism, answer + b"\r\n"
        if kind == 6:
            return rng.choice((b"RSET", b"NOOP", b"ETRN", b"HELP", b"HELP MAIL",
                               b"HELP \xff", b"EXPN list1", b"EXPN all", b"EXPN x",
                               b"VRFY", b"VRFY pass=a@b", b"VRFY fail=a@b",
                               b"STARTTLS", b"STARTTLS x", b"NOOP \x00")), None
        if kind == 7:       # VRFY echoes the address
            return b"VRFY " + rng.choice((b"", b"pass=", b"fail=")) + self.garbage(
                rng, rng.randrange(1, 40)), None
        if kind == 8:       # a verb that is not one
            while True:
                verb = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
                               for _ in range(rng.randrange(1, 9)))
                if verb not in _VERBS:
                    return verb.encode() + b" " + self.garbage(rng, 5), None
        if kind == 9:
            return rng.choice((b"\x00", b"\xff\xfe", b"\x1b[2J", b"\t", b" ", b"\r",
                               b"\x7f" * 3)) + self.garbage(rng, rng.randrange(20)), None
        if kind == 10:
            return b"X" * rng.choice((513, 12287, 12290, 20000)), None
        if kind == 11:
            return self.garbage(rng, rng.randrange(1, 100)).lstrip(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"), None
        if kind == 12:
            return rng.choice((b"NOOP", b"RSET")) + b" " + self.garbage(rng, 600), None
        return rng.choice((b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET",
                           b"NOOP")) + b" " + self.garbage(rng, 30), b"\r\n.\r\n"

    def check_reply(self, client, context):
        """One whole reply, each line checked; returns it."""
        lines = []
        while True:
            try:
                line = client.line()
            except OSError as exc:
                self.fail("%s: %s" % (exc, context))
            self.assertRegex(line, REPLY_LINE, context)
            try:
                line.decode("utf-8")        # never the client's invalid octets
            except UnicodeDecodeError:
                self.fail("%r is not UTF-8: %s" % (line, context))
            lines.append(line)
            if line[3:4] == b" ":
                return b"".join(lines)

    def session(self, server, rng, seed, number):
        client = RawClient(server.address)
        self.addCleanup(client.close)
        transcript = []
        context = lambda: "seed %d (BLACKHOLE_FUZZ_SEED), session %d: %r" % (
            seed, number, transcript[-6:])
        transcript.append(self.check_reply(client, context()))
        for _ in range(self.commands):
            line, follow = self.command(rng)
            ending = rng.choice((b"\r\n", b"\r\n", b"\n"))
            if line.upper().startswith(b"BDAT") and follow is not None:
                client.send(line + ending + follow)
            else:
                client.send(line + ending)
            transcript.append(line[:80])
            reply = self.check_reply(client, context())
            transcript.append(reply)
            while reply[:3] in (b"354", b"334"):     # end the data, cancel AUTH
                client.send(follow or (b"\r\n.\r\n" if reply[:3] == b"354" else b"*\r\n"))
                follow = None
                reply = self.check_reply(client, context())
                transcript.append(reply)
            if reply.startswith((b"221 ", b"421 ", b"502 5.5.3")):
                self.assertTrue(client.closed(), context())
                self.assertEqual(client.buf, b"", context())
                break
        client.close()

    def test_random_sessions(self):
        seed = os.environ.get("BLACKHOLE_FUZZ_SEED")
        seed = int(seed) if seed else random.randrange(2 ** 32)
        sys.stderr.write("BLACKHOLE_FUZZ_SEED=%d " % seed)
        sys.stderr.flush()
        started = time.process_time()      # CPU, not wall time: a loaded CI host waits
        for number in range(self.sessions):
            rng = random.Random(seed * 1000 + number)
            server = self.strict if number % 2 else self.server
            self.session(server, rng, seed, number)
        self.assertEqual(self.errors.records, [], "seed %d: %s" % (seed, [
            self.errors.format(r) for r in self.errors.records]))
        with self.smtp() as client:
            self.assertEqual(client.sendmail("a@example.com", ["b@example.com"], MESSAGE),
                             {}, "seed %d" % seed)
        self.assertLess(time.process_time() - started, 3.0, "seed %d" % seed)


HUGE = b"9" * 5000      # int() refuses strings over 4300 digits since 3.11

class HugeNumbersTest(ServerTestCase):
    """Numbers no int() can take are answered, never a 451 crash."""

    options = {"capture": 10}

    def test_huge_numbers(self):
        client = self.raw()
        self.assertEqual(client.cmd(b"EHLO localhost")[:4], b"250-")
        self.assertEqual(client.cmd(b"MAIL FROM:<a@example.com> SIZE=" + HUGE),
                         b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
        self.assertEqual(client.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 OK\r\n")
        # not a directive (over 9 digits), so an ordinary address
        self.assertEqual(client.cmd(b"RCPT TO:<delay-" + HUGE[:200] + b"=b@example.com>"),
                         b"250 2.1.5 OK\r\n")
        self.assertEqual(client.cmd(b"RCPT TO:<failx" + HUGE[:200] + b"=b@example.com>"),
                         b"250 2.1.5 OK\r\n")
        self.assertEqual(client.cmd(b"RCPT TO:<delay-" + HUGE + b"=b@example.com>"),
                         b"501 5.1.3 Recipient address too long\r\n")
        self.assertEqual(client.cmd(b"BDAT " + HUGE),
                         b"501 5.5.4 Syntax: BDAT size [LAST]\r\n")
        self.assertEqual(client.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        waits = []
        with mock.patch.object(blackhole.SMTPHandler, "_wait",
                               lambda handler, seconds: waits.append(seconds)):
            reply = client.cmd(b"X-Blackhole-Delay: " + HUGE + b"\r\n\r\nhi\r\n.")
        self.assertTrue(reply.startswith(b"250 2.0.0 OK: queued as <"), reply)
        self.assertEqual(waits, [60])       # above 60 is 60 (4.3), however long
        self.assertEqual(self.server.wait_for(1)[0].data, b"X-Blackhole-Delay: " + HUGE +
                         b"\r\n\r\nhi\r\n")


class VerbLookupTest(ServerTestCase):

    def test_only_ascii_verbs(self):
        client = self.raw()
        # "ſ".upper() == "S": without the ASCII check these would be RSET and STARTTLS
        self.assertEqual(client.cmd("rſet".encode()), b"502 5.5.2 Command not recognised\r\n")
        self.assertEqual(client.cmd("ſtarttlſ".encode()),
                         b"502 5.5.2 Command not recognised\r\n")

    def test_a_verb_patched_later_is_the_one_called(self):
        # the verb table is built by the first session; a later patch still counts
        self.assertEqual(self.raw().cmd(b"NOOP"), b"250 2.0.0 OK\r\n")
        with mock.patch.object(blackhole.SMTPHandler, "smtp_NOOP",
                               lambda handler, arg: handler.reply(250, "patched")):
            self.assertEqual(self.raw().cmd(b"NOOP"), b"250 patched\r\n")


class SilentReaderTest(ServerTestCase):
    """A client that writes but never reads is cut off by the timeout while
    the server is blocked writing to it."""

    options = {"timeout": 1}

    def test_a_client_that_does_not_read_is_cut_off(self):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(TIMEOUT)
        sock.connect(self.server.address)
        burst = b"EXPN all\r\n" * 40000 + b"QUIT\r\n"   # 16 MB of replies: more than
                                                            # socket buffers hold
        writer = threading.Thread(target=_send_quietly, args=(sock, burst))
        writer.start()
        self.addCleanup(writer.join)
        wait_until(lambda: self.server.stats["connections_active"] == 1, message="a session")
        started = time.monotonic()
        wait_until(lambda: self.server.stats["connections_active"] == 0,
                   message="the session cut off")
        self.assertLess(time.monotonic() - started, 8)  # 2 x timeout, and a busy host
        try:
            sock.shutdown(socket.SHUT_RDWR)     # ends the writer if it still waits
        except OSError:
            pass

    def test_replies_before_quit_to_a_client_not_reading_are_bounded(self):
        """After QUIT the session is out of the counts, so its last write has
        final_write_timeout, not the reaper's 2 x timeout (here: never)."""
        server = self.start_server(timeout=0)
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with small_send_buffer(), \
                mock.patch.object(blackhole.SMTPHandler, "final_write_timeout", 0.1):
            sock.connect(server.address)
            sock.sendall(b"EXPN all\r\n" * 254 + b"QUIT\r\n")      # 100 KB of replies
            wait_until(lambda: server.stats["connections_total"] == 1 and
                       server.stats["connections_active"] == 0, message="QUIT")
            wait_until(lambda: not server.shared.sessions, message="the session to end")


def _send_quietly(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


class StuckWriterTimeoutTest(ServerTestCase):
    """A client that sent its
    commands and then neither reads nor writes leaves the session blocked
    in a write; the timeout's second kick shuts the socket (4.5)."""

    options = {"timeout": 1}

    def test_a_client_gone_quiet_with_replies_unread_is_cut_off(self):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with small_send_buffer():
            sock.connect(self.server.address)
            # 3 KB of commands, all read at once; 100 KB of replies, never read
            sock.sendall(b"EXPN all\r\n" * 300)
            wait_until(lambda: self.server.stats["connections_active"] == 1,
                       message="a session")
            started = time.monotonic()
            wait_until(lambda: self.server.stats["connections_active"] == 0,
                       message="the session cut off")
        self.assertLess(time.monotonic() - started, 8)  # 2 x timeout, and a busy host


if __name__ == "__main__":
    unittest.main()
