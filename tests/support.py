"""Helpers shared by the tests: servers, raw clients, transcripts."""

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from unittest import mock

import blackhole

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CERTS = os.path.join(HERE, "certs")
CERT = os.path.join(CERTS, "server.pem")
KEY = os.path.join(CERTS, "server.key")
CA = os.path.join(CERTS, "ca.pem")
HOST = "bh.test"            # the configured hostname in replies
TIMEOUT = 10                # seconds any client waits for anything
BLACKHOLE = os.path.join(ROOT, "blackhole.py")

# Replies many tests expect, as exact bytes (SPEC 4.1, 4.2, 2).
OK = b"250 2.0.0 OK\r\n"
MAIL_OK = b"250 2.1.0 OK\r\n"
RCPT_OK = b"250 2.1.5 OK\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED_PATTERN = rb"250 2\.0\.0 OK: queued as (<[^<>@\s]+@bh\.test>)"
QUEUED = re.compile(rb"\A" + QUEUED_PATTERN + rb"\r\n\Z")     # the id is group 1
SHUTTING_DOWN = b"421 4.3.2 bh.test Service shutting down\r\n"


class ServerTestCase(unittest.TestCase):
    """Starts a blackhole.Server per test with `options` (none when it is
    None: the test starts its own), and offers clients."""

    options = {}

    def setUp(self):
        if self.options is not None:
            self.server = self.start_server(**self.options)

    def start_server(self, **options):
        options.setdefault("hostname", HOST)
        server = blackhole.Server(**options)
        server.start()
        self.addCleanup(server.stop)
        return server

    def smtp(self, server=None, **kwargs):
        """An smtplib client, closed at cleanup."""
        host, port = (server or self.server).address
        client = smtplib.SMTP(host, port, local_hostname="localhost", timeout=TIMEOUT,
                              **kwargs)
        self.addCleanup(_quietly_close, client)
        return client

    def raw(self, server=None, address=None, greeting=True):
        """A RawClient on the server's first plain listener, closed at cleanup."""
        client = RawClient(address or (server or self.server).address)
        self.addCleanup(client.close)
        if greeting:
            self.assertEqual(client.line(), b"220 %s ESMTP\r\n" % HOST.encode())
        return client


def _quietly_close(client):
    try:
        client.close()
    except Exception:
        pass


class RawClient:
    """A socket that speaks bytes, for pipelining and malformed input."""

    def __init__(self, address, timeout=TIMEOUT):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        """One reply line, CRLF included; b"" when the server closed."""
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                line, self.buf = self.buf, b""
                return line
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self):
        """One whole (possibly multi-line) reply."""
        lines = [self.line()]
        while len(lines[-1]) > 3 and lines[-1][3:4] == b"-":
            lines.append(self.line())
        return b"".join(lines)

    def cmd(self, data):
        """Send one command (CRLF added) and return its whole reply."""
        self.send(data + b"\r\n")
        return self.reply()

    def closed(self):
        """True once the server has closed the connection (reads to EOF)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def stuff(content):
    """Dot-stuff content for DATA as a client must (RFC 5321 4.5.2)."""
    return re.sub(rb"(?m)^\.", b"..", content)


def open_fds():
    """How many file descriptors this process has open (Linux)."""
    return len(os.listdir("/proc/self/fd"))


def small_send_buffer(size=8192):
    """Patch SMTPHandler.setup so that each session writes through a small
    send buffer, as over a link whose window closed; a context manager."""
    setup = blackhole.SMTPHandler.setup

    def small(handler):
        setup(handler)
        handler.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    return mock.patch.object(blackhole.SMTPHandler, "setup", small)


def wait_until(predicate, timeout=TIMEOUT, message="condition"):
    """Poll predicate with a deadline (for state no event reports)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + message)
        time.sleep(0.005)


def write_config(testcase, text):
    """A temporary INI file with text, removed at cleanup; returns its path."""
    fd, path = tempfile.mkstemp(suffix=".ini", prefix="blackhole-test-")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    testcase.addCleanup(os.remove, path)
    return path


_HANDED_OUT = set()


def free_port():
    """A port that was free a moment ago (for subprocess configs only), and
    never one this process handed out before: a test asking for several
    (HAProxyTest's six) must not get the same port twice."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def kill_group(proc):
    """Kill a subprocess started with start_new_session=True, and its children."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def run_cli(*args, timeout=TIMEOUT, **kwargs):
    """Run `python blackhole.py ARGS` to completion; returns CompletedProcess."""
    return subprocess.run([sys.executable, BLACKHOLE] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                          cwd=ROOT, **kwargs)
