"""The SMTP session (SPEC section 4): every reply as exact bytes.

smtplib drives the happy paths; raw sockets drive pipelining, BDAT,
smuggling and malformed input.
"""

import base64
import random
import re
import smtplib
import socket
import threading
import time
import unittest
from unittest import mock

import blackhole
from tests.support import (CERT, GO_AHEAD, HOST, KEY, MAIL_OK, OK, QUEUED, RCPT_OK,
                           SHUTTING_DOWN, TIMEOUT, RawClient, ServerTestCase, stuff,
                           wait_until)

TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
UNKNOWN = b"502 5.5.2 Command not recognised\r\n"
NO_VALID = b"554 5.5.1 No valid recipients\r\n"
BAD_SEQUENCE = b"503 5.5.1 Bad sequence of commands\r\n"
EHLO_REPLY = (
    b"250-bh.test\r\n250-PIPELINING\r\n250-SIZE %d\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250-CHUNKING\r\n250-HELP\r\n250-VRFY\r\n"
    b"250-EXPN\r\n250-ETRN\r\n250%sAUTH CRAM-MD5 LOGIN PLAIN\r\n")
VERBS = b"AUTH BDAT DATA EHLO ETRN EXPN HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"
BOUNCE_REPLIES = {
    b"450 4.2.1 Requested mail action not taken: mailbox unavailable\r\n",
    b"451 4.3.0 Requested action aborted: local error in processing\r\n",
    b"452 4.3.1 Requested action not taken: insufficient system storage\r\n",
    b"458 4.3.0 Unable to queue message\r\n",
    b"521 5.3.2 Machine does not accept mail\r\n",
    b"550 5.1.1 Requested action not taken: mailbox unavailable\r\n",
    b"551 5.1.6 User not local\r\n",
    b"552 5.2.2 Requested mail action aborted: exceeded storage allocation\r\n",
    b"553 5.1.3 Requested action not taken: mailbox name not allowed\r\n",
    b"571 5.7.1 Blocked\r\n",
}
MESSAGE = b"From: a@example.com\r\nSubject: test\r\n\r\nhello\r\n"


def ehlo_reply(size=512000, starttls=False):
    if starttls:
        return (EHLO_REPLY % (size, b"-")) + b"250 STARTTLS\r\n"
    return EHLO_REPLY % (size, b" ")


def transaction(raw, content=MESSAGE, sender=b"<a@example.com>",
                rcpts=(b"<b@example.com>",)):
    """MAIL, RCPT, DATA, content, dot; returns the reply to the data."""
    steps = [(b"MAIL FROM:" + sender, MAIL_OK)] if sender is not None else []
    steps += [(b"RCPT TO:" + rcpt, RCPT_OK) for rcpt in rcpts] + [(b"DATA", GO_AHEAD)]
    for command, expected in steps:
        reply = raw.cmd(command)
        if reply != expected:
            raise AssertionError("%r got %r, not %r" % (command, reply, expected))
    raw.send(content + b".\r\n")
    return raw.reply()


