"""The PROXY protocol and HAProxy in front of blackholes (SPEC 12)."""

import ipaddress
import logging
import os
import re
import resource
import shutil
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import blackhole
from blackhole import parse_proxy_v1, parse_proxy_v2
from tests.support import CA, CERT, HOST, KEY, ROOT, RawClient, ServerTestCase, TIMEOUT, \
    free_port, kill_group, wait_until
from tests.test_service import http_get, parse_metrics, read_text, tcp_entry

GREETING = b"220 %s ESMTP\r\n" % HOST.encode()
SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command=1, family=0x11, body=b""):
    """A PROXY v2 header: signature, version 2 and command, family, body."""
    return SIG + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_inet(src, sport, dst, dport, tlvs=b"", command=1):
    """A v2 header for a TCP connection from src:sport to dst:dport."""
    src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if src.version == 4 else 0x21
    return v2(command, family, src.packed + dst.packed + struct.pack("!HH", sport, dport)
              + tlvs)


def v1(src, sport, dst="127.0.0.1", dport=25):
    family = "TCP4" if ipaddress.ip_address(src).version == 4 else "TCP6"
    return ("PROXY %s %s %s %d %d\r\n" % (family, src, dst, sport, dport)).encode()


TLVS = (b"\x04\x00\x03abc"                  # PP2_TYPE_NOOP
        b"\x02\x00\x0bexample.com")         # PP2_TYPE_AUTHORITY
MAX_V1 = b"PROXY UNKNOWN " + b"f" * 91 + b"\r\n"    # 107 octets, the most allowed


