"""Sender checks (SPEC section 11): what is wrong with the mail a client sends."""

import email.message
import email.policy
import email.utils
import re
import socket
import ssl
import unittest

import blackhole
from tests.support import (CA, CERT, GO_AHEAD, KEY, MAIL_OK, OK, QUEUED, QUEUED_PATTERN,
                           RCPT_OK, ServerTestCase, stuff)

HEADER = (b"Date: Mon, 24 Nov 2025 14:00:00 +0000\r\n"
          b"From: a@example.com\r\n"
          b"Message-ID: <1@example.com>\r\n"
          b"Subject: test\r\n")
CLEAN = HEADER + b"\r\nhello\r\n"


def without(name):
    """HEADER without the field `name` (bytes, as written)."""
    return b"".join(line for line in HEADER.splitlines(True) if not line.startswith(name))


class ChecksTestCase(ServerTestCase):
    """A server with capture, and raw transactions that return issues."""

    options = {"capture": 100}

    def session(self, server=None, ehlo=True):
        client = self.raw(server)
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        if ehlo:
            self.assertTrue(client.cmd(b"EHLO localhost").startswith(b"250-"))
        return client

    def send(self, wire, client=None, server=None, mail=b"MAIL FROM:<a@example.com>",
             rcpt=b"RCPT TO:<b@example.com>", ehlo=True):
        """One message over DATA (wire: the content as sent, without the
        final dot line); returns the final reply."""
        client = client or self.session(server, ehlo)
        self.assertEqual(client.cmd(mail), MAIL_OK)
        self.assertEqual(client.cmd(rcpt), RCPT_OK)
        self.assertEqual(client.cmd(b"DATA"), GO_AHEAD)
        client.send(wire + b".\r\n")
        return client.reply()

    def envelope(self, server=None):
        """The last message's envelope (delivered before its reply is sent)."""
        return (server or self.server).messages[-1]

    def issues(self, wire, **kwargs):
        """The issues of one accepted message (and that it was accepted)."""
        server = kwargs.get("server") or self.server
        before = len(server.messages)
        reply = self.send(wire, **kwargs)
        self.assertRegex(reply, QUEUED_PATTERN + rb"\r\n\Z")
        return server.wait_for(before + 1)[-1].issues

    def counted(self, server=None):
        stats = (server or self.server).stats
        return {name: stats["sender_issues_" + name] for name in blackhole.SENDER_ISSUES
                if stats["sender_issues_" + name]}


# ###########################################################################
# One test per issue
# ###########################################################################

