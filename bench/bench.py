#!/usr/bin/env python3
"""Benchmark blackhole.py, and compare it with kura/blackhole in the same run.

Run it with `make bench` or `python3 bench/bench.py [options]`:

    --quick          shorter measurements (about a minute in all)
    --only NAME,...  run only these scenario groups: small, connect, large,
                     pipelined, idle, tls, workers, embed, checks
    --no-kura        measure blackhole.py alone
    --seconds S      length of one measurement (default 2)
    --rounds N       rounds over every target (default 3, 1 with --quick)
    --blackhole PATH the blackhole.py to measure (default: the repo's)
    --no-smtp-source use the Python clients even when smtp-source is there

It starts `python3 blackhole.py -c CONFIG` on a generated config and a free
port of 127.0.0.1, waits until the port answers, runs each scenario against
it and prints one markdown table on stdout (progress goes to stderr). The
targets take turns, round after round, and the table shows each figure's
median over the rounds: on a small, noisy machine one 2-second figure can
be 25% off, and taking turns keeps a slow minute from favouring one side.

    scenario        what was measured, and its unit
    ours            blackhole.py, one process (`workers = 1`) unless the row
                    says otherwise
    kura/blackhole  kura/blackhole 2.x from PyPI on asyncio's own event loop
    kura+uvloop     the same with uvloop installed
    ratio           how many times better ours is than kura's best figure on
                    that row (> 1: ours is better): ours / theirs for rates,
                    theirs / ours for RSS and milliseconds. On the
                    sender-checks rows it is `count` / `off` for ours instead.

Server RSS (VmRSS) and thread counts are read from /proc/PID/status and
summed over the server's whole process tree (kura always runs a supervisor
and a worker process; `workers = 2` forks two workers). The kura columns use
kura's best `workers` setting (1 or 2, whichever is faster on the
"small, reused, 50 sessions" row); the "workers" rows show both.

Two figures put the goals in scale. The floor sink (class Floor) is a
thread-per-session server like ours that parses nothing and answers from
constants; its "small, reused, 50 sessions" figure, under the table, is a
fair estimate of the most a server of this design does on the machine. The workers row
measures the CPU time per message of ours and of the load generator, which
share the machine: all CPUs busy, two workers do at most CPUs / (both per
message) messages a second, shown next to the workers goal.

Load generator: Postfix's `smtp-source` (C, `apt-get install postfix`) when
it is installed, for the rows it can drive (plain SMTP without pipelining);
otherwise, and always for the pipelined, TLS and idle rows, Python clients on
raw sockets spread over several processes. Every measurement is time-boxed
(--seconds), so slow servers do not make the run longer.

kura/blackhole is installed with pip into scratch virtualenvs outside the
repository (/tmp/kura-venv and /tmp/kura-uvloop-venv), created on first use;
when pip fails its columns say why. None of it is a dependency of the
project. kura's `blackhole` command dies at start with a current uvloop
("There is no current event loop"), so it is started through a one-line
wrapper that sets an event loop first and then calls its entry point.
kura has no STARTTLS and no embedding API: n/a.
"""

import argparse
import multiprocessing
import os
import resource
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMTP_SOURCE = shutil.which("smtp-source") or (
    "/usr/sbin/smtp-source" if os.access("/usr/sbin/smtp-source", os.X_OK) else None)
KURA_VENVS = {"kura": ("/tmp/kura-venv", ["blackhole"]),
              "kura+uvloop": ("/tmp/kura-uvloop-venv", ["blackhole", "uvloop"])}
KURA_WRAPPER = ("import sys, asyncio, blackhole.application as app; "
                "asyncio.set_event_loop(asyncio.new_event_loop()); "
                "sys.argv[0] = 'blackhole'; app.run()")