class RepliesTest(ServerTestCase):
    """Section 4.1 in the default (permissive, accept) configuration."""

    options = {"capture": 20}

    def test_greeting_and_helo(self):
        raw = self.raw()        # checks 220 bh.test ESMTP
        self.assertEqual(raw.cmd(b"HELO client.example"), b"250 bh.test\r\n")
        self.assertEqual(raw.cmd(b"helo client.example"), b"250 bh.test\r\n")

    def test_ehlo_lists_every_extension_without_starttls(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"EHLO client.example"), ehlo_reply())
        self.assertEqual(raw.cmd(b"ehlo client.example"), ehlo_reply())
        server = self.start_server(max_message_size=1000)
        self.assertEqual(self.raw(server).cmd(b"EHLO x"), ehlo_reply(1000))

    def test_ehlo_and_help_offer_starttls_with_a_certificate(self):
        server = self.start_server(tls_cert=CERT, tls_key=KEY)
        raw = self.raw(server)
        self.assertEqual(raw.cmd(b"EHLO x"), ehlo_reply(starttls=True))
        self.assertEqual(raw.cmd(b"HELP"), b"250 Supported commands: AUTH BDAT DATA EHLO "
                         b"ETRN EXPN HELO HELP MAIL NOOP QUIT RCPT RSET STARTTLS VRFY\r\n")

    def test_smtplib_happy_path(self):
        with self.smtp() as client:
            code, lines = client.ehlo()
            self.assertEqual(code, 250)
            self.assertTrue(client.has_extn("pipelining"))
            self.assertEqual(client.esmtp_features["size"], "512000")
            refused = client.sendmail("a@example.com", ["b@example.com", "c@example.com"],
                                      MESSAGE)
            self.assertEqual(refused, {})
        env, = self.server.wait_for(1)
        self.assertEqual(env.mail_from, "a@example.com")
        self.assertEqual(env.rcpt_tos, ["b@example.com", "c@example.com"])
        self.assertEqual(env.data, MESSAGE)
        self.assertEqual(env.helo, "localhost")

    def test_mail_forms(self):
        raw = self.raw()
        for command in (b"MAIL FROM:<>", b"MAIL FROM:<a@example.com>",
                        b"mail from:<a@example.com>", b"MAIL FROM: <a@example.com>",
                        b"MAIL FROM:a@example.com", b"MAIL FROM: a@example.com SIZE=10",
                        b"MAIL FROM:<a@example.com> SIZE=512000",
                        b"MAIL FROM:<a@example.com> BODY=7BIT",
                        b"MAIL FROM:<a@example.com> BODY=8BITMIME SMTPUTF8",
                        b"MAIL FROM:<a@example.com> BODY=BINARYMIME",
                        b"MAIL FROM:<a@example.com> RET=HDRS ENVID=QQ314159 AUTH=<>",
                        b"MAIL FROM:<a\xc3\xa9@example.com> SMTPUTF8",
                        b"MAIL FROM:<\xff\xfe@example.com>"):
            with self.subTest(command=command):
                self.assertEqual(raw.cmd(command), MAIL_OK)

    def test_mail_size_above_maximum(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com> SIZE=512001"), TOO_BIG)
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com> size=99999999999"), TOO_BIG)
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com> SIZE=512000"), MAIL_OK)

    def test_mail_without_argument(self):
        raw = self.raw()
        for command in (b"MAIL", b"MAIL FROM:", b"MAIL TO:<a@example.com>"):
            with self.subTest(command=command):
                self.assertEqual(raw.cmd(command),
                                 b"501 5.5.4 Syntax: MAIL FROM: <address>\r\n")

    def test_rcpt_forms(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com>"), MAIL_OK)
        for command in (b"RCPT TO:<b@example.com>", b"rcpt to:<b@example.com>",
                        b"RCPT TO: <b@example.com>", b"RCPT TO:b@example.com",
                        b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE "
                        b"ORCPT=rfc822;b@example.com", b"RCPT TO:<b@example.com> NOTIFY=NEVER"):
            with self.subTest(command=command):
                self.assertEqual(raw.cmd(command), RCPT_OK)
        self.assertEqual(raw.cmd(b"RCPT TO:"), b"501 5.5.4 Syntax: RCPT TO: <address>\r\n")

    def test_data_reply_and_unique_ids(self):
        ids = []
        for _ in range(2):
            raw = self.raw()
            self.assertEqual(raw.cmd(b"EHLO x"), ehlo_reply())
            for _ in range(3):
                match = QUEUED.match(transaction(raw))
                self.assertIsNotNone(match)
                ids.append(match.group(1))
            self.assertEqual(raw.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
            self.assertTrue(raw.closed())
        self.assertEqual(len(set(ids)), 6, ids)
        envs = self.server.wait_for(6)
        self.assertEqual(envs[0].reply, "250 2.0.0 OK: queued as " + ids[0].decode())

    def test_data_without_mail_or_rcpt_is_permitted(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"DATA"), GO_AHEAD)
        raw.send(MESSAGE + b".\r\n")
        self.assertRegex(raw.reply(), QUEUED)
        env, = self.server.wait_for(1)
        self.assertEqual(env.data, MESSAGE)

    def test_rset_helo_and_ehlo_clear_the_transaction(self):
        raw = self.raw()
        for clear, reply in ((b"RSET", OK), (b"HELO x", b"250 bh.test\r\n"),
                             (b"EHLO x", ehlo_reply())):
            self.assertEqual(raw.cmd(b"MAIL FROM:<old@example.com>"), MAIL_OK)
            self.assertEqual(raw.cmd(b"RCPT TO:<old@example.com>"), RCPT_OK)
            self.assertEqual(raw.cmd(clear), reply)
            self.assertRegex(transaction(raw, sender=b"<new@example.com>",
                                         rcpts=(b"<new@example.com>",)), QUEUED)
        for env in self.server.wait_for(3):
            self.assertEqual((env.mail_from, env.rcpt_tos),
                             ("new@example.com", ["new@example.com"]))

    def test_rset_noop_quit_etrn(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"RSET"), OK)
        self.assertEqual(raw.cmd(b"NOOP"), OK)
        self.assertEqual(raw.cmd(b"noop"), OK)
        self.assertEqual(raw.cmd(b"ETRN"), b"250 2.0.0 Queueing started\r\n")
        self.assertEqual(raw.cmd(b"ETRN example.com"), b"250 2.0.0 Queueing started\r\n")
        self.assertEqual(raw.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
        self.assertTrue(raw.closed())
        self.assertEqual(raw.buf, b"")

    def test_help(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"HELP"), b"250 Supported commands: " + VERBS + b"\r\n")
        self.assertEqual(raw.cmd(b"HELP MAIL"), b"250 Syntax: MAIL FROM: <address>\r\n")
        self.assertEqual(raw.cmd(b"help rcpt"), b"250 Syntax: RCPT TO: <address>\r\n")
        self.assertEqual(raw.cmd(b"HELP NOOP"), b"250 Syntax: NOOP\r\n")
        for verb in VERBS.split():
            with self.subTest(verb=verb):
                self.assertTrue(raw.cmd(b"HELP " + verb).startswith(b"250 Syntax: " + verb))
        self.assertEqual(raw.cmd(b"HELP FOO"), b"501 Supported commands: " + VERBS + b"\r\n")
        self.assertEqual(raw.cmd(b"HELP STARTTLS"),
                         b"501 Supported commands: " + VERBS + b"\r\n")

    def test_vrfy(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"VRFY pass=bob@example.com"),
                         b"250 2.0.0 <pass=bob@example.com> OK\r\n")
        self.assertEqual(raw.cmd(b"VRFY <pass=bob@example.com>"),
                         b"250 2.0.0 <pass=bob@example.com> OK\r\n")
        self.assertEqual(raw.cmd(b"VRFY fail=bob@example.com"),
                         b"550 5.7.1 <fail=bob@example.com> unknown\r\n")
        self.assertEqual(raw.cmd(b"VRFY <fail=bob@example.com>"),
                         b"550 5.7.1 <fail=bob@example.com> unknown\r\n")
        self.assertEqual(raw.cmd(b"VRFY bob@example.com"),
                         b"252 2.0.0 Will attempt delivery\r\n")
        self.assertEqual(raw.cmd(b"VRFY"), b"501 5.5.4 Syntax: VRFY <address>\r\n")
        self.assertEqual(raw.cmd(b"VRFY "), b"501 5.5.4 Syntax: VRFY <address>\r\n")
        # a name before the mailbox, and RFC 6531's parameter (curl sends it)
        self.assertEqual(raw.cmd(b"VRFY Bob <pass=bob@example.com>"),
                         b"250 2.0.0 <pass=bob@example.com> OK\r\n")
        self.assertEqual(raw.cmd("VRFY pass=bøb@example.com SMTPUTF8".encode()),
                         "250 2.0.0 <pass=bøb@example.com> OK\r\n".encode())
        self.assertEqual(raw.cmd(b"VRFY SMTPUTF8"), b"252 2.0.0 Will attempt delivery\r\n")

    def expn(self, raw, name):
        reply = raw.cmd(b"EXPN " + name)
        lines = reply.split(b"\r\n")[:-1]
        for i, line in enumerate(lines):
            sep = b" " if i == len(lines) - 1 else b"-"
            self.assertRegex(line, re.compile(
                rb"\A250" + re.escape(sep) + rb"\S[^<>]* <[^<>@\s]+@bh\.test>\Z"))
        return [line[4:] for line in lines]

    def test_expn(self):
        raw = self.raw()
        lists = {name: self.expn(raw, name) for name in (b"list1", b"list2", b"list3")}
        self.assertEqual([len(m) for m in lists.values()], [3, 4, 6])
        union = set().union(*lists.values())
        everyone = self.expn(raw, b"all")
        self.assertEqual(len(everyone), len(union))
        self.assertEqual(set(everyone), union)
        self.assertEqual(self.expn(raw, b"list1 smtputf8"), lists[b"list1"])   # RFC 6531
        for command in (b"EXPN", b"EXPN nope", b"EXPN fail=list1", b"EXPN list4"):
            with self.subTest(command=command):
                self.assertEqual(raw.cmd(command), b"550 5.7.1 Not authorised\r\n")

    def test_unknown_commands_and_empty_lines(self):
        raw = self.raw()
        junk = [b"FOO", b"", b"X-HELO bar", b"\xff\xfe\x00\x80", b"RESET", b"SMTP_HELO",
                b"UNKNOWN", b"    ", b"ehlo\tx"]
        for line in junk:
            with self.subTest(line=line):
                self.assertEqual(raw.cmd(line), UNKNOWN)
        self.assertEqual(raw.cmd(b"NOOP"), OK)     # known verbs still work
        self.assertEqual(raw.cmd(b"BAR"), b"502 5.5.3 Too many unknown commands\r\n")
        self.assertTrue(raw.closed())
        self.assertEqual(raw.buf, b"")

    def test_malformed_input_never_crashes_a_session(self):
        raw = self.raw()
        bdat_syntax = b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"
        cases = [
            (b"MAIL FROM:<a@example.com> SIZE=\xc2\xb2", MAIL_OK),    # "2" not ASCII
            (b"MAIL FROM:<a@example.com> SIZE=\xd9\xa3", MAIL_OK),
            (b"MAIL FROM:<a@example.com> SIZE=-1 BODY =", MAIL_OK),
            (b"MAIL FROM:<\xed\xa0\x80@example.com>", MAIL_OK),
            (b"RCPT TO:<<b@example.com>>", RCPT_OK),
            (b"BDAT \xc2\xb2", bdat_syntax),
            (b"BDAT \xd9\xa3 LAST", bdat_syntax),
            (b"BDAT -1", bdat_syntax),
            (b"BDAT 1 LAST x", bdat_syntax),
            (b"BDAT 1 FIRST", bdat_syntax),
            (b"HELP \xff\x00", b"501 Supported commands: " + VERBS + b"\r\n"),
            (b"VRFY \xff", b"252 2.0.0 Will attempt delivery\r\n"),
            (b"EXPN \xff", b"550 5.7.1 Not authorised\r\n"),
            (b"HELO \xff", b"250 bh.test\r\n"),
        ]
        for command, reply in cases:
            with self.subTest(command=command):
                self.assertEqual(raw.cmd(command), reply)
        self.assertEqual(raw.cmd(b"NOOP"), OK)

    def test_line_too_long_is_discarded_and_counts_as_unknown(self):
        raw = self.raw()
        raw.send(b"NOOP " + b"x" * 13000 + b"\r\n")
        self.assertEqual(raw.reply(), b"500 5.5.2 Line too long\r\n")
        self.assertEqual(raw.cmd(b"NOOP"), OK)     # the excess was not taken as commands
        raw.send(b"MAIL FROM:<a@example.com>" + b" " * 20000 + b"RCPT TO:<b>\r\n")
        self.assertEqual(raw.reply(), b"500 5.5.2 Line too long\r\n")
        self.assertEqual(raw.cmd(b"NOOP " + b"x" * 600), OK)   # permissive: 512 is no limit
        for _ in range(7):
            self.assertEqual(raw.cmd(b"FOO"), UNKNOWN)
        raw.send(b"x" * 13000 + b"\r\n")
        self.assertEqual(raw.reply(), b"502 5.5.3 Too many unknown commands\r\n")
        self.assertTrue(raw.closed())

    def assert_unstuffed(self, content):
        """Send content dot-stuffed; the server keeps it as it was."""
        self.assertRegex(transaction(self.raw(), stuff(content)), QUEUED)
        env, = self.server.wait_for(1)
        self.assertEqual(env.data, content)
        self.assertEqual(env.size, len(content))

    def test_dot_unstuffing_and_size(self):
        content = (b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nmiddle . dot\r\n"
                   b"...three\r\n.\r\nend\r\n")
        self.assert_unstuffed(content)
        self.assertEqual(self.server.stats["bytes_received"], len(content))

    def test_dot_unstuffing_after_many_inner_dots(self):
        # more dots inside lines than the reader hops over before its regex
        self.assert_unstuffed(b"Message-Id: <a.b.c.d.e.f@example.com>\r\n\r\nv1.2.3.4.5\r\n"
                              b".stuffed\r\nx.y.z.w\r\n..\r\nend.\r\n")

    def test_smuggling_lf_dot_crlf_is_data(self):
        smuggled = (b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\n"
                    b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n")
        for tail in (b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.x\r\n"):
            with self.subTest(tail=tail):
                self.server.messages.clear()
                raw = self.raw()
                self.assertEqual(raw.cmd(b"EHLO x"), ehlo_reply())
                content = b"Subject: x\r\n\r\nhello" + tail + smuggled
                raw.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
                         + content + b".\r\nNOOP\r\n")
                self.assertEqual(raw.reply(), MAIL_OK)
                self.assertEqual(raw.reply(), RCPT_OK)
                self.assertEqual(raw.reply(), GO_AHEAD)
                self.assertRegex(raw.reply(), QUEUED)
                self.assertEqual(raw.reply(), OK)          # the NOOP, nothing in between
                env, = self.server.wait_for(1)
                self.assertEqual(env.mail_from, "a@example.com")
                self.assertIn(smuggled, env.data)
                self.assertTrue(env.data.endswith(b"evil\r\n"), env.data)
                self.assertEqual(len(self.server.messages), 1)

    def test_data_sent_one_octet_per_write(self):
        raw = self.raw()
        raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        content = b"Subject: x\r\n\r\n.\r\nhello\n.\r\nstill data\r\n.\n..\r\nend\r\n"
        wire = (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
                + stuff(content) + b".\r\nBDAT 5 LAST\r\nab.\r\nNOOP\r\n")
        for i in range(len(wire)):
            raw.send(wire[i:i + 1])
        self.assertEqual(raw.reply() + raw.reply() + raw.reply(),
                         MAIL_OK + RCPT_OK + GO_AHEAD)
        self.assertRegex(raw.reply(), QUEUED)
        self.assertRegex(raw.reply(), QUEUED)
        self.assertEqual(raw.reply(), OK)
        self.assertEqual([env.data for env in self.server.wait_for(2)],
                         [content, b"ab.\r\n"])

    def test_all_lf_client(self):
        raw = self.raw()
        raw.send(b"EHLO x\nMAIL FROM:<a@example.com>\nRCPT TO:<b@example.com>\nDATA\n")
        self.assertEqual(raw.reply(), ehlo_reply())
        self.assertEqual(raw.reply(), MAIL_OK)
        self.assertEqual(raw.reply(), RCPT_OK)
        self.assertEqual(raw.reply(), GO_AHEAD)
        raw.send(b"Subject: lf\n\n..dot\nbody\n.\nNOOP\n")
        self.assertRegex(raw.reply(), QUEUED)
        self.assertEqual(raw.reply(), OK)
        env, = self.server.wait_for(1)
        self.assertEqual(env.data, b"Subject: lf\n\n.dot\nbody\n")
        # An empty message right after DATA, bare LF.
        raw.send(b"DATA\n.\n")
        self.assertEqual(raw.reply(), GO_AHEAD)
        self.assertRegex(raw.reply(), QUEUED)
        self.assertEqual(self.server.wait_for(2)[1].data, b"")

    def test_pipelining_in_one_write(self):
        raw = self.raw()
        raw.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
                 b"RCPT TO:<c@example.com>\r\nDATA\r\n" + MESSAGE + b".\r\n"
                 b"MAIL FROM:<d@example.com>\r\nRCPT TO:<e@example.com>\r\nDATA\r\n"
                 + MESSAGE + b".\r\nQUIT\r\n")
        chunks = []
        while True:
            data = raw.sock.recv(65536)
            if not data:
                break
            chunks.append(data)
        self.assertLessEqual(len(chunks), 2, chunks)
        self.assertRegex(b"".join(chunks), re.compile(
            re.escape(ehlo_reply() + MAIL_OK + RCPT_OK + RCPT_OK + GO_AHEAD)
            + rb"250 2\.0\.0 OK: queued as <[^<>@\s]+@bh\.test>\r\n"
            + re.escape(MAIL_OK + RCPT_OK + GO_AHEAD)
            + rb"250 2\.0\.0 OK: queued as <[^<>@\s]+@bh\.test>\r\n"
            + re.escape(b"221 2.0.0 Goodbye\r\n") + rb"\Z"))
        first, second = self.server.wait_for(2)
        self.assertEqual(first.rcpt_tos, ["b@example.com", "c@example.com"])
        self.assertEqual(second.mail_from, "d@example.com")

    def test_bdat(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"EHLO x"), ehlo_reply())
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com>"), MAIL_OK)
        self.assertEqual(raw.cmd(b"RCPT TO:<b@example.com>"), RCPT_OK)
        raw.send(b"BDAT 16\r\nSubject: x\r\n\r\nhe")
        self.assertEqual(raw.reply(), b"250 2.0.0 16 octets received\r\n")
        raw.send(b"BDAT 0\r\n")
        self.assertEqual(raw.reply(), b"250 2.0.0 0 octets received\r\n")
        raw.send(b"bdat 14 last\r\nllo\r\n.\r\nQUIT\r\n")      # dots and verbs are data
        self.assertRegex(raw.reply(), QUEUED)
        env, = self.server.wait_for(1)
        self.assertEqual(env.data, b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        self.assertEqual(env.size, 30)
        # Pipelined: chunks and commands in one write; BDAT 0 LAST ends a message.
        raw.send(b"MAIL FROM:<c@example.com>\r\nRCPT TO:<d@example.com>\r\n"
                 b"BDAT 5\r\nabcdeBDAT 3 LAST\r\nfghBDAT 0 LAST\r\nNOOP\r\n")
        self.assertEqual(raw.reply(), MAIL_OK)
        self.assertEqual(raw.reply(), RCPT_OK)
        self.assertEqual(raw.reply(), b"250 2.0.0 5 octets received\r\n")
        self.assertRegex(raw.reply(), QUEUED)
        self.assertRegex(raw.reply(), QUEUED)
        self.assertEqual(raw.reply(), OK)
        self.assertEqual([env.data for env in self.server.wait_for(3)[1:]],
                         [b"abcdefgh", b""])
        self.assertEqual(raw.cmd(b"BDAT"), b"501 5.5.4 Syntax: BDAT size [LAST]\r\n")
        self.assertEqual(raw.cmd(b"BDAT x"), b"501 5.5.4 Syntax: BDAT size [LAST]\r\n")

    def test_bdat_after_every_recipient_refused(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com>"), MAIL_OK)
        self.assertEqual(raw.cmd(b"RCPT TO:<fail=b@example.com>"),
                         b"550 5.1.1 Recipient address rejected\r\n")
        raw.send(b"BDAT 12\r\nQUIT\r\nQUIT\r\n")      # read and discarded, never run
        self.assertEqual(raw.reply(), NO_VALID)
        raw.send(b"BDAT 6 LAST\r\nQUIT\r\n")
        self.assertEqual(raw.reply(), NO_VALID)
        self.assertEqual(raw.cmd(b"NOOP"), OK)
        self.assertEqual(len(self.server.messages), 0)

    def test_data_after_recipients_refused_for_any_reason(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com>"), MAIL_OK)
        self.assertEqual(raw.cmd(b"RCPT TO:"), b"501 5.5.4 Syntax: RCPT TO: <address>\r\n")
        self.assertEqual(raw.cmd(b"RCPT TO:<%s@example.com>" % (b"x" * 300)),
                         b"501 5.1.3 Recipient address too long\r\n")
        self.assertEqual(raw.cmd(b"DATA"), NO_VALID)
        self.assertEqual(raw.cmd(b"RCPT TO:<b@example.com>"), RCPT_OK)   # some accepted
        self.assertEqual(raw.cmd(b"DATA"), GO_AHEAD)
        raw.send(MESSAGE + b".\r\n")
        self.assertRegex(raw.reply(), QUEUED)

    def test_size_is_the_unstuffed_content(self):
        content = b"Subject: x\r\n\r\n" + b".dot\r\n" * 10
        server = self.start_server(max_message_size=len(content), capture=5)
        raw = self.raw(server)
        self.assertRegex(transaction(raw, stuff(content)), QUEUED)
        self.assertEqual(transaction(raw, stuff(content + b"x\r\n")), TOO_BIG)
        self.assertEqual(server.stats["bytes_received"], 2 * len(content) + 3)
        self.assertEqual(server.stats["messages_too_big"], 1)
        # BDAT counts the same way.
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com>"), MAIL_OK)
        raw.send(b"BDAT %d LAST\r\n" % (len(content) + 1) + content + b"x")
        self.assertEqual(raw.reply(), TOO_BIG)
        self.assertEqual(raw.cmd(b"NOOP"), OK)
        self.assertEqual(server.stats["messages_too_big"], 2)


class SmallReadsTest(ServerTestCase):
    """Reads of 1 to 3 octets split the data everywhere, the end marker
    included: the same data, replies and pipelined command after it."""

    options = {"capture": 3}

    def test_every_split(self):
        data = b"Subject: x\r\n\r\n..dot\r\n..\r\nx.\r\n"
        for size in (1, 2, 3):
            with self.subTest(read_size=size):
                with mock.patch.object(blackhole.SMTPHandler, "read_size", size):
                    client = self.raw()
                    client.send(b"HELO x\r\nMAIL FROM:<a@example.com>\r\n"
                                b"RCPT TO:<b@example.com>\r\nDATA\r\n" + data +
                                b".\r\nNOOP\r\n")
                    replies = [client.reply() for _ in range(6)]
                self.assertEqual(replies[3], b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.assertRegex(replies[4], QUEUED)
                self.assertEqual(replies[5], b"250 2.0.0 OK\r\n")
                self.assertEqual(self.server.messages[-1].data,
                                 b"Subject: x\r\n\r\n.dot\r\n.\r\nx.\r\n")


def model_data(stream):
    """SPEC 4.2 line by line, after a DATA line ended by CRLF: (content,
    a lone leading dot seen, octets up to and with the end) or None."""
    content, lone, start, crlf = [], False, 0, True
    while True:
        stop = stream.find(b"\n", start) + 1
        if not stop:
            return None
        line = stream[start:stop]
        if (line == b".\r\n" and crlf) or (line == b".\n" and not crlf):
            return b"".join(content), lone, stop
        if line[:1] == b".":
            lone = lone or line[1:2] != b"."
            line = line[1:]
        content.append(line)
        crlf, start = line.endswith(b"\r\n"), stop


class DataModelTest(ServerTestCase):
    """The block reader against model_data: seeded random content of dots,
    CRs and LFs, read in blocks of 1 to 64 octets."""

    options = {"capture": 1, "sender_checks": "count"}
    pieces = (b".", b"..", b"\r", b"\n", b"\r\n", b"x", b"\r\n.", b"\n.", b"\n.\n",
              b"\r\n.\r\n", b"\n.\r\n", b"\r\n.\n", b".x")

    def test_random_content(self):
        rng = random.Random(1)
        for case in range(60):
            body = b"".join(rng.choice(self.pieces) for _ in range(rng.randrange(40)))
            stream = body + b"\r\n.\r\n"
            content, lone, stop = model_data(stream)
            for size in (1, 3, 64):
                with self.subTest(case=case, body=body, read_size=size), \
                        mock.patch.object(blackhole.SMTPHandler, "read_size", size):
                    client = self.raw()
                    client.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n"
                                + stream[:stop] + b"NOOP\r\n")
                    replies = [client.reply() for _ in range(5)]
                    self.assertRegex(replies[3], QUEUED)
                    self.assertEqual(replies[4], OK)    # nothing after the end was lost
                    envelope = self.server.messages[-1]
                    self.assertEqual(envelope.data, content)
                    self.assertEqual("unstuffed_dot" in envelope.issues, lone)
                    client.close()


class LineDotSearchTest(unittest.TestCase):
    """The DATA reader's search for line-leading dots hops with memchr over
    sparse dots and hands dense stretches to a regex: whatever the mix, it
    finds what bytes.find(b"\\n.") finds."""

    def all_hits(self, find, window):
        hits, pos = [], 2
        while True:
            hit = find(window, pos)
            if hit < 0:
                return hits
            hits.append(hit)
            pos = hit + 2

    def test_same_hits_as_bytes_find(self):
        rnd = random.Random(6)
        pieces = [b"Mr. Smith went to Washington. He saw it.\r\n", b"x" * 700 + b".",
                  b"a.b.c.d\r\n", b"\r\n.stuffed\r\n", b"\r\n", b"\n.", b"\r\n..\r\n"]
        weights = [40, 8, 10, 1, 5, 1, 1]
        for _ in range(60):
            window = b"\r\n" + b"".join(rnd.choices(pieces, weights, k=rnd.randrange(1, 800)))
            expected = self.all_hits(lambda w, pos: w.find(b"\n.", pos), window)
            self.assertEqual(self.all_hits(blackhole._find_line_dot, window), expected)

    def test_a_line_dot_at_each_offset_past_a_dense_stretch(self):
        dense = b"\r\n" + b"a.b.c.d.e.f.g.h.i.j\r\n" * 600      # 13 KB, no line dot
        for at in range(blackhole._DOT_STRETCH - 40, blackhole._DOT_STRETCH + 40):
            window = dense[:at] + b"\n." + dense[at:]
            with self.subTest(at=at):
                self.assertEqual(blackhole._find_line_dot(window, 2), window.find(b"\n.", 2))
        self.assertEqual(blackhole._find_line_dot(dense, 2), -1)


class FailureInjectionTest(ServerTestCase):
    """Section 4.7: fail= and defer= at MAIL and RCPT."""

    options = {"capture": 5}

    def test_mail(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"MAIL FROM:<fail=bob@example.com>"),
                         b"553 5.1.7 Sender address rejected\r\n")
        self.assertEqual(raw.cmd(b"MAIL FROM:<defer=bob@example.com>"),
                         b"451 4.1.7 Sender address temporarily rejected\r\n")
        self.assertEqual(raw.cmd(b"MAIL FROM:<FAIL=bob@example.com> SIZE=10"),
                         b"553 5.1.7 Sender address rejected\r\n")
        self.assertEqual(raw.cmd(b"MAIL FROM:<bob.fail=x@example.com>"), MAIL_OK)

    def test_rcpt(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com>"), MAIL_OK)
        self.assertEqual(raw.cmd(b"RCPT TO:<fail=bob@example.com>"),
                         b"550 5.1.1 Recipient address rejected\r\n")
        self.assertEqual(raw.cmd(b"RCPT TO:<defer=bob@example.com> NOTIFY=NEVER"),
                         b"450 4.2.1 Recipient temporarily unavailable\r\n")
        self.assertEqual(raw.cmd(b"DATA"), NO_VALID)
        self.assertEqual(raw.cmd(b"NOOP"), OK)     # DATA refused: no data mode
        self.assertEqual(raw.cmd(b"RCPT TO:<ok@example.com>"), RCPT_OK)
        self.assertEqual(raw.cmd(b"DATA"), GO_AHEAD)
        raw.send(MESSAGE + b".\r\n")
        self.assertRegex(raw.reply(), QUEUED)
        env, = self.server.wait_for(1)
        self.assertEqual(env.rcpt_tos, ["ok@example.com"])

    def test_smtplib_partial_failure(self):
        with self.smtp() as client:
            refused = client.sendmail("a@example.com", ["fail=x@example.com", "b@example.com",
                                                        "defer=y@example.com"], MESSAGE)
            self.assertEqual(refused, {
                "fail=x@example.com": (550, b"5.1.1 Recipient address rejected"),
                "defer=y@example.com": (450, b"4.2.1 Recipient temporarily unavailable")})
            with self.assertRaises(smtplib.SMTPRecipientsRefused):
                client.sendmail("a@example.com", ["fail=x@example.com"], MESSAGE)
            with self.assertRaises(smtplib.SMTPSenderRefused) as caught:
                client.sendmail("fail=a@example.com", ["b@example.com"], MESSAGE)
            self.assertEqual(caught.exception.smtp_code, 553)
        env, = self.server.wait_for(1)
        self.assertEqual(env.rcpt_tos, ["b@example.com"])


class StrictTest(ServerTestCase):
    """Section 4.4 with strict = true."""

    options = {"strict": True, "capture": 5}

    def test_sequence(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com>"), BAD_SEQUENCE)
        self.assertEqual(raw.cmd(b"RCPT TO:<b@example.com>"), BAD_SEQUENCE)
        self.assertEqual(raw.cmd(b"DATA"), BAD_SEQUENCE)
        raw.send(b"BDAT 6 LAST\r\nQUIT\r\n")
        self.assertEqual(raw.reply(), BAD_SEQUENCE)
        self.assertEqual(raw.cmd(b"EHLO x"), ehlo_reply())
        self.assertEqual(raw.cmd(b"RCPT TO:<b@example.com>"), BAD_SEQUENCE)
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com>"), MAIL_OK)
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com>"), BAD_SEQUENCE)
        self.assertEqual(raw.cmd(b"DATA"), BAD_SEQUENCE)
        raw.send(b"BDAT 4\r\nNOOP")
        self.assertEqual(raw.reply(), BAD_SEQUENCE)
        self.assertEqual(raw.cmd(b"RCPT TO:<b@example.com>"), RCPT_OK)
        for clear, reply in ((b"RSET", OK), (b"EHLO x", ehlo_reply()),
                             (b"HELO x", b"250 bh.test\r\n")):
            self.assertEqual(raw.cmd(clear), reply)
            self.assertEqual(raw.cmd(b"DATA"), BAD_SEQUENCE)
            self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com>"), MAIL_OK)
            self.assertEqual(raw.cmd(b"RCPT TO:<b@example.com>"), RCPT_OK)
        self.assertEqual(raw.cmd(b"DATA"), GO_AHEAD)
        raw.send(MESSAGE + b".\r\n")
        self.assertRegex(raw.reply(), QUEUED)
        self.assertEqual(raw.cmd(b"RCPT TO:<b@example.com>"), BAD_SEQUENCE)  # cleared
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com>"), MAIL_OK)

    def test_arguments_and_auth(self):
        """501 for RSET/QUIT arguments, an empty RCPT path and parameter values
        their extension does not allow; AUTH only after EHLO and outside a
        transaction (RFC 4954 4)."""
        raw = self.raw()
        auth = b"AUTH PLAIN " + base64.b64encode(b"\0me\0pw")
        self.assertEqual(raw.cmd(auth), BAD_SEQUENCE)
        self.assertEqual(raw.cmd(b"EHLO x"), ehlo_reply())
        self.assertEqual(raw.cmd(b"RSET x"), b"501 5.5.4 Syntax: RSET\r\n")
        for params in (b"SIZE=abc", b"SIZE", b"BODY=FOO", b"RET=ALL"):
            with self.subTest(params=params):
                self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com> " + params),
                                 b"501 5.5.4 Malformed parameter: %s\r\n" % params.split(b"=")[0])
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com> SIZE=10 BODY=8bitmime RET=HDRS"),
                         MAIL_OK)
        self.assertEqual(raw.cmd(auth), BAD_SEQUENCE)
        self.assertEqual(raw.cmd(b"RCPT TO:<>"), b"501 5.5.4 Syntax: RCPT TO: <address>\r\n")
        self.assertEqual(raw.cmd(b"RSET"), OK)
        self.assertEqual(raw.cmd(auth), b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(raw.cmd(b"QUIT now"), b"501 5.5.4 Syntax: QUIT\r\n")
        self.assertEqual(raw.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")

    def test_binarymime_needs_bdat(self):
        """RFC 3030 3: DATA after BODY=BINARYMIME is a bad sequence."""
        raw = self.raw()
        self.assertEqual(raw.cmd(b"EHLO x"), ehlo_reply())
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com> BODY=binarymime"), MAIL_OK)
        self.assertEqual(raw.cmd(b"RCPT TO:<b@example.com>"), RCPT_OK)
        self.assertEqual(raw.cmd(b"DATA"), BAD_SEQUENCE)
        raw.send(b"BDAT 16 LAST\r\nSubject: x\r\n\r\nhi")
        self.assertRegex(raw.reply(), QUEUED)

    def test_every_refused_recipient_is_not_a_sequence_error(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"HELO x"), b"250 bh.test\r\n")
        self.assertEqual(raw.cmd(b"MAIL FROM:<a@example.com>"), MAIL_OK)
        self.assertEqual(raw.cmd(b"RCPT TO:<fail=b@example.com>"),
                         b"550 5.1.1 Recipient address rejected\r\n")
        self.assertEqual(raw.cmd(b"DATA"), NO_VALID)

    def test_syntax(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"HELO"), b"501 5.5.4 Syntax: HELO domain\r\n")
        self.assertEqual(raw.cmd(b"EHLO"), b"501 5.5.4 Syntax: EHLO domain\r\n")
        self.assertEqual(raw.cmd(b"EHLO x"), ehlo_reply())
        for command in (b"MAIL FROM:", b"MAIL FROM:a@example.com", b"MAIL FROM: <a@example.com>",
                        b"MAIL", b"MAIL FROM <a@example.com>"):
            with self.subTest(command=command):
                self.assertEqual(raw.cmd(command), b"501 5.5.4 Syntax: MAIL FROM: <address>\r\n")
        reply = raw.cmd(b"MAIL FROM:<a@example.com> FOO=BAR")
        self.assertTrue(reply.startswith(b"555 5.5.4 ") and reply.endswith(b"\r\n"), reply)
        self.assertEqual(raw.cmd(b"MAIL FROM:<> BODY=8BITMIME SMTPUTF8 RET=FULL ENVID=x "
                                 b"AUTH=<> SIZE=100"), MAIL_OK)
        for command in (b"RCPT TO:", b"RCPT TO:b@example.com", b"RCPT TO: <b@example.com>"):
            with self.subTest(command=command):
                self.assertEqual(raw.cmd(command), b"501 5.5.4 Syntax: RCPT TO: <address>\r\n")
        reply = raw.cmd(b"RCPT TO:<b@example.com> XFOO")
        self.assertTrue(reply.startswith(b"555 5.5.4 ") and reply.endswith(b"\r\n"), reply)
        self.assertEqual(raw.cmd(b"RCPT TO:<b@example.com> NOTIFY=DELAY ORCPT=rfc822;b@x"),
                         RCPT_OK)

    def test_line_limits(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"NOOP " + b"x" * (512 - 7)), OK)        # 512 with CRLF
        self.assertEqual(raw.cmd(b"NOOP " + b"x" * (512 - 6)), b"500 5.5.2 Line too long\r\n")
        self.assertEqual(raw.cmd(b"NOOP"), OK)
        response = base64.b64encode(b"\0user\0" + b"p" * 3000)
        self.assertTrue(raw.cmd(b"EHLO x").startswith(b"250-"))
        self.assertEqual(raw.cmd(b"AUTH PLAIN " + response),
                         b"235 2.7.0 Authentication successful\r\n")
        raw.send(b"NOOP " + b"x" * 13000 + b"\r\n")
        self.assertEqual(raw.reply(), b"500 5.5.2 Line too long\r\n")
        self.assertEqual(raw.cmd(b"NOOP"), OK)


class ModesTest(ServerTestCase):
    """Section 4.2's modes, and the dynamic switches of 4.3."""

    options = {"mode": "bounce"}

    def send_many(self, raw, count, content=MESSAGE):
        """Pipeline count messages in one write; the replies to their data."""
        one = (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
               + content + b".\r\n")
        raw.send(one * count)
        replies = []
        for _ in range(count):
            self.assertEqual(raw.reply() + raw.reply() + raw.reply(),
                             MAIL_OK + RCPT_OK + GO_AHEAD)
            replies.append(raw.reply())
        return replies

    def test_bounce_replies_come_from_the_table(self):
        replies = self.send_many(self.raw(), 200)
        self.assertLessEqual(set(replies), BOUNCE_REPLIES)
        self.assertEqual(set(replies), BOUNCE_REPLIES)    # all ten, (1 - 0.1) ** 200 aside
        self.assertEqual(self.server.stats["messages_bounced"], 200)

    def test_accept(self):
        server = self.start_server(mode="accept")
        for reply in self.send_many(self.raw(server), 20):
            self.assertRegex(reply, QUEUED)

    def test_seeded_random(self):
        runs = []
        for _ in range(2):
            server = self.start_server(mode="random", seed=12345)
            replies = self.send_many(self.raw(server), 220)
            runs.append([QUEUED.sub(b"accepted", reply) for reply in replies])
        self.assertEqual(runs[0], runs[1])
        accepted = runs[0].count(b"accepted")
        self.assertTrue(5 <= accepted <= 45, accepted)
        self.assertLessEqual(set(runs[0]) - {b"accepted"}, BOUNCE_REPLIES)
        self.assertEqual(len(set(runs[0])), 11)

    def test_mode_header(self):
        raw = self.raw()
        for header in (b"X-Blackhole-Mode: accept", b"x-blackhole-mode: ACCEPT",
                       b"X-BLACKHOLE-MODE:Accept"):
            with self.subTest(header=header):
                content = b"Subject: x\r\n" + header + b"\r\n\r\nbody\r\n"
                self.assertRegex(self.send_many(raw, 1, content)[0], QUEUED)
        # Only in the header part; unknown values are ignored.
        for content in (b"Subject: x\r\n\r\nX-Blackhole-Mode: accept\r\n",
                        b"X-Blackhole-Mode: sometimes\r\n\r\nbody\r\n"):
            with self.subTest(content=content):
                self.assertIn(self.send_many(raw, 1, content)[0], BOUNCE_REPLIES)
        server = self.start_server(mode="accept")
        content = b"X-Blackhole-Mode: bounce\r\n\r\nbody\r\n"
        self.assertIn(self.send_many(self.raw(server), 1, content)[0], BOUNCE_REPLIES)

    def test_headers_ignored_without_dynamic_switch(self):
        server = self.start_server(mode="bounce", dynamic_switch=False)
        content = b"X-Blackhole-Mode: accept\r\nX-Blackhole-Delay: 30\r\n\r\nbody\r\n"
        for reply in self.send_many(self.raw(server), 3, content):
            self.assertIn(reply, BOUNCE_REPLIES)

    def test_per_listener_flags(self):
        server = self.start_server(
            mode="bounce", listen="127.0.0.1:0 mode=accept, 127.0.0.1:0, 127.0.0.1:0 delay=0")
        self.assertEqual(len(server.addresses), 3)
        to_accept = self.raw(address=server.addresses[0])
        to_bounce = self.raw(address=server.addresses[1])
        delay_flag = self.raw(address=server.addresses[2])
        self.assertRegex(self.send_many(to_accept, 1)[0], QUEUED)
        self.assertIn(self.send_many(to_bounce, 1)[0], BOUNCE_REPLIES)
        accept_header = b"X-Blackhole-Mode: accept\r\n\r\nbody\r\n"
        bounce_header = b"X-Blackhole-Mode: bounce\r\n\r\nbody\r\n"
        self.assertRegex(self.send_many(to_bounce, 1, accept_header)[0], QUEUED)
        self.assertRegex(self.send_many(to_accept, 1, bounce_header)[0], QUEUED)
        self.assertIn(self.send_many(delay_flag, 1, accept_header)[0], BOUNCE_REPLIES)


def timed_message(address, content, results, key):
    """Send one message; results[key] is (seconds to the reply, reply)."""
    try:
        client = RawClient(address)
        try:
            client.line()
            client.send(b"MAIL FROM:<%s@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
                        % key.encode())
            for _ in range(3):
                client.reply()
            started = time.monotonic()
            client.send(content + b".\r\n")
            reply = client.reply()
            results[key] = (time.monotonic() - started, reply)
        finally:
            client.close()
    except Exception as exc:        # reported by the test
        results[key] = (None, exc)


class TimeTest(ServerTestCase):
    """Delays (4.2, 4.3) and the timeout (4.5); each test waits about 1 s."""

    options = {"delay": 1, "listen": "127.0.0.1:0, 127.0.0.1:0 delay=0-1"}

    def run_concurrently(self, jobs):
        results, threads = {}, []
        for key, (address, content) in jobs.items():
            thread = threading.Thread(target=timed_message,
                                      args=(address, content, results, key))
            thread.start()
            threads.append(thread)
            self.addCleanup(thread.join, TIMEOUT)
        for thread in threads:
            thread.join(TIMEOUT)
        return results

    def test_delays(self):
        plain, ranged = self.server.addresses

        def header(value):
            return b"X-Blackhole-Delay: " + value + b"\r\nSubject: x\r\n\r\nbody\r\n"
        jobs = {
            "global": (plain, MESSAGE),
            "header0": (plain, header(b"0")),
            "header00": (plain, b"x-blackhole-delay:0,0\r\n\r\nbody\r\n"),
            "reversed": (plain, header(b"1, 0")),
            "negative": (plain, header(b"-1")),
            "word": (plain, header(b"soon")),
            "range": (plain, header(b"0, 1")),
            "dash": (plain, header(b"0-0")),      # the header's range is MIN, MAX only
        }
        jobs.update(("flag%d" % i, (ranged, header(b"0"))) for i in range(20))
        results = self.run_concurrently(jobs)
        zero, one = [], []
        for key, (seconds, reply) in results.items():
            with self.subTest(key=key):
                self.assertIsNotNone(seconds, reply)
                self.assertRegex(reply, QUEUED)
                (zero if seconds < 0.6 else one).append(key)
                if seconds >= 0.6:
                    self.assertTrue(0.9 <= seconds < 3, seconds)
        self.assertEqual(len(results), len(jobs))
        self.assertIn("header0", zero)
        self.assertIn("header00", zero)
        for key in ("global", "reversed", "negative", "word", "dash"):
            self.assertIn(key, one)
        flags_zero = [key for key in zero if key.startswith("flag")]
        self.assertTrue(0 < len(flags_zero) < 20, zero)    # 0-1: both, whole seconds

    def test_timeout(self):
        server = self.start_server(timeout=1)
        idle = self.raw(server)
        mid_data = self.raw(server)
        mid_data.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        self.assertEqual(mid_data.reply() + mid_data.reply() + mid_data.reply(),
                         MAIL_OK + RCPT_OK + GO_AHEAD)
        mid_data.send(b"Subject: x\r\n\r\nhello\r\n")
        started = time.monotonic()
        dribbler = self.raw(server)
        stop = threading.Event()

        def dribble():      # one octet every 0.2 s, never a whole line
            try:
                while not stop.wait(0.2):
                    dribbler.send(b"N")
            except OSError:
                pass
        thread = threading.Thread(target=dribble)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(stop.set)
        timeout = b"421 4.4.2 bh.test Error: timeout exceeded\r\n"
        self.assertEqual(idle.line(), timeout)
        self.assertTrue(idle.closed())
        self.assertEqual(mid_data.line(), timeout)
        self.assertTrue(mid_data.closed())
        self.assertEqual(dribbler.line(), timeout)
        self.assertLess(time.monotonic() - started, 2.5)
        stop.set()
        wait_until(lambda: server.stats["timeouts"] == 3)

    def test_a_delayed_message_is_counted_when_its_client_is_gone(self):
        """Writing the queued replies before the delay fails: the message
        was received, so its result is counted all the same (8)."""
        def failed_flush(handler, seconds):
            raise ConnectionResetError("the client reset")

        with mock.patch.object(blackhole.SMTPHandler, "_wait", failed_flush):
            server = self.start_server()
            raw = self.raw(server)
            raw.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
                     b"X-Blackhole-Delay: 5\r\n\r\nbody\r\n.\r\n")
            self.assertTrue(raw.closed())
            wait_until(lambda: server.stats["connections_active"] == 0)
        self.assertEqual((server.stats["messages_accepted"], server.stats["bytes_received"]),
                         (1, 30))

    def test_stop_during_a_delay(self):
        """The 421 is the message's reply: counted as bounced, and so the
        envelope says (it would have been accepted after the delay)."""
        delaying, wait = threading.Event(), blackhole.SMTPHandler._wait

        def announced_wait(handler, seconds):
            if seconds:
                delaying.set()
            wait(handler, seconds)

        patcher = mock.patch.object(blackhole.SMTPHandler, "_wait", announced_wait)
        patcher.start()
        self.addCleanup(patcher.stop)
        server = self.start_server(capture=1, sender_checks="reply")
        raw = self.raw(server)
        raw.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
                 b"X-Blackhole-Delay: 30\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(raw.reply() + raw.reply() + raw.reply(),
                         MAIL_OK + RCPT_OK + GO_AHEAD)
        self.assertTrue(delaying.wait(TIMEOUT))
        started = time.monotonic()
        server.stop()
        self.assertLess(time.monotonic() - started, 0.5)
        shutting_down = SHUTTING_DOWN[:-2] + (b" (sender issues: missing_date, missing_from, "
                                              b"missing_message_id, no_helo)\r\n")
        self.assertEqual(raw.line(), shutting_down)
        self.assertTrue(raw.closed())
        stats = server.stats
        self.assertEqual((stats["messages_accepted"], stats["messages_bounced"]), (0, 1))
        [envelope] = server.messages
        self.assertEqual(envelope.reply.encode() + b"\r\n", shutting_down)