class ParseProxyTest(unittest.TestCase):
    """parse_proxy_v1/v2: (source, length), None for more, ValueError (SPEC 12)."""

    V1_VALID = [
        (v1("203.0.113.7", 56324), ("203.0.113.7", 56324)),
        (v1("2001:db8::7", 1, "2001:db8::1", 25), ("2001:db8::7", 1)),
        (v1("0.0.0.0", 0, "255.255.255.255", 65535), ("0.0.0.0", 0)),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN 203.0.113.7 127.0.0.1 1 2\r\n", None),
        (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
         b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
         ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
        (MAX_V1, None),
    ]

    V1_INVALID = [
        b"EHLO client.example.com\r\n",
        b"GET /metrics HTTP/1.1\r\n",
        b"proxy TCP4 203.0.113.7 127.0.0.1 1 2\r\n",        # the keyword is upper case
        b"PROXYTCP4 203.0.113.7 127.0.0.1 1 2\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",      # a TLS ClientHello
        b"PROXY TCP5 203.0.113.7 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 127.0.0.1 1\r\n",
        b"PROXY TCP4 203.0.113.7 127.0.0.1 1 2 3\r\n",
        b"PROXY TCP4\r\n",
        b"PROXY\r\n",
        b"PROXY TCP4 203.0.113.256 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 127.0.0.1 65536 25\r\n",
        b"PROXY TCP4 203.0.113.7 127.0.0.1 -1 25\r\n",
        b"PROXY TCP4 203.0.113.7 127.0.0.1 x 25\r\n",
        b"PROXY TCP4 2001:db8::7 2001:db8::1 1 25\r\n",       # wrong family
        b"PROXY TCP6 203.0.113.7 127.0.0.1 1 25\r\n",         # wrong family
        b"PROXY TCP4 203.0.113.7 2001:db8::1 1 25\r\n",       # mixed families
        b"PROXY TCP6 fe80::1%\nforged fe80::2 1 25\r\n",     # a scope id: a line in logs
        b"PROXY TCP6 fe80::1%eth0 fe80::2 1 25\r\n",
        b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n",              # 108 octets
        b"PROXY TCP4 " + b"1" * 200,                          # no end in 107 octets
        b"PROXY " + b" " * 101,
    ]

    V2_VALID = [
        (v2_inet("203.0.113.7", 56324, "192.0.2.1", 25), ("203.0.113.7", 56324), 28),
        (v2_inet("203.0.113.7", 1, "192.0.2.1", 25, TLVS), ("203.0.113.7", 1), 28 + 20),
        (v2_inet("2001:db8::7", 65535, "2001:db8::1", 25), ("2001:db8::7", 65535), 52),
        (v2_inet("2001:db8::7", 2, "2001:db8::1", 25, TLVS), ("2001:db8::7", 2), 52 + 20),
        (v2(0, 0x00), None, 16),                                    # LOCAL, as checks send
        (v2_inet("203.0.113.7", 1, "192.0.2.1", 25, command=0), None, 28),   # LOCAL
        (v2(1, 0x00), None, 16),                                    # PROXY, UNSPEC
        (v2(1, 0x31, b"\0" * 216), None, 232),                      # AF_UNIX
    ]

    V2_INVALID = [
        b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + b"\0" * 12,      # signature
        b"\r\n\r\n\x01",                                              # signature, early
        b"PROXY TCP4 203.0.113.7 127.0.0.1 1 2\r\n",                  # a v1 header
        b"EHLO client.example.com\r\n",
        SIG + b"\x11\x11\x00\x0c" + b"\0" * 12,                       # version 1
        SIG + b"\x31\x11\x00\x0c" + b"\0" * 12,                       # version 3
        SIG + b"\x22\x11\x00\x0c" + b"\0" * 12,                       # command 2
        SIG + b"\x2f\x11\x00\x0c" + b"\0" * 12,                       # command 15
        v2(1, 0x41, b"\0" * 12),                                      # family 4
        v2(1, 0xf1, b"\0" * 12),                                      # family 15
        v2(1, 0x11, b"\0" * 8),                                       # IPv4 block short
        v2(1, 0x21, b"\0" * 12),                                      # IPv6 block short
        v2(1, 0x21, b"\0" * 35),
    ]

    def test_v1_valid(self):
        for data, source in self.V1_VALID:
            with self.subTest(data=data):
                self.assertLessEqual(len(data), 107)
                self.assertEqual(parse_proxy_v1(data), (source, len(data)))
                # what follows the header is not part of it
                self.assertEqual(parse_proxy_v1(data + b"EHLO x\r\n"), (source, len(data)))

    def test_v1_prefixes_need_more(self):
        for data, _ in self.V1_VALID:
            for end in range(len(data)):
                with self.subTest(data=data[:end]):
                    self.assertIsNone(parse_proxy_v1(data[:end]))

    def test_v1_invalid(self):
        for data in self.V1_INVALID:
            with self.subTest(data=data):
                with self.assertRaises(ValueError):
                    parse_proxy_v1(data)

    def test_v2_valid(self):
        for data, source, length in self.V2_VALID:
            with self.subTest(data=data):
                self.assertEqual(len(data), length)
                self.assertEqual(parse_proxy_v2(data), (source, length))
                self.assertEqual(parse_proxy_v2(data + b"EHLO x\r\n" + SIG),
                                 (source, length))

    def test_v2_prefixes_need_more(self):
        for data, _, _ in self.V2_VALID:
            for end in range(len(data)):
                with self.subTest(data=data[:end]):
                    self.assertIsNone(parse_proxy_v2(data[:end]))

    def test_v2_invalid(self):
        for data in self.V2_INVALID:
            with self.subTest(data=data):
                with self.assertRaises(ValueError):
                    parse_proxy_v2(data)

    def test_versions_do_not_mix(self):
        with self.assertRaises(ValueError):
            parse_proxy_v1(v2_inet("203.0.113.7", 1, "192.0.2.1", 25))
        with self.assertRaises(ValueError):
            parse_proxy_v2(v1("203.0.113.7", 1))


# ---------------------------------------------------------------------------

def consumed(client):
    """True once the server has read every octet the client sent (Linux)."""
    fields = tcp_entry(client.sock)
    return fields is None or int(fields[4].split(":")[1], 16) == 0


class ProxyListenerTest(ServerTestCase):
    """A `proxy=on` listener in front of the session (SPEC 12)."""

    options = {"listen": "127.0.0.1:0 proxy=on", "capture": 10}

    def proxied(self, header, server=None, address=None):
        """A RawClient that sent header; asserts the greeting."""
        client = self.raw(server, address, greeting=False)
        client.send(header)
        self.assertEqual(client.line(), GREETING)
        return client

    def transaction(self, client, server=None):
        """One message on client; returns the captured envelope."""
        server = server or self.server
        server.messages.clear()
        self.assertEqual(client.cmd(b"HELO client.example.com"), b"250 %s\r\n" % HOST.encode())
        self.assertEqual(client.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 OK\r\n")
        self.assertEqual(client.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 OK\r\n")
        self.assertEqual(client.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertTrue(client.cmd(b"Subject: x\r\n\r\nhi\r\n.").startswith(b"250 2.0.0 OK"))
        return server.wait_for(1, TIMEOUT)[0]

    def assertClosedSilently(self, client):
        self.assertTrue(client.closed())
        self.assertEqual(client.buf, b"")

    def test_v1_header_names_the_client(self):
        client = self.proxied(v1("203.0.113.7", 40000, "127.0.0.1", self.server.address[1]))
        self.assertEqual(self.transaction(client).peer, "203.0.113.7")

    def test_v2_header_names_the_client(self):
        client = self.proxied(v2_inet("203.0.113.7", 40000, "127.0.0.1",
                                      self.server.address[1], TLVS))
        self.assertEqual(self.transaction(client).peer, "203.0.113.7")

    def test_ipv6_client_over_ipv4(self):
        client = self.proxied(v1("2001:db8::7", 40000, "2001:db8::1", 25))
        self.assertEqual(self.transaction(client).peer, "2001:db8::7")

    def test_header_and_commands_in_one_write(self):
        # the header is read without reading past it: EHLO is answered
        client = self.raw(greeting=False)
        client.send(v2_inet("203.0.113.7", 1, "192.0.2.1", 25) + b"NOOP\r\n")
        self.assertEqual(client.line(), GREETING)
        self.assertEqual(client.reply(), b"250 2.0.0 OK\r\n")
        self.assertEqual(self.transaction(client).peer, "203.0.113.7")

    def test_header_split_across_writes(self):
        for header, cuts in ((v1("203.0.113.7", 40000), (3, 6, 11, 20, 41)),
                             (v2_inet("203.0.113.7", 40000, "192.0.2.1", 25, TLVS),
                              (1, 5, 12, 13, 15, 16, 30, 47))):
            with self.subTest(header=header):
                client = self.raw(greeting=False)
                start = 0
                for cut in cuts:
                    client.send(header[start:cut])
                    start = cut
                    # the server has taken it in before the next part is sent
                    wait_until(lambda: consumed(client), message="part read")
                client.send(header[start:])
                self.assertEqual(client.line(), GREETING)
                self.assertEqual(self.transaction(client).peer, "203.0.113.7")

    def test_unknown_and_local_keep_the_real_address(self):
        for header in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN 203.0.113.7 127.0.0.1 1 2\r\n",
                       v2(0, 0x00), v2_inet("203.0.113.7", 1, "192.0.2.1", 25, command=0)):
            with self.subTest(header=header):
                client = self.proxied(header)
                self.assertEqual(self.transaction(client).peer, "127.0.0.1")

    def test_no_header_is_closed_without_greeting(self):
        for data in (b"EHLO client.example.com\r\n", b"QUIT\r\n", b"\x16\x03\x01\x00\x05hello",
                     v2(1, 0x41, b"\0" * 12), b"PROXY TCP4 2001:db8::7 127.0.0.1 1 2\r\n"):
            with self.subTest(data=data):
                client = self.raw(greeting=False)
                with self.assertLogs("blackhole", logging.INFO) as logs:
                    client.send(data)
                    self.assertClosedSilently(client)
                self.assertTrue(any(line.startswith("INFO:blackhole:closed 127.0.0.1")
                                    for line in logs.output), logs.output)
        self.assertEqual(self.server.stats["connections_total"], 0)

    def test_untrusted_sender_is_closed_without_greeting(self):
        server = self.start_server(listen="127.0.0.1:0 proxy=on", proxy_trusted="192.0.2.0/24",
                                   capture=1)
        with self.assertLogs("blackhole", logging.INFO) as logs:
            client = self.raw(server, greeting=False)
            client.send(v1("203.0.113.7", 1))
            self.assertClosedSilently(client)
        self.assertIn("INFO:blackhole:closed 127.0.0.1: not in proxy_trusted", logs.output)
        self.assertEqual(server.stats["connections_total"], 0)
        self.assertEqual(len(server.messages), 0)
        # a trusted network (127.0.0.1 itself) is served
        trusted = self.start_server(listen="127.0.0.1:0 proxy=on",
                                    proxy_trusted="192.0.2.0/24, 127.0.0.1", capture=1)
        client = self.proxied(v1("203.0.113.7", 1), trusted)
        self.assertEqual(self.transaction(client, trusted).peer, "203.0.113.7")

    def test_plain_listener_ignores_headers(self):
        # without proxy=on a header is just a bad command
        server = self.start_server(capture=1)
        client = self.raw(server)
        self.assertEqual(client.cmd(v1("203.0.113.7", 1).rstrip())[:1], b"5")
        self.assertEqual(self.transaction(client, server).peer, "127.0.0.1")

    def test_header_before_tls_handshake(self):
        server = self.start_server(listen="127.0.0.1:0", tls_listen="127.0.0.1:0 proxy=on",
                                   tls_cert=CERT, tls_key=KEY, capture=1)
        context = ssl.create_default_context(cafile=CA)
        client = self.raw(server, server.tls_address, greeting=False)
        client.send(v2_inet("203.0.113.7", 40000, "127.0.0.1", server.tls_address[1]))
        client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
        self.assertEqual(client.line(), GREETING)
        self.assertEqual(self.transaction(client, server).peer, "203.0.113.7")
        self.assertEqual(server.stats["tls_success"], 1)
        # a handshake without the header first is closed
        client = self.raw(server, server.tls_address, greeting=False)
        with self.assertRaises((ssl.SSLError, OSError)) as caught:
            client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
            client.line()
        self.assertNotIsInstance(caught.exception, socket.timeout)     # closed, not held

    def test_flood_of_stalled_headers(self):
        count = 500
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = 4 * count + 256          # both ends of each, and some spare
        if soft != resource.RLIM_INFINITY and soft < need:
            if hard != resource.RLIM_INFINITY and hard < need:
                self.skipTest("RLIMIT_NOFILE hard limit %d < %d" % (hard, need))
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        server = self.start_server(listen="127.0.0.1:0 proxy=on", max_connections=2 * count)
        halves = (v1("203.0.113.7", 40000)[:20], v2_inet("203.0.113.7", 1, "192.0.2.1", 25)[:20])
        for number in range(count):
            sock = socket.create_connection(server.address, timeout=TIMEOUT)
            self.addCleanup(sock.close)
            sock.sendall(halves[number % 2])
        # every stalled connection is now held by a session of its own
        wait_until(lambda: len(server.shared.sessions) >= count, message="flood taken in")
        times = []
        for _ in range(3):
            start = time.monotonic()
            client = RawClient(server.address)
            try:
                client.send(v1("203.0.113.7", 40000))
                self.assertEqual(client.line(), GREETING)
                times.append(time.monotonic() - start)
            finally:
                client.close()
        self.assertLess(min(times), 0.1, times)
        self.assertEqual(server.stats["connections_total"], 3)


# ---------------------------------------------------------------------------

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access(
    "/usr/sbin/haproxy", os.X_OK) else None)
BLACKHOLE = os.path.join(ROOT, "blackhole.py")

HAPROXY_CFG = """\
global
    stats socket {dir}/haproxy.sock mode 600 level admin
    maxconn 200

defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
    timeout check 5s

frontend spread
    bind 127.0.0.1:{spread}
    default_backend blackholes

frontend single
    bind 127.0.0.1:{single}
    default_backend bh2_only

backend blackholes
    balance roundrobin
    option smtpchk HELO haproxy.test
    server bh1 127.0.0.1:{bh1} send-proxy-v2 check inter 100 rise 1 fall 3
    server bh2 127.0.0.1:{bh2} send-proxy-v2 check inter 100 rise 1 fall 3

backend bh2_only
    server bh2 127.0.0.1:{bh2} send-proxy-v2
"""

INSTANCE_CFG = """\
[blackhole]
hostname = {host}
listen = 127.0.0.1:{port} proxy=on
metrics_listen = 127.0.0.1:{metrics}
timeout = 10
{extra}
"""


class SourcedClient(RawClient):
    """A RawClient connecting from a given loopback address."""

    def __init__(self, address, source):
        self.sock = socket.create_connection(address, timeout=TIMEOUT,
                                             source_address=(source, 0))
        self.buf = b""


def _loopback_source_works(address):
    try:
        with socket.socket() as sock:
            sock.bind((address, 0))
        return True
    except OSError:
        return False


@unittest.skipUnless(HAPROXY, "haproxy is not installed (.ci/run installs it with apt-get)")
@unittest.skipUnless(hasattr(os, "killpg") and os.path.isdir("/proc/self"), "needs POSIX")
@unittest.skipUnless(_loopback_source_works("127.0.0.2"), "needs 127.0.0.2 on loopback")
class HAProxyTest(unittest.TestCase):
    """HAProxy (TCP mode, send-proxy-v2, option smtpchk) before two blackholes.

    Clients connect from 127.0.0.2 and other loopback addresses, so that the
    address a blackhole names can only come from the PROXY header: HAProxy
    itself connects from 127.0.0.1.
    """

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="blackhole-haproxy-")
        cls.addClassCleanup(shutil.rmtree, cls.dir, True)
        ports = {name: free_port() for name in
                 ("spread", "single", "bh1", "bh2", "metrics1", "metrics2")}
        cls.ports = ports
        cls.logs, cls.procs = {}, {}
        for name, extra, args in (("bh1", "", ["-q"]),
                                  ("bh2", "max_connections_per_ip = 1", ["-q", "-d"])):
            conf = os.path.join(cls.dir, name + ".ini")
            with open(conf, "w") as handle:
                handle.write(INSTANCE_CFG.format(
                    host=HOST, port=ports[name], extra=extra,
                    metrics=ports["metrics" + name[-1]]))
            cls.start(name, [sys.executable, BLACKHOLE, "-c", conf] + args)
        conf = os.path.join(cls.dir, "haproxy.cfg")
        with open(conf, "w") as handle:
            handle.write(HAPROXY_CFG.format(dir=cls.dir, **ports))
        cls.start("haproxy", [HAPROXY, "-db", "-f", conf])
        try:
            wait_until(cls.checks_passed, message="HAProxy to mark both servers up")
        except AssertionError as exc:
            raise AssertionError("%s\n%s" % (exc, "\n".join(
                "--- %s:\n%s" % (name, read_text(path)) for name, path in cls.logs.items())))

    @classmethod
    def start(cls, name, argv):
        path = cls.logs[name] = os.path.join(cls.dir, name + ".log")
        with open(path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    cwd=cls.dir, start_new_session=True)
        cls.procs[name] = proc
        cls.addClassCleanup(kill_group, proc)

    @classmethod
    def haproxy(cls, command):
        """One command on HAProxy's stats socket; its answer as text."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(os.path.join(cls.dir, "haproxy.sock"))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return b"".join(chunks).decode()
                chunks.append(chunk)

    @classmethod
    def servers(cls):
        """{server name: (status, check status)} of backend blackholes."""
        lines = cls.haproxy("show stat").splitlines()
        columns = lines[0].lstrip("# ").split(",")
        result = {}
        for line in lines[1:]:
            row = dict(zip(columns, line.split(",")))
            if row.get("pxname") == "blackholes" and row["svname"] in ("bh1", "bh2"):
                # "* L7OK": the last check passed and another one is running
                result[row["svname"]] = (row["status"], row["check_status"].lstrip("* "))
        return result

    @classmethod
    def checks_passed(cls):
        for name, proc in cls.procs.items():
            if proc.poll() is not None:
                raise AssertionError("%s exited with %s" % (name, proc.returncode))
        try:
            servers = cls.servers()
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        return servers == {"bh1": ("UP", "L7OK"), "bh2": ("UP", "L7OK")}

    def smtp(self, frontend, source):
        client = smtplib.SMTP("127.0.0.1", self.ports[frontend], local_hostname="localhost",
                              timeout=TIMEOUT, source_address=(source, 0))
        self.addCleanup(client.close)
        return client

    def accepted(self, instance):
        samples = parse_metrics(self, http_get(
            ("127.0.0.1", self.ports["metrics" + instance[-1]]), "/metrics")[2])
        return samples['blackhole_messages_total{result="accepted"}']

    def test_smtpchk_marks_both_servers_up(self):
        # option smtpchk (HELO, then QUIT) over send-proxy-v2 health checks
        self.assertEqual(self.servers(), {"bh1": ("UP", "L7OK"), "bh2": ("UP", "L7OK")})
        self.assertIn("127.0.0.1 > 'HELO haproxy.test'", read_text(self.logs["bh2"]))

    def test_messages_spread_over_both_instances(self):
        before = {name: self.accepted(name) for name in ("bh1", "bh2")}
        for number in range(40):
            # a source address of its own per session: bh2 allows one per address
            source = "127.0.1.%d" % (number + 1)
            with self.smtp("spread", source) as client:
                self.assertEqual(client.sendmail("a@example.com", ["b@example.com"],
                                                 b"Subject: %d\r\n\r\nhi\r\n" % number), {})
        counts = {name: self.accepted(name) - before[name] for name in ("bh1", "bh2")}
        self.assertGreater(counts["bh1"], 0, counts)
        self.assertGreater(counts["bh2"], 0, counts)
        self.assertEqual(sum(counts.values()), 40, counts)
        # bh2 saw each of its clients' own address
        named = set(re.findall(r"PROXY header for (127\.0\.1\.\d+) port",
                               read_text(self.logs["bh2"])))
        self.assertEqual(len(named), counts["bh2"], named)

    def test_client_address_survives_the_balancer(self):
        first = self.smtp("single", "127.0.0.2")
        self.assertEqual(first.noop(), (250, b"2.0.0 OK"))
        # a second session from the same client address: refused (SPEC 10.3)
        second = SourcedClient(("127.0.0.1", self.ports["single"]), "127.0.0.2")
        self.addCleanup(second.close)
        self.assertEqual(second.line(), b"421 4.7.0 %s Too many connections from your "
                                        b"address\r\n" % HOST.encode())
        self.assertTrue(second.closed())
        # while another client address is served at the same time
        other = self.smtp("single", "127.0.0.3")
        self.assertEqual(other.noop(), (250, b"2.0.0 OK"))
        # the -d log names the client's address and port, not HAProxy's
        line = r"^blackhole: debug: 127\.0\.0\.1 port \d+: PROXY header for 127\.0\.0\.2 " \
            r"port %d$" % first.sock.getsockname()[1]
        self.assertRegex(read_text(self.logs["bh2"]), re.compile(line, re.M))
        self.assertIn("blackhole: debug: 127.0.0.2 refused: Too many connections from your "
                      "address",
                      read_text(self.logs["bh2"]))
        first.quit()
        other.quit()


class ProxyHeaderTimeoutTest(ServerTestCase):
    """8, 12: a proxy=on connection that sends no header in `timeout`
    seconds is closed without a greeting and counts in timeouts_total."""

    options = {"listen": "127.0.0.1:0 proxy=on", "timeout": 1}

    def test_silent_connection_counts_as_a_timeout(self):
        client = self.raw(greeting=False)
        client.send(v1("203.0.113.7", 40000)[:10])       # half a header, then nothing
        self.assertTrue(client.closed())
        self.assertEqual(client.buf, b"")
        self.assertEqual(self.server.stats["timeouts"], 1)
        self.assertIn("blackhole_timeouts_total 1\n",
                      blackhole.metrics_text(self.server.stats))


class AwaitingHeaderTest(ServerTestCase):
    """10.3, 12: connections that have yet to send their PROXY header count
    in max_connections, so silent ones cannot take every thread and fd."""

    options = {"listen": "127.0.0.1:0 proxy=on", "max_connections": 2}

    def test_silent_connections_count(self):
        silent = [self.raw(greeting=False) for _ in range(2)]
        wait_until(lambda: self.server.shared.awaiting_header == 2)
        extra = self.raw(greeting=False)
        self.assertTrue(extra.closed())             # at once, with no greeting
        self.assertEqual(extra.buf, b"")
        silent[0].send(v1("203.0.113.7", 40000))
        self.assertEqual(silent[0].line(), GREETING)
        self.assertEqual(self.server.shared.awaiting_header, 1)
        silent[1].close()
        wait_until(lambda: self.server.shared.awaiting_header == 0)
        late = self.raw(greeting=False)
        late.send(v1("203.0.113.8", 40000))
        self.assertEqual(late.line(), GREETING)
        self.assertEqual(self.server.stats["connections_total"], 3)    # the refused too


class FullBehindAProxyTest(ServerTestCase):
    """A full server still answers a proxied client's header with the 421."""

    options = {"listen": "127.0.0.1:0, 127.0.0.1:0 proxy=on", "max_connections": 1}

    def test_the_421_after_the_header(self):
        plain, proxied = self.server.addresses
        self.raw(address=plain)                 # the one session allowed
        client = self.raw(address=proxied, greeting=False)
        client.send(v1("203.0.113.7", 40000))
        self.assertEqual(client.line(),
                         b"421 4.7.0 bh.test Too many connections, try again later\r\n")


class ProxyStrictnessTest(unittest.TestCase):
    """12: only headers as HAProxy writes them."""

    def test_v1_ports_are_plain_decimal(self):
        for port in (b"040000", b"+40000", b"4_0000"):
            with self.subTest(port=port):
                with self.assertRaises(ValueError):
                    parse_proxy_v1(
                        b"PROXY TCP4 203.0.113.7 127.0.0.1 " + port + b" 25\r\n")

    def test_v2_inet_block_needs_12_octets(self):
        full = v2_inet("203.0.113.7", 40000, "192.0.2.1", 25)
        for length in (10, 11):
            with self.subTest(length=length):
                data = full[:14] + struct.pack("!H", length) + full[16:16 + length]
                with self.assertRaises(ValueError):
                    parse_proxy_v2(data)


if __name__ == "__main__":
    unittest.main()
