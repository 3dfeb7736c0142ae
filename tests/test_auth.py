"""AUTH PLAIN, LOGIN and CRAM-MD5 (SPEC 5)."""

import base64
import hmac
import logging
import re
import smtplib
import unittest

from tests.support import CERT, HOST, KEY, TIMEOUT, ServerTestCase
from tests.test_tls import client_context

OK = b"235 2.7.0 Authentication successful\r\n"
FAILED = b"535 5.7.8 Authentication failed\r\n"
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


def b64(data):
    return base64.b64encode(data)


class SmtplibLoginTest(ServerTestCase):
    """smtplib's login() forced through each mechanism."""

    def login(self, mechanism, user, password):
        client = self.smtp()
        client.ehlo()
        self.assertEqual(client.esmtp_features["auth"], " CRAM-MD5 LOGIN PLAIN")
        client.esmtp_features["auth"] = mechanism
        return client.login(user, password)

    def test_login_succeeds(self):
        for mechanism in MECHANISMS:
            with self.subTest(mechanism=mechanism):
                self.assertEqual(self.login(mechanism, "me", "x"),
                                 (235, b"2.7.0 Authentication successful"))

    def check_fails(self, mechanism, user, password):
        with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
            self.login(mechanism, user, password)
        self.assertEqual(caught.exception.smtp_code, 535)
        self.assertEqual(caught.exception.smtp_error, b"5.7.8 Authentication failed")

    def test_fail_user_fails_everywhere(self):
        for mechanism in MECHANISMS:
            with self.subTest(mechanism=mechanism):
                self.check_fails(mechanism, "fail=me", "x")

    def test_fail_password(self):
        for mechanism in ("PLAIN", "LOGIN"):
            with self.subTest(mechanism=mechanism):
                self.check_fails(mechanism, "me", "fail=x")
        # CRAM-MD5 never sends the password: the username decides.
        self.assertEqual(self.login("CRAM-MD5", "me", "fail=x"),
                         (235, b"2.7.0 Authentication successful"))

    def test_auth_method_directly(self):
        client = self.smtp()
        client.ehlo()
        client.user, client.password = "me", "x"
        self.assertEqual(client.auth("LOGIN", client.auth_login, initial_response_ok=False),
                         (235, b"2.7.0 Authentication successful"))

    def test_counters(self):
        self.login("PLAIN", "me", "x")
        self.login("CRAM-MD5", "me", "x")
        for mechanism in MECHANISMS:
            self.check_fails(mechanism, "fail=me", "x")
        stats = self.server.stats
        self.assertEqual((stats["auth_success"], stats["auth_failure"]), (2, 3))


class TLSLoginTest(ServerTestCase):
    """login() after SMTP_SSL and after STARTTLS, through each mechanism."""

    options = {"tls_listen": "127.0.0.1:0", "tls_cert": CERT, "tls_key": KEY}

    def check(self, client):
        client.ehlo()
        self.assertEqual(client.esmtp_features["auth"], " CRAM-MD5 LOGIN PLAIN")
        for mechanism in MECHANISMS:
            with self.subTest(mechanism=mechanism):
                client.esmtp_features["auth"] = mechanism
                with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
                    client.login("fail=me", "x")
                self.assertEqual(caught.exception.smtp_code, 535)
        client.esmtp_features["auth"] = "PLAIN"
        self.assertEqual(client.login("me", "x"), (235, b"2.7.0 Authentication successful"))

    def test_smtp_ssl(self):
        host, port = self.server.tls_address
        client = smtplib.SMTP_SSL(host, port, local_hostname="localhost", timeout=TIMEOUT,
                                  context=client_context())
        self.addCleanup(client.close)
        self.check(client)

    def test_starttls(self):
        client = self.smtp()
        client.starttls(context=client_context())
        self.check(client)
        self.assertEqual(self.server.stats["tls_success"], 1)


