"""Running as a service: -b, workers, signals, /metrics, privileges (SPEC 2, 7, 8).

The daemon and the workers are real processes (`python blackhole.py`); each
test kills whatever it started at cleanup, found by its own config file.
"""

import grp
import http.client
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import blackhole
from tests.support import (HOST, ROOT, TIMEOUT, RawClient, ServerTestCase, free_port, kill_group,
                           run_cli, wait_until, write_config)

BLACKHOLE = os.path.join(ROOT, "blackhole.py")
GREETING = b"220 %s ESMTP\r\n" % HOST.encode()
POSIX = hasattr(os, "fork") and os.path.isdir("/proc/self")
ROOT_WARNING = b"blackhole: warning: running as root without user/group\n"


# ---------------------------------------------------------------------------
# Processes, seen through /proc

def proc_stat(pid):
    """(state, ppid, session) of pid, or None once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[3])


def gone(pid):
    """True when pid has exited (a zombie waiting for a reaper counts)."""
    stat = proc_stat(pid)
    return stat is None or stat[0] in ("Z", "X")


def children(pid):
    """The live processes whose parent is pid."""
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat and stat[1] == pid and stat[0] not in ("Z", "X"):
                kids.append(int(name))
    return sorted(kids)


def stopped(pid):
    """True when every thread of pid is stopped (after SIGSTOP)."""
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return False
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as handle:
                if handle.read().rpartition(")")[2].split()[0] not in ("T", "t"):
                    return False
        except OSError:
            pass
    return True


def tcp_entry(sock):
    """The /proc/net/tcp fields of the server side of a client socket."""
    client_port, server_port = sock.getsockname()[1], sock.getpeername()[1]
    with open("/proc/net/tcp") as handle:
        for line in handle.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == server_port and \
                    int(fields[2].split(":")[1], 16) == client_port:
                return fields
    return None


def owner(sock, pids):
    """Which of pids holds the server side of a client socket, or None."""
    fields = tcp_entry(sock)
    if fields is None:
        return None
    target = "socket:[%s]" % fields[9]
    for pid in pids:
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == target:
                    return pid
            except OSError:
                pass
    return None


def processes_using(path):
    """Pids whose command line names path (a test's own config file)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open("/proc/%s/cmdline" % name, "rb") as handle:
                    if path.encode() in handle.read().split(b"\0") and not gone(int(name)):
                        pids.append(int(name))
            except OSError:
                pass
    return pids


def kill_quietly(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_using(path):
    """Cleanup: SIGKILL every process started with this config file."""
    for pid in processes_using(path):
        kill_quietly(pid)


def read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


# ---------------------------------------------------------------------------
# Talking to a process

def greeting(port, timeout=TIMEOUT):
    """Connect to 127.0.0.1:port and return the first line (b"" if closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
        return data


def smtp(testcase, port):
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="localhost", timeout=TIMEOUT)
    testcase.addCleanup(client.close)
    return client


def http_get(address, path, method="GET"):
    """(status, content type, body) of GET (or HEAD) path."""
    conn = http.client.HTTPConnection(*address, timeout=TIMEOUT)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


SAMPLE = re.compile(r'^(blackhole_[a-z_]+(?:\{[a-z]+="[a-z0-9_]+"\})?) (\d+)$')


def parse_metrics(testcase, body):
    """Prometheus text format: every line checked; returns {sample: value}."""
    text = body.decode("utf-8")
    testcase.assertTrue(text.endswith("\n"))
    samples, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            testcase.assertIn(kind, ("counter", "gauge"), line)
            typed.add(name)
            continue
        match = SAMPLE.match(line)
        testcase.assertIsNotNone(match, "not a sample line: %r" % line)
        testcase.assertIn(match.group(1).split("{")[0], typed, "no # TYPE for " + line)
        testcase.assertNotIn(match.group(1), samples)
        samples[match.group(1)] = int(match.group(2))
    return samples


def metric_name(stat):
    """The /metrics sample for a server.stats key."""
    for prefix, metric, label in (
            ("messages_", "messages_total", "result"),
            ("auth_", "auth_total", "result"),
            ("tls_", "tls_handshakes_total", "result"),
            ("faults_", "faults_total", "kind"),
            ("sender_issues_", "sender_issues_total", "issue")):
        if stat.startswith(prefix):
            return 'blackhole_%s{%s="%s"}' % (metric, label, stat[len(prefix):])
    return {"connections_total": "blackhole_connections_total",
            "connections_active": "blackhole_connections_active",
            "bytes_received": "blackhole_bytes_received_total",
            "timeouts": "blackhole_timeouts_total"}[stat]


def as_metrics(stats):
    return {metric_name(name): value for name, value in stats.items()}


def message(kind, number):
    """A message that gets the result kind: accepted, bounced or too_big."""
    body = b"x" * 60 + b"\r\n"
    if kind == "bounced":
        return (b"From: a@example.com\r\nX-Blackhole-Mode: bounce\r\nSubject: %d\r\n\r\n"
                % number) + body
    if kind == "too_big":
        return b"From: a@example.com\r\nSubject: %d\r\n\r\n" % number + body * 40
    return b"From: a@example.com\r\nSubject: %d\r\n\r\n" % number + body


MAX_SIZE = 1000     # max_message_size in these tests: too_big is 2500 octets


def send(testcase, client, kinds):
    """Send one message of each kind on client; returns their octets.

    MAIL carries no SIZE=, so that a message too big is refused after its
    data (a message), not at MAIL (not one).
    """
    sizes = 0
    for number, kind in enumerate(kinds):
        data = message(kind, number)
        testcase.assertEqual(len(data) > MAX_SIZE, kind == "too_big")
        testcase.assertEqual(client.mail("a@example.com")[0], 250)
        testcase.assertEqual(client.rcpt("b@example.com")[0], 250)
        code, text = client.data(data)
        if kind == "accepted":
            testcase.assertEqual(code, 250, text)
        elif kind == "too_big":
            testcase.assertEqual((code, text), (
                552, b"5.3.4 Message size exceeds fixed maximum message size"))
        else:
            testcase.assertIn(code, blackhole.BOUNCES)
        sizes += len(data)
    return sizes


def expected_counters(kinds, connections, octets, faults=0):
    counts = dict.fromkeys(("accepted", "bounced", "too_big"), 0)
    for kind in kinds:
        counts[kind] += 1
    return {
        'blackhole_messages_total{result="accepted"}': counts["accepted"],
        'blackhole_messages_total{result="bounced"}': counts["bounced"],
        'blackhole_messages_total{result="too_big"}': counts["too_big"],
        "blackhole_connections_total": connections,
        "blackhole_bytes_received_total": octets,
        'blackhole_faults_total{kind="directive"}': faults,
        # no Date: or Message-ID: in any of them (SPEC 11), a From: in all
        'blackhole_sender_issues_total{issue="missing_date"}': len(kinds),
        'blackhole_sender_issues_total{issue="missing_message_id"}': len(kinds),
        'blackhole_sender_issues_total{issue="missing_from"}': 0,
    }


# ---------------------------------------------------------------------------

@unittest.skipUnless(POSIX, "needs fork and /proc")
class ProcessTestCase(unittest.TestCase):
    """Starts `python blackhole.py -c CONF` processes and cleans them up."""

    def config(self, text):
        path = write_config(self, "hostname = %s\n%s" % (HOST, text))
        self.addCleanup(kill_using, path)
        return path

    def tempdir(self):
        path = tempfile.mkdtemp(prefix="blackhole-test-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def start(self, text, *args):
        """A foreground blackhole in its own process group; (proc, log path)."""
        conf = self.config(text)
        fd, log = tempfile.mkstemp(suffix=".log", prefix="blackhole-test-")
        self.addCleanup(os.remove, log)
        try:
            proc = subprocess.Popen([sys.executable, BLACKHOLE, "-c", conf] + list(args),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=fd, cwd=ROOT, start_new_session=True)
        finally:
            os.close(fd)
        self.addCleanup(kill_group, proc)
        return proc, log

    def serving(self, proc, log, port):
        """Wait until 127.0.0.1:port greets; fails early if proc exited."""
        def greets():
            if proc.poll() is not None:
                raise AssertionError("blackhole exited with %s:\n%s" % (
                    proc.returncode, read_text(log)))
            try:
                return greeting(port) == GREETING
            except ConnectionRefusedError:
                return False
        wait_until(greets, message="a greeting on port %d" % port)

    def workers_of(self, proc, count=2):
        wait_until(lambda: len(children(proc.pid)) == count, message="%d workers" % count)
        return children(proc.pid)

    def pause(self, pid):
        """SIGSTOP pid so that the other workers take every connection."""
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(kill_quietly, pid, signal.SIGCONT)
        wait_until(lambda: stopped(pid), message="worker %d stopped" % pid)

    def served_by(self, port, pid, pids):
        """A session on port, asserted to be served by pid; returns the client."""
        client = smtp(self, port)
        self.assertEqual(owner(client.sock, pids), pid)
        return client


class BackgroundTest(ProcessTestCase):
    """-b: the launcher returns once the daemon serves (SPEC 2, 7)."""

    def test_background_serves_and_stops(self):
        port, piddir = free_port(), self.tempdir()
        pidfile = os.path.join(piddir, "blackhole.pid")
        conf = self.config("listen = 127.0.0.1:%d\npidfile = %s\n" % (port, pidfile))
        launcher = subprocess.Popen([sys.executable, BLACKHOLE, "-b", "-c", conf],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=ROOT)
        out, err = launcher.communicate(timeout=TIMEOUT)
        # connect at once: the port accepts and the daemon greets
        self.assertEqual(greeting(port), GREETING)
        self.assertEqual(launcher.returncode, 0, err)
        self.assertEqual(out, b"")
        self.assertEqual(err, ROOT_WARNING if os.getuid() == 0 else b"")
        with open(pidfile) as handle:
            text = handle.read()
        self.assertRegex(text, r"^\d+\n$")
        pid = int(text)
        self.addCleanup(kill_quietly, pid)
        self.assertNotEqual(pid, launcher.pid)
        self.assertFalse(gone(pid))
        self.assertEqual(processes_using(conf), [pid])
        state, ppid, session = proc_stat(pid)
        self.assertNotEqual(ppid, launcher.pid)
        self.assertNotEqual(session, os.getsid(0))          # setsid: detached
        self.assertEqual(os.readlink("/proc/%d/cwd" % pid), "/")
        for fd in (0, 1, 2):
            self.assertEqual(os.readlink("/proc/%d/fd/%d" % (pid, fd)), os.devnull)

        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 2
        wait_until(lambda: gone(pid) and not os.path.exists(pidfile), timeout=5,
                   message="the daemon to exit")
        self.assertLess(time.monotonic(), deadline)
        self.assertEqual(processes_using(conf), [])
        with self.assertRaises(ConnectionRefusedError):
            greeting(port)

    def test_background_keeps_a_log_file(self):
        """`-b 2>>file`: the daemon logs there (a pipe or terminal is let go)."""
        port, folder = free_port(), self.tempdir()
        pidfile, logfile = os.path.join(folder, "bh.pid"), os.path.join(folder, "bh.log")
        conf = self.config("listen = 127.0.0.1:%d\npidfile = %s\n" % (port, pidfile))
        with open(logfile, "ab") as log:
            launcher = subprocess.run([sys.executable, BLACKHOLE, "-q", "-b", "-c", conf],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=log, cwd=ROOT, timeout=TIMEOUT)
        self.assertEqual(launcher.returncode, 0)
        with open(pidfile) as handle:
            pid = int(handle.read())
        self.addCleanup(kill_quietly, pid)
        self.assertEqual([os.readlink("/proc/%d/fd/%d" % (pid, fd)) for fd in (0, 1, 2)],
                         [os.devnull, os.devnull, logfile])

        def logged():
            with open(logfile) as handle:
                return handle.read()
        os.kill(pid, signal.SIGUSR1)
        wait_until(lambda: "blackhole: counters: connections_total=0" in logged())
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: gone(pid), message="the daemon to exit")
        lines = logged().splitlines()
        self.assertEqual(lines[0], "blackhole: listening on 127.0.0.1:%d (smtp, mode=accept)"
                         % port)
        self.assertRegex(lines[1], r"^blackhole: counters: connections_total=0 ")
        self.assertEqual(lines[2:], ["blackhole: stopped"])

    def test_root_with_a_group_but_no_user_warns(self):
        port, pidfile = free_port(), os.path.join(self.tempdir(), "bh.pid")
        group = grp.getgrgid(os.getgid()).gr_name
        conf = self.config("listen = 127.0.0.1:%d\npidfile = %s\ngroup = %s\n"
                           % (port, pidfile, group))
        result = run_cli("-b", "-c", conf)
        with open(pidfile) as handle:
            pid = int(handle.read())
        self.addCleanup(kill_quietly, pid)
        self.assertEqual(result.returncode, 0)
        self.assertEqual(result.stderr, ROOT_WARNING if os.getuid() == 0 else b"")
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: gone(pid), message="the daemon to exit")

    def test_background_with_standard_streams_closed(self):
        """`-b <&- >&-`: no listener takes fd 0 or 1 for /dev/null to replace."""
        port, pidfile = free_port(), os.path.join(self.tempdir(), "bh.pid")
        conf = self.config("listen = 127.0.0.1:%d\npidfile = %s\n" % (port, pidfile))
        result = subprocess.run(["sh", "-c", 'exec "$0" "$@" <&- >&-', sys.executable,
                                 BLACKHOLE, "-q", "-b", "-c", conf],
                                stderr=subprocess.PIPE, timeout=TIMEOUT)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        with open(pidfile) as handle:
            pid = int(handle.read())
        self.addCleanup(kill_quietly, pid)
        self.assertEqual(greeting(port), GREETING)
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: gone(pid), message="the daemon to exit")

    def test_background_port_in_use(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            pidfile = os.path.join(self.tempdir(), "blackhole.pid")
            conf = self.config("listen = 127.0.0.1:%d\npidfile = %s\n" % (port, pidfile))
            self.assertFailsToStart(conf, "%s: listen = 127.0.0.1:%d: cannot bind: "
                                    "Address already in use" % (conf, port))
        self.assertFalse(os.path.exists(pidfile))

    def test_unwritable_pidfile(self):
        """An error the daemon meets after forking still makes the launcher
        exit 64 with that one line."""
        port = free_port()
        pidfile = os.path.join(self.tempdir(), "missing", "blackhole.pid")
        conf = self.config("listen = 127.0.0.1:%d\npidfile = %s\n" % (port, pidfile))
        self.assertFailsToStart(conf, "%s: pidfile = %s: cannot write: No such file or "
                                "directory" % (conf, pidfile))

    def assertFailsToStart(self, conf, problem):
        """`-q -b -c conf` exits 64 with `blackhole: problem` alone on stderr,
        leaving no process behind."""
        result = run_cli("-q", "-b", "-c", conf)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (64, b"", ("blackhole: %s\n" % problem).encode()))
        self.assertEqual(processes_using(conf), [])


class ForegroundTest(ProcessTestCase):
    """workers = 1: SIGUSR1 logs the counters, SIGINT stops (SPEC 2)."""

    def test_sigusr1_then_sigint(self):
        port = free_port()
        proc, log = self.start("listen = 127.0.0.1:%d\nmax_message_size = %d\n"
                               % (port, MAX_SIZE), "-q")
        self.serving(proc, log, port)
        client = smtp(self, port)
        octets = send(self, client, ["accepted", "too_big"])
        client.quit()
        os.kill(proc.pid, signal.SIGUSR1)
        wait_until(lambda: "counters:" in read_text(log), message="the counters line")
        lines = [line for line in read_text(log).splitlines() if "counters:" in line]
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("blackhole: counters: connections_total="),
                        lines[0])
        values = dict(item.split("=") for item in lines[0].split()[2:])
        self.assertEqual(list(values), list(blackhole.Stats.names))
        # the probe of serving(), then the session that sent
        self.assertEqual(values["connections_total"], "2")
        self.assertEqual(values["messages_accepted"], "1")
        self.assertEqual(values["messages_too_big"], "1")
        self.assertEqual(values["bytes_received"], str(octets))
        self.assertEqual(proc.poll(), None)                 # SIGUSR1 does not stop it

        os.kill(proc.pid, signal.SIGINT)
        self.assertEqual(proc.wait(2), 0)
        self.assertEqual(read_text(log).splitlines()[-1], "blackhole: stopped")


class WorkersTest(ProcessTestCase):
    """workers = 2: a supervisor and two workers (SPEC 7)."""

    def test_workers_serve_restart_and_stop(self):
        port, pidfile = free_port(), os.path.join(self.tempdir(), "blackhole.pid")
        proc, log = self.start("listen = 127.0.0.1:%d\nworkers = 2\npidfile = %s\n"
                               % (port, pidfile), "-q")
        self.serving(proc, log, port)
        first, second = workers = self.workers_of(proc)
        with open(pidfile) as handle:
            self.assertEqual(handle.read(), "%d\n" % proc.pid)
        # each worker serves mail while the other is paused
        for serving, paused in ((first, second), (second, first)):
            self.pause(paused)
            client = self.served_by(port, serving, workers)
            self.assertEqual(client.sendmail("a@example.com", ["b@example.com"],
                                             b"Subject: x\r\n\r\nhi\r\n"), {})
            client.quit()
            os.kill(paused, signal.SIGCONT)

        # a worker killed is replaced, and the replacement serves
        killed = time.monotonic()
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: set(children(proc.pid)) - {first, second}, timeout=5,
                   message="a replacement worker")
        wait_until(lambda: gone(first), message="the killed worker reaped")
        (replacement,) = set(children(proc.pid)) - {second}
        self.pause(second)
        client = self.served_by(port, replacement, [replacement, second])
        self.assertEqual(client.noop(), (250, b"2.0.0 OK"))
        self.assertLess(time.monotonic() - killed, 5)
        client.quit()
        os.kill(second, signal.SIGCONT)

        # SIGTERM stops every process within 2 s and removes the pidfile; a
        # worker's client mid-transaction gets the 421 (the supervisor passes
        # SIGTERM on, it does not kill the workers)
        held = smtp(self, port)
        self.assertEqual(held.ehlo()[0], 250)
        self.assertEqual(held.mail("a@example.com"), (250, b"2.1.0 OK"))
        stopping = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(held.getreply(), (421, b"4.3.2 %s Service shutting down"
                                                % HOST.encode()))
        self.assertEqual(proc.wait(2), 0)
        wait_until(lambda: gone(replacement) and gone(second),
                   timeout=max(0, stopping + 2 - time.monotonic()), message="workers gone")
        self.assertFalse(os.path.exists(pidfile))
        self.assertRegex(read_text(log), r"worker [01] \(pid %d\) was killed by signal 9; "
                         r"restarting" % first)

    def test_ctrl_c_stops_every_process(self):
        # a terminal's Ctrl-C signals the supervisor and the workers at once,
        # here as soon as the second worker exists
        port, metrics_port = free_port(), free_port()
        proc, log = self.start("listen = 127.0.0.1:%d\nworkers = 2\n"
                               "metrics_listen = 127.0.0.1:%d\n" % (port, metrics_port), "-q")
        self.serving(proc, log, port)
        workers = self.workers_of(proc)
        os.killpg(proc.pid, signal.SIGINT)
        stopping = time.monotonic()
        self.assertEqual(proc.wait(2), 0)
        wait_until(lambda: all(gone(pid) for pid in workers),
                   timeout=max(0, stopping + 2 - time.monotonic()), message="workers gone")
        self.assertEqual(read_text(log), "blackhole: listening on 127.0.0.1:%d (smtp, mode="
                         "accept)\nblackhole: metrics on http://127.0.0.1:%d/metrics\n"
                         "blackhole: stopped\n" % (port, metrics_port))

    def test_metrics_over_two_workers(self):
        port, metrics_port = free_port(), free_port()
        proc, log = self.start(
            "listen = 127.0.0.1:%d\nworkers = 2\nmetrics_listen = 127.0.0.1:%d\n"
            "max_message_size = %d\n" % (port, metrics_port, MAX_SIZE), "-q")
        self.serving(proc, log, port)
        first, second = workers = self.workers_of(proc)
        metrics = ("127.0.0.1", metrics_port)
        plan = [  # (worker, kinds) per connection, several on each worker
            (first, ["accepted", "bounced", "too_big", "accepted"]),
            (second, ["bounced", "accepted", "too_big"]),
            (first, ["accepted"]),
            (second, ["bounced", "bounced", "accepted"]),
        ]
        octets, kinds = 0, []
        for serving, sent in plan:
            paused = second if serving == first else first
            self.pause(paused)
            client = self.served_by(port, serving, workers)
            os.kill(paused, signal.SIGCONT)
            octets += send(self, client, sent)
            kinds += sent
            if len(sent) == 1:      # an injected fault counts too (SPEC 10.5)
                self.assertEqual(client.rcpt("fail=c@example.com"),
                                 (550, b"5.1.1 Recipient address rejected"))
            # read right after the reply: the counters are already there (SPEC 8)
            status, kind, body = http_get(metrics, "/metrics")
            self.assertEqual(status, 200)
            samples = parse_metrics(self, body)
            self.assertEqual(sum(samples['blackhole_messages_total{result="%s"}' % r]
                                 for r in ("accepted", "bounced", "too_big")), len(kinds))
            client.quit()
        self.assertTrue(kind.startswith("text/plain; version=0.0.4"), kind)
        # the probe of serving() is a connection too
        expected = expected_counters(kinds, len(plan) + 1, octets, faults=1)
        wait_until(lambda: parse_metrics(self, http_get(metrics, "/metrics")[2])[
            "blackhole_connections_active"] == 0, message="sessions closed")
        samples = parse_metrics(self, http_get(metrics, "/metrics")[2])
        self.assertEqual({k: samples[k] for k in expected}, expected)
        self.assertEqual(set(samples), {metric_name(n) for n in
                                        blackhole.Stats.names})
        for path in ("/", "/metricsx", "/other"):
            self.assertEqual(http_get(metrics, path)[0], 404)
        self.assertEqual(http_get(metrics, "/metrics", "HEAD")[:3:2], (200, b""))

        # SIGUSR1 to the supervisor: one line, summed over the workers
        os.kill(proc.pid, signal.SIGUSR1)
        wait_until(lambda: "counters:" in read_text(log), message="the counters line")
        lines = [line for line in read_text(log).splitlines() if "counters:" in line]
        self.assertEqual(len(lines), 1, lines)
        values = {metric_name(k): int(v) for k, v in
                  (item.split("=") for item in lines[0].split()[2:])}
        self.assertEqual(values, samples)

        # a worker killed with a session open: its sessions are no longer active
        self.pause(second)
        held = self.served_by(port, first, workers)
        os.kill(second, signal.SIGCONT)

        def active():
            return parse_metrics(self, http_get(metrics, "/metrics")[2])[
                "blackhole_connections_active"]
        self.assertEqual(active(), 1)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: set(children(proc.pid)) - {first, second}, timeout=5,
                   message="a replacement worker")
        wait_until(lambda: active() == 0, message="the killed worker's session gone")
        self.assertEqual(parse_metrics(self, http_get(metrics, "/metrics")[2])[
            'blackhole_messages_total{result="accepted"}'], kinds.count("accepted"))
        held.close()


class CpuChoiceTest(unittest.TestCase):
    """Which CPU pin_cpu picks for each process (_cpus_to_pin, _current_cpu)."""

    def choose(self, count, allowed, current=None, gil=True):
        with mock.patch.object(os, "sched_setaffinity", create=True), \
                mock.patch.object(os, "sched_getaffinity", lambda pid: set(allowed),
                                  create=True), \
                mock.patch.object(blackhole, "_current_cpu", lambda: current), \
                mock.patch.object(sys, "_is_gil_enabled", lambda: gil, create=True):
            return blackhole._cpus_to_pin(count)

    def test_workers_take_the_allowed_cpus_in_order(self):
        self.assertEqual(self.choose(2, {5, 1, 3}), [1, 3])
        self.assertEqual(self.choose(3, {5, 1, 3}), [1, 3, 5])

    def test_one_process_stays_where_it_runs(self):
        self.assertEqual(self.choose(1, {0, 1, 2, 3}, current=2), [2])
        self.assertEqual(self.choose(1, {4, 6}, current=1), [4])     # not allowed
        self.assertEqual(self.choose(1, {4, 6}, current=None), [4])  # unknown

    def test_no_pinning(self):
        with self.assertLogs("blackhole", "INFO") as logs:
            self.assertIsNone(self.choose(3, {0, 1}))
        self.assertEqual(logs.output,
                         ["INFO:blackhole:pin_cpu: 3 workers on 2 CPUs: left to the scheduler"])
        self.assertIsNone(self.choose(1, {7}))                      # one CPU allowed
        self.assertIsNone(self.choose(1, {0, 1}, gil=False))        # free-threaded
        with mock.patch.object(os, "sched_getaffinity", side_effect=OSError(38, "ENOSYS"),
                               create=True), \
                mock.patch.object(os, "sched_setaffinity", create=True):
            self.assertIsNone(blackhole._cpus_to_pin(1))

    def test_current_cpu_from_proc_stat(self):
        # the command name may hold spaces and parentheses
        stat = b"42 (a) b ) 9) S " + b" ".join(b"%d" % n for n in range(4, 39)) + b" 7 0 0\n"
        with mock.patch("builtins.open", mock.mock_open(read_data=stat)):
            self.assertEqual(blackhole._current_cpu(), 7)
        with mock.patch("builtins.open", side_effect=FileNotFoundError):
            self.assertIsNone(blackhole._current_cpu())


ALLOWED_CPUS = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


def thread_cpus(pid):
    """{thread id: the CPUs it may run on} for every live thread of pid."""
    cpus = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            cpus[int(tid)] = frozenset(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:      # a thread that just ended
            pass
    return cpus


@unittest.skipUnless(len(ALLOWED_CPUS) >= 2 and hasattr(os, "sched_setaffinity"),
                     "pinning needs Linux and two CPUs this process may use")
class PinCpuTest(ProcessTestCase):
    """pin_cpu: every thread of a process on one CPU, workers on different ones."""

    def pinned(self, pid):
        """The one CPU every thread of pid is kept on."""
        cpus = set(thread_cpus(pid).values())
        self.assertEqual(len(cpus), 1, cpus)
        (cpu,) = cpus
        self.assertEqual(len(cpu), 1, cpu)
        self.assertLessEqual(cpu, ALLOWED_CPUS)
        return next(iter(cpu))

    def test_one_process_keeps_its_threads_on_one_cpu(self):
        port = free_port()
        proc, log = self.start("listen = 127.0.0.1:%d\n" % port, "-q")
        self.serving(proc, log, port)
        client = smtp(self, port)       # a session thread exists now
        self.assertEqual(client.noop(), (250, b"2.0.0 OK"))
        self.assertGreaterEqual(len(thread_cpus(proc.pid)), 3)
        self.pinned(proc.pid)
        client.quit()

    def test_workers_on_different_cpus(self):
        port = free_port()
        proc, log = self.start("listen = 127.0.0.1:%d\nworkers = 2\n" % port, "-q")
        self.serving(proc, log, port)
        workers = self.workers_of(proc)
        wait_until(lambda: all(len(thread_cpus(pid)) >= 2 for pid in workers),
                   message="the workers' accept threads")
        self.assertEqual(len({self.pinned(pid) for pid in workers}), 2)
        self.assertEqual(set(thread_cpus(proc.pid).values()), {frozenset(ALLOWED_CPUS)})

    def test_off(self):
        port = free_port()
        proc, log = self.start("listen = 127.0.0.1:%d\npin_cpu = no\n" % port, "-q")
        self.serving(proc, log, port)
        self.assertEqual(set(thread_cpus(proc.pid).values()), {frozenset(ALLOWED_CPUS)})


class PrivilegesTest(ProcessTestCase):
    """Bind, then drop to user/group (SPEC 7)."""

    def test_unknown_user_is_a_config_error(self):
        conf = self.config("listen = 127.0.0.1:%d\nuser = no-such-user-bh\n" % free_port())
        result = run_cli("-c", conf)
        self.assertEqual(result.returncode, 64)
        self.assertRegex(result.stderr.decode(), r"^blackhole: %s: user = no-such-user-bh: "
                         r"[^\n]*no such user[^\n]*\n\Z" % re.escape(conf))
        self.assertEqual(processes_using(conf), [])

    @unittest.skipUnless(hasattr(os, "getuid") and os.getuid() == 0,
                         "dropping privileges needs root (CI runs the tests as root)")
    def test_workers_run_as_nobody(self):
        import grp
        import pwd
        user = pwd.getpwnam("nobody")
        for group in ("nogroup", "nobody"):
            try:
                gid = grp.getgrnam(group).gr_gid
                break
            except KeyError:
                pass
        else:
            self.skipTest("no nogroup or nobody group")
        port = free_port()
        proc, log = self.start("listen = 127.0.0.1:%d\nworkers = 2\nuser = nobody\n"
                               "group = %s\n" % (port, group))
        self.serving(proc, log, port)
        workers = self.workers_of(proc)
        for pid in [proc.pid] + workers:
            with open("/proc/%d/status" % pid) as handle:
                status = dict(line.split(":", 1) for line in handle.read().splitlines())
            # real, effective, saved and filesystem ids
            self.assertEqual(status["Uid"].split(), [str(user.pw_uid)] * 4, pid)
            self.assertEqual(status["Gid"].split(), [str(gid)] * 4, pid)
            self.assertEqual(status["Groups"].split(), [str(gid)], pid)
        self.assertNotIn("warning", read_text(log))
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(2), 0)


class MetricsAbuseTest(ServerTestCase):
    """/metrics costs a slow or huge client little, and Prometheus still gets
    its answer (SPEC 8): requests are bounded in number, time and size."""

    options = {"metrics_listen": "127.0.0.1:0"}

    def connect(self):
        client = RawClient(self.server.metrics_address)
        self.addCleanup(client.close)
        return client

    def test_at_most_max_clients(self):
        with mock.patch.object(blackhole._MetricsServer, "max_clients", 2):
            server = self.start_server(metrics_listen="127.0.0.1:0")
            self.server = server
            slow = [self.connect() for _ in range(2)]
            wait_until(lambda: server.metrics.clients == 2)
            self.assertTrue(self.connect().closed())    # at once, with no answer
            slow[0].close()
            wait_until(lambda: server.metrics.clients == 1)
            self.assertEqual(http_get(server.metrics_address, "/metrics")[0], 200)

    def test_no_count_is_lost_when_a_thread_cannot_start(self):
        start = threading.Thread.start

        def no_thread(thread):
            raise RuntimeError("can't start new thread")

        server = self.start_server(metrics_listen="127.0.0.1:0")
        with mock.patch.object(blackhole._MetricsServer, "max_clients", 2), \
                mock.patch.object(threading.Thread, "start", no_thread):
            for _ in range(3):
                client = RawClient(server.metrics_address)
                self.addCleanup(client.close)
                self.assertTrue(client.closed())
        self.assertIs(threading.Thread.start, start)
        self.assertEqual(server.metrics.clients, 0)
        self.assertEqual(http_get(server.metrics_address, "/metrics")[0], 200)

    def test_a_request_has_a_deadline(self):
        with mock.patch.object(blackhole._MetricsHandler, "request_time", 0.2):
            client = self.connect()
            client.send(b"GET /metrics HTTP/1.1\r\nX-Slow: ")    # and no more
            started = time.monotonic()
            self.assertTrue(client.closed())
            self.assertLess(time.monotonic() - started, 5)
            self.assertEqual(client.buf, b"")

    def test_a_request_is_bounded_in_size(self):
        client = self.connect()
        try:
            client.send(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
        except OSError:         # closed while we were still sending
            pass
        self.assertTrue(client.closed())
        self.assertEqual(client.buf, b"")
        self.assertEqual(http_get(self.server.metrics_address, "/metrics")[0], 200)


class EmbeddedMetricsTest(ServerTestCase):
    """workers = 1 in-process: /metrics and server.stats agree (SPEC 8, 9)."""

    options = {"metrics_listen": "127.0.0.1:0", "max_message_size": MAX_SIZE}

    def test_metrics_equal_stats(self):
        self.assertEqual(self.server.metrics_address[0], "127.0.0.1")
        kinds, octets = [], 0
        for sent in (["accepted", "too_big"], ["bounced", "accepted", "bounced"]):
            client = self.smtp()
            octets += send(self, client, sent)
            kinds += sent
            client.quit()
        self.assertEqual(self.smtp().rcpt("fail=c@example.com")[0], 550)
        wait_until(lambda: self.server.stats["connections_active"] == 1)
        status, kind, body = http_get(self.server.metrics_address, "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(kind.startswith("text/plain; version=0.0.4"), kind)
        samples = parse_metrics(self, body)
        self.assertEqual(samples, as_metrics(self.server.stats))
        expected = expected_counters(kinds, 3, octets, faults=1)
        expected["blackhole_connections_active"] = 1
        self.assertEqual({k: samples[k] for k in expected}, expected)
        for name in ("auth_total", "tls_handshakes_total"):
            for result in ("success", "failure"):
                self.assertEqual(samples['blackhole_%s{result="%s"}' % (name, result)], 0)
        self.assertEqual(samples["blackhole_timeouts_total"], 0)
        self.assertEqual(http_get(self.server.metrics_address, "/")[0], 404)
        self.assertEqual(http_get(self.server.metrics_address, "/metrics/x")[0], 404)


class MetricTypesTest(unittest.TestCase):
    """8: connections_active is a gauge, every other metric a counter."""

    def test_types(self):
        text = blackhole.metrics_text(blackhole.Stats().as_dict())
        types = dict(re.findall(r"^# TYPE blackhole_(\S+) (\S+)$", text, re.M))
        self.assertEqual(types.pop("connections_active"), "gauge")
        self.assertEqual(set(types.values()), {"counter"})


class WorkerLifeTest(ProcessTestCase):
    """What a worker's death and its supervisor's death do (SPEC 7, 8)."""

    def test_workers_end_when_the_supervisor_is_killed(self):
        """SIGKILL leaves the supervisor no time to stop its workers: each
        sees its pipe to the supervisor close and stops on its own."""
        port = free_port()
        proc, log = self.start("listen = 127.0.0.1:%d\nworkers = 2\n" % port, "-q")
        self.serving(proc, log, port)
        workers = self.workers_of(proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT)
        wait_until(lambda: all(gone(pid) for pid in workers), timeout=5,
                   message="the orphaned workers to exit")

    def test_restarts_back_off(self):
        """A worker that keeps dying is restarted after 0.1 s, then twice
        as long each time."""
        port = free_port()
        proc, log = self.start("listen = 127.0.0.1:%d\nworkers = 2\n" % port, "-q")
        self.serving(proc, log, port)
        known = set(self.workers_of(proc))
        victim = min(known)
        for seconds in ("0.1", "0.2", "0.4"):
            os.kill(victim, signal.SIGKILL)
            line = "(pid %d) was killed by signal 9; restarting in %ss" % (victim, seconds)
            wait_until(lambda: line in read_text(log), timeout=5, message=line)
            wait_until(lambda: set(children(proc.pid)) - known, timeout=5,
                       message="a replacement worker")
            (victim,) = set(children(proc.pid)) - known
            known.add(victim)

    def test_workers_ended_with_the_supervisor_are_not_restarted(self):
        """Ctrl-C reaches the workers and the supervisor at once; here the
        workers' ends are surely seen in the same wake-up as the SIGINT."""
        port = free_port()
        proc, log = self.start("listen = 127.0.0.1:%d\nworkers = 2\n" % port, "-q")
        self.serving(proc, log, port)
        workers = self.workers_of(proc)
        self.pause(proc.pid)                    # its signals wait, pending
        for pid in workers:
            os.kill(pid, signal.SIGINT)
        wait_until(lambda: all(gone(pid) for pid in workers), message="workers gone")
        os.kill(proc.pid, signal.SIGINT)
        os.kill(proc.pid, signal.SIGCONT)
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertNotIn("restarting", read_text(log))
        self.assertEqual(read_text(log).splitlines()[-1], "blackhole: stopped")

    def test_one_counters_line_per_sigusr1_to_the_supervisor(self):
        """The supervisor wakes again (here: a worker dies) without logging
        the counters a second time."""
        port = free_port()
        proc, log = self.start("listen = 127.0.0.1:%d\nworkers = 2\n" % port, "-q")
        self.serving(proc, log, port)
        workers = self.workers_of(proc)
        os.kill(proc.pid, signal.SIGUSR1)
        wait_until(lambda: "counters:" in read_text(log), message="a counters line")
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: set(children(proc.pid)) - set(workers), timeout=5,
                   message="a replacement worker")
        self.assertEqual(read_text(log).count("counters:"), 1)

    def test_sigusr1_to_a_worker_logs_its_own_counters(self):
        port = free_port()
        proc, log = self.start("listen = 127.0.0.1:%d\nworkers = 2\n" % port, "-q")
        self.serving(proc, log, port)
        first, second = self.workers_of(proc)
        os.kill(first, signal.SIGUSR1)
        wait_until(lambda: "counters:" in read_text(log), message="a counters line")
        lines = [line for line in read_text(log).splitlines() if "counters:" in line]
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("blackhole: counters: connections_total="))
        self.assertEqual(proc.poll(), None)


