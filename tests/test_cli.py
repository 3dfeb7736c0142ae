"""The command line (SPEC section 2) and its logging (section 8)."""

import base64
import concurrent.futures
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import blackhole
from tests import support

SCRIPT = os.path.join(support.ROOT, "blackhole.py")
SHUTDOWN = b"421 4.3.2 bh.test Service shutting down\r\n"
LISTENING = re.compile(r"^blackhole: listening on 127\.0\.0\.1:(\d+) \(smtp, (.*)\)$")
WARNING = "blackhole: warning: "


def errors(stderr):
    """stderr's lines that are not warnings."""
    return [line for line in stderr.decode().splitlines() if not line.startswith(WARNING)]


NOHUP = ("import runpy, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
         "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


class Blackhole:
    """A running `python blackhole.py ARGS` whose stderr lines are collected
    by a thread, so a test can wait for a line (with a deadline); `nohup`
    starts it with SIGHUP ignored, as nohup(1) does."""

    def __init__(self, testcase, *args, nohup=False):
        wrapper = ["-c", NOHUP] if nohup else []
        self.proc = subprocess.Popen([sys.executable] + wrapper + [SCRIPT] + list(args),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, cwd=support.ROOT)
        self.lines = []
        self.done = False
        self.usr1_sent = 0
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        testcase.addCleanup(self.close)

    def _read(self):
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.done = True
            self.changed.notify_all()

    def wait_for(self, pattern, count=0, timeout=support.TIMEOUT):
        """Every stderr line matching pattern, once there are `count` of them."""
        regex = re.compile(pattern)
        def found():
            return [line for line in self.lines if regex.search(line)]
        with self.changed:
            if not self.changed.wait_for(lambda: len(found()) >= count or self.done,
                                         timeout) or len(found()) < count:
                raise AssertionError("no %r on stderr; got %r" % (pattern, self.lines))
            return found()

    def ports(self, count=1):
        """Wait for `count` listening lines; the ports they name, in order."""
        lines = self.wait_for(LISTENING.pattern, count)[:count]
        return [int(LISTENING.match(line).group(1)) for line in lines]

    def counters(self):
        """Send SIGUSR1 and return the counters of the line it logs."""
        self.usr1_sent += 1
        wanted = self.usr1_sent
        self.proc.send_signal(signal.SIGUSR1)
        line = self.wait_for("counters:", wanted)[wanted - 1]
        self.check_counters_line(line)
        return dict((name, int(value)) for name, value in
                    (word.split("=") for word in line.split()[2:]))

    @staticmethod
    def check_counters_line(line):
        if not re.match(r"^blackhole: counters: connections_total=\d+"
                        r"( [a-z0-9_]+=\d+)+$", line):
            raise AssertionError("bad counters line %r" % line)

    def stop(self, sig=signal.SIGTERM, timeout=support.TIMEOUT):
        """Signal the process and wait for it; returns its exit status."""
        self.proc.send_signal(sig)
        status = self.proc.wait(timeout)
        self.reader.join()
        return status

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join()
        self.proc.stderr.close()


class QuickCommandTest(unittest.TestCase):
    """Commands that run to completion; all started at once in setUpClass,
    since each costs a Python start-up."""

    @classmethod
    def setUpClass(cls):
        cls.files = {}
        # the shipped file as it is, on ephemeral ports: 2525 and 2587 may be
        # taken (a `make run`, or test-all running two interpreters at once)
        with open(os.path.join(support.ROOT, "blackhole.ini")) as handle:
            shipped, count = re.subn(r"127\.0\.0\.1:25(25|87)\b", "127.0.0.1:0", handle.read())
        assert count == 2, "blackhole.ini no longer listens on 2525 and 2587"
        for name, text in [
                ("good", "listen = 127.0.0.1:0, 127.0.0.1:0 mode=bounce\nhostname = bh.test\n"),
                ("bad", "[blackhole]\nlisten = 127.0.0.1:0\nmode = bouce  # a typo\n"),
                ("shipped", shipped),
                ("no_pid_dir", "listen = 127.0.0.1:0\npidfile = /nonexistent-bh/bh.pid\n"),
                ("order", "mode = bogus\nlisten = nope\n")]:
            fd, path = tempfile.mkstemp(suffix=".ini", prefix="blackhole-cli-")
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            cls.addClassCleanup(os.remove, path)
            cls.files[name] = path
        busy = socket.socket()
        cls.addClassCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cls.busy_port = port = busy.getsockname()[1]
        fd, path = tempfile.mkstemp(suffix=".ini", prefix="blackhole-cli-")
        with os.fdopen(fd, "w") as handle:
            handle.write("listen = 127.0.0.1:0, 127.0.0.1:%d\nhostname = bh.test\n" % port)
        cls.addClassCleanup(os.remove, path)
        cls.files["busy"] = path
        commands = {
            "help": ["-h"],
            "version": ["-v"],
            "options": ["--options"],
            "test": ["-t", "-c", cls.files["good"]],
            "test_bad": ["-t", "-c", cls.files["bad"]],
            "test_busy": ["--test", "--conf", cls.files["busy"]],
            "test_shipped": ["-t", "-c", cls.files["shipped"]],
            "bad_flag": ["--bogus"],
            "bad_value": ["-c", cls.files["bad"]],
            "busy": ["-q", "-c", cls.files["busy"]],
            "test_no_pid_dir": ["-t", "-c", cls.files["no_pid_dir"]],
            "order": ["-c", cls.files["order"]],
            "no_fork": ["-c", "import os, runpy, sys; del os.fork; sys.argv = sys.argv[1:]; "
                        "runpy.run_path(sys.argv[0], run_name='__main__')", SCRIPT,
                        "-b", "-c", cls.files["good"]],
        }
        with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
            futures = {name: pool.submit(support.run_cli, *args, timeout=60)
                       for name, args in commands.items() if name != "no_fork"}
            futures["no_fork"] = pool.submit(
                subprocess.run, [sys.executable] + commands["no_fork"], timeout=60,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=support.ROOT)
            cls.results = {name: future.result() for name, future in futures.items()}

    def assertFailure(self, name, line):
        """Exit 64, nothing on stdout, `line` alone on stderr but for warnings;
        never a traceback."""
        result = self.results[name]
        self.assertEqual(result.returncode, 64, result)
        self.assertEqual(result.stdout, b"")
        self.assertNotIn(b"Traceback", result.stderr)
        self.assertEqual(errors(result.stderr), [line])

    def test_help(self):
        result = self.results["help"]
        self.assertEqual(result.returncode, 0)
        self.assertTrue(result.stdout.startswith(b"usage: blackhole "), result.stdout)
        for flag in (b"--help", b"--version", b"--conf FILE", b"--test", b"--debug",
                     b"--background", b"--quiet", b"--less-secure", b"--options"):
            self.assertIn(flag, result.stdout)
        self.assertEqual(result.stderr, b"")

    def test_version(self):
        result = self.results["version"]
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, b"blackhole 1.0.0\n", b""))

    def test_options(self):
        result = self.results["options"]
        self.assertEqual(result.returncode, 0)
        self.assertEqual(result.stdout.decode(), blackhole.options_text())
        for name in blackhole.OPTIONS:
            self.assertRegex(result.stdout.decode(), r"(?m)^%s = " % name)

    def test_test_success(self):
        path = self.files["good"]
        result = self.results["test"]
        self.assertEqual(result.returncode, 0, result)
        self.assertEqual(result.stdout.decode(), "blackhole: %s syntax is OK\n"
                         "blackhole: %s test was successful\n" % (path, path))
        self.assertEqual(errors(result.stderr), [])

    def test_test_failure(self):
        self.assertFailure("test_bad", "blackhole: %s: mode = bouce: must be accept, "
                           "bounce or random" % self.files["bad"])
        self.assertEqual(self.results["test_bad"].stderr.count(b"\n"), 1)

    def test_test_busy_port(self):
        self.assertFailure("test_busy", "blackhole: %s: listen = 127.0.0.1:%d: cannot bind: "
                           "Address already in use" % (self.files["busy"], self.busy_port))

    def test_test_checks_the_pidfile_folder(self):
        self.assertFailure("test_no_pid_dir", "blackhole: %s: pidfile = /nonexistent-bh/bh.pid: "
                           "cannot write: No such directory: /nonexistent-bh"
                           % self.files["no_pid_dir"])

    def test_the_first_problem_in_file_order(self):
        self.assertFailure("order", "blackhole: %s: mode = bogus: must be accept, bounce "
                           "or random" % self.files["order"])

    def test_background_without_fork(self):
        self.assertFailure("no_fork", "blackhole: -b: cannot run in the background "
                           "on this platform")

    def test_shipped_config(self):
        path, result = self.files["shipped"], self.results["test_shipped"]
        self.assertEqual(result.returncode, 0, result)
        self.assertEqual(result.stdout.decode(), "blackhole: %s syntax is OK\n"
                         "blackhole: %s test was successful\n" % (path, path))

    def test_bad_command_line(self):
        result = self.results["bad_flag"]
        self.assertEqual((result.returncode, result.stdout), (64, b""))
        self.assertEqual(result.stderr, b"blackhole: unrecognized arguments: --bogus "
                         b"(see --help)\n")

    def test_bad_value(self):
        self.assertFailure("bad_value", "blackhole: %s: mode = bouce: must be accept, "
                           "bounce or random" % self.files["bad"])
        self.assertEqual(self.results["bad_value"].stderr.count(b"\n"), 1)

    def test_busy_port(self):
        """Startup (not -t) with a port in use; -q leaves that one line alone."""
        line = "blackhole: %s: listen = 127.0.0.1:%d: cannot bind: Address already in use" % (
            self.files["busy"], self.busy_port)
        self.assertFailure("busy", line)
        self.assertEqual(self.results["busy"].stderr.decode(), line + "\n")