class RawAuthTest(ServerTestCase):
    """Transcripts with exact bytes."""

    def client(self):
        client = self.raw()
        self.assertIn(b"250 AUTH CRAM-MD5 LOGIN PLAIN\r\n", client.cmd(b"EHLO localhost"))
        return client

    def test_plain_initial_response(self):
        client = self.client()
        self.assertEqual(client.cmd(b"AUTH PLAIN " + b64(b"\0me\0x")), OK)
        self.assertEqual(client.cmd(b"AUTH PLAIN " + b64(b"\0me\0x")),
                         b"503 5.5.1 Already authenticated\r\n")
        self.assertEqual(client.cmd(b"NOOP"), b"250 2.0.0 OK\r\n")

    def test_plain_two_step(self):
        client = self.client()
        self.assertEqual(client.cmd(b"AUTH PLAIN"), b"334 \r\n")
        self.assertEqual(client.cmd(b64(b"\0me\0x")), OK)

    def test_plain_fail(self):
        client = self.client()
        self.assertEqual(client.cmd(b"AUTH PLAIN " + b64(b"\0me\0fail=x")), FAILED)
        self.assertEqual(client.cmd(b"auth plain " + b64(b"\0fail=me\0x")), FAILED)
        self.assertEqual(client.cmd(b"AUTH PLAIN"), b"334 \r\n")
        self.assertEqual(client.cmd(b64(b"\0me\0fail=x")), FAILED)
        # A failure does not lock the session out.
        self.assertEqual(client.cmd(b"AUTH PLAIN " + b64(b"\0me\0x")), OK)

    def test_login_two_step(self):
        client = self.client()
        self.assertEqual(client.cmd(b"AUTH LOGIN"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(client.cmd(b64(b"me")), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(client.cmd(b64(b"x")), OK)

    def test_login_initial_username(self):
        client = self.client()
        self.assertEqual(client.cmd(b"AUTH LOGIN " + b64(b"me")), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(client.cmd(b64(b"x")), OK)

    def test_login_fail(self):
        client = self.client()
        self.assertEqual(client.cmd(b"AUTH LOGIN " + b64(b"fail=me")), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(client.cmd(b64(b"x")), FAILED)
        self.assertEqual(client.cmd(b"AUTH LOGIN"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(client.cmd(b64(b"me")), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(client.cmd(b64(b"fail=x")), FAILED)

    def cram_challenge(self, client):
        reply = client.cmd(b"AUTH CRAM-MD5")
        self.assertTrue(reply.startswith(b"334 ") and reply.endswith(b"\r\n"), reply)
        challenge = base64.b64decode(reply[4:-2], validate=True)
        self.assertRegex(challenge, rb"^<[^<>@\s]+@" + re.escape(HOST.encode()) + rb">$")
        return challenge

    def test_cram_md5(self):
        client = self.client()
        first = self.cram_challenge(client)
        digest = hmac.new(b"x", first, "md5").hexdigest().encode()
        self.assertEqual(client.cmd(b64(b"fail=me " + digest)), FAILED)
        second = self.cram_challenge(client)
        self.assertNotEqual(first, second)
        digest = hmac.new(b"x", second, "md5").hexdigest().encode()
        self.assertEqual(client.cmd(b64(b"me " + digest)), OK)
        third = self.raw()
        self.assertNotIn(self.cram_challenge(third), (first, second))

    def test_kura_raw_forms(self):
        user_prompt, password_prompt = b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n"
        for transcript in (
                [(b"AUTH PLAIN pass=letmein", OK)],
                [(b"AUTH PLAIN fail=letmein", FAILED)],
                [(b"AUTH PLAIN", b"334 \r\n"), (b"pass=letmein", OK)],
                [(b"AUTH PLAIN", b"334 \r\n"), (b"fail=letmein", FAILED)],
                [(b"AUTH LOGIN", user_prompt), (b"pass=letmein", OK)],
                [(b"AUTH LOGIN", user_prompt), (b"fail=letmein", FAILED)],
                [(b"AUTH LOGIN pass=letmein", OK)],
                [(b"AUTH LOGIN fail=letmein", FAILED)],
                [(b"AUTH LOGIN " + b64(b"me"), password_prompt), (b"pass=letmein", OK)],
                [(b"AUTH LOGIN " + b64(b"me"), password_prompt), (b"fail=letmein", FAILED)],
                [(b"AUTH CRAM-MD5", None), (b"pass=letmein", OK)],
                [(b"AUTH CRAM-MD5", None), (b"fail=letmein", FAILED)],
                [(b"AUTH CRAM-MD5 pass=letmein", OK)],
                [(b"AUTH CRAM-MD5 fail=letmein", FAILED)],
                # Five characters, so not base64, on every Python version.
                [(b"AUTH PLAIN fail=", FAILED)],
                [(b"AUTH LOGIN", user_prompt), (b"pass=", OK)],
                [(b"AUTH LOGIN", user_prompt), (b"fail=", FAILED)]):
            with self.subTest(transcript=transcript):
                client = self.client()
                for line, expected in transcript:
                    reply = client.cmd(line)
                    if expected is None:    # a CRAM-MD5 challenge
                        self.assertRegex(reply, rb"^334 [A-Za-z0-9+/]+=*\r\n$")
                    else:
                        self.assertEqual(reply, expected)
                self.assertEqual(client.cmd(b"NOOP"), b"250 2.0.0 OK\r\n")

    def test_cancel(self):
        client = self.client()
        cancelled = b"501 5.7.0 Authentication cancelled\r\n"
        self.assertEqual(client.cmd(b"AUTH PLAIN"), b"334 \r\n")
        self.assertEqual(client.cmd(b"*"), cancelled)
        self.assertEqual(client.cmd(b"AUTH LOGIN"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(client.cmd(b"*"), cancelled)
        self.assertEqual(client.cmd(b"AUTH LOGIN " + b64(b"me")), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(client.cmd(b"*"), cancelled)
        self.assertTrue(client.cmd(b"AUTH CRAM-MD5").startswith(b"334 "))
        self.assertEqual(client.cmd(b"*"), cancelled)
        # Not authenticated: AUTH is still possible.
        self.assertEqual(client.cmd(b"AUTH PLAIN " + b64(b"\0me\0x")), OK)

    def test_errors(self):
        client = self.client()
        undecodable = b"501 5.5.2 Cannot decode response\r\n"
        self.assertEqual(client.cmd(b"AUTH PLAIN !!!notbase64"), undecodable)
        self.assertEqual(client.cmd(b"AUTH PLAIN"), b"334 \r\n")
        self.assertEqual(client.cmd(b"bWU"), undecodable)       # bad padding
        self.assertEqual(client.cmd(b"AUTH"), b"501 5.5.4 Syntax: AUTH mechanism\r\n")
        self.assertEqual(client.cmd(b"AUTH "), b"501 5.5.4 Syntax: AUTH mechanism\r\n")
        unknown = b"504 5.5.4 Unrecognized authentication type\r\n"
        self.assertEqual(client.cmd(b"AUTH XOAUTH2 abc"), unknown)
        self.assertEqual(client.cmd(b"AUTH GSSAPI"), unknown)
        self.assertEqual(client.cmd(b"AUTH CRAM_MD5"), unknown)
        # CRAM-MD5 is server-first: no initial response, but kura's raw forms decide
        self.assertEqual(client.cmd(b"AUTH CRAM-MD5 " + b64(b"me 0123")),
                         b"501 5.5.4 Syntax: AUTH mechanism\r\n")
        self.assertEqual(client.cmd(b"NOOP"), b"250 2.0.0 OK\r\n")
        stats = self.server.stats
        self.assertEqual((stats["auth_success"], stats["auth_failure"]), (0, 0))

    def test_long_initial_response(self):
        client = self.client()
        prefix = b"AUTH PLAIN "
        # The longest line AUTH takes (12288 octets with CRLF) is answered...
        payload = b64(b"\0me\0" + b"y" * 9200)
        self.assertEqual(len(prefix + payload + b"\r\n"), 12285)   # 12288 is the limit
        self.assertEqual(client.cmd(prefix + payload), OK)
        # ...and 12 KB of base64 beyond it too, without killing the session.
        client = self.client()
        self.assertEqual(client.cmd(prefix + b"QUFB" * 3072), b"500 5.5.2 Line too long\r\n")
        self.assertEqual(client.cmd(b"NOOP"), b"250 2.0.0 OK\r\n")

    def test_counters(self):
        client = self.client()
        client.cmd(b"AUTH PLAIN pass=letmein")
        client = self.client()
        client.cmd(b"AUTH LOGIN fail=letmein")
        client.cmd(b"AUTH LOGIN")
        client.cmd(b"fail=letmein")
        client.cmd(b"AUTH PLAIN *")
        stats = self.server.stats
        self.assertEqual((stats["auth_success"], stats["auth_failure"]), (1, 2))


class StrictAuthTest(ServerTestCase):
    """Under strict the 512-octet limit does not apply to AUTH lines."""

    options = {"strict": True}

    def test_long_auth_line(self):
        client = self.raw()
        client.cmd(b"EHLO localhost")
        self.assertEqual(client.cmd(b"AUTH PLAIN " + b64(b"\0me\0" + b"y" * 3000)), OK)
        client = self.raw()
        client.cmd(b"EHLO localhost")
        self.assertEqual(client.cmd(b"NOOP " + b"y" * 600), b"500 5.5.2 Line too long\r\n")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def logged_count(records, text):
    return sum(text in message for message in records.messages)


class CredentialsNotLoggedTest(ServerTestCase):
    """Debug logging shows AUTH but never what was sent with it."""

    def setUp(self):
        logger = logging.getLogger("blackhole")
        self.records = _Records()
        level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self.records)
        self.addCleanup(logger.setLevel, level)
        self.addCleanup(logger.removeHandler, self.records)
        super().setUp()     # the session reads the level when it starts

    def test_no_credentials_in_logs(self):
        secret = b"S3cretPw"
        plain = b64(b"\0someone\0" + secret)
        user, password = b64(b"someone"), b64(secret)
        raw = b"pass=" + secret
        client = self.raw()
        client.cmd(b"EHLO localhost")
        for lines in ([b"AUTH PLAIN " + plain], [b"AUTH PLAIN", plain],
                      [b"AUTH LOGIN", user, password], [b"AUTH LOGIN " + user, password],
                      [b"AUTH PLAIN " + raw], [b"AUTH LOGIN", raw],
                      [b"AUTH LOGIN " + user, b"fail=" + secret]):
            for line in lines:
                reply = client.cmd(line)
            self.assertIn(reply[:4], (b"235 ", b"535 "))
            client.cmd(b"RSET")
            client.close()
            client = self.raw()
        # a password pipelined after an AUTH that was refused is read as a
        # command: an unknown verb is logged by its length only
        client.cmd(b"EHLO localhost")
        client.send(b"AUTH PLAIN " + plain + b"\r\nAUTH LOGIN\r\n" + password + b"\r\n")
        self.assertEqual([client.reply()[:4] for _ in range(3)], [b"235 ", b"503 ", b"502 "])
        client.cmd(b"QUIT")
        # a response where the mechanism belongs is not logged either
        client = self.raw()
        for line in (b"AUTH " + plain, b"AUTH PLAIN\t" + plain, b"AUTH  " + raw):
            self.assertEqual(client.cmd(line)[:4], b"504 ")
        self.assertEqual(logged_count(self.records, "> 'AUTH (unknown mechanism)'"), 3)
        client.cmd(b"QUIT")
        smtp = self.smtp()
        smtp.login("someone", secret.decode())
        smtp.quit()
        logged = "\n".join(self.records.messages)
        self.assertIn("> 'AUTH PLAIN", logged)           # the capture works
        self.assertIn("> 'AUTH LOGIN", logged)
        self.assertIn("< 334 UGFzc3dvcmQ6", logged)
        self.assertIn("connected to %s:%d" % self.server.address, logged)   # the bound port
        self.assertIn("> '(unknown, %d octets)'" % (len(password) + 2), logged)
        for text in (secret, plain, user, password, raw):
            self.assertNotIn(text.decode(), logged)
        self.assertNotIn("someone", logged)


class RawAuthBothTest(ServerTestCase):
    """5: a raw response that contains fail= fails, whatever else it holds."""

    def test_fail_wins(self):
        for line in (b"AUTH PLAIN pass=fail=x", b"AUTH PLAIN fail=pass=x"):
            with self.subTest(line=line):
                raw = self.raw()
                self.assertEqual(raw.cmd(line), b"535 5.7.8 Authentication failed\r\n")


if __name__ == "__main__":
    unittest.main()