class GroupTest(ProcessTestCase):
    """`group` wins over the user's own group (SPEC 7)."""

    @unittest.skipUnless(hasattr(os, "getuid") and os.getuid() == 0,
                         "dropping privileges needs root (CI runs the tests as root)")
    def test_group_other_than_the_users_own(self):
        import grp
        import pwd
        user = pwd.getpwnam("nobody")
        others = [g for g in grp.getgrall() if g.gr_gid not in (0, user.pw_gid)]
        if not others:
            self.skipTest("no group other than root and nobody's own")
        group = others[0]
        port = free_port()
        proc, log = self.start("listen = 127.0.0.1:%d\nuser = nobody\ngroup = %s\n"
                               % (port, group.gr_name))
        self.serving(proc, log, port)
        with open("/proc/%d/status" % proc.pid) as handle:
            status = dict(line.split(":", 1) for line in handle.read().splitlines())
        self.assertEqual(status["Uid"].split(), [str(user.pw_uid)] * 4)
        self.assertEqual(status["Gid"].split(), [str(group.gr_gid)] * 4)
        self.assertEqual(status["Groups"].split(), [str(group.gr_gid)])
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(TIMEOUT), 0)


class BackgroundPidfileDefaultTest(unittest.TestCase):
    """-b without `pidfile` writes /tmp/blackhole.pid
    (SPEC 3).  main() runs in this process with the fork, the signals and
    the serving loop replaced, so no file outside the test is touched."""

    def test_background_pidfile_defaults_to_tmp(self):
        conf = write_config(self, "listen = 127.0.0.1:0\nhostname = bh.test\n")
        read_fd, write_fd = os.pipe()
        self.addCleanup(os.close, read_fd)
        calls = []
        logger = blackhole.log
        saved = list(logger.handlers), logger.level, logger.propagate

        def restore():
            logger.handlers[:] = saved[0]
            logger.setLevel(saved[1])
            logger.propagate = saved[2]
        self.addCleanup(restore)
        with mock.patch.object(blackhole, "_daemonize", lambda: write_fd), \
                mock.patch.object(blackhole, "_write_pidfile",
                                  lambda path, source: calls.append(("write", path))), \
                mock.patch.object(blackhole, "_remove_pidfile",
                                  lambda path: calls.append(("remove", path))), \
                mock.patch.object(blackhole, "_Signals", mock.MagicMock()), \
                mock.patch.object(blackhole, "_run",
                                  lambda server, signals: server._close_listeners()), \
                mock.patch.object(blackhole, "_listening", lambda server: None), \
                mock.patch.object(threading, "stack_size"), \
                mock.patch.object(sys, "stderr", mock.MagicMock()):
            self.assertEqual(blackhole.main(["-q", "-b", "-c", conf]), 0)
        self.assertEqual(calls, [("write", "/tmp/blackhole.pid"),
                                 ("remove", "/tmp/blackhole.pid")])
        self.assertEqual(os.read(read_fd, 16), b"ok")     # the launcher's word