class LineLimitBoundaryTest(ServerTestCase):
    """4.4: a command line of 12288 octets (CRLF included) is a command; one
    more octet is `500 5.5.2 Line too long`, read alone and pipelined."""

    def test_12288_octets_is_the_limit(self):
        raw = self.raw()
        at_limit = b"NOOP " + b"x" * (12288 - 7)            # 12288 with CRLF
        self.assertEqual(raw.cmd(at_limit), OK)
        self.assertEqual(raw.cmd(at_limit + b"x"), b"500 5.5.2 Line too long\r\n")
        # the same two lines behind a pipelined NOOP (already in the buffer)
        raw.send(b"NOOP\r\n" + at_limit + b"\r\nNOOP\r\n" + at_limit + b"x\r\n")
        self.assertEqual(raw.reply() + raw.reply() + raw.reply() + raw.reply(),
                         OK + OK + OK + b"500 5.5.2 Line too long\r\n")


class UnknownModeHeaderTest(ServerTestCase):
    """4.3: an X-Blackhole-Mode value that is not a mode is ignored, in an
    accept server too (ModesTest only looks from a bounce server)."""

    options = {"mode": "accept"}

    def test_unknown_mode_value_leaves_accept(self):
        raw = self.raw()
        for value in (b"sometimes", b"bounced", b""):
            with self.subTest(value=value):
                content = b"X-Blackhole-Mode: " + value + b"\r\nSubject: x\r\n\r\nbody\r\n"
                self.assertRegex(transaction(raw, content), QUEUED)


