"""Embedding blackhole in a test suite (SPEC section 9)."""

import fcntl
import os
import smtplib
import socket
import struct
import sys
import termios
import threading
import time
import tracemalloc
import unittest
from contextlib import closing, suppress
from unittest import mock

import blackhole
from tests.support import (CERT, GO_AHEAD, HOST, KEY, MAIL_OK, QUEUED, RCPT_OK, TIMEOUT,
                           RawClient, ServerTestCase, run_cli, wait_until, write_config)

MESSAGE = b"From: a@example.com\r\nSubject: %d\r\n\r\nhello\r\n"
SHUTTING_DOWN = b"421 4.3.2 bh.test Service shutting down\r\n"
GREETING = b"220 bh.test ESMTP\r\n"


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def accept_threads():
    return [t for t in threading.enumerate() if t.name == "blackhole-accept"]


def calling_in_bind(call):
    """A Server whose first bind() ends by calling call(server), as a signal
    handler arriving in the middle of start() would."""
    class Server(blackhole.Server):
        pending = True

        def bind(self):
            super().bind()
            if self.pending:
                self.pending = False
                call(self)
    return Server(hostname=HOST)


class LifecycleTest(unittest.TestCase):
    """start(), stop(), the context manager and what they leave behind."""

    def test_context_manager_on_an_ephemeral_port(self):
        with blackhole.Server(hostname=HOST, mode="bounce") as server:
            self.assertIsInstance(server, blackhole.Server)
            host, port = server.address
            self.assertEqual(host, "127.0.0.1")
            self.assertGreater(port, 0)
            with smtplib.SMTP(host, port, local_hostname="localhost",
                              timeout=TIMEOUT) as client:
                with self.assertRaises(smtplib.SMTPDataError):
                    client.sendmail("a@example.com", ["b@example.com"], MESSAGE % 1)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=TIMEOUT).close()

    def test_start_and_stop_are_idempotent(self):
        baseline = set(threading.enumerate())
        server = blackhole.Server(hostname=HOST)
        self.addCleanup(server.stop)
        server.stop()                                   # before start: nothing to do
        self.assertIs(server.start(), server)
        address = server.address
        self.assertIs(server.start(), server)
        self.assertEqual(server.address, address)
        self.assertGreater(set(threading.enumerate()) - baseline, set())
        server.stop()
        server.stop()
        self.assertEqual(set(threading.enumerate()) - baseline, set())
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(address, timeout=TIMEOUT).close()
        server.start()                                  # a stopped server starts again
        with closing(RawClient(server.address)) as client:
            self.assertEqual(client.line(), b"220 bh.test ESMTP\r\n")
        server.stop()

    def test_stop_is_prompt_with_idle_clients(self):
        server = blackhole.Server(hostname=HOST)
        server.start()
        self.addCleanup(server.stop)
        clients = []
        for _ in range(3):
            client = RawClient(server.address)
            self.addCleanup(client.close)
            self.assertEqual(client.line(), b"220 bh.test ESMTP\r\n")
            clients.append(client)
        self.assertEqual(clients[0].cmd(b"EHLO x")[:12], b"250-bh.test\r")
        clients[1].send(b"DATA\r\nSubject: mid-data\r\n\r\nhello")
        self.assertEqual(clients[1].reply(), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        wait_until(lambda: server.stats["connections_active"] == 3)
        started = time.monotonic()
        server.stop()
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 0.1)
        for client in clients:
            self.assertEqual(client.line(), SHUTTING_DOWN)
            self.assertTrue(client.closed())

    def test_cycles_leave_nothing_behind(self):
        linux = os.path.isdir("/proc/self/fd")
        with blackhole.Server(hostname=HOST):  # warm up lazy imports and caches
            pass
        threads, fds = set(threading.enumerate()), open_fds() if linux else 0
        count = threading.active_count()
        for cycle in range(200):
            with blackhole.Server(hostname=HOST) as server:
                if cycle % 20 == 0:         # sometimes with a session to end
                    with closing(RawClient(server.address)) as client:
                        self.assertEqual(client.line(), b"220 bh.test ESMTP\r\n")
                        server.stop()
                        self.assertEqual(client.line(), SHUTTING_DOWN)
        self.assertEqual(set(threading.enumerate()) - threads, set())
        self.assertLessEqual(threading.active_count(), count)
        if linux:
            self.assertEqual(open_fds(), fds)

    @unittest.skipUnless(sys.platform.startswith("linux"), "counts /proc/self/fd")
    def test_concurrent_stops_close_only_their_own_descriptors(self):
        """Two threads in stop() at once (a tearDown and a callback): the
        wake pipe is closed once, never a descriptor opened meanwhile."""
        for _ in range(50):
            server = blackhole.Server(hostname=HOST).start()
            gate, errors, mine = threading.Barrier(3), [], []

            def stop():
                gate.wait()
                try:
                    server.stop()
                except Exception as exc:        # noqa: BLE001 - reported below
                    errors.append(exc)

            def open_some():
                gate.wait()
                mine.extend(os.open(os.devnull, os.O_RDONLY) for _ in range(20))

            threads = [threading.Thread(target=f) for f in (stop, stop, open_some)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(TIMEOUT)
            for fd in mine:
                os.fstat(fd)            # EBADF if a stop() closed it
                os.close(fd)
            self.assertEqual(errors, [])

    def test_concurrent_starts_bind_once(self):
        for _ in range(20):
            server = blackhole.Server(hostname=HOST)
            self.addCleanup(server.stop)
            gate = threading.Barrier(2)
            threads = [threading.Thread(target=lambda: (gate.wait(), server.start()))
                       for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(TIMEOUT)
            self.assertEqual(len(server.servers), 1)
            server.stop()
            self.assertEqual([t for t in threading.enumerate()
                              if t.name == "blackhole-accept"], [])

    def test_a_stop_during_start_is_done_when_start_ends(self):
        """A signal handler's stop() while this thread is in start()."""
        server = calling_in_bind(blackhole.Server.stop)
        self.addCleanup(server.stop)
        server.start()
        self.assertIsNone(server.address)
        self.assertTrue(server.shared.stopping.is_set())
        self.assertEqual([t for t in threading.enumerate() if t.name == "blackhole-accept"], [])

    def test_an_accept_thread_starting_late_serves_its_own_wake(self):
        serve, errors = blackhole.Server.serve, []

        def late(server, wake, watch_fd=None):
            wait_until(lambda: server._wake is None, message="stop() under way")
            try:
                serve(server, wake, watch_fd)
            except Exception as exc:        # noqa: BLE001 - reported below
                errors.append(exc)

        with mock.patch.object(blackhole.Server, "serve", late):
            blackhole.Server(hostname=HOST).start().stop()
        self.assertEqual(errors, [])

    def test_a_nested_stop_returns_at_once(self):
        """A signal handler calling stop() while this thread is in stop()."""
        server = blackhole.Server(hostname=HOST).start()
        self.addCleanup(server.stop)
        close_sessions, nested = server._close_sessions, []

        def close_and_nest(grace):
            started = time.monotonic()
            server.stop()           # as a signal handler would, mid-stop
            nested.append(time.monotonic() - started)
            close_sessions(grace)

        with mock.patch.object(server, "_close_sessions", close_and_nest):
            server.stop()
        self.assertEqual(len(nested), 1)
        self.assertLess(nested[0], 0.05)
        self.assertIsNone(server.address)

    @unittest.skipUnless(sys.platform.startswith("linux"), "counts /proc/self/fd")
    def test_no_descriptor_left_after_sessions(self):
        fds = open_fds()
        with blackhole.Server(hostname=HOST, capture=1) as server:
            with smtplib.SMTP(*server.address, local_hostname="localhost",
                              timeout=TIMEOUT) as client:
                client.sendmail("a@example.com", ["b@example.com"], MESSAGE % 1)
            server.wait_for(1)
        self.assertEqual(open_fds(), fds)


class ThreadReuseTest(unittest.TestCase):
    """A finished session's thread waits idle_seconds for the next connection."""

    def session(self, server):
        with closing(RawClient(server.address)) as client:
            self.assertEqual(client.line(), b"220 bh.test ESMTP\r\n")
            self.assertEqual(client.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
            self.assertTrue(client.closed())

    def parked(self, server, count):
        wait_until(lambda: len(server.shared.idle) == count,
                   message="%d parked thread(s)" % count)

    def test_sessions_one_after_another_share_a_thread(self):
        with mock.patch.object(blackhole.ThreadingSMTPServer, "idle_seconds", 30):
            with blackhole.Server(hostname=HOST) as server:
                before = set(threading.enumerate())
                self.session(server)
                self.parked(server, 1)
                parked = set(threading.enumerate()) - before
                self.assertEqual(len(parked), 1)
                for _ in range(10):
                    self.session(server)
                    self.parked(server, 1)
                    self.assertEqual(set(threading.enumerate()) - before, parked)
                started = time.monotonic()
            self.assertLess(time.monotonic() - started, 5)  # stop() wakes it, no 30 s wait
            self.assertFalse(parked.pop().is_alive())

    def test_a_parked_thread_ends_after_idle_seconds(self):
        with mock.patch.object(blackhole.ThreadingSMTPServer, "idle_seconds", 0.05):
            with blackhole.Server(hostname=HOST) as server:
                before = set(threading.enumerate())
                self.session(server)
                wait_until(lambda: set(threading.enumerate()) <= before,
                           message="the parked thread to end")
                self.assertEqual(server.shared.idle, {})
                self.session(server)        # and a new thread serves the next

    def test_stop_joins_a_thread_ending_its_session(self):
        # the thread has closed its socket and is about to wait for another
        closed, go_on = threading.Event(), threading.Event()
        close = blackhole.SMTPServer.shutdown_request

        def slow_close(server, request):
            close(server, request)
            closed.set()
            go_on.wait(TIMEOUT)

        with mock.patch.object(blackhole.SMTPServer, "shutdown_request", slow_close):
            server = blackhole.Server(hostname=HOST).start()
            self.addCleanup(server.stop)
            before = set(threading.enumerate())
            self.session(server)
            self.assertTrue(closed.wait(TIMEOUT))
            session_thread, = set(threading.enumerate()) - before
            # still where stop() looks, though its socket is closed
            self.assertIn(session_thread, server.shared.sessions)
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            wait_until(server.shared.stopping.is_set, message="stop() to begin")
            go_on.set()
            stopper.join(TIMEOUT)
            self.assertFalse(stopper.is_alive())
            self.assertFalse(session_thread.is_alive())     # joined, not left behind
            self.assertEqual(server.shared.idle, {})

    def test_stop_waits_for_a_session_in_on_message(self):
        """Its client reads, so it gets the reply to its message, then 421:
        stop() cuts off only sessions stuck writing (a sender would
        otherwise send again a message that was accepted)."""
        entered = threading.Event()

        def on_message(envelope):   # slow, and still at work once stop() has begun
            entered.set()
            session, = server.shared.sessions.values()

            def woken():
                try:
                    return session.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    return False
            wait_until(woken, message="stop() to wake the session")
            time.sleep(3 * server.stuck_after)      # the slow callback, not a wait for it
        server = blackhole.Server(hostname=HOST, on_message=on_message).start()
        self.addCleanup(server.stop)
        client = RawClient(server.address)
        self.addCleanup(client.close)
        self.assertEqual(client.line(), b"220 bh.test ESMTP\r\n")
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        self.assertEqual([client.reply()[:4] for _ in range(3)], [b"250 ", b"250 ", b"354 "])
        client.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        self.assertTrue(entered.wait(TIMEOUT))
        server.stop()
        self.assertTrue(client.reply().startswith(b"250 2.0.0 OK: queued as <"))
        self.assertEqual(client.line(), SHUTTING_DOWN)

    def test_stop_from_on_message(self):
        """The callback's own session is not joined: it gets its reply,
        then the 421, and stop() returns at once."""
        elapsed = []

        def on_message(envelope):
            started = time.monotonic()
            server.stop()
            elapsed.append(time.monotonic() - started)

        server = blackhole.Server(hostname=HOST, on_message=on_message).start()
        self.addCleanup(server.stop)
        with closing(RawClient(server.address)) as client:
            self.assertEqual(client.line(), b"220 bh.test ESMTP\r\n")
            client.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
            self.assertEqual([client.reply()[:4] for _ in range(3)], [b"250 ", b"250 ", b"354 "])
            client.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
            self.assertTrue(client.reply().startswith(b"250 2.0.0 OK: queued as <"))
            self.assertEqual(client.line(), SHUTTING_DOWN)
            self.assertTrue(client.closed())
        self.assertEqual(len(elapsed), 1)
        self.assertLess(elapsed[0], 0.5)

    def test_stop_from_on_message_during_a_stop(self):
        """The callback's stop() returns at once; the stop under way does
        not wait for it for its whole grace."""
        entered = threading.Event()

        def on_message(envelope):
            entered.set()
            wait_until(server.shared.stopping.is_set, message="the other stop")
            server.stop()

        server = blackhole.Server(hostname=HOST, on_message=on_message).start()
        self.addCleanup(server.stop)
        with closing(RawClient(server.address)) as client:
            self.assertEqual(client.line(), b"220 bh.test ESMTP\r\n")
            client.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nhi\r\n.\r\n")
            self.assertTrue(entered.wait(TIMEOUT))
            started = time.monotonic()
            server.stop(grace=2)
            self.assertLess(time.monotonic() - started, 1)
            self.assertEqual([client.reply()[:4] for _ in range(4)],
                             [b"250 ", b"250 ", b"354 ", b"250 "])
            self.assertEqual(client.line(), SHUTTING_DOWN)

    def test_an_endless_idle_time_serves_and_stops(self):
        with mock.patch.object(blackhole.ThreadingSMTPServer, "idle_seconds", float("inf")):
            with blackhole.Server(hostname=HOST) as server:
                self.session(server)
                self.parked(server, 1)
                self.session(server)        # the waiting thread is alive and serves it

    def test_at_most_max_idle_threads_wait(self):
        with mock.patch.multiple(blackhole.ThreadingSMTPServer, idle_seconds=30, max_idle=2):
            with blackhole.Server(hostname=HOST) as server:
                before = set(threading.enumerate())
                clients = [RawClient(server.address) for _ in range(5)]
                for client in clients:
                    self.addCleanup(client.close)
                    self.assertEqual(client.line(), b"220 bh.test ESMTP\r\n")
                for client in clients:
                    self.assertEqual(client.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
                    self.assertTrue(client.closed())
                wait_until(lambda: len(set(threading.enumerate()) - before) == 2,
                           message="three of five threads to end")
                self.assertEqual(len(server.shared.idle), 2)


class AddressesTest(unittest.TestCase):

    def test_addresses_in_config_order(self):
        server = blackhole.Server(hostname=HOST, listen="127.0.0.1:0, 127.0.0.1:0 mode=bounce",
                                  tls_listen="127.0.0.1:0", tls_cert=CERT, tls_key=KEY)
        self.assertIsNone(server.address)       # nothing bound before start()
        with server:
            addresses = server.addresses
            self.assertEqual(len(addresses), 2)
            self.assertEqual(addresses[0], server.address)
            host, port = server.tls_address
            self.assertEqual(host, "127.0.0.1")
            self.assertEqual(len({port} | {p for _, p in addresses}), 3)
            for address in addresses:
                with closing(RawClient(address)) as client:
                    self.assertEqual(client.line(), b"220 bh.test ESMTP\r\n")

    def test_no_tls_address_without_tls_listen(self):
        with blackhole.Server(hostname=HOST) as server:
            self.assertIsNone(server.tls_address)
            self.assertEqual(server.addresses, [server.address])


class HandlerSubclassTest(unittest.TestCase):
    """Server.handler: a subclass of SMTPHandler serves every listener."""

    def test_a_subclass_limit_and_verb_on_every_listener(self):
        class Handler(blackhole.SMTPHandler):
            max_recipients = 1

            def smtp_XPING(self, arg):
                self.reply(250, "2.0.0 pong " + arg)

        class Server(blackhole.Server):
            handler = Handler

        with Server(hostname=HOST, listen="127.0.0.1:0, 127.0.0.1:0") as server:
            for address in server.addresses:
                with closing(RawClient(address)) as client:
                    client.line()
                    client.send(b"XPING x\r\nMAIL FROM:<a@x>\r\n"
                                b"RCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\n")
                    self.assertEqual([client.line() for _ in range(4)], [
                        b"250 2.0.0 pong x\r\n", b"250 2.1.0 OK\r\n", b"250 2.1.5 OK\r\n",
                        b"452 4.5.3 Too many recipients\r\n"])


class StatsAndCaptureTest(ServerTestCase):

    options = {"capture": 3}

    def send(self, count, start=0, **kwargs):
        with self.smtp(**kwargs) as client:
            for i in range(start, start + count):
                client.sendmail("a@example.com", ["b@example.com"], MESSAGE % i)

    def test_stats(self):
        stats = self.server.stats
        self.assertEqual(stats["connections_total"], 0)
        self.assertEqual(stats["messages_accepted"], 0)
        raw = self.raw()
        raw.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
                 b"Subject: 1\r\n\r\n.\r\n"
                 b"DATA\r\nX-Blackhole-Mode: bounce\r\n\r\n.\r\n")
        replies = [raw.reply() for _ in range(6)]
        self.assertTrue(replies[3].startswith(b"250 2.0.0 OK: queued as <"), replies)
        self.assertTrue(replies[5].startswith((b"4", b"5")), replies)
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com> SIZE=999999999")[:4], b"552 ")
        raw.send(b"DATA\r\n" + b"x" * 512001 + b"\r\n.\r\n")
        self.assertEqual(raw.reply()[:4], b"354 ")
        self.assertEqual(raw.reply(), b"552 5.3.4 Message size exceeds fixed maximum "
                         b"message size\r\n")
        stats = self.server.stats           # counted before the reply was written
        self.assertEqual(stats["connections_total"], 1)
        self.assertEqual(stats["connections_active"], 1)
        self.assertEqual(stats["messages_accepted"], 1)
        self.assertEqual(stats["messages_bounced"], 1)
        self.assertEqual(stats["messages_too_big"], 1)      # SIZE= refusal is no message
        self.assertEqual(stats["bytes_received"], 14 + 28 + 512003)
        self.assertEqual(stats["timeouts"], 0)
        raw.close()
        wait_until(lambda: self.server.stats["connections_active"] == 0)

    def test_capture_keeps_the_last_n(self):
        self.send(5)
        self.assertEqual(len(self.server.messages), 3)
        self.assertEqual([env.data for env in self.server.messages],
                         [MESSAGE % i for i in (2, 3, 4)])
        self.server.messages.clear()
        self.assertEqual(len(self.server.messages), 0)
        self.send(1, start=7)
        envs = self.server.wait_for(1, timeout=TIMEOUT)
        self.assertEqual([env.data for env in envs], [MESSAGE % 7])

    def test_wait_for(self):
        with self.assertRaises(TimeoutError):
            self.server.wait_for(1, timeout=0.05)
        thread = threading.Thread(target=self.send, args=(2,), kwargs={"server": self.server})
        started = time.monotonic()
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        envs = self.server.wait_for(2, timeout=TIMEOUT)
        thread.join(TIMEOUT)        # its client's cleanup must not run under it
        self.assertLess(time.monotonic() - started, TIMEOUT / 2)
        self.assertEqual(len(envs), 2)
        self.assertIsInstance(envs, list)
        with self.assertRaisesRegex(ValueError, "capture keeps 3 messages at most"):
            self.server.wait_for(4, timeout=TIMEOUT)    # at once: capture holds 3

    def test_on_message(self):
        received, done = [], threading.Event()

        def on_message(envelope):
            received.append(envelope)
            done.set()
        server = self.start_server(on_message=on_message, mode="bounce")
        with self.smtp(server) as client:
            with self.assertRaises(smtplib.SMTPDataError) as caught:
                client.sendmail("a@example.com", ["b@example.com", "fail=c@example.com"],
                                b"Subject: x\r\n\r\n.dot\r\nbody")
        self.assertTrue(done.wait(TIMEOUT))
        env, = received
        self.assertEqual(env.peer, "127.0.0.1")
        self.assertEqual(env.helo, "localhost")
        self.assertEqual(env.mail_from, "a@example.com")
        self.assertEqual(env.rcpt_tos, ["b@example.com"])
        self.assertEqual(env.data, b"Subject: x\r\n\r\n.dot\r\nbody\r\n")
        self.assertEqual(env.reply, "%d %s" % (caught.exception.smtp_code,
                                               caught.exception.smtp_error.decode()))
        self.assertRegex(env.reply, r"\A(45[0128]|5[25][0-3]|571) [45]\.\d\.\d [A-Z]")
        self.assertEqual(env.issues, ("missing_date", "missing_from", "missing_message_id"))

    def test_an_on_message_error_does_not_break_the_session(self):
        def on_message(envelope):
            raise RuntimeError("a bug in the test's callback")
        server = self.start_server(on_message=on_message)
        with self.assertLogs("blackhole", "ERROR"):
            with self.smtp(server) as client:
                client.sendmail("a@example.com", ["b@example.com"], MESSAGE % 1)
                self.assertEqual(client.noop()[0], 250)

    def test_nothing_kept_without_capture(self):
        server = self.start_server()
        with self.smtp(server) as client:
            client.sendmail("a@example.com", ["b@example.com"], MESSAGE % 1)
        self.assertEqual(server.stats["messages_accepted"], 1)
        self.assertFalse(getattr(server, "messages", None))


class ConfigTest(unittest.TestCase):

    def test_config_object(self):
        config = blackhole.Config(mode="BOUNCE", timeout="5", delay="1-2", hostname=HOST,
                                  listen="127.0.0.1:0")
        self.assertEqual((config.mode, config.timeout, config.delay), ("bounce", 5, (1, 2)))
        with self.assertRaises(AttributeError):
            config.mode = "accept"
        with blackhole.Server(config) as server:
            self.assertEqual(server.config, config)
            with closing(RawClient(server.address)) as client:
                self.assertEqual(client.line(), b"220 bh.test ESMTP\r\n")

    def test_python_values(self):
        config = blackhole.Config(timeout=5, strict=True, dynamic_switch=False,
                                  max_message_size=1000, delay=(0, 1), hostname=HOST)
        self.assertEqual((config.timeout, config.strict, config.dynamic_switch,
                          config.max_message_size, config.delay),
                         (5, True, False, 1000, (0, 1)))
        config = blackhole.Config(timeout=5.0, max_message_size=1e6,
                                  listen=[("127.0.0.1", 0), "::1:0 mode=bounce"],
                                  tls_listen=("::1", 465), tls_cert=CERT, tls_key=KEY,
                                  metrics_listen=("127.0.0.1", 0))
        self.assertEqual((config.timeout, config.max_message_size), (5, 1000000))
        self.assertEqual([listener.text for listener in config.listeners()],
                         ["127.0.0.1:0", "::1:0 mode=bounce", "[::1]:465"])
        self.assertEqual(config.metrics_listen, ("127.0.0.1", 0))
        with self.assertRaisesRegex(blackhole.ConfigError, "timeout = 0.5: must be a whole"):
            blackhole.Config(timeout=0.5)
        config = blackhole.Config(listen=[("127.0.0.1", 0, "mode=bounce"), ("::1", 0)],
                                  delay=(1.0, 2.0))
        self.assertEqual([listener.text for listener in config.listen],
                         ["127.0.0.1:0 mode=bounce", "[::1]:0"])
        self.assertEqual(config.delay, (1, 2))
        with self.assertRaisesRegex(blackhole.ConfigError, "mode = bouce"):
            blackhole.Config(mode="bouce", colour="red")    # the first, not the unknown

    def test_server_defaults_and_capture(self):
        server = blackhole.Server(listen=None)      # None: Server's own default
        self.assertEqual([l.text for l in server.config.listen], ["127.0.0.1:0"])
        for capture in (-1, "5", 1.0, True):
            with self.subTest(capture=capture):
                with self.assertRaisesRegex(ValueError, "capture = .*: must be a whole"):
                    blackhole.Server(capture=capture)

    def test_errors(self):
        cases = {
            "mode": ("bouce", "mode = bouce: must be accept, bounce or random"),
            "colour": ("red", "colour"),
        }
        for name, (value, message) in cases.items():
            with self.subTest(name=name):
                with self.assertRaises(blackhole.ConfigError) as caught:
                    blackhole.Config(**{name: value})
                self.assertIn(message, str(caught.exception))
                with self.assertRaises(blackhole.ConfigError):
                    blackhole.Server(hostname=HOST, **{name: value})

    def test_error_is_what_the_cli_prints(self):
        for text in ("colour = red\n", "[blackhole]\nlisten = 127.0.0.1:99999\n"):
            with self.subTest(text=text):
                path = write_config(self, text)
                with self.assertRaises(blackhole.ConfigError) as caught:
                    blackhole.Config.from_file(path)
                message = str(caught.exception)
                self.assertTrue(message.startswith(path + ": "), message)
                self.assertNotIn("\n", message)
                result = run_cli("-c", path)
                self.assertEqual(result.returncode, 64)
                self.assertEqual(result.stderr.decode(), "blackhole: %s\n" % message)
                self.assertEqual(result.stdout, b"")
        self.assertEqual(str(caught.exception), path + ": listen = 127.0.0.1:99999: "
                         "port must be a number from 0 to 65535")


class MemoryTest(ServerTestCase):
    """Section 4.2: message content is streamed and counted, never held."""

    line = b"x" * 78 + b"\r\n"
    chunk = line * 819                              # 65,520 octets of whole lines
    header = b"Subject: big\r\n\r\n"

    def send_big(self, server, chunks):
        """Send header + chunks * chunk; (reply, peak traced memory)."""
        raw = self.raw(server)
        raw.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        self.assertEqual(raw.reply() + raw.reply() + raw.reply(),
                         b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n"
                         b"354 End data with <CR><LF>.<CR><LF>\r\n")
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        raw.send(self.header)
        for _ in range(chunks):
            raw.send(self.chunk)
        raw.send(b".\r\n")
        reply = raw.reply()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.assertEqual(raw.cmd(b"NOOP"), b"250 2.0.0 OK\r\n")
        return reply, peak

    def test_50_mb_message_holds_no_memory(self):
        chunks = 800                                # 52,416,000 octets: 50 MB
        reply, peak = self.send_big(self.server, chunks)
        self.assertEqual(reply, b"552 5.3.4 Message size exceeds fixed maximum "
                         b"message size\r\n")
        self.assertLess(peak, 3 * 1024 * 1024)
        stats = self.server.stats
        self.assertEqual(stats["bytes_received"], len(self.header) + chunks * len(self.chunk))
        self.assertEqual(stats["messages_too_big"], 1)

    def test_accepted_data_is_not_kept_without_capture(self):
        server = self.start_server(max_message_size=20000000)
        reply, peak = self.send_big(server, 128)    # 8 MB, accepted
        self.assertTrue(reply.startswith(b"250 2.0.0 OK: queued as <"), reply)
        self.assertLess(peak, 3 * 1024 * 1024)

    def test_an_idle_session_holds_no_content(self):
        """After the reply, the session's read buffer has none of the message,
        however the client's writes fell (DATA, BDAT, a pipelined BDAT)."""
        marker = b"content-" * 4000                     # 32,000 octets, one block
        bdat = b"BDAT %d LAST\r\n" % len(marker)
        cases = {       # the client's writes, then one reply to the message
            "DATA": [b"DATA\r\n", b"Subject: x\r\n\r\n" + marker + b"\r\n.\r\n"],
            "BDAT": [bdat, marker],
            "pipelined BDAT": [bdat + marker],
        }
        for name, writes in cases.items():
            with self.subTest(name):
                raw = self.raw()
                self.assertEqual(raw.cmd(b"EHLO x")[:4], b"250-")
                raw.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
                self.assertEqual(raw.reply() + raw.reply(), b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n")
                for data in writes:
                    raw.send(data)
                reply = raw.reply()
                if name == "DATA":
                    self.assertEqual(reply, b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    reply = raw.reply()
                self.assertTrue(reply.startswith(b"250 2.0.0 OK: queued as <"), reply)
                port = raw.sock.getsockname()[1]
                with self.server.shared.lock:
                    session, = [h for h in self.server.shared.sessions.values()
                                if getattr(h, "peer_port", None) == port]
                self.assertEqual(session._buf.find(b"content-"), -1)
                raw.close()

    @unittest.skipUnless(sys.platform.startswith("linux"), "TIOCOUTQ is Linux's")
    def test_stop_is_prompt_with_a_client_not_reading(self):
        server = self.start_server()
        raw = self.raw(server)
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.sock.setblocking(False)
        with suppress(BlockingIOError):     # EXPN's replies are 18x its size
            for _ in range(200):
                raw.sock.send(b"EXPN all\r\n" * 2000)
        session, = server.shared.sessions.values()
        unsent = []

        def stuck():    # the server's unsent replies no longer change
            unsent.append(struct.unpack("i", fcntl.ioctl(
                session.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])
            return unsent[-1] > 65536 and unsent[-3:] == [unsent[-1]] * 3
        wait_until(stuck, message="the session to be stuck writing")
        started = time.monotonic()
        server.stop()
        self.assertLess(time.monotonic() - started, 1.0)    # stuck_after, not grace's 1.5 s
        self.assertEqual(server.stats["connections_active"], 0)

class ServerArgumentsTest(unittest.TestCase):
    """9: a Config and options together are refused, not silently dropped."""

    def test_config_and_options(self):
        with self.assertRaises(TypeError):
            blackhole.Server(blackhole.Config(listen="127.0.0.1:0"), mode="bounce")


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
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.recv(100)
        sock.sendall(b"QUIT\r\n")
        sock.recv(100)


class LifecycleNestingTest(unittest.TestCase):
    """A nested start() returns, and neither a stop() made during start()
    nor one nested in stop() outlives its call (the `_busy` /
    `_stop_after_start` bookkeeping of Server)."""

    def greets(self, server):
        with closing(RawClient(server.address)) as client:
            self.assertEqual(client.line(), GREETING)

    def test_a_nested_start_returns_at_once(self):
        """As a signal handler calling start() while this thread is in start()."""
        server = calling_in_bind(blackhole.Server.start)
        self.addCleanup(server.stop)
        server.start()
        self.assertEqual(len(accept_threads()), 1)
        self.greets(server)
        server.stop()
        self.assertEqual(accept_threads(), [])

    def test_a_server_stopped_during_start_starts_again(self):
        """The stop() deferred to the end of start() is done once, not at
        every later start()."""
        server = calling_in_bind(blackhole.Server.stop)
        self.addCleanup(server.stop)
        server.start()
        self.assertIsNone(server.address)       # stopped when start() ended
        server.start()
        self.assertIsNotNone(server.address)
        self.greets(server)

    def test_a_nested_stop_leaves_the_next_start_alone(self):
        """A stop() nested in stop() (a signal handler) returns; it must not
        be taken for one made during start() and stop the next start()."""
        server = blackhole.Server(hostname=HOST).start()
        self.addCleanup(server.stop)
        close_sessions = server._close_sessions

        def close_and_nest(grace):
            server.stop()
            close_sessions(grace)

        with mock.patch.object(server, "_close_sessions", close_and_nest):
            server.stop()
        server.start()
        self.assertIsNotNone(server.address)
        self.greets(server)


class StopGraceTest(unittest.TestCase):
    """_close_sessions' second grace for on_message."""

    def start_blocked(self, release, threads, linger=0):
        def on_message(envelope):
            threads.append(threading.current_thread())
            release.wait(TIMEOUT)
            time.sleep(linger)      # a slow callback, not a wait for anything

        server = blackhole.Server(hostname=HOST, on_message=on_message).start()
        self.addCleanup(server.stop)
        self.addCleanup(lambda: [thread.join(TIMEOUT) for thread in threads])
        self.addCleanup(release.set)
        client = RawClient(server.address)
        self.addCleanup(client.close)
        self.assertEqual(client.line(), GREETING)
        client.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
        self.assertEqual(client.line() + client.line() + client.line(),
                         MAIL_OK + RCPT_OK + GO_AHEAD)
        client.send(b"hi\r\n.\r\n")
        wait_until(lambda: threads, message="on_message to be called")
        return server, client

    def test_an_on_message_left_running_loses_its_connection(self):
        """stop() returns with the client's connection ended (it gets no
        reply, not one much later), and its warning gives both graces."""
        release, threads = threading.Event(), []
        server, client = self.start_blocked(release, threads)
        started = time.monotonic()
        with self.assertLogs("blackhole", "WARNING") as logs:
            server.stop(grace=0.1)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertIn("left running after 0.2 s", logs.output[0])
        self.assertIn("blocked in on_message? " + threads[0].name, logs.output[0])
        self.assertTrue(threads[0].is_alive())          # still in on_message
        client.sock.settimeout(TIMEOUT / 2)             # on_message waits TIMEOUT
        self.assertEqual(client.line(), b"")            # EOF while it still runs

    def test_an_on_message_ending_in_the_second_grace_is_joined(self):
        """One that returns after the first grace but within the second is
        joined, without the left-running warning."""
        release, threads = threading.Event(), []
        server, client = self.start_blocked(release, threads, linger=0.1)
        warnings = []
        stopper = threading.Thread(target=lambda: server.stop(grace=1.0))
        with mock.patch.object(blackhole.log, "warning",
                               lambda *args: warnings.append(args)):
            stopper.start()
            # the end of the first grace shuts the session's socket: EOF here
            self.assertEqual(client.line(), b"")
            release.set()                   # on_message returns 0.1 s into the second
            stopper.join(TIMEOUT)
        self.assertFalse(stopper.is_alive())
        self.assertEqual(warnings, [])
        self.assertFalse(threads[0].is_alive())


class RestartAfterParkingTest(unittest.TestCase):
    """stop() empties the table of parked threads, so a restarted server never
    hands a connection to a thread that has ended."""

    def session(self, server):
        with closing(RawClient(server.address)) as client:
            self.assertEqual(client.line(), GREETING)
            self.assertEqual(client.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
            self.assertTrue(client.closed())

    def test_a_restarted_server_serves_after_threads_were_parked(self):
        with mock.patch.object(blackhole.ThreadingSMTPServer, "idle_seconds", 30):
            server = blackhole.Server(hostname=HOST).start()
            self.addCleanup(server.stop)
            self.session(server)
            wait_until(lambda: len(server.shared.idle) == 1, message="a parked thread")
            server.stop()
            server.start()
            self.session(server)


class HandOverTest(unittest.TestCase):
    """A parked thread handed a connection is where stop() looks from the hand-
    over on, before its session's setup(), so stop() joins it."""

    def test_stop_joins_a_reused_thread_still_in_setup(self):
        entered, go_on = threading.Event(), threading.Event()
        setup, shutdown = blackhole.SMTPHandler.setup, blackhole._shutdown
        calls = []

        def slow_setup(handler):
            calls.append(handler)
            if len(calls) == 2:             # the second session, on the parked thread
                entered.set()
                go_on.wait(TIMEOUT)
            setup(handler)

        def shutdown_and_go_on(sock, how):  # stop() wakes the sessions it knows
            shutdown(sock, how)
            go_on.set()

        with mock.patch.object(blackhole.ThreadingSMTPServer, "idle_seconds", 30), \
                mock.patch.object(blackhole.SMTPHandler, "setup", slow_setup), \
                mock.patch.object(blackhole, "_shutdown", shutdown_and_go_on):
            server = blackhole.Server(hostname=HOST).start()
            self.addCleanup(server.stop)
            with closing(RawClient(server.address)) as client:
                self.assertEqual(client.line(), GREETING)
                self.assertEqual(client.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
                self.assertTrue(client.closed())
            wait_until(lambda: len(server.shared.idle) == 1, message="a parked thread")
            (parked,) = server.shared.idle
            second = RawClient(server.address)
            self.addCleanup(go_on.set)
            self.addCleanup(second.close)
            self.assertTrue(entered.wait(TIMEOUT))
            server.stop()
            self.assertFalse(parked.is_alive())
            self.assertTrue(second.closed())    # its session is over, not serving on


    def test_stop_joins_a_new_session_thread_still_in_setup(self):
        entered, go_on = threading.Event(), threading.Event()
        setup, shutdown = blackhole.SMTPHandler.setup, blackhole._shutdown
        threads = []

        def slow_setup(handler):
            threads.append(threading.current_thread())
            entered.set()
            go_on.wait(TIMEOUT)
            setup(handler)

        def shutdown_and_go_on(sock, how):
            shutdown(sock, how)
            go_on.set()

        with mock.patch.object(blackhole.SMTPHandler, "setup", slow_setup), \
                mock.patch.object(blackhole, "_shutdown", shutdown_and_go_on):
            server = blackhole.Server(hostname=HOST).start()
            self.addCleanup(server.stop)
            client = RawClient(server.address)
            self.addCleanup(go_on.set)
            self.addCleanup(client.close)
            self.assertTrue(entered.wait(TIMEOUT))
            server.stop()
            self.assertFalse(threads[0].is_alive())
            self.assertTrue(client.closed())


class LateTimeoutTest(unittest.TestCase):
    """A parked thread whose idle_seconds run out just as a connection is
    handed to it serves that connection (_Parked.wait), it does not drop it."""

    def test_a_connection_handed_as_the_idle_time_ends_is_served(self):
        handed = threading.Event()

        class LateLock:
            """The parked thread's lock: its timed wait ends in a timeout
            only once the job was handed, as when both happen at once."""

            def __init__(self, lock):
                self.lock = lock

            def acquire(self, timeout=None):
                if timeout is None or handed.is_set():
                    return self.lock.acquire(timeout=-1 if timeout is None else timeout)
                handed.wait(TIMEOUT)
                return False

            def release(self):
                self.lock.release()
                handed.set()

        init = blackhole._Parked.__init__

        def late_init(parked):
            init(parked)
            parked.ready = LateLock(parked.ready)

        with mock.patch.object(blackhole._Parked, "__init__", late_init):
            with blackhole.Server(hostname=HOST) as server:
                for count in range(2):      # the second is handed to the parked thread
                    if count:
                        wait_until(lambda: len(server.shared.idle) == 1,
                                   message="a parked thread")
                    with closing(RawClient(server.address)) as client:
                        self.assertEqual(client.line(), GREETING)
                        self.assertEqual(client.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
                        self.assertTrue(client.closed())
                self.assertTrue(handed.is_set())


class CaptureEdgesTest(ServerTestCase):
    """An on_message that raises any Exception (not only RuntimeError) is
    logged and contained, and capture still keeps the envelope when on_message
    is given too (9)."""

    options = None

    def send(self, server, count):
        with closing(RawClient(server.address)) as client:
            self.assertEqual(client.line(), GREETING)
            for _ in range(count):
                client.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nhi\r\n.\r\n")
                replies = [client.reply() for _ in range(4)]
                self.assertRegex(replies[3], QUEUED)

    def test_any_on_message_exception_is_logged_and_contained(self):
        def on_message(envelope):
            raise KeyError("a bug in the test's callback")
        server = self.start_server(on_message=on_message, capture=1)
        with self.assertLogs("blackhole", "ERROR") as logs:
            self.send(server, 1)
        self.assertIn("on_message raised", logs.output[0])
        self.assertEqual(len(server.messages), 1)       # and capture has it


if __name__ == "__main__":
    unittest.main()