class PidfileTest(ProcessTestCase):
    """The pidfile at exit, and -b's standard input."""

    def test_a_pidfile_another_process_took_over_is_left(self):
        """A second instance given the same pidfile wrote its pid there: the
        first one, stopping, must not remove it."""
        port, pidfile = free_port(), os.path.join(self.tempdir(), "bh.pid")
        proc, log = self.start("listen = 127.0.0.1:%d\npidfile = %s\n" % (port, pidfile), "-q")
        self.serving(proc, log, port)
        with open(pidfile, "w") as handle:
            handle.write("%d\n" % os.getpid())      # as the other instance would
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(TIMEOUT), 0)
        with open(pidfile) as handle:
            self.assertEqual(handle.read(), "%d\n" % os.getpid())

    def test_background_lets_go_of_a_standard_input_file(self):
        """`-b < file`: the daemon keeps only a standard output or error
        that is a file (its log), never standard input."""
        port, folder = free_port(), self.tempdir()
        pidfile, infile = os.path.join(folder, "bh.pid"), os.path.join(folder, "in.txt")
        with open(infile, "w") as handle:
            handle.write("input\n")
        conf = self.config("listen = 127.0.0.1:%d\npidfile = %s\n" % (port, pidfile))
        with open(infile) as stdin:
            launcher = subprocess.run([sys.executable, os.path.join(ROOT, "blackhole.py"),
                                       "-q", "-b", "-c", conf], stdin=stdin,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      cwd=ROOT, timeout=TIMEOUT)
        self.assertEqual((launcher.returncode, launcher.stderr), (0, b""))
        with open(pidfile) as handle:
            pid = int(handle.read())
        self.addCleanup(_kill_quietly, pid)
        self.assertEqual(os.readlink("/proc/%d/fd/0" % pid), os.devnull)
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: gone(pid), message="the daemon to exit")


def _kill_quietly(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":
    unittest.main()