class MessageIdAcrossProcessesTest(ServerTestCase):
    """4.2: ids are unique across processes, even two started in the same
    nanosecond (as forked workers may be)."""

    def test_same_clock_different_pids(self):
        ids = []
        for pid in (1001, 1002):
            with mock.patch("time.time_ns", return_value=1764000000123456789), \
                    mock.patch("os.getpid", return_value=pid):
                server = blackhole.Server(hostname=HOST)
            server.start()
            self.addCleanup(server.stop)
            ids.append(QUEUED.match(transaction(self.raw(server))).group(1))
        self.assertNotEqual(ids[0], ids[1])

    def test_same_clock_same_process(self):
        """Two servers made within one tick of a coarse clock (Windows)."""
        ids = []
        with mock.patch("time.time_ns", return_value=1764000000123456789):
            servers = [blackhole.Server(hostname=HOST) for _ in range(2)]
        for server in servers:
            server.start()
            self.addCleanup(server.stop)
            ids.append(QUEUED.match(transaction(self.raw(server))).group(1))
        self.assertNotEqual(ids[0], ids[1])


class SlowOnMessageTest(ServerTestCase):
    """4.5: the timeout runs only while the server awaits a client line; an
    on_message that takes longer than `timeout` does not cut the client off."""

    def test_time_in_on_message_is_not_the_clients(self):
        server = self.start_server(timeout=1, on_message=lambda envelope:
                                   threading.Event().wait(1.5))     # the embedder's time
        raw = self.raw(server)
        self.assertRegex(transaction(raw), QUEUED)
        self.assertEqual(raw.cmd(b"NOOP"), OK)
        self.assertEqual(server.stats["timeouts"], 0)