class IssueTest(ChecksTestCase):

    def test_clean_smtplib_message_has_none(self):
        msg = email.message.EmailMessage()
        msg["From"] = "a@example.com"
        msg["To"] = "b@example.com"
        msg["Subject"] = "clean"
        msg["Date"] = email.utils.formatdate()
        msg["Message-ID"] = email.utils.make_msgid(domain="example.com")
        msg.set_content("hello\n.leading dot\n" + "x" * 900 + "\n")
        client = self.smtp()
        client.sendmail("a@example.com", ["b@example.com"],
                        msg.as_bytes(policy=email.policy.SMTP))
        envelope = self.server.wait_for(1)[0]
        self.assertEqual(envelope.issues, ())
        self.assertEqual(self.counted(), {})
        self.assertEqual(self.issues(CLEAN), ())

    def test_bare_lf_in_data(self):
        self.assertEqual(self.issues(HEADER + b"\r\none\ntwo\r\n"), ("bare_lf",))
        self.assertEqual(self.issues(HEADER + b"\nbody\r\n"), ("bare_lf",))
        self.assertEqual(self.counted(), {"bare_lf": 2})

    def test_bare_lf_in_a_command_line(self):
        client = self.session()
        client.send(b"NOOP\n")
        self.assertEqual(client.reply(), OK)
        self.assertEqual(self.issues(CLEAN, client=client), ("bare_lf",))
        # since the previous end of data only
        self.assertEqual(self.issues(CLEAN, client=client), ())
        client.send(b"MAIL FROM:<a@example.com>\n")
        self.assertEqual(client.reply(), MAIL_OK)
        self.assertEqual(self.issues(CLEAN, client=client), ("bare_lf",))
        self.assertEqual(self.counted(), {"bare_lf": 2})

    def test_bare_cr(self):
        self.assertEqual(self.issues(HEADER + b"\r\none\rtwo\r\n"), ("bare_cr",))
        self.assertEqual(self.issues(HEADER + b"\r\nend\r\r\n"), ("bare_cr",))
        self.assertEqual(self.counted(), {"bare_cr": 2})

    def test_long_line(self):
        self.assertEqual(self.issues(HEADER + b"\r\n" + b"x" * 999 + b"\r\n"), ("long_line",))
        self.assertEqual(self.issues(HEADER + b"\r\n" + b"x" * 998 + b"\r\n"), ())
        self.assertEqual(self.issues(HEADER + b"X-Long: " + b"x" * 991 + b"\r\n\r\nhi\r\n"),
                         ("long_line",))
        self.assertEqual(self.counted(), {"long_line": 2})

    def test_long_line_measured_after_unstuffing(self):
        # ".." + 997 on the wire is "." + 997 = 998 octets of content
        self.assertEqual(self.issues(HEADER + b"\r\n.." + b"x" * 997 + b"\r\n"), ())
        self.assertEqual(self.issues(HEADER + b"\r\n.." + b"x" * 998 + b"\r\n"),
                         ("long_line",))

    def test_unstuffed_dot_in_data(self):
        self.assertEqual(self.issues(HEADER + b"\r\n.hidden\r\n"), ("unstuffed_dot",))
        self.assertTrue(self.envelope().data.endswith(b"\r\nhidden\r\n"))
        self.assertEqual(self.issues(HEADER + b"\r\n..shown\r\n"), ())
        self.assertTrue(self.envelope().data.endswith(b"\r\n.shown\r\n"))
        self.assertEqual(self.counted(), {"unstuffed_dot": 1})

    def test_no_unstuffed_dot_in_bdat(self):
        client = self.session()
        content = HEADER + b"\r\n.not stuffed\r\n"
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
                    b"BDAT %d LAST\r\n%s" % (len(content), content))
        self.assertEqual(client.reply(), MAIL_OK)
        self.assertEqual(client.reply(), RCPT_OK)
        self.assertRegex(client.reply(), QUEUED)
        self.assertEqual(self.envelope().data, content)
        self.assertEqual(self.envelope().issues, ())

    def test_8bit_without_8bitmime(self):
        content = HEADER + b"\r\ncaf\xc3\xa9\r\n"
        self.assertEqual(self.issues(content), ("8bit_without_8bitmime",))
        for params in (b"BODY=8BITMIME", b"body=8bitmime", b"SMTPUTF8", b"BODY=BINARYMIME"):
            with self.subTest(params=params):
                self.assertEqual(self.issues(
                    content, mail=b"MAIL FROM:<a@example.com> " + params), ())
        self.assertEqual(self.issues(content, mail=b"MAIL FROM:<a@example.com> BODY=7BIT"),
                         ("8bit_without_8bitmime",))
        self.assertEqual(self.counted(), {"8bit_without_8bitmime": 2})

    def test_utf8_without_smtputf8(self):
        sender = "MAIL FROM:<j\u00f6rg@example.com>".encode()
        rcpt = "RCPT TO:<\u00fcser@example.com>".encode()
        self.assertEqual(self.issues(CLEAN, mail=sender), ("utf8_without_smtputf8",))
        self.assertEqual(self.issues(CLEAN, rcpt=rcpt), ("utf8_without_smtputf8",))
        self.assertEqual(self.issues(CLEAN, mail=sender + b" SMTPUTF8", rcpt=rcpt), ())
        self.assertEqual(self.counted(), {"utf8_without_smtputf8": 2})

    def test_missing_date(self):
        header = without(b"Date:")
        self.assertEqual(self.issues(header + b"\r\nhi\r\n"), ("missing_date",))
        # a Date: in the body is not in the header
        self.assertEqual(self.issues(header + b"\r\nDate: today\r\n"), ("missing_date",))
        self.assertEqual(self.issues(header + b"Resent-Date: today\r\n\r\nhi\r\n"),
                         ("missing_date",))
        self.assertEqual(self.counted(), {"missing_date": 3})

    def test_missing_from(self):
        header = without(b"From:")
        self.assertEqual(self.issues(header + b"\r\nhi\r\n"), ("missing_from",))
        self.assertEqual(self.issues(header + b"\r\nFrom: me\r\n"), ("missing_from",))
        self.assertEqual(self.counted(), {"missing_from": 2})

    def test_missing_message_id(self):
        header = without(b"Message-ID:")
        self.assertEqual(self.issues(header + b"\r\nhi\r\n"), ("missing_message_id",))
        self.assertEqual(self.counted(), {"missing_message_id": 1})

    def test_all_missing_and_header_rules(self):
        self.assertEqual(self.issues(b"Subject: x\r\n\r\nhi\r\n"),
                         ("missing_date", "missing_from", "missing_message_id"))
        self.assertEqual(self.issues(b""),
                         ("missing_date", "missing_from", "missing_message_id"))
        # names compare case-insensitively
        self.assertEqual(self.issues(HEADER.replace(b"Date:", b"DATE:").replace(
            b"From:", b"from:").replace(b"Message-ID:", b"message-id:") + b"\r\nhi\r\n"), ())
        # no empty line: the whole message is the header
        self.assertEqual(self.issues(HEADER), ())

    def test_no_helo(self):
        self.assertEqual(self.issues(CLEAN, ehlo=False), ("no_helo",))
        client = self.session(ehlo=False)
        self.assertEqual(client.cmd(b"HELO localhost"), b"250 bh.test\r\n")
        self.assertEqual(self.issues(CLEAN, client=client), ())
        self.assertEqual(client.cmd(b"RSET"), OK)   # keeps the HELO
        self.assertEqual(self.issues(CLEAN, client=client), ())
        self.assertEqual(self.counted(), {"no_helo": 1})

    def test_no_helo_after_starttls(self):
        server = self.start_server(tls_cert=CERT, tls_key=KEY, capture=10)
        context = ssl.create_default_context(cafile=CA)
        client = self.smtp(server)
        client.ehlo()
        client.starttls(context=context)
        # smtplib forgets the EHLO; mail() does not send a new one
        self.assertEqual(client.mail("a@example.com"), (250, b"2.1.0 OK"))
        client.rcpt("b@example.com")
        self.assertEqual(client.data(CLEAN)[0], 250)
        self.assertEqual(server.wait_for(1)[-1].issues, ("no_helo",))
        client.ehlo()
        self.assertEqual(client.sendmail("a@example.com", ["b@example.com"], CLEAN), {})
        self.assertEqual(server.wait_for(2)[-1].issues, ())

    def test_each_issue_once_per_message(self):
        content = (HEADER + b"\r\na\nb\nc\rd\re\r\n" + (b"y" * 1000 + b"\r\n") * 3 +
                   b".one\r\n.two\r\n\xff\xfe\r\n")
        expected = ("8bit_without_8bitmime", "bare_cr", "bare_lf", "long_line",
                    "unstuffed_dot")
        self.assertEqual(self.issues(content), expected)
        self.assertEqual(self.counted(), dict.fromkeys(expected, 1))
        self.assertEqual(self.issues(content), expected)
        self.assertEqual(self.counted(), dict.fromkeys(expected, 2))
        text = blackhole.metrics_text(self.server.stats)
        self.assertIn('\nblackhole_sender_issues_total{issue="bare_lf"} 2\n', text)
        self.assertIn('\nblackhole_sender_issues_total{issue="no_helo"} 0\n', text)

    def test_debug_log_line(self):
        with self.assertLogs("blackhole", "DEBUG") as logs:
            self.issues(without(b"Date:") + b"\r\na\rb\r\n")
            self.issues(CLEAN)
        lines = [line for line in logs.output if "sender issues" in line]
        self.assertEqual(lines, ["DEBUG:blackhole:127.0.0.1 sender issues: bare_cr, "
                                 "missing_date"])

    def test_too_big_message_has_issues_too(self):
        server = self.start_server(max_message_size=100, capture=10)
        reply = self.send(without(b"From:") + b"\r\n" + b"z" * 200 + b"\r\n", server=server)
        self.assertEqual(reply, b"552 5.3.4 Message size exceeds fixed maximum message size"
                                b"\r\n")
        self.assertEqual(server.wait_for(1)[0].issues, ("missing_from",))
        self.assertEqual(self.counted(server), {"missing_from": 1})


