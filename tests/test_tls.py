"""TLS: tls_listen, STARTTLS and the server context (SPEC 6, warnings of SPEC 2)."""

import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import unittest
import warnings
from unittest import mock

import blackhole
from tests.support import (CA, CERT, CERTS, HOST, KEY, ROOT, TIMEOUT, RawClient,
                           ServerTestCase, free_port, wait_until, write_config)

EC_CERT = os.path.join(CERTS, "server-ec.pem")
EC_KEY = os.path.join(CERTS, "server-ec.key")
DHPARAMS = os.path.join(CERTS, "dhparams.pem")

EHLO_LINES = (
    b"250-" + HOST.encode() + b"\r\n250-PIPELINING\r\n250-SIZE 512000\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250-CHUNKING\r\n250-HELP\r\n"
    b"250-VRFY\r\n250-EXPN\r\n250-ETRN\r\n")
EHLO_PLAIN = EHLO_LINES + b"250-AUTH CRAM-MD5 LOGIN PLAIN\r\n250 STARTTLS\r\n"
EHLO_TLS = EHLO_LINES + b"250 AUTH CRAM-MD5 LOGIN PLAIN\r\n"
AEAD = ("GCM", "CHACHA20")


def client_context(maximum=None, ciphers=None):
    """A verifying client context: the test CA, hostname checking on."""
    context = ssl.create_default_context(cafile=CA)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    if maximum is not None:
        context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


def pem_der(path):
    with open(path) as handle:
        return ssl.PEM_cert_to_DER_cert(handle.read())


def _old_tls_names():
    with warnings.catch_warnings():     # TLSVersion.TLSv1/TLSv1_1 are deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1