class NoDelayTest(ServerTestCase):
    """7: every session socket has TCP_NODELAY set."""

    def test_session_socket(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"NOOP"), OK)
        with self.server.shared.lock:
            handlers = [h for h in self.server.shared.sessions.values()
                        if isinstance(h, blackhole.SMTPHandler)]
        self.assertEqual(len(handlers), 1)
        self.assertTrue(handlers[0].sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


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

    def test_addresses_are_bounded_in_octets(self):
        client = self.raw()
        fits = "\U0001F600" * 60 + "@example.com"         # 252 octets of UTF-8
        over = "\U0001F600" * 62 + "@example.com"         # 74 characters, 260 octets
        self.assertEqual(client.cmd(b"MAIL FROM:<%s> SMTPUTF8" % fits.encode()),
                         b"250 2.1.0 OK\r\n")
        self.assertEqual(client.cmd(b"RCPT TO:<%s>" % over.encode()),
                         b"501 5.1.3 Recipient address too long\r\n")
        self.assertEqual(client.cmd(b"MAIL FROM:<%s> SMTPUTF8" % over.encode()),
                         b"501 5.1.7 Sender address too long\r\n")

    def test_at_most_max_params(self):
        client = self.raw()
        many = b" ".join(b"X%d=1" % i for i in range(blackhole.SMTPHandler.max_params))
        self.assertEqual(client.cmd(b"MAIL FROM:<a@example.com> " + many), b"250 2.1.0 OK\r\n")
        self.assertEqual(client.cmd(b"MAIL FROM:<a@example.com> " + many + b" Y"),
                         b"501 5.5.4 Too many parameters\r\n")

    def test_refused_recipients_count_toward_the_limit(self):
        """Else one transaction of refused RCPTs could flush the greylist."""
        with mock.patch.object(blackhole.SMTPHandler, "max_recipients", 3):
            client = self.raw()
            client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<fail=b@example.com>\r\n"
                        b"RCPT TO:<fail=c@example.com>\r\nRCPT TO:<d@example.com>\r\n"
                        b"RCPT TO:<e@example.com>\r\n")
            self.assertEqual([client.reply()[:4] for _ in range(5)],
                             [b"250 ", b"550 ", b"550 ", b"250 ", b"452 "])

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