# ###########################################################################
# The result never depends on how writes and reads split the data
# ###########################################################################

# (content after unstuffing, its issues over DATA; over BDAT the same less
# unstuffed_dot, which only DATA can have)
TRICKY = [
    (CLEAN, ()),
    (HEADER + b"\r\none\rtwo\nthree\r\n", ("bare_cr", "bare_lf")),    # one of each, one line
    (HEADER + b"\r\n" + b"y" * 998 + b"\r\n" + b"z" * 998 + b"\r\n", ()),
    (HEADER + b"\r\n" + b"y" * 998 + b"\r\n" + b"z" * 999 + b"\r\n", ("long_line",)),
    (HEADER + b"\r\n" + b"y" * 999 + b"\r\nend\r\n", ("long_line",)),
    (HEADER + b"\r\n" + b"y" * 998 + b"\r\r\n", ("bare_cr", "long_line")),
    (HEADER + b"\r\n" + b"y" * 998 + b"\nz\r\n", ("bare_lf",)),
    (HEADER + b"\r\na\nb\r\n\r\r\n", ("bare_cr", "bare_lf")),
    (without(b"Date:") + b"X-Date: x\r\nDat: y\r\n\r\nDate: z\r\n", ("missing_date",)),
    (without(b"Message-ID:") + b"\r\n\r\n\xc3\xa9\r\n",
     ("8bit_without_8bitmime", "missing_message_id")),
    (b"Message-ID: <x@y>\r\nFrom: a\r\nDate: b\r\n", ()),      # all header
    (HEADER + b"\r\n.x\r\n" + b"." * 999 + b"\r\n", ("long_line",)),
]