def tls11_client_context():
    """A client that speaks TLS 1.1 and nothing newer."""
    tls1, tls11 = _old_tls_names()
    context = client_context(ciphers="DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = tls1
        context.maximum_version = tls11
    return context


def local_tls11():
    """Whether this OpenSSL can complete a TLS 1.1 handshake at all (in memory)."""
    if not getattr(ssl, "HAS_TLSv1_1", False):
        return False
    try:
        tls1, tls11 = _old_tls_names()
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            server.minimum_version = tls1
            server.maximum_version = tls11
        server.set_ciphers("DEFAULT:@SECLEVEL=0")
        server.load_cert_chain(CERT, KEY)
        client = tls11_client_context()
    except (ssl.SSLError, ValueError):
        return False
    bios = [ssl.MemoryBIO() for _ in range(4)]
    sides = [server.wrap_bio(bios[0], bios[1], server_side=True),
             client.wrap_bio(bios[2], bios[3], server_hostname="localhost")]
    done = [False, False]
    for _ in range(20):
        for i, side in enumerate(sides):
            if not done[i]:
                try:
                    side.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    return False
        bios[0].write(bios[3].read())   # client -> server
        bios[2].write(bios[1].read())   # server -> client
        if all(done):
            return sides[1].version() == "TLSv1.1"
    return False


class TLSCase(ServerTestCase):
    """Clients that verify the server against tests/certs/ca.pem."""

    options = {"tls_listen": "127.0.0.1:0", "tls_cert": CERT, "tls_key": KEY}

    def smtp_ssl(self, server=None, context=None):
        host, port = (server or self.server).tls_address
        client = smtplib.SMTP_SSL(host, port, local_hostname="localhost", timeout=TIMEOUT,
                                  context=context or client_context())
        self.addCleanup(_quietly_close, client)
        return client

    def raw_tls(self, server=None, context=None, hostname="localhost"):
        """A RawClient over TLS on the tls_listen port, greeting read."""
        client = RawClient((server or self.server).tls_address)
        self.addCleanup(client.close)
        client.sock = (context or client_context()).wrap_socket(
            client.sock, server_hostname=hostname)
        self.assertEqual(client.line(), b"220 %s ESMTP\r\n" % HOST.encode())
        return client

    def starttls(self, client, hostname="localhost", context=None):
        """STARTTLS on a RawClient; returns the SSL socket it now uses."""
        self.assertEqual(client.cmd(b"STARTTLS"), b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(client.buf, b"")
        client.sock = (context or client_context()).wrap_socket(
            client.sock, server_hostname=hostname)
        return client.sock

    def assert_mail_goes_through(self, client):
        self.assertEqual(client.sendmail("a@example.com", ["b@example.com"],
                                         b"Subject: x\r\n\r\nhi\r\n"), {})


def _quietly_close(client):
    try:
        client.close()
    except Exception:
        pass


class TLSListenTest(TLSCase):
    """tls_listen: TLS from the first byte, then the greeting (RSA)."""

    cert, key = CERT, KEY

    def setUp(self):
        self.server = self.start_server(tls_listen="127.0.0.1:0", tls_cert=self.cert,
                                        tls_key=self.key)

    def test_smtp_ssl_verified(self):
        client = self.smtp_ssl()
        self.assertEqual(client.sock.getpeercert(binary_form=True), pem_der(self.cert))
        self.assertIn(client.sock.version(), ("TLSv1.2", "TLSv1.3"))
        code, _ = client.ehlo()
        self.assertEqual(code, 250)
        self.assertFalse(client.has_extn("starttls"))
        self.assertTrue(client.has_extn("auth"))
        self.assert_mail_goes_through(client)
        self.assertEqual(client.docmd("STARTTLS"), (503, b"5.5.1 TLS already active"))
        self.assertEqual(client.quit(), (221, b"2.0.0 Goodbye"))
        self.assertEqual(self.server.stats["tls_success"], 1)
        self.assertEqual(self.server.stats["tls_failure"], 0)

    def test_raw_exact_replies_by_name(self):
        client = self.raw_tls(hostname="localhost")
        self.assertEqual(client.cmd(b"EHLO localhost"), EHLO_TLS)
        self.assertEqual(client.cmd(b"STARTTLS"), b"503 5.5.1 TLS already active\r\n")
        self.assertEqual(client.cmd(b"STARTTLS x"), b"501 5.5.4 Syntax: STARTTLS\r\n")
        help_reply = client.cmd(b"HELP")
        self.assertTrue(help_reply.startswith(b"250 Supported commands: "), help_reply)
        self.assertNotIn(b"STARTTLS", help_reply)
        self.assertEqual(client.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
        self.assertTrue(client.closed())

    def test_wrong_name_is_refused_by_the_client(self):
        # The client really verifies: a name outside the certificate fails.
        client = RawClient(self.server.tls_address)
        self.addCleanup(client.close)
        with self.assertRaises(ssl.SSLCertVerificationError):
            client_context().wrap_socket(client.sock, server_hostname="bh.invalid")


class TLSRefusalTest(TLSCase):
    """A refusal on a tls_listen port comes over TLS too (sections 6, 10.3)."""

    options = dict(TLSCase.options, max_connections_per_ip=1)

    def test_smtps_client_reads_the_421(self):
        first = self.smtp_ssl()
        with self.assertRaises(smtplib.SMTPConnectError) as caught:
            self.smtp_ssl()
        self.assertEqual((caught.exception.smtp_code, caught.exception.smtp_error),
                         (421, b"4.7.0 bh.test Too many connections from your address"))
        self.assertEqual(first.noop(), (250, b"2.0.0 OK"))
        self.assertEqual(self.server.stats["faults_connections_per_ip"], 1)

    def test_refusals_over_tls_are_bounded(self):
        """Each costs a handshake; past tls_refusals a second, refused
        clients are closed without one (10.3)."""
        with mock.patch.object(blackhole._Shared, "tls_refusals", 1):
            server = self.start_server(**self.options)
        first = self.smtp_ssl(server)
        with self.assertRaises(smtplib.SMTPConnectError):
            self.smtp_ssl(server)                       # the 421, over TLS
        with socket.create_connection(server.tls_address, timeout=TIMEOUT) as sock:
            with self.assertRaises(OSError):            # no handshake: closed at once
                client_context().wrap_socket(sock, server_hostname="localhost").close()
        self.assertEqual(first.noop(), (250, b"2.0.0 OK"))
        self.assertEqual(server.stats["faults_connections_per_ip"], 2)

    def test_a_silent_refused_client_is_not_kept(self):
        """Even with timeout = 0 (no reaper) its handshake has
        final_write_timeout, and it is not counted as a timeout."""
        server = self.start_server(timeout=0, **self.options)
        first = self.smtp_ssl(server)
        with mock.patch.object(blackhole.SMTPHandler, "final_write_timeout", 0.1):
            silent = RawClient(server.tls_address)      # never shakes hands
            self.addCleanup(silent.close)
            self.assertTrue(silent.closed())            # in 0.1 s, not never
        self.assertEqual(first.noop(), (250, b"2.0.0 OK"))
        self.assertEqual((server.stats["timeouts"], server.stats["tls_failure"]), (0, 0))


class TLSListenECDSATest(TLSListenTest):
    """The same with an ECDSA certificate."""

    cert, key = EC_CERT, EC_KEY


class StartTLSTest(TLSCase):
    """STARTTLS on a plain listener (RSA certificate)."""

    cert, key = CERT, KEY

    def setUp(self):
        self.server = self.start_server(tls_cert=self.cert, tls_key=self.key)

    def test_smtplib_starttls(self):
        client = self.smtp()
        client.ehlo()
        self.assertTrue(client.has_extn("starttls"))
        self.assertEqual(client.starttls(context=client_context()),
                         (220, b"2.0.0 Ready to start TLS"))
        self.assertEqual(client.sock.getpeercert(binary_form=True), pem_der(self.cert))
        client.ehlo()
        self.assertFalse(client.has_extn("starttls"))
        self.assert_mail_goes_through(client)
        self.assertEqual(client.docmd("STARTTLS"), (503, b"5.5.1 TLS already active"))
        self.assertEqual(client.quit(), (221, b"2.0.0 Goodbye"))
        self.assertEqual(self.server.stats["tls_success"], 1)

    def test_raw_starttls_by_ip(self):
        client = self.raw()
        self.assertEqual(client.cmd(b"EHLO localhost"), EHLO_PLAIN)
        self.assertIn(b" STARTTLS ", client.cmd(b"HELP") + b" ")
        self.assertEqual(client.cmd(b"STARTTLS now"), b"501 5.5.4 Syntax: STARTTLS\r\n")
        sock = self.starttls(client, hostname="127.0.0.1")
        self.assertEqual(sock.getpeercert(binary_form=True), pem_der(self.cert))
        self.assertEqual(client.cmd(b"EHLO localhost"), EHLO_TLS)
        self.assertEqual(client.cmd(b"STARTTLS"), b"503 5.5.1 TLS already active\r\n")
        self.assertNotIn(b"STARTTLS", client.cmd(b"HELP"))
        self.assertEqual(client.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")

    def test_pipelined_after_starttls_is_discarded(self):
        client = self.raw()
        self.assertEqual(client.cmd(b"EHLO localhost"), EHLO_PLAIN)
        client.send(b"STARTTLS\r\nNOOP\r\n")
        self.assertEqual(client.line(), b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(client.buf, b"")
        client.sock = client_context().wrap_socket(client.sock, server_hostname="localhost")
        # The next thing read is the reply to our own command, not NOOP's 250.
        self.assertEqual(client.cmd(b"ETRN"), b"250 2.0.0 Queueing started\r\n")
        self.assertEqual(client.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
        self.assertTrue(client.closed())
        self.assertEqual(client.buf, b"")


class StartTLSECDSATest(StartTLSTest):
    """The same with an ECDSA certificate."""

    cert, key = EC_CERT, EC_KEY


class StartTLSResetTest(TLSCase):
    """After STARTTLS the session starts over (strict shows it)."""

    options = {"tls_cert": CERT, "tls_key": KEY, "strict": True}

    def test_helo_and_transaction_forgotten(self):
        client = self.raw()
        self.assertEqual(client.cmd(b"EHLO localhost"), EHLO_PLAIN)
        self.assertEqual(client.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 OK\r\n")
        self.starttls(client)
        self.assertEqual(client.cmd(b"MAIL FROM:<a@example.com>"),
                         b"503 5.5.1 Bad sequence of commands\r\n")
        self.assertEqual(client.cmd(b"EHLO localhost"), EHLO_TLS)
        self.assertEqual(client.cmd(b"RCPT TO:<b@example.com>"),
                         b"503 5.5.1 Bad sequence of commands\r\n")
        self.assertEqual(client.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 OK\r\n")
        self.assertEqual(client.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 OK\r\n")

    def test_authentication_forgotten(self):
        client = self.raw()
        self.assertEqual(client.cmd(b"EHLO localhost"), EHLO_PLAIN)
        self.assertEqual(client.cmd(b"AUTH PLAIN AG1lAHg="),
                         b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(client.cmd(b"AUTH PLAIN AG1lAHg="),
                         b"503 5.5.1 Already authenticated\r\n")
        self.starttls(client)
        self.assertEqual(client.cmd(b"EHLO localhost"), EHLO_TLS)
        self.assertEqual(client.cmd(b"AUTH PLAIN AG1lAHg="),
                         b"235 2.7.0 Authentication successful\r\n")


class NoStartTLSTest(ServerTestCase):
    """STARTTLS where it is not offered: 454, and not in EHLO or HELP."""

    def check_not_offered(self, server):
        client = self.raw(server)
        self.assertEqual(client.cmd(b"EHLO localhost"), EHLO_TLS)
        self.assertNotIn(b"STARTTLS", client.cmd(b"HELP"))
        self.assertEqual(client.cmd(b"STARTTLS"), b"454 4.7.0 TLS not available\r\n")
        self.assertEqual(client.cmd(b"STARTTLS x"), b"501 5.5.4 Syntax: STARTTLS\r\n")
        self.assertEqual(client.cmd(b"NOOP"), b"250 2.0.0 OK\r\n")   # still plain text

    def test_no_certificate(self):
        self.check_not_offered(self.server)

    def test_starttls_false(self):
        self.check_not_offered(self.start_server(tls_cert=CERT, tls_key=KEY,
                                                 starttls=False))

    def test_starttls_false_keeps_tls_listen(self):
        server = self.start_server(tls_cert=CERT, tls_key=KEY, starttls="false",
                                   tls_listen="127.0.0.1:0")
        self.check_not_offered(server)
        host, port = server.tls_address
        with smtplib.SMTP_SSL(host, port, local_hostname="localhost", timeout=TIMEOUT,
                              context=client_context()) as client:
            self.assertEqual(client.noop(), (250, b"2.0.0 OK"))


class HandshakeIsolationTest(TLSCase):
    """Silent and garbage TLS clients cost the others nothing (handshake bounded)."""

    def test_bad_clients_do_not_delay_a_good_one(self):
        # A second server with the smallest timeout: its silent client's
        # second runs while the rest of the test does.
        bounded = self.start_server(tls_listen="127.0.0.1:0", tls_cert=CERT, tls_key=KEY,
                                    timeout=1)
        timed = RawClient(bounded.tls_address)
        self.addCleanup(timed.close)

        stats = lambda: self.server.stats
        silent = RawClient(self.server.tls_address)
        self.addCleanup(silent.close)
        garbage = RawClient(self.server.tls_address)
        self.addCleanup(garbage.close)
        wait_until(lambda: stats()["connections_active"] == 2, message="two sessions")
        garbage.send(b"EHLO localhost\r\n")
        wait_until(lambda: stats()["tls_failure"] == 1, message="the garbage handshake")
        self.assertEqual(stats()["tls_success"], 0)

        # Both bad clients are connected; a good client is served at once.
        client = self.smtp_ssl()
        self.assertEqual(client.noop(), (250, b"2.0.0 OK"))
        self.assertEqual(client.quit(), (221, b"2.0.0 Goodbye"))
        self.assertEqual(stats()["tls_success"], 1)
        wait_until(lambda: stats()["connections_active"] == 1, message="the good one gone")
        self.assertEqual(stats()["tls_failure"], 1)     # the silent one still waits
        # The server keeps serving, plain text too.
        plain = self.smtp()
        self.assertEqual(plain.noop(), (250, b"2.0.0 OK"))
        plain.quit()
        # The garbage client was closed without a plain-text word.
        self.assertTrue(garbage.closed())
        self.assertNotIn(b"220", garbage.buf)
        # A client that goes away mid-handshake is a failure too.
        silent.close()
        wait_until(lambda: stats()["tls_failure"] == 2, message="the silent handshake")
        self.assertEqual(stats()["timeouts"], 0)
        self.assertEqual(self.smtp_ssl().noop(), (250, b"2.0.0 OK"))

        # The handshake is bounded by timeout: closed (a TLS alert at most), counted.
        self.assertTrue(timed.closed())
        self.assertTrue(timed.buf == b"" or timed.buf.startswith(b"\x15\x03"), timed.buf)
        wait_until(lambda: bounded.stats["tls_failure"] == 1, message="the timed-out one")
        self.assertEqual(bounded.stats["timeouts"], 1)
        self.assertEqual(self.smtp_ssl(bounded).noop(), (250, b"2.0.0 OK"))


class TLSRepliesOnTheWayOutTest(TLSCase):
    """The 421s of sections 4.5 and 2 reach TLS clients too: waking a session
    shuts down the socket's reading side, which OpenSSL 3 would otherwise
    take for a truncation and answer with a fatal alert."""

    options = dict(TLSCase.options, timeout=1)

    def transaction(self, client):
        client.cmd(b"EHLO localhost")
        self.assertEqual(client.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 OK\r\n")
        self.assertEqual(client.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 OK\r\n")
        self.assertEqual(client.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        client.send(b"Subject: half\r\n")

    def test_timeout(self):
        for name, connect in (("SMTPS", self.raw_tls), ("STARTTLS", self.raw_starttls)):
            with self.subTest(name):
                client = connect()
                self.transaction(client)
                self.assertEqual(client.line(),
                                 b"421 4.4.2 %s Error: timeout exceeded\r\n" % HOST.encode())

    def test_stop(self):
        clients = [self.raw_tls(), self.raw_starttls()]
        for client in clients:
            self.transaction(client)
        wait_until(lambda: self.server.stats["bytes_received"] == 0 and
                   self.server.stats["connections_active"] == 2, message="both mid-DATA")
        self.server.stop()
        for client in clients:
            self.assertEqual(client.line(),
                             b"421 4.3.2 %s Service shutting down\r\n" % HOST.encode())

    def test_a_handshake_cut_by_stop_is_no_failure(self):
        silent = RawClient(self.server.tls_address)     # never shakes hands
        self.addCleanup(silent.close)
        wait_until(lambda: self.server.stats["connections_active"] == 1)
        self.server.stop()
        self.assertTrue(silent.closed())
        self.assertEqual(self.server.stats["tls_failure"], 0)

    def raw_starttls(self):
        client = self.raw()
        client.cmd(b"EHLO localhost")
        self.starttls(client)
        return client


class ContextTest(TLSCase):
    """The server context of SPEC 6."""

    def test_tls11_refused(self):
        if not local_tls11():
            self.skipTest("this OpenSSL (%s) cannot do TLS 1.1 at all" % ssl.OPENSSL_VERSION)
        client = RawClient(self.server.tls_address)
        self.addCleanup(client.close)
        with self.assertRaises(ssl.SSLError) as caught:
            tls11_client_context().wrap_socket(client.sock, server_hostname="localhost")
        # The server refused it: its protocol_version alert, not a client-side error.
        self.assertEqual(caught.exception.reason, "TLSV1_ALERT_PROTOCOL_VERSION")
        wait_until(lambda: self.server.stats["tls_failure"] == 1, message="tls_failure")
        self.assertEqual(self.server.stats["tls_success"], 0)

    def test_tls12_works_with_ecdhe_aead_preferred(self):
        for cert, key, ciphers in (
                (CERT, KEY, "AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA384:"
                 "ECDHE-RSA-AES128-GCM-SHA256"),
                (EC_CERT, EC_KEY, "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:"
                 "ECDHE-ECDSA-AES128-GCM-SHA256")):
            with self.subTest(cert=os.path.basename(cert)):
                server = self.start_server(tls_listen="127.0.0.1:0", tls_cert=cert,
                                           tls_key=key)
                # The client prefers CBC ciphers; the server's order wins.
                client = self.smtp_ssl(server, client_context(
                    maximum=ssl.TLSVersion.TLSv1_2, ciphers=ciphers))
                self.assertEqual(client.sock.version(), "TLSv1.2")
                name = client.sock.cipher()[0]
                self.assertTrue(name.startswith("ECDHE-"), name)
                self.assertTrue(any(aead in name for aead in AEAD), name)
                self.assertIsNone(client.sock.compression())
                self.assertEqual(client.noop(), (250, b"2.0.0 OK"))

    def test_context_options(self):
        context = self.server.tls_context
        self.assertTrue(context.options & ssl.OP_NO_COMPRESSION)
        self.assertTrue(context.options & ssl.OP_CIPHER_SERVER_PREFERENCE)
        self.assertTrue(context.options & getattr(ssl, "OP_NO_RENEGOTIATION", -1))
        self.assertGreaterEqual(context.minimum_version, ssl.TLSVersion.TLSv1_2)
        names = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        self.assertTrue(names)
        self.assertTrue(names[0].startswith("ECDHE-"), names)
        self.assertTrue(any(aead in names[0] for aead in AEAD), names)
        for name in names:
            self.assertFalse(any(weak in name for weak in ("RC4", "DES-CBC3", "NULL", "MD5")),
                             name)

    def test_dhparams_loaded(self):
        dhe_only = dict(maximum=ssl.TLSVersion.TLSv1_2, ciphers="DHE-RSA-AES128-GCM-SHA256")
        # Without tls_dhparams there is no DHE at all (the warning of SPEC 2)...
        with self.assertRaises(ssl.SSLError):
            self.smtp_ssl(context=client_context(**dhe_only))
        # ...with them a DHE-only client gets in.
        server = self.start_server(tls_listen="127.0.0.1:0", tls_cert=CERT, tls_key=KEY,
                                   tls_dhparams=DHPARAMS)
        client = self.smtp_ssl(server, client_context(**dhe_only))
        self.assertEqual(client.sock.cipher()[0], "DHE-RSA-AES128-GCM-SHA256")
        self.assertEqual(client.noop(), (250, b"2.0.0 OK"))

    def test_bad_dhparams_is_a_config_error(self):
        with self.assertRaises(blackhole.ConfigError) as caught:
            blackhole.Config(tls_cert=CERT, tls_key=KEY, tls_dhparams=CERT)
        self.assertIn("tls_dhparams", str(caught.exception))

    def test_less_secure_serves(self):
        server = blackhole.Server(hostname=HOST, tls_listen="127.0.0.1:0", tls_cert=CERT,
                                  tls_key=KEY, less_secure=True)
        server.start()
        self.addCleanup(server.stop)
        client = self.smtp_ssl(server)
        self.assertEqual(client.noop(), (250, b"2.0.0 OK"))
        self.assertTrue(server.tls_context.options & ssl.OP_NO_COMPRESSION)


class WarningsTest(unittest.TestCase):
    """The TLS warnings of SPEC 2, from the real command line."""

    def start(self, *args, dhparams=False):
        path = write_config(self, "[blackhole]\nhostname = bh.test\nlisten = 127.0.0.1:%d\n"
                            "tls_cert = %s\ntls_key = %s\n%s" % (
                                free_port(), CERT, KEY,
                                "tls_dhparams = %s\n" % DHPARAMS if dhparams else ""))
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "blackhole.py"), "-c", path] + list(args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        self.addCleanup(_reap, proc)
        return proc

    def stop(self, proc):
        lines = []
        while True:     # up to the listening line: startup is over
            line = proc.stderr.readline()
            lines.append(line)
            if not line or b"listening on" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 0, b"".join(lines) + err)
        return [line.decode() for line in lines if line.startswith(b"blackhole: warning:")
                and b"running as root" not in line]     # not ours: CI may run as root

    def test_warnings(self):
        loud = self.start("-ls")
        quiet = self.start("-ls", "-q")
        dh = self.start(dhparams=True)
        self.assertEqual(self.stop(loud), [
            "blackhole: warning: -ls leaves out single-use (EC)DH keys\n",
            "blackhole: warning: TLS without tls_dhparams: only ECDHE key exchange\n"])
        self.assertEqual(self.stop(quiet), [])
        self.assertEqual(self.stop(dh), [])


def _reap(proc):
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


if __name__ == "__main__":
    unittest.main()