class BdatRefusedChunkTest(ServerTestCase):

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


class DelayedCountingTest(ServerTestCase):
    """A message with a delay counts its octets and its
    sender issues before the wait, its result after, once each (8, 11)."""

    def test_a_delayed_message_counts_its_sender_issues(self):
        waits = []

        def no_wait(handler, seconds):      # the delay, without its seconds
            waits.append(seconds)

        with mock.patch.object(blackhole.SMTPHandler, "_wait", no_wait):
            raw = self.raw()
            raw.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
                     b"X-Blackhole-Delay: 5\r\n\r\nbody\r\n.\r\n")
            self.assertEqual(raw.reply() + raw.reply() + raw.reply(),
                             MAIL_OK + RCPT_OK + GO_AHEAD)
            self.assertRegex(raw.reply(), QUEUED)
        self.assertIn(5, waits)
        stats = self.server.stats
        self.assertEqual((stats["messages_accepted"], stats["bytes_received"]), (1, 30))
        for issue in ("missing_date", "missing_from", "missing_message_id", "no_helo"):
            self.assertEqual(stats["sender_issues_" + issue], 1, issue)


class LateKickTest(ServerTestCase):
    """The reaper's kick() re-reads the deadline; a line that came after the
    reaper looked (a new, later deadline) is not cut off."""

    options = {"timeout": 60}

    def test_a_kick_before_the_deadline_does_nothing(self):
        raw = self.raw()
        self.assertEqual(raw.cmd(b"NOOP"), b"250 2.0.0 OK\r\n")
        with self.server.shared.lock:
            (session,) = self.server.shared.sessions.values()
        wait_until(lambda: session.deadline is not None, message="the next line awaited")
        session.kick(time.monotonic())          # as a reaper that looked a moment ago
        self.assertFalse(session.timed_out)
        self.assertEqual(raw.cmd(b"NOOP"), b"250 2.0.0 OK\r\n")


if __name__ == "__main__":
    unittest.main()