def checks_issues(segments, eightbit_ok=False):
    """Feed a SenderChecks the segments; the issues at the end."""
    checks = blackhole.SenderChecks(eightbit_ok=eightbit_ok)
    for seg in segments:
        checks.feed(seg)
    return checks.issues(blackhole.Envelope(), False)


class FeedSplitTest(unittest.TestCase):
    """SenderChecks.feed over every split point."""

    def test_every_split_point(self):
        for content, expected in TRICKY:
            with self.subTest(content=content[:60]):
                self.assertEqual(checks_issues([content]), expected)
                for at in range(len(content) + 1):
                    got = checks_issues([content[:at], content[at:]])
                    if got != expected:
                        self.fail("split at %d: %r != %r" % (at, got, expected))

    def test_a_last_cr_is_bare(self):
        # only BDAT can end a message so; DATA always ends on CRLF
        content = HEADER + b"\r\nends on a CR\r"
        for at in range(len(content) + 1):
            self.assertEqual(checks_issues([content[:at], content[at:]]), ("bare_cr",))

    def test_small_pieces(self):
        for size in (1, 2, 3, 7):
            for content, expected in TRICKY:
                with self.subTest(size=size, content=content[:60]):
                    pieces = [content[i:i + size] for i in range(0, len(content), size)]
                    self.assertEqual(checks_issues(pieces), expected)

    def test_three_way_splits_around_line_ends(self):
        content = HEADER + b"\r\n" + b"y" * 998 + b"\r\n" + b"z" * 999 + b"\r\nok\r\n"
        ends = [i for i, octet in enumerate(content) if octet in b"\r\n"]
        points = sorted({p for i in ends for p in (i - 1, i, i + 1, i + 2)
                         if 0 < p < len(content)})
        for a in points:
            for b in points:
                if a < b:
                    got = checks_issues([content[:a], content[a:b], content[b:]])
                    if got != ("long_line",):
                        self.fail("split at %d, %d: %r" % (a, b, got))

    def test_8bit_allowed(self):
        self.assertEqual(checks_issues([CLEAN + b"\xc3\xa9\r\n"], eightbit_ok=True), ())


