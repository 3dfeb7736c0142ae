"""Faults on demand (SPEC section 10): address directives, greylisting,
backpressure, reproducible randomness and the counters of all of them."""

import collections
import re
import smtplib
import threading
import time
import unittest
from unittest import mock

import blackhole
from tests.support import HOST, OK, TIMEOUT, RawClient, ServerTestCase, wait_until

D = blackhole.Directive
MESSAGE = b"Subject: test\r\n\r\nhello\r\n"
QUEUED = re.compile(rb"250 2\.0\.0 OK: queued as <[^<>@\s]+@bh\.test>\r\n\Z")


def bounce(code):
    """The exact reply line of section 4.2's bounce table for code."""
    return b"%d %s\r\n" % (code, blackhole.BOUNCES[code].encode())


class Session:
    """Raw-socket transactions for the tests below (exact reply bytes)."""

    def session(self, server=None, ehlo=True):
        client = self.raw(server)
        if ehlo:
            self.assertTrue(client.cmd(b"EHLO localhost").startswith(b"250-" + HOST.encode()))
        return client

    def transaction(self, client, sender, recipients, content=MESSAGE):
        """MAIL, each RCPT (all must be accepted), DATA: the final reply."""
        self.assertEqual(client.cmd(b"MAIL FROM:<%s>" % sender), b"250 2.1.0 OK\r\n")
        for rcpt in recipients:
            self.assertEqual(client.cmd(b"RCPT TO:<%s>" % rcpt), b"250 2.1.5 OK\r\n")
        self.assertEqual(client.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        client.send(content + b".\r\n")
        return client.reply()


# ###########################################################################
# parse_directives: the one pure function the handler asks (10.1)
# ###########################################################################

class ParseDirectivesTest(unittest.TestCase):

    PLANS = [
        ("452=bob@example.com", (D(False, "code", 452, None),)),
        ("421=a@example.com", (D(False, "code", 421, None),)),
        ("450=a@example.com", (D(False, "code", 450, None),)),
        ("559=a@example.com", (D(False, "code", 559, None),)),
        ("fail=bob@example.com", (D(False, "fail", None, None),)),
        ("defer=bob@example.com", (D(False, "defer", None, None),)),
        ("drop=bob@example.com", (D(False, "drop", None, None),)),
        ("delay-3=bob@example.com", (D(False, "delay", 3, None),)),
        ("delay-0=bob@example.com", (D(False, "delay", 0, None),)),
        ("delay-600=bob@example.com", (D(False, "delay", 60, None),)),   # at most 60
        ("data-451=b@example.com", (D(True, "code", 451, None),)),
        ("data-fail=b@example.com", (D(True, "fail", None, None),)),
        ("data-drop=b@example.com", (D(True, "drop", None, None),)),
        ("data-delay-1=b@example.com", (D(True, "delay", 1, None),)),
        ("452x2=bob@example.com", (D(False, "code", 452, 2),)),
        ("dropx10=bob@example.com", (D(False, "drop", None, 10),)),
        ("data-deferx1=bob@example.com", (D(True, "defer", None, 1),)),
        ("delay-2x3=bob@example.com", (D(False, "delay", 2, 3),)),
        ("delay-2.451=bob@example.com",
         (D(False, "delay", 2, None), D(False, "code", 451, None))),
        ("delay-1.data-delay-2.data-552x3=bob@example.com",
         (D(False, "delay", 1, None), D(True, "delay", 2, None), D(True, "code", 552, 3))),
        ("fail.452=bob@example.com",
         (D(False, "fail", None, None), D(False, "code", 452, None))),
        # case-insensitive
        ("DATA-451X2=bob@example.com", (D(True, "code", 451, 2),)),
        ("Fail=bob@example.com", (D(False, "fail", None, None),)),
        ("DeLaY-1.DROP=bob@example.com",
         (D(False, "delay", 1, None), D(False, "drop", None, None))),
        # the directives are the text before the first = of the local part
        ("fail=x=y@example.com", (D(False, "fail", None, None),)),
        ("fail=bob", (D(False, "fail", None, None),)),
    ]

    ORDINARY = [
        "a=b@example.com", "999=c@example.com", "250=c@example.com", "x0=c@example.com",
        "bob@example.com", "", "=bob@example.com", "fail@example.com",
        "bob@fail=example.com", "420=a@example.com", "422=a@example.com",
        "449=a@example.com", "560=a@example.com", "4510=a@example.com", "45=a@example.com",
        "452x0=a@example.com", "452x=a@example.com", "452x-1=a@example.com",
        "x2=a@example.com", "fail.=a@example.com", ".fail=a@example.com",
        "fail..452=a@example.com", "fail.a=a@example.com", "data-=a@example.com",
        "data-data-451=a@example.com", "delay-=a@example.com", "delay1=a@example.com",
        "delay--1=a@example.com", "delay-1.5=a@example.com", "fail =a@example.com",
        " fail=a@example.com", "fail\n=a@example.com", "failure=a@example.com",
        "xfail=a@example.com", "data_451=a@example.com",
        # ASCII only: other scripts' digits and letters are not directives
        "45\u0661=a@example.com", "delay-\u0661=a@example.com", "fa\u0131l=a@example.com",
        "452x\u0662=a@example.com",
    ]

    def test_directives(self):
        for address, plan in self.PLANS:
            with self.subTest(address=address):
                self.assertEqual(blackhole.parse_directives(address), plan)

    def test_ordinary_addresses(self):
        for address in self.ORDINARY:
            with self.subTest(address=address):
                self.assertEqual(blackhole.parse_directives(address), ())

    def test_plan_is_immutable(self):
        plan = blackhole.parse_directives("delay-2.451=bob@example.com")
        self.assertIsInstance(plan, tuple)
        with self.assertRaises(AttributeError):
            plan[0].value = 5


# ###########################################################################
# Directives over the wire
# ###########################################################################

class DirectiveTest(Session, ServerTestCase):

    options = {"capture": 10}

    def faults(self, kind="directive"):
        return self.server.stats["faults_" + kind]

    def test_count_suffix_refuses_twice_then_accepts(self):
        client = self.smtp()
        rcpt = "452x2=bob@example.com"
        for _ in range(2):
            with self.assertRaises(smtplib.SMTPRecipientsRefused) as caught:
                client.sendmail("a@example.com", [rcpt], MESSAGE)
            self.assertEqual(caught.exception.recipients, {rcpt: (
                452, b"4.3.1 Requested action not taken: insufficient system storage")})
        self.assertEqual(client.sendmail("a@example.com", [rcpt], MESSAGE), {})
        self.assertEqual(client.sendmail("a@example.com", [rcpt], MESSAGE), {})
        self.assertEqual(self.faults(), 2)
        # counted per stage: the same address at MAIL has its own count
        raw = self.session()
        self.assertEqual(raw.cmd(b"MAIL FROM:<452x2=bob@example.com>"), bounce(452))
        self.assertEqual(raw.cmd(b"MAIL FROM:<452x2=bob@example.com>"), bounce(452))
        self.assertEqual(raw.cmd(b"MAIL FROM:<452x2=bob@example.com>"), b"250 2.1.0 OK\r\n")
        # and per address as written
        self.assertEqual(raw.cmd(b"RCPT TO:<452X2=bob@example.com>"), bounce(452))
        self.assertEqual(self.faults(), 5)

    def test_421_at_mail_replies_and_closes(self):
        client = self.session()
        self.assertEqual(client.cmd(b"MAIL FROM:<421=a@example.com>"),
                         b"421 4.0.0 Failure requested by address\r\n")
        self.assertTrue(client.closed())
        client = self.session()
        client.cmd(b"MAIL FROM:<a@example.com>")
        self.assertEqual(client.cmd(b"RCPT TO:<421=b@example.com>"),
                         b"421 4.0.0 Failure requested by address\r\n")
        self.assertTrue(client.closed())
        self.assertEqual(self.faults(), 2)

    def test_421_at_end_of_data_closes(self):
        client = self.session()
        self.assertEqual(self.transaction(client, b"a@example.com", [b"data-421=b@example.com"]),
                         b"421 4.0.0 Failure requested by address\r\n")
        self.assertTrue(client.closed())

    def test_data_451_accepted_at_rcpt_then_bounced(self):
        client = self.smtp()
        self.assertEqual(client.mail("a@example.com"), (250, b"2.1.0 OK"))
        self.assertEqual(client.rcpt("data-451=b@example.com"), (250, b"2.1.5 OK"))
        self.assertEqual(client.data(MESSAGE), (
            451, b"4.3.0 Requested action aborted: local error in processing"))
        self.assertEqual(client.noop(), (250, b"2.0.0 OK"))       # the session goes on
        envelope = self.server.wait_for(1)[0]
        self.assertEqual(envelope.rcpt_tos, ["data-451=b@example.com"])
        self.assertEqual(envelope.reply,
                         "451 4.3.0 Requested action aborted: local error in processing")
        self.assertEqual(self.faults(), 1)
        self.assertEqual(self.server.stats["messages_bounced"], 1)

    def test_code_replies(self):
        # (address, reply at RCPT): the bounce text of 4.2, else N.0.0
        cases = [
            (b"450", bounce(450)), (b"458", bounce(458)), (b"550", bounce(550)),
            (b"553", bounce(553)), (b"554", b"554 5.0.0 Failure requested by address\r\n"),
            (b"559", b"559 5.0.0 Failure requested by address\r\n"),
            (b"499", b"499 4.0.0 Failure requested by address\r\n"),
            (b"fail", b"550 5.1.1 Recipient address rejected\r\n"),
            (b"defer", b"450 4.2.1 Recipient temporarily unavailable\r\n"),
        ]
        client = self.session()
        client.cmd(b"MAIL FROM:<a@example.com>")
        for word, reply in cases:
            with self.subTest(stage="rcpt", directive=word):
                self.assertEqual(client.cmd(b"RCPT TO:<%s=b@example.com>" % word), reply)
        for word, reply in cases:
            with self.subTest(stage="data", directive=word):
                self.assertEqual(self.transaction(
                    client, b"a@example.com", [b"data-%s=b@example.com" % word]), reply)
        mail = [(b"fail", b"553 5.1.7 Sender address rejected\r\n"),
                (b"defer", b"451 4.1.7 Sender address temporarily rejected\r\n"),
                (b"552", bounce(552)),
                (b"530", b"530 5.0.0 Failure requested by address\r\n")]
        for word, reply in mail:
            with self.subTest(stage="mail", directive=word):
                self.assertEqual(client.cmd(b"MAIL FROM:<%s=a@example.com>" % word), reply)
        # the sender's data- directives use the 4.7 RCPT texts too
        self.assertEqual(self.transaction(client, b"data-fail=a@example.com",
                                          [b"b@example.com"]),
                         b"550 5.1.1 Recipient address rejected\r\n")
        self.assertEqual(self.faults(), 2 * len(cases) + len(mail) + 1)

    def test_drop_at_rcpt_closes_without_reply(self):
        client = self.session()
        client.cmd(b"MAIL FROM:<a@example.com>")
        client.send(b"RCPT TO:<drop=b@example.com>\r\n")
        self.assertEqual(client.line(), b"")
        client = self.session()
        client.send(b"MAIL FROM:<drop=a@example.com>\r\n")
        self.assertEqual(client.line(), b"")
        self.assertEqual(self.faults(), 2)

    def test_drop_keeps_earlier_pipelined_replies(self):
        # 4.6: nothing pipelined before the dropped command is lost
        client = self.session()
        client.send(b"NOOP\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<drop=b@example.com>\r\n")
        self.assertEqual(client.line(), b"250 2.0.0 OK\r\n")
        self.assertEqual(client.line(), b"250 2.1.0 OK\r\n")
        self.assertEqual(client.line(), b"")
        client = self.session()
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<data-drop=b@example.com>\r\n"
                    b"BDAT 5\r\nhelloBDAT 2 LAST\r\n\r\n")
        self.assertEqual(client.line(), b"250 2.1.0 OK\r\n")
        self.assertEqual(client.line(), b"250 2.1.5 OK\r\n")
        self.assertEqual(client.line(), b"250 2.0.0 5 octets received\r\n")
        self.assertEqual(client.line(), b"")

    def test_data_drop_reads_the_message_then_closes(self):
        client = self.session()
        client.cmd(b"MAIL FROM:<a@example.com>")
        self.assertEqual(client.cmd(b"RCPT TO:<data-drop=b@example.com>"), b"250 2.1.5 OK\r\n")
        self.assertEqual(client.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        body = MESSAGE + b"line\r\n" * 20000       # 120 KB: more than one read
        client.send(body + b".\r\n")
        self.assertEqual(client.line(), b"")         # no reply, and no reset either
        envelope = self.server.wait_for(1)[0]
        self.assertEqual(envelope.data, body)
        self.assertIsNone(envelope.reply)
        self.assertEqual(envelope.size, len(body))
        self.assertEqual(self.faults(), 1)

    def test_sender_data_directive_acts_before_the_recipients(self):
        client = self.session()
        sender, rcpts = b"data-552x1=a@example.com", [b"data-451x1=b@example.com"]
        self.assertEqual(self.transaction(client, sender, rcpts), bounce(552))
        # the recipient's directive was not evaluated, so not counted: now it acts
        self.assertEqual(self.transaction(client, sender, rcpts), bounce(451))
        self.assertRegex(self.transaction(client, sender, rcpts), QUEUED)
        # recipients in order; the first that decides ends it
        rcpts = [b"b@example.com", b"data-450=c@example.com", b"data-553=d@example.com"]
        self.assertEqual(self.transaction(client, b"a@example.com", rcpts), bounce(450))
        self.assertEqual(self.faults(), 3)

    def test_lookalike_directive_is_an_ordinary_address(self):
        client = self.session()
        client.cmd(b"MAIL FROM:<a@example.com>")
        self.assertEqual(client.cmd("RCPT TO:<fa\u0131l=b@example.com>".encode()),
                         b"250 2.1.5 OK\r\n")
        self.assertEqual(client.cmd(b"NOOP"), b"250 2.0.0 OK\r\n")

    def test_ordinary_addresses_are_accepted(self):
        client = self.session()
        for address in (b"a=b@example.com", b"999=c@example.com", b"250=c@example.com",
                        b"x0=c@example.com", b"452x0=c@example.com", b"fail@example.com"):
            with self.subTest(address=address):
                self.assertRegex(self.transaction(client, address, [address]), QUEUED)
        self.assertEqual(self.faults(), 0)

    def test_counters_in_stats_and_metrics(self):
        client = self.session()
        client.cmd(b"MAIL FROM:<fail=a@example.com>")
        client.cmd(b"MAIL FROM:<a@example.com>")
        client.cmd(b"RCPT TO:<defer=b@example.com>")
        stats = self.server.stats
        self.assertEqual({k: stats["faults_" + k] for k in blackhole.FAULT_KINDS},
                         {"directive": 2, "greylist": 0, "rate_limit": 0,
                          "connections_per_ip": 0})
        text = blackhole.metrics_text(stats)
        self.assertIn('\nblackhole_faults_total{kind="directive"} 2\n', text)
        self.assertIn('\nblackhole_faults_total{kind="greylist"} 0\n', text)


# ###########################################################################
# Greylisting (10.2)
# ###########################################################################

class Clock:
    """A monotonic clock that tests move by hand."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class GreylistTest(unittest.TestCase):

    A = ("127.0.0.1", "a@example.com", "b@example.com")
    B = ("127.0.0.1", "a@example.com", "c@example.com")

    def test_periods(self):
        day = 24 * 3600
        # (clock, triple, greylisted?): one table, read top to bottom
        steps = [
            (0, self.A, True),          # first attempt
            (10, self.A, True),         # retries inside the period...
            (59.9, self.A, True),
            (30, self.B, True),         # another triple has its own period
            (60, self.A, False),        # ...do not restart it: accepted at 60
            (61, self.A, False),
            (89.9, self.B, True),
            (90, self.B, False),
            (60 + day, self.A, False),  # accepted for 24 h from the first pass
            (60.5 + day, self.A, True),  # then greylisted afresh
            (120 + day, self.A, True),
            (120.5 + day, self.A, False),
        ]
        clock = Clock(0)
        greylist = blackhole.Greylist(60, clock=clock)
        for now, triple, greylisted in steps:
            with self.subTest(now=now, triple=triple):
                clock.now = now
                self.assertEqual(bool(greylist.check(triple)), greylisted)

    def test_sub_second_period_uses_the_clock(self):
        clock = Clock()
        greylist = blackhole.Greylist(1, clock=clock)
        self.assertTrue(greylist.check(self.A))
        clock.now += 0.999
        self.assertTrue(greylist.check(self.A))
        clock.now += 0.001
        self.assertFalse(greylist.check(self.A))

    def test_oldest_dropped_first(self):
        clock = Clock()
        greylist = blackhole.Greylist(60, clock=clock)
        greylist.max_triples = 3
        triples = [("127.0.0.1", "a@example.com", "%d@example.com" % i) for i in range(4)]
        for triple in triples:
            greylist.check(triple)
            clock.now += 1
        self.assertEqual(len(greylist), 3)
        clock.now += 60
        self.assertTrue(greylist.check(triples[0]))     # forgotten: starts again
        self.assertFalse(greylist.check(triples[3]))    # remembered: passes

class GreylistServerTest(Session, ServerTestCase):

    options = {"greylist": 1}
    greylisted = b"451 4.7.1 Greylisted, try again in 1 seconds\r\n"

    def test_first_attempt_refused(self):
        client = self.session()
        client.cmd(b"MAIL FROM:<a@example.com>")
        self.assertEqual(client.cmd(b"RCPT TO:<b@example.com>"), self.greylisted)
        self.assertEqual(client.cmd(b"RCPT TO:<b@example.com>"), self.greylisted)
        # a greylisted RCPT is a refused recipient (4.7)
        self.assertEqual(client.cmd(b"DATA"), b"554 5.5.1 No valid recipients\r\n")
        # address directives come first
        self.assertEqual(client.cmd(b"RCPT TO:<fail=b@example.com>"),
                         b"550 5.1.1 Recipient address rejected\r\n")
        self.assertEqual(self.server.stats["faults_greylist"], 2)
        self.assertEqual(self.server.stats["faults_directive"], 1)

    def test_listener_flag_overrides(self):
        server = self.start_server(
            greylist=1, listen="127.0.0.1:0 greylist=5, 127.0.0.1:0 greylist=0, 127.0.0.1:0")
        replies = []
        for address in server.addresses:
            client = self.raw(address=address)
            client.cmd(b"MAIL FROM:<a@example.com>")
            replies.append(client.cmd(b"RCPT TO:<b@example.com>"))
        self.assertEqual(replies, [b"451 4.7.1 Greylisted, try again in 5 seconds\r\n",
                                   b"250 2.1.5 OK\r\n",
                                   b"451 4.7.1 Greylisted, try again in 1 seconds\r\n"])


# ###########################################################################
# The tests that wait about a second, overlapped
# ###########################################################################

class Background(threading.Thread):
    """Runs fn() in a thread; result() joins it and returns or re-raises."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.value, self.error = fn, args, None, None

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as exc:       # re-raised in the test's thread
            self.error = exc

    def result(self):
        self.join(TIMEOUT)
        if self.is_alive():
            raise AssertionError("%s still running" % self.fn.__name__)
        if self.error is not None:
            raise self.error
        return self.value


class WaitsTest(unittest.TestCase):
    """Delays and a greylist period: setUpClass starts every wait in a
    thread, so they overlap one another and the CPU-bound test that runs
    first (test_bounded...); each test joins its own and checks it."""

    greylisted = b"451 4.7.1 Greylisted, try again in 1 seconds\r\n"

    @classmethod
    def setUpClass(cls):
        cls.delay_server = cls.start_server(capture=1)
        cls.greylist_server = cls.start_server(greylist=1, capture=1)
        cls.delays = cls.start(cls.delayed_replies)
        cls.greylisting = cls.start(cls.greylist_retries)

    @classmethod
    def start_server(cls, **options):
        server = blackhole.Server(hostname=HOST, **options).start()
        cls.addClassCleanup(server.stop)
        return server

    @classmethod
    def client(cls, server):
        client = RawClient(server.address)
        cls.addClassCleanup(client.close)
        if client.line() != b"220 bh.test ESMTP\r\n" or \
                not client.cmd(b"EHLO localhost").startswith(b"250-"):
            raise AssertionError("no greeting")
        return client

    @classmethod
    def start(cls, fn):
        thread = Background(fn)
        thread.start()
        cls.addClassCleanup(thread.join)
        return thread

    # (commands before, the delayed command, its reply; None: queued)
    DELAYS = [
        ([], b"MAIL FROM:<delay-1=a@example.com>", b"250 2.1.0 OK\r\n"),
        ([b"MAIL FROM:<a@example.com>"], b"RCPT TO:<delay-1=b@example.com>",
         b"250 2.1.5 OK\r\n"),
        ([b"MAIL FROM:<a@example.com>"], b"RCPT TO:<delay-1.451=b@example.com>",
         bounce(451)),
        ([b"MAIL FROM:<a@example.com>", b"RCPT TO:<data-delay-1=b@example.com>", b"DATA"],
         MESSAGE + b".", None),
    ]

    @classmethod
    def delayed_replies(cls):
        """Send each delayed command on its own session, then read the
        replies: [(reply, seconds it took)]."""
        ready = []
        for before, command, _ in cls.DELAYS:
            client = cls.client(cls.delay_server)
            for line in before:
                client.cmd(line)
            ready.append((client, command))
        started = []        # every session is set up: the delays start together
        for client, command in ready:
            started.append((client, time.monotonic()))
            client.send(command + b"\r\n")
        return [(client.reply(), time.monotonic() - start) for client, start in started]

    @classmethod
    def greylist_retries(cls):
        """RCPT until accepted: (replies, seconds from the first)."""
        client = cls.client(cls.greylist_server)
        client.cmd(b"MAIL FROM:<a@example.com>")
        start = time.monotonic()
        replies = []

        def retry():
            replies.append(client.cmd(b"RCPT TO:<b@example.com>"))
            return replies[-1] != cls.greylisted

        wait_until(retry, message="the greylisted triple to pass")
        elapsed = time.monotonic() - start
        replies.append(client.cmd(b"RCPT TO:<c@example.com>"))  # another triple
        client.cmd(b"DATA")
        client.send(MESSAGE + b".\r\n")
        replies.append(client.reply())
        return replies, elapsed

    def test_bounded_greylist_memory(self):
        clock = Clock()
        greylist = blackhole.Greylist(1, clock=clock)
        check = greylist.check
        for i in range(200000):
            check(("192.0.2.1", "a@example.com", i))
        self.assertEqual(len(greylist), greylist.max_triples)
        self.assertEqual(greylist.max_triples, 100000)
        clock.now += 2
        self.assertFalse(check(("192.0.2.1", "a@example.com", 199999)))
        self.assertTrue(check(("192.0.2.1", "a@example.com", 0)))

    def test_delays(self):
        for (got, elapsed), (_, command, reply) in zip(self.delays.result(), self.DELAYS):
            with self.subTest(command=command):
                if reply is None:
                    self.assertRegex(got, QUEUED)
                else:
                    self.assertEqual(got, reply)
                self.assertGreaterEqual(elapsed, 0.9)
                self.assertLess(elapsed, 1.9)
        self.assertEqual(self.delay_server.stats["faults_directive"], 1)  # delays are not

    def test_greylist_retry_after_the_period_accepted(self):
        replies, elapsed = self.greylisting.result()
        self.assertGreaterEqual(elapsed, 1.0)
        self.assertGreater(len(replies), 4)
        # retries inside the period are refused and do not restart it
        self.assertEqual(set(replies[:-3]), {self.greylisted})
        self.assertEqual(replies[-3:-1], [b"250 2.1.5 OK\r\n", self.greylisted])
        self.assertRegex(replies[-1], QUEUED)
        self.assertEqual(self.greylist_server.messages[0].rcpt_tos, ["b@example.com"])
        self.assertEqual(self.greylist_server.stats["faults_greylist"], len(replies) - 2)


# ###########################################################################
# Backpressure (10.3)
# ###########################################################################

class DelaySumTest(ServerTestCase):
    """Delays add up, left to right and over addresses, at most 60 s in all
    (10.1). _wait records the seconds instead of sleeping."""

    options = {"capture": 1}

    def setUp(self):
        self.waits = []
        patcher = mock.patch.object(blackhole.SMTPHandler, "_wait",
                                    lambda handler, seconds: self.waits.append(seconds))
        patcher.start()
        self.addCleanup(patcher.stop)
        super().setUp()

    def test_delays_add_up_to_sixty(self):
        client = self.raw()
        client.cmd(b"EHLO localhost")
        for command, reply in (
                (b"MAIL FROM:<delay-2.delay-3.data-delay-40=a@example.com>", b"250 2.1.0 OK"),
                (b"RCPT TO:<data-delay-30=b@example.com>", b"250 2.1.5 OK"),
                (b"RCPT TO:<delay-40.delay-30=c@example.com>", b"250 2.1.5 OK"),
                (b"DATA", b"354 End data with <CR><LF>.<CR><LF>"),
                (b"Subject: x\r\n\r\nhi\r\n.", b"250 2.0.0 OK: queued as ")):
            with self.subTest(command=command):
                self.assertTrue(client.cmd(command).startswith(reply))
        self.assertEqual([w for w in self.waits if w], [5, 60, 60])


class TokenBucketTest(unittest.TestCase):

    def run_steps(self, bucket, clock, steps):
        for now, key, expected in steps:
            with self.subTest(now=now, key=key):
                clock.now = now
                self.assertEqual(bucket.take(key), expected)

    def test_five_per_second(self):
        clock = Clock(0)
        bucket = blackhole.TokenBucket(5, 1, clock=clock)
        steps = [(0, "a", True)] * 5 + [
            (0, "a", False),            # the 6th in the same second
            (0, "b", True),             # another address has its own bucket
            (0.1, "a", False),          # half a token
            (0.2, "a", True),           # refills continuously
            (0.2, "a", False),
            (0.3, "a", False),          # a refused take takes nothing...
            (0.4, "a", True),           # ...so the token is there at 0.4
        ] + [(10, "a", True)] * 5 + [
            (10, "a", False),           # never more than N tokens
        ]
        self.run_steps(bucket, clock, steps)

    def test_fractional_seconds(self):
        clock = Clock(0)
        bucket = blackhole.TokenBucket(2, 0.5, clock=clock)
        steps = [(0, "a", True), (0, "a", True), (0, "a", False),
                 (0.2, "a", False), (0.25, "a", True), (0.25, "a", False),
                 (1.0, "a", True), (1.0, "a", True), (1.0, "a", False)]
        self.run_steps(bucket, clock, steps)

    def test_table_is_bounded(self):
        clock = Clock(0)
        bucket = blackhole.TokenBucket(1, 60, clock=clock)
        bucket.max_keys = 2
        self.assertTrue(bucket.take("a"))
        self.assertTrue(bucket.take("b"))
        self.assertTrue(bucket.take("c"))       # "a" is dropped: it starts full
        self.assertFalse(bucket.take("c"))
        self.assertTrue(bucket.take("a"))


class RateLimitTest(Session, ServerTestCase):

    options = {"rate_limit": "5/1"}

    def test_sixth_message_in_a_second_refused_then_flows(self):
        client = self.session()
        start = time.monotonic()
        client.send(b"MAIL FROM:<a@example.com>\r\n" * 6)
        replies = [client.reply() for _ in range(6)]
        limited = b"451 4.7.1 Rate limit exceeded, try again later\r\n"
        self.assertEqual(replies, [b"250 2.1.0 OK\r\n"] * 5 + [limited])
        self.assertEqual(client.cmd(b"NOOP"), b"250 2.0.0 OK\r\n")   # still open
        self.assertEqual(self.server.stats["faults_rate_limit"], 1)
        # per client address, not per session
        other = self.session()
        self.assertEqual(other.cmd(b"MAIL FROM:<b@example.com>"), limited)
        self.assertEqual(self.server.stats["faults_rate_limit"], 2)
        wait_until(lambda: client.cmd(b"MAIL FROM:<a@example.com>") == b"250 2.1.0 OK\r\n",
                   message="a token")
        self.assertGreaterEqual(time.monotonic() - start, 0.15)
        self.assertEqual(client.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 OK\r\n")
        self.assertEqual(client.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        client.send(MESSAGE + b".\r\n")
        self.assertRegex(client.reply(), QUEUED)

    def test_refused_address_not_counted_for_directives(self):
        client = self.session()
        client.send(b"MAIL FROM:<a@example.com>\r\n" * 5)
        for _ in range(5):
            client.reply()
        self.assertEqual(client.cmd(b"MAIL FROM:<452x1=a@example.com>"),
                         b"451 4.7.1 Rate limit exceeded, try again later\r\n")
        self.assertEqual(self.server.stats["faults_directive"], 0)


class ConnectionsPerIpTest(ServerTestCase):

    options = {"max_connections_per_ip": 3}

    def test_fourth_session_refused_first_three_served(self):
        clients = [self.raw() for _ in range(3)]
        fourth = self.raw(greeting=False)
        self.assertEqual(fourth.line(),
                         b"421 4.7.0 bh.test Too many connections from your address\r\n")
        self.assertTrue(fourth.closed())
        for client in clients:
            self.assertEqual(client.cmd(b"NOOP"), b"250 2.0.0 OK\r\n")
        stats = self.server.stats
        self.assertEqual(stats["faults_connections_per_ip"], 1)
        self.assertEqual(stats["connections_total"], 4)
        self.assertEqual(stats["connections_active"], 3)
        self.assertEqual(clients[0].cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
        self.assertEqual(self.server.stats["connections_active"], 2)   # before the 221
        self.raw()                                      # the slot is free again

    def test_a_client_that_read_221_may_connect_again_at_once(self):
        """The slot is free before the 221 is written, however long the
        session's thread then takes to end."""
        server = self.start_server(max_connections_per_ip=1)
        finish, go_on = blackhole.SMTPHandler.finish, threading.Event()
        self.addCleanup(go_on.set)

        def held_finish(handler):
            go_on.wait(TIMEOUT)
            finish(handler)
        with mock.patch.object(blackhole.SMTPHandler, "finish", held_finish):
            client = self.raw(server)
            self.assertEqual(client.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
            self.assertEqual(server.stats["connections_active"], 0)
            self.assertEqual(self.raw(server).cmd(b"NOOP"), b"250 2.0.0 OK\r\n")
            go_on.set()
        self.assertEqual(server.stats["faults_connections_per_ip"], 0)

    def test_max_connections_checked_first(self):
        server = self.start_server(max_connections=2, max_connections_per_ip=2)
        for _ in range(2):
            self.raw(server)
        third = self.raw(server, greeting=False)
        self.assertEqual(third.line(),
                         b"421 4.7.0 bh.test Too many connections, try again later\r\n")
        self.assertEqual(server.stats["faults_connections_per_ip"], 0)


class MaxConnectionsTest(ServerTestCase):

    options = {"max_connections": 2}

    def test_third_session_refused_at_once_until_one_leaves(self):
        first, second = self.raw(), self.raw()
        third = self.raw(greeting=False)
        self.assertEqual(third.line(),
                         b"421 4.7.0 bh.test Too many connections, try again later\r\n")
        self.assertTrue(third.closed())
        self.assertEqual(self.server.stats["connections_total"], 3)   # still counted
        self.assertEqual(second.cmd(b"NOOP"), b"250 2.0.0 OK\r\n")
        self.assertEqual(first.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
        self.assertEqual(self.server.stats["connections_active"], 1)
        self.assertEqual(self.raw().cmd(b"NOOP"), b"250 2.0.0 OK\r\n")


# ###########################################################################
# Reproducible randomness (10.4)
# ###########################################################################

class SeedTest(ServerTestCase):

    options = None      # each run starts its own server
    threads, per_thread = 20, 10

    def run_batch(self, **options):
        """200 messages from 20 threads: {(sender, recipient, seq): code}."""
        server = self.start_server(mode="random", **options)
        results, errors = {}, []

        def send(n):
            sender = "s%d@example.com" % n
            seq = collections.Counter()
            try:
                with smtplib.SMTP(*server.address, local_hostname="localhost",
                                  timeout=TIMEOUT) as client:
                    for i in range(self.per_thread):
                        rcpt = "r%d@example.com" % (i % 3)
                        client.mail(sender)
                        client.rcpt(rcpt)
                        code, _ = client.data(MESSAGE)
                        results[sender, rcpt, seq[rcpt]] = code
                        seq[rcpt] += 1
            except Exception as exc:      # reported by the test thread
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(n,)) for n in range(self.threads)]
        for thread in threads:
            thread.start()
            self.addCleanup(thread.join)
        for thread in threads:
            thread.join(TIMEOUT)
        server.stop()
        self.assertEqual(errors, [])
        self.assertEqual(len(results), self.threads * self.per_thread)
        return results

    def test_same_seed_same_fates(self):
        first = self.run_batch(seed=42)
        second = self.run_batch(seed=42)
        self.assertEqual(first, second)
        self.assertGreater(len(set(first.values())), 5)     # really random mode
        # the sequence counts: one pair's messages do not all share one fate
        fates = collections.defaultdict(set)
        for (sender, rcpt, _), code in first.items():
            fates[sender, rcpt].add(code)
        self.assertGreater(max(len(codes) for codes in fates.values()), 1)
        self.assertNotEqual(first, self.run_batch(seed=43))

    def test_without_seed_fates_differ(self):
        self.assertNotEqual(self.run_batch(), self.run_batch())


class GreylistTripleTest(ServerTestCase):
    """10.2: the triple is (client IP, sender, recipient): a passed
    recipient is greylisted afresh for another sender."""

    options = {"greylist": 60}

    def test_another_sender_starts_its_own_period(self):
        clock = Clock()
        self.server.shared.greylist_for(60).clock = clock
        raw = self.raw()
        greylisted = b"451 4.7.1 Greylisted, try again in 60 seconds\r\n"
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com>"), b"250 2.1.0 OK\r\n")
        self.assertEqual(raw.cmd(b"RCPT TO:<b@example.com>"), greylisted)
        clock.now += 60
        self.assertEqual(raw.cmd(b"RCPT TO:<b@example.com>"), b"250 2.1.5 OK\r\n")
        self.assertEqual(raw.cmd(b"RSET"), OK)
        self.assertEqual(raw.cmd(b"MAIL FROM:<c@example.com>"), b"250 2.1.0 OK\r\n")
        self.assertEqual(raw.cmd(b"RCPT TO:<b@example.com>"), greylisted)


class SeedRecipientsTest(Session, ServerTestCase):
    """10.4: fates depend on the recipients too: one sender's first message
    to each of 30 recipients does not get one fate 30 times."""

    options = {"mode": "random", "seed": 7}

    def test_recipients_choose(self):
        client = self.session()
        replies = set()
        for number in range(30):
            reply = self.transaction(client, b"a@example.com", [b"r%d@example.com" % number])
            replies.add(reply[:3])
        self.assertGreater(len(replies), 1, replies)


class SeedTooBigTest(ServerTestCase):
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


if __name__ == "__main__":
    unittest.main()