class RunningTest(unittest.TestCase):
    """A running blackhole: log lines, signals, -q and -d."""

    def start(self, config, *args, **kwargs):
        return Blackhole(self, "-c", support.write_config(self, config), *args, **kwargs)

    def client(self, port):
        client = support.RawClient(("127.0.0.1", port))
        self.addCleanup(client.close)
        self.assertEqual(client.line(), b"220 bh.test ESMTP\r\n")
        return client

    def mid_data(self, port):
        """A client that has sent part of a message."""
        client = self.client(port)
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        self.assertEqual(client.line(), b"250 2.1.0 OK\r\n")
        self.assertEqual(client.line(), b"250 2.1.5 OK\r\n")
        self.assertEqual(client.line(), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        client.send(b"Subject: unfinished\r\n\r\nhalf a message\r\n")
        return client

    def mid_delay(self, port, header=b""):
        """A client whose whole message was sent; its reply is being delayed."""
        client = self.client(port)
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        for _ in range(3):
            reply = client.line()
        self.assertEqual(reply, b"354 End data with <CR><LF>.<CR><LF>\r\n")
        client.send(header + b"Subject: delayed\r\n\r\nbody\r\n.\r\n")
        return client

    def assertStopsCleanly(self, process, sig, clients):
        start = time.monotonic()
        process.proc.send_signal(sig)
        for client in clients:
            self.assertEqual(client.line(), SHUTDOWN)
            self.assertTrue(client.closed())
        self.assertEqual(process.proc.wait(support.TIMEOUT), 0)
        self.assertLess(time.monotonic() - start, 2.0)
        process.reader.join()
        self.assertEqual(process.lines[-1], "blackhole: stopped")

    def wait_delayed(self, process):
        """Poll with SIGUSR1 until a message was received (its reply is being
        delayed, and so is its result's counter); returns the last counters."""
        deadline = time.monotonic() + support.TIMEOUT
        while True:
            counters = process.counters()
            if counters["bytes_received"] > 0 or time.monotonic() > deadline:
                return counters

    def test_sigterm_mid_data_and_listener_delay(self):
        """Also SIGUSR1 (one counters line per signal) and the pidfile."""
        pidfile = os.path.join(tempfile.mkdtemp(prefix="blackhole-cli-"), "bh.pid")
        self.addCleanup(shutil.rmtree, os.path.dirname(pidfile), True)   # kept on a failure
        process = self.start("listen = 127.0.0.1:0, 127.0.0.1:0 delay=5\n"
                             "hostname = bh.test\npidfile = %s\n" % pidfile)
        plain, delayed = process.ports(2)
        with open(pidfile) as handle:
            self.assertEqual(handle.read(), "%d\n" % process.proc.pid)
        before = process.counters()
        self.assertEqual((before["connections_total"], before["connections_active"],
                          before["messages_accepted"]), (0, 0, 0))
        clients = [self.mid_data(plain), self.mid_delay(delayed)]
        after = self.wait_delayed(process)
        self.assertEqual((after["connections_total"], after["connections_active"],
                          after["messages_accepted"], after["bytes_received"]), (2, 2, 0, 26))
        self.assertEqual(list(after), list(before))
        self.assertEqual(len(process.wait_for("counters:")), process.usr1_sent)
        self.assertStopsCleanly(process, signal.SIGTERM, clients)
        self.assertFalse(os.path.exists(pidfile))

    def test_sigint_mid_data_and_header_delay(self):
        process = self.start("listen = 127.0.0.1:0\nhostname = bh.test\n")
        (port,) = process.ports()
        clients = [self.mid_data(port),
                   self.mid_delay(port, header=b"X-Blackhole-Delay: 5\r\n")]
        self.assertEqual(self.wait_delayed(process)["bytes_received"], 48)
        self.assertStopsCleanly(process, signal.SIGINT, clients)

    def test_sighup_stops_like_sigterm(self):
        """A closed terminal: the same clean stop, not the default sudden death."""
        process = self.start("listen = 127.0.0.1:0\nhostname = bh.test\n")
        (port,) = process.ports()
        clients = [self.mid_data(port)]
        self.assertStopsCleanly(process, signal.SIGHUP, clients)

    def test_sighup_ignored_under_nohup(self):
        process = self.start("listen = 127.0.0.1:0\nhostname = bh.test\n", nohup=True)
        (port,) = process.ports()
        process.proc.send_signal(signal.SIGHUP)
        process.counters()              # handled after the SIGHUP, which did nothing
        self.assertIsNone(process.proc.poll())
        self.assertStopsCleanly(process, signal.SIGTERM, [self.mid_data(port)])

    def test_listening_lines_and_quiet(self):
        """INFO: one line per listener and a stop line; -q drops the warnings."""
        port = support.free_port()
        config = ("listen = 127.0.0.1:%d, 127.0.0.1:0 mode=bounce delay=1-3\n"
                  "hostname = bh.test\ntimeout = 0\n")
        loud = self.start(config % 0, "-ls")
        quiet = self.start(config % port, "-ls", "-q")
        for process in (loud, quiet):
            process.ports(2)
            self.assertEqual(process.stop(), 0)
        first, second, stopped = quiet.lines
        self.assertEqual(first, "blackhole: listening on 127.0.0.1:%d (smtp, mode=accept)"
                         % port)
        match = LISTENING.match(second)
        self.assertNotEqual(int(match.group(1)), 0)     # port 0 logs the bound port
        self.assertEqual(match.group(2), "mode=bounce, delay=1-3")
        self.assertEqual(stopped, "blackhole: stopped")
        warnings = [line for line in loud.lines if line.startswith(WARNING)]
        self.assertIn(WARNING + "-ls leaves out single-use (EC)DH keys", warnings)
        self.assertIn(WARNING + "timeout = 0: idle clients are never cut off", warnings)
        others = [line for line in loud.lines if line not in warnings]
        self.assertEqual((len(others), others[2]), (3, stopped))
        self.assertEqual([LISTENING.match(line).group(2) for line in others[:2]],
                         ["mode=accept", "mode=bounce, delay=1-3"])

    def test_debug_transcript(self):
        secrets = [b"plain-s3cret-pw", b"login-s3cret-pw", b"login-user-name"]
        plain = base64.b64encode(b"\0someone\0" + secrets[0])
        login_user = base64.b64encode(secrets[2])
        login_password = base64.b64encode(secrets[1])
        body = b"body-line-that-must-not-be-logged"
        process = self.start("listen = 127.0.0.1:0\nhostname = bh.test\n", "-d")
        (port,) = process.ports()
        client = self.client(port)
        self.assertEqual(client.cmd(b"EHLO client.example.com")[:12], b"250-bh.test\r")
        self.assertEqual(client.cmd(b"AUTH LOGIN " + login_user), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(client.cmd(login_password),
                         b"235 2.7.0 Authentication successful\r\n")
        second = self.client(port)
        self.assertEqual(second.cmd(b"AUTH PLAIN " + plain),
                         b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(second.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
        self.assertEqual(client.cmd(b"MAIL FROM:<sender@example.com>"), b"250 2.1.0 OK\r\n")
        self.assertEqual(client.cmd(b"RCPT TO:<rcpt@example.com>"), b"250 2.1.5 OK\r\n")
        self.assertEqual(client.cmd(b"DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        reply = client.cmd(b"Subject: secret-subject\r\n\r\n" + body + b"\r\n.")
        self.assertTrue(reply.startswith(b"250 2.0.0 OK: queued as <"), reply)
        self.assertEqual(client.cmd(b"QUIT"), b"221 2.0.0 Goodbye\r\n")
        self.assertEqual(process.stop(), 0)
        log = "\n".join(process.lines)
        debug = [line for line in process.lines if line.startswith("blackhole: debug: ")]
        for text in ("EHLO client.example.com", "250-bh.test", "250 AUTH CRAM-MD5 LOGIN PLAIN",
                     "AUTH LOGIN", "334 UGFzc3dvcmQ6", "AUTH PLAIN",
                     "MAIL FROM:<sender@example.com>", "250 2.1.0 OK",
                     "RCPT TO:<rcpt@example.com>", "250 2.1.5 OK", "DATA", "354 End data",
                     "250 2.0.0 OK: queued as <", "QUIT", "221 2.0.0 Goodbye"):
            self.assertTrue(any(text in line for line in debug), "%r not logged" % text)
        self.assertTrue(any("127.0.0.1" in line and "connect" in line for line in debug))
        for secret in secrets + [plain, login_user, login_password, body,
                                 b"secret-subject"]:
            self.assertNotIn(secret.decode(), log)


if __name__ == "__main__":
    unittest.main()
