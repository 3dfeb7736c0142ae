"""Edges a review found: limits on what a client can make the server hold,
numbers too long for int(), writes to a client that never reads, and the
smaller corners of config, BDAT, seeds and verb lookup."""

import os
import socket
import threading
import time
import unittest
from unittest import mock

import blackhole
from tests import support
from tests.support import HOST, ServerTestCase, wait_until

HUGE = b"9" * 5000      # int() refuses strings over 4300 digits since 3.11


class NumbersTest(ServerTestCase):
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


class RecipientsTest(ServerTestCase):

    options = {"capture": 1}

    def test_addresses_are_bounded(self):
        """A path of 12 KB a thousand times would keep 12 MB a session."""
        limit = blackhole.SMTPHandler.max_address
        client = self.raw()
        local = b"a" * (limit - len(b"@example.com"))
        self.assertEqual(client.cmd(b"MAIL FROM:<%s@example.com>" % local), b"250 2.1.0 OK\r\n")
        self.assertEqual(client.cmd(b"RCPT TO:<%s@example.com>" % local), b"250 2.1.5 OK\r\n")
        self.assertEqual(client.cmd(b"RCPT TO:<%sa@example.com>" % local),
                         b"501 5.1.3 Recipient address too long\r\n")
        self.assertEqual(client.cmd(b"MAIL FROM:<%sa@example.com>" % local),
                         b"501 5.1.7 Sender address too long\r\n")
        self.assertEqual(client.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertTrue(client.cmd(b"hi\r\n.").startswith(b"250 "))
        self.assertEqual(self.server.wait_for(1)[0].rcpt_tos, ["%s@example.com" % local.decode()])

    def test_at_most_max_recipients(self):
        limit = blackhole.SMTPHandler.max_recipients
        client = self.raw()
        client.send(b"MAIL FROM:<a@example.com>\r\n" +
                    b"".join(b"RCPT TO:<b%d@example.com>\r\n" % i for i in range(limit + 1)))
        self.assertEqual(client.reply(), b"250 2.1.0 OK\r\n")
        for _ in range(limit):
            self.assertEqual(client.reply(), b"250 2.1.5 OK\r\n")
        self.assertEqual(client.reply(), b"452 4.5.3 Too many recipients\r\n")
        self.assertEqual(client.cmd(b"RSET"), b"250 2.0.0 OK\r\n")


class BdatTest(ServerTestCase):

    options = {"strict": True, "max_message_size": 50}

    def test_a_refused_chunk_is_not_counted(self):
        client = self.raw()
        self.assertEqual(client.cmd(b"EHLO localhost")[:4], b"250-")
        self.assertEqual(client.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 OK\r\n")
        client.send(b"BDAT 100\r\n" + b"x" * 100)
        self.assertEqual(client.reply(), b"503 5.5.1 Bad sequence of commands\r\n")
        self.assertEqual(client.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 OK\r\n")
        client.send(b"BDAT 10 LAST\r\n" + b"y" * 10)
        reply = client.reply()
        self.assertTrue(reply.startswith(b"250 2.0.0 OK: queued as"), reply)
        stats = self.server.stats
        self.assertEqual((stats["bytes_received"], stats["messages_too_big"]), (10, 0))


class VerbTest(ServerTestCase):

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
        sock.settimeout(support.TIMEOUT)
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
        setup = blackhole.SMTPHandler.setup

        def small_buffer(handler):      # as a link with a zero window would
            setup(handler)
            handler.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with mock.patch.object(blackhole.SMTPHandler, "setup", small_buffer), \
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


class InlineTest(unittest.TestCase):

    def test_an_inline_session_leaves_nothing_registered(self):
        config = blackhole.Config(listen="127.0.0.1:0", hostname=HOST)
        server = blackhole.SMTPServer(config.listen[0], config)
        self.addCleanup(server.server_close)
        client = threading.Thread(target=_quit, args=(server.server_address,))
        client.start()
        self.addCleanup(client.join)
        server.handle_request()
        self.assertEqual(server.shared.sessions, {})
        self.assertEqual(server.shared.stats.as_dict()["connections_active"], 0)


def _quit(address):
    with socket.create_connection(address, timeout=support.TIMEOUT) as sock:
        sock.recv(100)
        sock.sendall(b"QUIT\r\n")
        sock.recv(100)


class SeedTest(ServerTestCase):
    """A 552 is an end of data too: it advances the seeded sequence (10.4)."""

    def fates(self, first_too_big):
        server = self.start_server(mode="random", seed=42, max_message_size=100)
        codes = []
        for sender in range(8):
            client = self.raw(server)
            for too_big in (first_too_big, False):
                client.cmd(b"MAIL FROM:<s%d@example.com>" % sender)
                client.cmd(b"RCPT TO:<r@example.com>")
                client.cmd(b"DATA")
                codes.append(client.cmd((b"x" * 200 if too_big else b"hi") + b"\r\n.")[:3])
            codes.pop(-2)       # keep the second message's fate
        return codes

    def test_a_552_counts_in_the_sequence(self):
        self.assertEqual(self.fates(first_too_big=True), self.fates(first_too_big=False))


class ConfigTest(unittest.TestCase):

    def test_encrypted_key_is_refused_without_a_prompt(self):
        key = os.path.join(support.CERTS, "server-encrypted.key")
        with self.assertRaises(blackhole.ConfigError) as caught:
            blackhole.Config(tls_cert=support.CERT, tls_key=key, hostname=HOST)
        self.assertEqual(str(caught.exception), "<options>: tls_key = %s: is encrypted; "
                         "blackhole takes no passphrase" % key)

    def test_listener_delay_is_held_to_the_timeout(self):
        with self.assertRaises(blackhole.ConfigError) as caught:
            blackhole.Config(listen="127.0.0.1:0 delay=50", timeout=10, hostname=HOST)
        self.assertEqual(str(caught.exception), "<options>: listen = 127.0.0.1:0 delay=50: "
                         "delay= must be less than timeout (10)")

    def test_an_indented_bracket_is_a_continuation_not_a_section(self):
        path = support.write_config(self, "listen = 127.0.0.1:0,\n    [::1]:0\nhostname = x\n")
        config = blackhole.Config.from_file(path)
        self.assertEqual([(item.host, item.port) for item in config.listen],
                         [("127.0.0.1", 0), ("::1", 0)])


if __name__ == "__main__":
    unittest.main()