class WireSplitTest(ChecksTestCase):
    """The same messages in 1-octet, 7-octet and whole writes, DATA and BDAT."""

    def data_issues(self, content, write):
        client = self.session()
        wire = stuff(content) + b".\r\n"
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        for _ in range(3):
            client.reply()
        write = write or len(wire)
        for i in range(0, len(wire), write):
            client.send(wire[i:i + write])
        self.assertRegex(client.reply(), QUEUED)
        envelope = self.envelope()
        self.assertEqual(envelope.data, content)
        return envelope.issues

    def bdat_issues(self, content, chunk):
        client = self.session()
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        client.reply(), client.reply()
        batch = 64      # replies read every so often: the client never stalls the server
        chunks = [content[i:i + chunk] for i in range(0, len(content), chunk)]
        for start in range(0, len(chunks), batch):
            for piece in chunks[start:start + batch]:
                client.send(b"BDAT %d\r\n%s" % (len(piece), piece))
            for piece in chunks[start:start + batch]:
                self.assertEqual(client.reply(),
                                 b"250 2.0.0 %d octets received\r\n" % len(piece))
        client.send(b"BDAT 0 LAST\r\n")
        self.assertRegex(client.reply(), QUEUED)
        envelope = self.envelope()
        self.assertEqual(envelope.data, content)
        return envelope.issues

    def test_data_writes(self):
        for content, expected in TRICKY:
            for write in (1, 7, None):
                with self.subTest(content=content[:60], write=write):
                    self.assertEqual(self.data_issues(content, write), expected)

    def test_bdat_chunks(self):
        for content, expected in TRICKY:
            for chunk in (1, 7, len(content) or 1):
                with self.subTest(content=content[:60], chunk=chunk):
                    self.assertEqual(self.bdat_issues(content, chunk), expected)

    def test_unstuffed_dot_split(self):
        wire = HEADER + b"\r\nx\r\n.y\r\n"
        for write in (1, 7, len(wire)):
            client = self.session()
            client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            for _ in range(3):
                client.reply()
            wire_all = wire + b".\r\n"
            for i in range(0, len(wire_all), write):
                client.send(wire_all[i:i + write])
            self.assertRegex(client.reply(), QUEUED)
            with self.subTest(write=write):
                self.assertEqual(self.envelope().issues, ("unstuffed_dot",))


# ###########################################################################
# sender_checks = off | count | reply | refuse
# ###########################################################################

BAD = without(b"Date:") + b"\r\none\ntwo\r\n"         # bare_lf, missing_date
SUFFIX = b" (sender issues: bare_lf, missing_date)\r\n"