LARGE_MAX = 32 * 1024 * 1024  # max_message_size for every server
SENDER, RECIPIENT = "bench@example.com", "sink@example.com"
GROUPS = ["small", "connect", "large", "pipelined", "idle", "tls", "workers",
          "embed", "checks"]  # in the order of the table


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def message(size):
    """A well-formed message with `size` octets of body in 78-octet lines,
    shaped like smtp-source's, dot-stuffing not needed, final CRLF included."""
    head = ("From: <%s>\r\nTo: <%s>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            "Message-ID: <bench.1@example.com>\r\nSubject: bench\r\n\r\n"
            % (SENDER, RECIPIENT)).encode()
    line = b"X" * 78 + b"\r\n"
    body = line * (size // len(line))
    rest = size - len(body)
    if rest:
        body += b"X" * max(rest - 2, 0) + b"\r\n"
    return head + body


# --- servers ---------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """pid and every process below it (read from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def start_time(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def proc_status(pid, key):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Running:
    """A server process started on a generated config."""

    def __init__(self, target, options, tmp):
        self.target = target
        self.port = free_port()
        conf = os.path.join(tmp, "%s-%d.conf" % (target.key.replace("+", "-"), self.port))
        with open(conf, "w") as f:
            f.write(target.config(self.port, options, tmp))
        self.logfile = conf[:-5] + ".log"
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(target.command(conf), stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL, cwd=tmp)
        self.wait_ready()

    def log_tail(self):
        with open(self.logfile, "rb") as f:
            return f.read()[-600:].decode(errors="replace").strip()

    def wait_ready(self, timeout=15):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited with %s: %s"
                                   % (self.proc.returncode, self.log_tail()))
            try:
                with socket.create_connection(("127.0.0.1", self.port), 2) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("server did not answer within %ds: %s" % (timeout, self.log_tail()))

    def pids(self):
        return descendants(self.proc.pid)

    def rss_mb(self, key="VmRSS"):
        return sum(proc_status(p, key) for p in self.pids()) / 1024.0

    def threads(self):
        return sum(proc_status(p, "Threads") for p in self.pids())

    def cpu_seconds(self):
        """User + system CPU time of the whole process tree so far."""
        ticks = 0
        for p in self.pids():
            try:
                with open("/proc/%d/stat" % p) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])     # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return ticks / os.sysconf("SC_CLK_TCK")

    def reset_peak(self):
        for p in self.pids():
            try:
                with open("/proc/%d/clear_refs" % p, "w") as f:
                    f.write("5")
            except OSError:
                pass

    def stop(self):
        """SIGTERM, then SIGKILL for whatever of the tree is still there."""
        children = [(p, start_time(p)) for p in self.pids()[1:]]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        time.sleep(0.05)
        for pid, started in children:  # the same processes, not reused ids
            if started is not None and start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Ours:
    key, title = "ours", "ours"

    def __init__(self, path):
        self.path = path
        self.problem, self.version = None, None
        if not os.path.exists(path):
            self.problem = "missing"
            return
        out = subprocess.run([sys.executable, path, "-v"], capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.startswith("blackhole"):
            self.problem = "`-v` failed"
            log("%s -v: exit %d %s" % (path, out.returncode, out.stderr.strip()[-300:]))
        else:
            self.version = out.stdout.strip()

    def command(self, conf):
        return [sys.executable, self.path, "-q", "-c", conf]

    def config(self, port, opt, tmp):
        lines = ["[blackhole]",
                 "listen = 127.0.0.1:%d" % port,
                 "hostname = bench.example.com",
                 "mode = accept",
                 "timeout = 120",
                 "max_message_size = %d" % LARGE_MAX,
                 "workers = %d" % opt.get("workers", 1),
                 "max_connections = %d" % opt.get("max_connections", 1000)]
        if "sender_checks" in opt:
            lines.append("sender_checks = %s" % opt["sender_checks"])
        if opt.get("tls"):
            lines += ["tls_cert = %s" % opt["tls"][0], "tls_key = %s" % opt["tls"][1]]
        return "\n".join(lines) + "\n"


class Kura:
    """kura/blackhole from PyPI, in a scratch venv outside the repository."""

    def __init__(self, key):
        self.key = self.title = key
        self.venv, packages = KURA_VENVS[key]
        self.workers = 1
        self.problem = None
        python = os.path.join(self.venv, "bin", "python")
        probe = "import " + ", ".join(packages)
        if not os.path.exists(python) or subprocess.run(
                [python, "-c", probe], capture_output=True).returncode != 0:
            log("creating %s (pip install %s)" % (self.venv, " ".join(packages)))
            try:
                subprocess.run([sys.executable, "-m", "venv", self.venv], check=True,
                               capture_output=True, timeout=300)
                subprocess.run([python, "-m", "pip", "install", "-q"] + packages,
                               check=True, capture_output=True, timeout=600)
            except (subprocess.SubprocessError, OSError) as exc:
                err = getattr(exc, "stderr", b"") or b""
                log("  pip failed, skipping %s: %s" % (key, err.decode(errors="replace")[-300:]))
                self.problem = "pip failed"
        self.python = python

    def command(self, conf):
        return [self.python, "-c", KURA_WRAPPER, "-q", "-c", conf]

    def config(self, port, opt, tmp):
        # kura reads `key = value` lines without a section header.
        return ("listen = 127.0.0.1:%d\nworkers = %d\nmode = accept\ntimeout = 120\n"
                "max_message_size = %d\npidfile = %s/kura-%d.pid\n"
                % (port, opt.get("workers", self.workers), LARGE_MAX, tmp, port))


# --- load generators -------------------------------------------------------

class Client:
    """A minimal blocking SMTP client on a raw socket (smtplib is too slow)."""

    def __init__(self, port, tls=False, timeout=15):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.expect(220)
        self.command(b"EHLO localhost\r\n", 250)
        if tls:
            self.command(b"STARTTLS\r\n", 220)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")
            self.command(b"EHLO localhost\r\n", 250)

    def reply(self):
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed the connection")
                self.buf += data
                continue
            line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
            if line[3:4] != b"-":
                return int(line[:3])

    def expect(self, code):
        got = self.reply()
        if got != code:
            raise ConnectionError("expected %d, got %d" % (code, got))

    def command(self, data, code):
        self.sock.sendall(data)
        self.expect(code)

    def send_message(self, body):
        self.command(b"MAIL FROM:<%s>\r\n" % SENDER.encode(), 250)
        self.command(b"RCPT TO:<%s>\r\n" % RECIPIENT.encode(), 250)
        self.command(b"DATA\r\n", 354)
        self.command(body + b".\r\n", 250)

    def close(self, quit=True):
        try:
            if quit:
                self.command(b"QUIT\r\n", 221)
        except OSError:
            pass
        self.sock.close()


def _client_process(port, threads, size, reuse, tls, minimum, go, stop_at, results):
    """One process of the Python load generator: `threads` sessions.

    A session sends messages until the deadline, and past it until it has
    sent `minimum` (so that very slow servers still get measured)."""
    body = message(size)
    counts, last, errors = [0] * threads, [0.0] * threads, []

    def session(i):
        go.wait()
        deadline = stop_at.value
        hard_stop = deadline + 60
        client = None
        try:
            while time.monotonic() < deadline or (
                    counts[i] < minimum and time.monotonic() < hard_stop):
                if client is None:
                    client = Client(port, tls)
                client.send_message(body)
                now = time.monotonic()
                if now <= deadline or counts[i] < minimum:
                    counts[i] += 1
                    last[i] = now
                if not reuse:
                    client.close()
                    client = None
            if client is not None:
                client.close()
        except (OSError, ValueError) as exc:
            errors.append(repr(exc))

    pool = [threading.Thread(target=session, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    results.put(("ready", 0, 0.0, None))
    for t in pool:
        t.join()
    results.put(("done", sum(counts), max(last), errors[:3]))


def python_load(port, sessions, size, seconds, reuse=True, tls=False, minimum=0):
    """Time-boxed run of Python clients in several processes: (messages, s).

    With `minimum`, each session goes on past the deadline until it has sent
    that many messages, and the time is taken at the last one."""
    ctx = multiprocessing.get_context("fork")
    nproc = min(sessions, max(2, os.cpu_count() or 2))
    go, stop_at, results = ctx.Event(), ctx.Value("d", 0.0), ctx.Queue()
    shares = [sessions // nproc + (i < sessions % nproc) for i in range(nproc)]
    procs = [ctx.Process(target=_client_process, args=(
                 port, n, size, reuse, tls, minimum, go, stop_at, results))
             for n in shares]
    for p in procs:
        p.start()
    for _ in procs:
        results.get(timeout=60)
    start = time.monotonic()
    stop_at.value = start + seconds
    go.set()
    total, finish, errors = 0, start + seconds, []
    for _ in procs:
        _, n, last, errs = results.get(timeout=seconds + 120)
        total += n
        finish = max(finish, last)
        errors += errs
    for p in procs:
        p.join()
    if errors:
        log("  client errors: %s" % "; ".join(errors[:3]))
        if total == 0:
            raise RuntimeError(errors[0])
    return total, finish - start


def smtp_source_load(port, sessions, size, seconds, reuse=True, minimum=0):
    """Time-boxed run of Postfix's smtp-source: (messages, seconds).

    `-c` prints a counter after every message; the bench reads it every
    0.1 s (not per message, to stay off the CPU), takes the count at the
    deadline and stops smtp-source. With `minimum`, it runs past the
    deadline until that many messages are done (at most 60 s more)."""
    argv = [SMTP_SOURCE, "-c", "-M", "localhost", "-f", SENDER, "-t", RECIPIENT,
            "-s", str(sessions), "-l", str(size), "-m", "100000000"]
    if reuse:
        argv.append("-d")
    argv.append("127.0.0.1:%d" % port)
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    tail, count, when = b"", 0, start

    def read_counter():  # the output is "1\r2\r3\r..."
        nonlocal tail, count, when
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                return
            tail = (tail + chunk)[-64:]
            done = tail.rsplit(b"\r", 2)
            if len(done) >= 2 and done[-2].strip().isdigit():
                count, when = int(done[-2]), time.monotonic()

    deadline, hard_stop = start + seconds, start + seconds + 60
    while proc.poll() is None:
        now = time.monotonic()
        if now >= deadline and (count >= minimum or now >= hard_stop):
            break
        time.sleep(min(0.1, deadline - now) if now < deadline else 0.02)
        read_counter()
    elapsed = time.monotonic() - start
    if count >= minimum and elapsed - seconds > 0.05:
        elapsed = max(when - start, seconds)  # the minimum took longer
    exited = proc.poll()
    proc.terminate()
    proc.wait()
    err = proc.stderr.read().decode(errors="replace").strip()
    proc.stdout.close()
    proc.stderr.close()
    if exited is not None or "fatal" in err:  # e.g. a reply it did not expect
        raise RuntimeError("smtp-source: %s" % (err[-300:] or "exited with %s" % exited))
    return count, elapsed


def load(port, sessions, size, seconds, reuse=True, minimum=0):
    if SMTP_SOURCE:
        return smtp_source_load(port, sessions, size, seconds, reuse, minimum)
    return python_load(port, sessions, size, seconds, reuse, minimum=minimum)


# --- scenarios -------------------------------------------------------------
# Each takes (bench, target) and returns {row name: value}; a value is a
# number, or a string shown as it is.

SMALL = 1024
LARGE = 100 * 1024
HUGE = 10 * 1024 * 1024
# Rows the goals look up.
WORKERS_ROW = "small 1 KB, reused, 50 sessions, workers = %d: msg/s"
SMALL50_ROW = "small 1 KB, reused, 50 sessions: msg/s"
PIPELINED_ROW = "pipelined 1 KB, 1 session: msg/s"
LARGE_ROW = "large 100 KB, 4 sessions: MB/s"
IDLE_ROW = "idle, %s sessions: server RSS MB"
IDLE_ROW2 = "idle, %s sessions: RSS growth MB / threads / answered"
EMBED_ROW = "embed: Server() start + 1 message + stop: median ms"


def scenario_workers(bench, target):
    """Small, reused, 50 sessions with workers = 1 and workers = 2; for
    ours, also the CPU time per message of the server and of the load
    generator (the goals line shows what that leaves for two workers)."""
    rows = {}
    for workers in (1, 2):
        with bench.server(target, workers=workers) as srv:
            server0, client0 = srv.cpu_seconds(), children_cpu_seconds()
            n, s = load(srv.port, 50, SMALL, bench.seconds)
            server, client = srv.cpu_seconds() - server0, children_cpu_seconds() - client0
        rows[WORKERS_ROW % workers] = n / s
        if target.key == "ours" and workers == 1 and n and server + client > 0:
            bench.cpu_per_message.append((server / n, client / n))
    return rows


def scenario_small(bench, target):
    """1 KB messages, many per session, at 1, 10, 50 and 200 sessions; for
    ours, also the floor sink at 50 sessions."""
    rows = {}
    with bench.server(target) as srv:
        for sessions in (1, 10, 50, 200):
            n, s = load(srv.port, sessions, SMALL, bench.seconds)
            rows["small 1 KB, reused, %d session%s: msg/s"
                 % (sessions, "s" if sessions > 1 else "")] = n / s
            time.sleep(0.2)
    if target.key == "ours":
        try:
            with bench.server(FLOOR) as srv:
                n, s = load(srv.port, 50, SMALL, bench.seconds)
            bench.floor.append(n / s)
        except Exception as exc:    # ours' rows stand without it
            log("  the floor sink failed: %s" % exc)
    return rows


FLOOR_CODE = r"""
import os, socket, socketserver, sys
class Session(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"220 floor\r\n")
        buf, data = b"", False
        while True:
            end = buf.find(b"\r\n.\r\n" if data else b"\n")
            if end < 0:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf = (buf[-4:] if data else buf) + chunk
            elif data:
                buf, data = buf[end + 5:], False
                sock.sendall(b"250 2.0.0 OK\r\n")
            else:
                verb, buf = buf[:4].upper(), buf[end + 1:]
                if verb == b"DATA":
                    buf, data = b"\r\n" + buf, True
                    sock.sendall(b"354 go on\r\n")
                elif verb == b"QUIT":
                    sock.sendall(b"221 bye\r\n")
                    return
                else:
                    sock.sendall(b"250 OK\r\n")
class Server(socketserver.ThreadingTCPServer):
    daemon_threads, request_queue_size = True, 1024
if hasattr(os, "sched_setaffinity"):    # one CPU, as ours with pin_cpu
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
Server(("127.0.0.1", int(sys.argv[1])), Session).serve_forever()
"""


class Floor:
    """The design's floor: a thread per session, as ours, that parses
    nothing and answers every line from constants (DATA: 354, the end of
    data: 250, QUIT: 221, anything else: 250). No server of this shape
    does more on this machine: it bounds what the goals may ask of ours."""
    key = title = "floor"

    def command(self, conf):
        with open(conf) as f:   # its "config" is the port alone
            return [sys.executable, "-c", FLOOR_CODE, f.read()]

    def config(self, port, opt, tmp):
        return str(port)


FLOOR = Floor()


def scenario_connect(bench, target):
    """Connect, HELO, one 1 KB message, QUIT, at 10 and 50 sessions."""
    rows = {}
    with bench.server(target) as srv:
        for sessions in (10, 50):
            n, s = load(srv.port, sessions, SMALL, bench.seconds, reuse=False)
            rows["small 1 KB, one per connection, %d sessions: msg/s" % sessions] = n / s
            time.sleep(0.3)
    return rows


def scenario_large(bench, target):
    """100 KB (4 sessions) and 10 MB (2 sessions) messages: MB/s, and the
    server's RSS before and after the 10 MB run (peak: VmHWM, reset first)."""
    rows = {}
    with bench.server(target) as srv:
        n, s = load(srv.port, 4, LARGE, bench.seconds, minimum=4)
        rows[LARGE_ROW] = n * LARGE / s / 1e6
        time.sleep(0.3)
        srv.reset_peak()
        before = srv.rss_mb()
        n, s = load(srv.port, 2, HUGE, max(bench.seconds, 1.5), minimum=2)
        rows["large 10 MB, 2 sessions: MB/s"] = n * HUGE / s / 1e6
        peak, after = srv.rss_mb("VmHWM"), srv.rss_mb()
        rows["large 10 MB: RSS MB before → after (peak)"] = (
            "%.1f → %.1f (%.1f)" % (before, after, peak))
        bench.rss_growth.setdefault(target.key, []).append(max(after, peak) - before)
    return rows


def scenario_pipelined(bench, target):
    """One client writing MAIL, RCPT, DATA, the body and the dot in one send
    per message, then reading the four replies."""
    with bench.server(target) as srv:
        client = Client(srv.port)
        batch = (b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n"
                 % (SENDER.encode(), RECIPIENT.encode())) + message(SMALL) + b".\r\n"
        count, start = 0, time.monotonic()
        deadline = start + bench.seconds
        while time.monotonic() < deadline:
            client.sock.sendall(batch)
            codes = [client.reply() for _ in range(4)]
            if codes != [250, 250, 354, 250]:
                raise RuntimeError("pipelined replies %s" % codes)
            count += 1
        elapsed = time.monotonic() - start
        client.close()
    return {PIPELINED_ROW: count / elapsed}


def scenario_tls(bench, target):
    """The small, reused row over STARTTLS at 10 sessions (Python clients)."""
    if not bench.certs:
        return {"TLS (STARTTLS) 1 KB, reused, 10 sessions: msg/s": "no cert"}
    with bench.server(target, tls=bench.certs) as srv:
        n, s = python_load(srv.port, 10, SMALL, bench.seconds, tls=True)
    return {"TLS (STARTTLS) 1 KB, reused, 10 sessions: msg/s": n / s}


def _idle(bench, target, count):
    with bench.server(target, max_connections=count + 500) as srv:
        base = srv.rss_mb()
        socks = []
        try:
            for _ in range(count):  # one at a time: no burst on the backlog
                s = socket.create_connection(("127.0.0.1", srv.port), 15)
                socks.append(s)
                s.recv(512)  # the greeting (or a 421 for a refused one)
            time.sleep(0.5)
            rss, threads = srv.rss_mb(), srv.threads()
            # Wake every session at once and expect a 250 to NOOP from each.
            with selectors.DefaultSelector() as sel:
                for s in socks:
                    s.sendall(b"NOOP\r\n")
                    s.setblocking(False)
                    sel.register(s, selectors.EVENT_READ)
                answered, pending = 0, len(socks)
                end = time.monotonic() + 20
                while pending and time.monotonic() < end:
                    for key, _ in sel.select(1):
                        try:
                            data = key.fileobj.recv(512)
                        except BlockingIOError:
                            continue
                        sel.unregister(key.fileobj)
                        pending -= 1
                        answered += data.startswith(b"250")
        finally:
            for s in socks:
                s.close()
    name = format(count, ",")
    return {IDLE_ROW % name: rss,
            IDLE_ROW2 % name: "+%.1f / %d / %d of %d" % (rss - base, threads, answered, count)}


def scenario_idle(bench, target):
    """1,000 and 5,000 silent sessions: server RSS and threads, then each
    sends NOOP and must get its 250."""
    rows = {}
    for count in (1000, 5000):
        rows.update(_idle(bench, target, count))
    return rows


EMBED_CODE = r"""
import smtplib, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import blackhole
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    with blackhole.Server() as server:
        with smtplib.SMTP(*server.address, local_hostname="localhost") as client:
            client.sendmail("a@example.com", ["b@example.com"],
                            b"Subject: x\r\n\r\nhi\r\n")
    times.append(time.perf_counter() - start)
print(statistics.median(times) * 1000)
"""


def scenario_embed(bench, target):
    """blackhole.Server() start + one smtplib message + stop, in-process:
    median ms over 50 (run in a fresh interpreter)."""
    out = subprocess.run([sys.executable, "-c", EMBED_CODE, os.path.dirname(target.path),
                          str(bench.embed_runs)],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip()[-300:])
    return {EMBED_ROW: float(out.stdout)}


def scenario_checks(bench, target):
    """sender_checks = off vs count (SPEC 11): 1 KB at 10 sessions and
    100 KB at 4 sessions, alternated twice, best of each kept."""
    rows = {}
    for size, sessions, what in ((SMALL, 10, "1 KB, 10 sessions: msg/s"),
                                 (LARGE, 4, "100 KB, 4 sessions: MB/s")):
        best = {"off": 0.0, "count": 0.0}
        for _ in range(2):
            for mode in ("off", "count"):
                if best[mode] is None:
                    continue
                try:
                    with bench.server(target, sender_checks=mode) as srv:
                        n, s = load(srv.port, sessions, size, bench.seconds)
                except Exception as exc:
                    log("  sender_checks = %s, %s failed: %s" % (mode, what, exc))
                    best[mode] = None
                    continue
                rate = n / s if size == SMALL else n * size / s / 1e6
                best[mode] = max(best[mode], rate)
        for mode in ("off", "count"):
            rows["sender_checks = %s, %s" % (mode, what)] = (
                "error" if best[mode] is None else best[mode])
        if best["off"] and best["count"]:
            bench.checks_ratio.setdefault(what, []).append(best["count"] / best["off"])
    return rows


SCENARIOS = {"workers": scenario_workers, "small": scenario_small,
             "connect": scenario_connect, "large": scenario_large,
             "pipelined": scenario_pipelined, "tls": scenario_tls,
             "idle": scenario_idle, "embed": scenario_embed,
             "checks": scenario_checks}
OURS_ONLY = {"tls", "embed", "checks"}  # kura: no STARTTLS, no API, no checks


# --- the run and the table -------------------------------------------------

class Bench:
    """Settings of the run, and every figure measured so far."""

    def __init__(self, args):
        self.seconds = args.seconds or (0.6 if args.quick else 2.0)
        self.rounds = args.rounds or (1 if args.quick else 3)
        self.embed_runs = 15 if args.quick else 50
        self.tmp = tempfile.mkdtemp(prefix="blackhole-bench-")
        self.certs = self.find_certs()
        self.results = {}  # row -> {target key: [value of each round]}
        self.rows = {g: [] for g in GROUPS}  # the rows of each group, in order
        self.rss_growth, self.checks_ratio = {}, {}  # key -> [value of each round]
        self.floor = []             # the floor sink, 50 sessions: msg/s of each round
        self.cpu_per_message = []   # (ours, load generator) seconds, workers = 1

    def find_certs(self):
        """The test suite's certificate, else a throwaway self-signed one."""
        pem = os.path.join(ROOT, "tests", "certs", "server.pem")
        key = os.path.join(ROOT, "tests", "certs", "server.key")
        if os.path.exists(pem) and os.path.exists(key):
            return pem, key
        pem, key = os.path.join(self.tmp, "cert.pem"), os.path.join(self.tmp, "key.pem")
        try:
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-keyout", key, "-out", pem, "-days", "2", "-subj",
                            "/CN=localhost"], check=True, capture_output=True)
            return pem, key
        except (OSError, subprocess.CalledProcessError):
            return None

    def server(self, target, **options):
        return Running(target, options, self.tmp)

    def value(self, row, key="ours"):
        """The median of a row's numbers over the rounds, or None."""
        return median(self.results.get(row, {}).get(key, []))

    def shown(self, row, key):
        """What the table shows: the median, else the last text (an error)."""
        values = self.results[row][key]
        number = median(values)
        return values[-1] if number is None else number

    def run(self, target, groups):
        for group in groups:
            if group in OURS_ONLY and target.key != "ours":
                continue
            started = time.monotonic()
            try:
                rows = SCENARIOS[group](self, target)
            except Exception as exc:  # one failing scenario must not end the run
                log("  %s: %s failed: %s" % (target.title, group, exc))
                rows = {"%s: error" % group: "error"}
            for name, value in rows.items():
                if name not in self.results:
                    self.results[name] = {}
                    self.rows[group].append(name)
                self.results[name].setdefault(target.key, []).append(value)
                log("  %-12s %-58s %s" % (target.title, name, fmt(value)))
            log("  (%s took %.1fs)" % (group, time.monotonic() - started))

    def pick_kura_workers(self, target, groups):
        """kura's best `workers` (1 or 2) on small, reused, 50 sessions: from
        the workers rows when they run, else from a short measurement."""
        if "workers" in groups:
            self.run(target, ["workers"])
            rates = [self.value(WORKERS_ROW % w, target.key) for w in (1, 2)]
        else:
            rates = []
            for w in (1, 2):
                with self.server(target, workers=w) as srv:
                    n, s = load(srv.port, 50, SMALL, min(self.seconds, 0.8))
                rates.append(n / s)
        if all(rates):
            target.workers = 2 if rates[1] > rates[0] else 1
        log("  %s: best workers = %d" % (target.title, target.workers))


def median(values):
    """The median of the numbers among values, or None if there are none."""
    numbers = sorted(v for v in values if isinstance(v, (int, float)))
    if not numbers:
        return None
    middle = len(numbers) // 2
    return numbers[middle] if len(numbers) % 2 else (numbers[middle - 1] + numbers[middle]) / 2


def fmt(value):
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if value >= 100:
        return format(round(value), ",")
    return "%.3g" % value


def ratio(bench, row, kuras):
    """How many times better ours is than kura's best on this row."""
    if row.startswith("sender_checks = count"):
        r = median(bench.checks_ratio.get(row.split(", ", 1)[1], []))
        return "%.2f× off" % r if r else ""
    ours = bench.value(row)
    theirs = [bench.value(row, k) for k in kuras if bench.value(row, k) is not None]
    if not ours or not theirs:
        return ""
    if "RSS" in row or row.endswith(" ms"):  # lower is better
        return "%.2f×" % (min(theirs) / ours)
    best = max(theirs)
    return "%.1f×" % (ours / best) if best else "∞"


def table(bench, targets):
    heads = {"ours": "ours", "kura": "kura/blackhole", "kura+uvloop": "kura+uvloop"}
    present = {t.key: t for t in targets}
    kuras = [t.key for t in targets[1:] if not t.problem]
    lines = ["| scenario | %s | ratio |" % " | ".join(heads.values()),
             "| --- | ---: | ---: | ---: | ---: |"]
    for group in GROUPS:
        for row in bench.rows[group]:
            cells = []
            for key in heads:
                if key in bench.results[row]:
                    cells.append(fmt(bench.shown(row, key)))
                elif key not in present:
                    cells.append("-")
                elif present[key].problem:
                    cells.append(present[key].problem)
                else:
                    cells.append("n/a")
            lines.append("| %s | %s | %s |" % (row, " | ".join(cells), ratio(bench, row, kuras)))
    return "\n".join(lines)


def goals(bench, targets):
    """The speed targets and SPEC 11's "no measurable cost", checked against this run."""
    out = []

    def check(text, ok):
        out.append("- %s %s" % ("ok  " if ok else "MISS", text))

    get = bench.value
    kuras = [t.key for t in targets[1:] if not t.problem]
    # kura's best configuration: the best of all its 50-session figures,
    # with either loop and either workers setting.
    ours = get(SMALL50_ROW)
    theirs = [get(r, k) for k in kuras for r in (SMALL50_ROW, WORKERS_ROW % 1, WORKERS_ROW % 2)
              if get(r, k)]
    if ours and theirs:
        x = ours / max(theirs)
        floor = median(bench.floor)
        check("small, reused, 50 sessions: %.1f× kura's best configuration (goal ≥ 3×)%s"
              % (x, "; the floor sink: %.1f×" % (floor / max(theirs)) if floor else ""),
              x >= 3)
    w1, w2 = get(WORKERS_ROW % 1), get(WORKERS_ROW % 2)
    if w1 and w2:
        cap = ""
        if bench.cpu_per_message:
            server = median([s for s, _ in bench.cpu_per_message])
            client = median([c for _, c in bench.cpu_per_message])
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else os.cpu_count() or 1
            # The load generator shares the machine: with every CPU busy,
            # two workers (two CPUs at most) do at most this many a second;
            # smtp-source is one process, so one CPU at most.
            most = min(cpus / (server + client), 2 / server)
            if SMTP_SOURCE:
                most = min(most, 1 / client)
            cap = ("; CPU per message: %.0f µs ours, %.0f µs load generator, so "
                   "%d CPUs allow at most %.2f×" % (server * 1e6, client * 1e6, cpus,
                                                   most / w1))
        check("workers = 2: %.2f× workers = 1 (goal ≥ 1.6×)%s" % (w2 / w1, cap),
              w2 / w1 >= 1.6)
    # The goal is against kura on asyncio's own loop, which stalls on Nagle;
    # uvloop sets TCP_NODELAY itself, so it is shown but not held to 100×.
    for k in kuras:
        if get(PIPELINED_ROW) and get(PIPELINED_ROW, k):
            x = get(PIPELINED_ROW) / get(PIPELINED_ROW, k)
            check("pipelined: %.0f× %s%s" % (x, k, " (goal ≥ 100×)" if k == "kura" else ""),
                  x >= 100 or k != "kura")
    v = get(LARGE_ROW)
    if v:
        check("large 100 KB: %.0f MB/s (goal ≥ 250)" % v, v >= 250)
    if "ours" in bench.rss_growth:
        g = median(bench.rss_growth["ours"])
        check("10 MB messages grow RSS by %.1f MB (goal < 5)" % g, g < 5)
    v = get(IDLE_ROW % "5,000")
    if v:
        answered = bench.shown(IDLE_ROW2 % "5,000", "ours").rsplit(" / ", 1)[1]
        check("5,000 idle sessions: %.0f MB RSS, %s answered (goal < 150 MB, all)"
              % (v, answered), v < 150 and answered == "5000 of 5000")
    v = get(EMBED_ROW)
    if v:
        check("embed: %.2f ms median (goal < 5)" % v, v < 5)
    for what, ratios in bench.checks_ratio.items():
        x = median(ratios)
        check("sender_checks = count vs off, %s: %.3f (goal ≥ 0.95)"
              % (what.split(":")[0], x), x >= 0.95)
    return "\n".join(out)


def children_cpu_seconds():
    """User + system CPU time of the bench's finished children (the load
    generators: smtp-source, or the Python client processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_busy(seconds=0.5):
    """The share of this machine's CPU time other processes are using now
    (sampled from /proc/stat while the bench is idle), or None."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def raise_fd_limit():
    """Thousands of idle sessions: the bench and the servers (which inherit
    this limit) need a file descriptor each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 12000 if hard == resource.RLIM_INFINITY else min(hard, 12000)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main():
    global SMTP_SOURCE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter measurements")
    parser.add_argument("--only", action="append", default=[],
                        help="scenario groups, comma-separated: " + ", ".join(GROUPS))
    parser.add_argument("--no-kura", action="store_true", help="skip kura/blackhole")
    parser.add_argument("--seconds", type=float, help="length of one measurement")
    parser.add_argument("--rounds", type=int,
                        help="rounds over every target; the table shows medians")
    parser.add_argument("--blackhole", default=os.path.join(ROOT, "blackhole.py"),
                        help="the blackhole.py to measure")
    parser.add_argument("--no-smtp-source", action="store_true",
                        help="use the Python load generator for every row")
    args = parser.parse_args()
    if args.no_smtp_source:
        SMTP_SOURCE = None
    only = [g.strip() for item in args.only for g in item.split(",") if g.strip()]
    unknown = [g for g in only if g not in GROUPS]
    if unknown:
        parser.error("unknown scenario %s; choose from %s"
                     % (", ".join(unknown), ", ".join(GROUPS)))
    groups = [g for g in GROUPS if not only or g in only]
    raise_fd_limit()
    busy_before = cpu_busy()

    bench = Bench(args)
    targets = [Ours(os.path.abspath(args.blackhole))]
    if not args.no_kura:
        targets += [Kura("kura"), Kura("kura+uvloop")]
    log("load generator: %s" % (SMTP_SOURCE or "Python clients"))
    log("measurement: %.1fs each; scratch dir %s" % (bench.seconds, bench.tmp))
    try:
        for round_ in range(1, bench.rounds + 1):
            for target in targets:
                if target.problem:
                    if round_ == 1:
                        log("%s: skipped (%s)" % (target.title, target.problem))
                    continue
                log("%s, round %d of %d:" % (target.title, round_, bench.rounds))
                todo = list(groups)
                if target.key != "ours":
                    if not [g for g in todo if g not in OURS_ONLY]:
                        continue
                    if round_ == 1:     # its configuration stays the same after
                        bench.pick_kura_workers(target, todo)
                        todo = [g for g in todo if g != "workers"]
                bench.run(target, todo)
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)

    print()
    print(table(bench, targets))
    print()
    notes = ["load generator: " + (
        "Postfix smtp-source; pipelined, TLS and idle rows: Python clients" if SMTP_SOURCE
        else "Python clients on raw sockets"),
        "%.1f s per measurement; the median of %d round%s, the targets taking turns; "
        "ratio > 1 means ours is better"
        % (bench.seconds, bench.rounds, "s" if bench.rounds > 1 else "")]
    notes.append("ours: %s" % (targets[0].version or targets[0].problem))
    if bench.floor:
        notes.append("the floor sink (a thread per session, constant replies, no "
                     "parsing; bench.py's Floor), small reused 50 sessions: %s msg/s"
                     % fmt(median(bench.floor)))
    for t in targets[1:]:
        notes.append("%s: %s" % (t.title, t.problem or "workers = %d" % t.workers))
    busy = [b for b in (busy_before, cpu_busy()) if b is not None]
    if busy and max(busy) > 0.2:
        notes.append("other processes used %s of the CPU before / after the run: "
                     "figures are noisy" % " / ".join("%.0f%%" % (b * 100) for b in busy))
    print("\n".join("- " + n for n in notes))
    summary = goals(bench, targets)
    if summary:
        print("\nGoals (the speed targets, and SPEC 11: checks at no measurable cost):\n" + summary)


if __name__ == "__main__":
    main()