class ModeTest(ChecksTestCase):

    def test_off(self):
        server = self.start_server(sender_checks="off", capture=10)
        self.assertEqual(self.issues(BAD, server=server, ehlo=False), ())
        self.assertEqual(self.counted(server), {})

    def test_off_still_reads_switches_from_a_header_split_from_its_body(self):
        server = self.start_server(sender_checks="off")
        client = self.session(server)
        self.assertEqual(client.cmd(b"MAIL FROM:<a@example.com>"), MAIL_OK)
        self.assertEqual(client.cmd(b"RCPT TO:<b@example.com>"), RCPT_OK)
        header = b"X-Blackhole-Mode: bounce\r\n\r\n"
        client.send(b"BDAT %d\r\n%s" % (len(header), header))
        self.assertEqual(client.reply(),    # each chunk is read apart from the next
                         b"250 2.0.0 %d octets received\r\n" % len(header))
        for _ in range(2):      # the header scan has ended; the body goes on
            client.send(b"BDAT 6\r\nbody\r\n")
            self.assertEqual(client.reply(), b"250 2.0.0 6 octets received\r\n")
        self.assertIn(int(client.cmd(b"BDAT 0 LAST")[:3]), blackhole.BOUNCES)

    def test_count_is_the_default(self):
        self.assertEqual(self.issues(BAD), ("bare_lf", "missing_date"))
        self.assertEqual(self.counted(), {"bare_lf": 1, "missing_date": 1})

    def test_reply(self):
        server = self.start_server(sender_checks="reply", max_message_size=1000, capture=20)
        client = self.session(server)
        self.assertRegex(self.send(BAD, client=client),
                         QUEUED_PATTERN + re.escape(SUFFIX) + rb"\Z")
        self.assertRegex(self.send(CLEAN, client=client), QUEUED_PATTERN + rb"\r\n\Z")
        # an injected failure
        self.assertEqual(self.send(BAD, client=client, rcpt=b"RCPT TO:<data-451=b@example.com>"),
                         b"451 4.3.0 Requested action aborted: local error in processing" +
                         SUFFIX)
        # 552
        self.assertEqual(self.send(BAD + (b"z" * 100 + b"\r\n") * 10, client=client),
                         b"552 5.3.4 Message size exceeds fixed maximum message size" + SUFFIX)
        # a bounce (mode bounce for this message)
        reply = self.send(b"X-Blackhole-Mode: bounce\r\n" + BAD, client=client)
        code = int(reply[:3])
        self.assertEqual(reply, b"%d %s%s" % (code, blackhole.BOUNCES[code].encode(), SUFFIX))
        self.assertEqual(server.wait_for(5)[-1].issues, ("bare_lf", "missing_date"))
        self.assertEqual(self.counted(server), {"bare_lf": 4, "missing_date": 4})

    def test_reply_after_bounce_mode(self):
        server = self.start_server(sender_checks="reply", mode="bounce", capture=10)
        reply = self.send(BAD, server=server)
        code = int(reply[:3])
        self.assertEqual(reply, b"%d %s%s" % (code, blackhole.BOUNCES[code].encode(), SUFFIX))

    def test_refuse(self):
        server = self.start_server(sender_checks="refuse", max_message_size=1000, capture=20)
        client = self.session(server)
        refused = b"550 5.6.0 Message refused, sender issues: bare_lf, missing_date\r\n"
        self.assertEqual(self.send(BAD, client=client), refused)
        self.assertRegex(self.send(CLEAN, client=client), QUEUED_PATTERN + rb"\r\n\Z")
        # size comes first, then address directives, then refuse
        self.assertEqual(self.send(BAD + (b"z" * 100 + b"\r\n") * 10, client=client),
                         b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
        self.assertEqual(self.send(BAD, client=client, rcpt=b"RCPT TO:<data-451=b@example.com>"),
                         b"451 4.3.0 Requested action aborted: local error in processing\r\n")
        # and before the mode or a dynamic switch
        self.assertEqual(self.send(b"X-Blackhole-Mode: accept\r\n" + BAD, client=client),
                         refused)
        self.assertEqual(server.wait_for(5)[0].reply, refused[:-2].decode())
        self.assertEqual(server.stats["messages_bounced"], 3)
        self.assertEqual(server.stats["messages_too_big"], 1)
        self.assertEqual(server.stats["messages_accepted"], 1)
        self.assertEqual(self.counted(server), {"bare_lf": 4, "missing_date": 4})

    def test_refuse_over_bdat(self):
        server = self.start_server(sender_checks="refuse")
        client = self.session(server, ehlo=False)
        content = b"Subject: x\r\n\r\nhi\r\n"
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
                    b"BDAT %d LAST\r\n%s" % (len(content), content))
        client.reply(), client.reply()
        self.assertEqual(client.reply(), b"550 5.6.0 Message refused, sender issues: "
                         b"missing_date, missing_from, missing_message_id, no_helo\r\n")
        self.assertEqual(client.cmd(b"NOOP"), OK)


class FieldNameTest(ChecksTestCase):
    """11: a field counts only by its whole name at the start of a line;
    X-Original-From:, Resent-Date: or a From: inside a Subject are not From
    or Date fields."""

    def test_lookalike_names_do_not_count(self):
        header = (without(b"From:").replace(b"Date:", b"Resent-Date:")
                  + b"X-Original-From: a@example.com\r\nX-Note: mail from: b\r\n")
        self.assertEqual(self.issues(header + b"\r\nhi\r\n"), ("missing_date", "missing_from"))


class LfHeaderEndTest(ChecksTestCase):
    """11: an LF-only empty line ends the header, so a field after it is body."""

    def test_bare_lf_empty_line_ends_the_header(self):
        header = without(b"Message-ID:").replace(b"\r\n", b"\n")
        self.assertEqual(self.issues(header + b"\nMessage-ID: <1@example.com>\nhi\r\n"),
                         ("bare_lf", "missing_message_id"))


class LastLineLengthTest(unittest.TestCase):
    """11: a last line without a line ending (BDAT) of 999 octets is long."""

    def test_unterminated_last_line(self):
        for size, expected in ((998, ()), (999, ("long_line",))):
            with self.subTest(size=size):
                checks = blackhole.SenderChecks()
                checks.feed(HEADER + b"\r\n" + b"x" * size)
                self.assertEqual(checks.issues(blackhole.Envelope(), False), expected)


if __name__ == "__main__":
    unittest.main()
