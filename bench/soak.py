#!/usr/bin/env python3
"""Soak test: hostile and ordinary clients against one blackhole.py process.

Run it with `make soak` or `python3 bench/soak.py [options]`:

    --minutes M      how long to run the load (default 5)
    --seconds S      the same in seconds (overrides --minutes)
    --seed N         seed of the garbage generator (default: random, printed)
    --blackhole PATH the blackhole.py to run (default: the repo's)

It writes a config (ephemeral ports on 127.0.0.1, `timeout = 2`, TLS on a
`tls_listen` port and STARTTLS when tests/certs exists), starts
`python3 blackhole.py -c CONFIG` and runs these clients in threads, each in
a loop, until the time is up:

    normal      smtplib sends a small message
    pipelined   1,000 NOOPs and a whole transaction in one write
    stall       nothing after the greeting, a line trickled one byte at a
                time, a stop mid-DATA, a BDAT chunk that never arrives: each
                must get `421 4.4.2 <h> Error: timeout exceeded` in time
    reset       connections reset (SO_LINGER 0) in the middle of DATA
    garbage     seeded random bytes, NUL, invalid UTF-8, 100 KB lines;
                every reply line must be well-formed SMTP
    big         a message over max_message_size with a 1 MB line (552)
                and one just under it (250)
    connect     connect-and-close cycles
    tls         SMTPS and STARTTLS sends (with certs)
    tls-stall   a TLS handshake that never completes (with certs)

It samples the server's RSS, thread count (/proc/PID/status) and open file
descriptors (/proc/PID/fd) at the start, after warm-up, periodically and at
the end (once the clients are gone and the server's sessions have ended),
and prints a table.  It exits 1 if RSS at the end is more than 20% above
the warm-up figure, if threads or fds do not return to the start figures,
if any client saw an unexpected reply, if the server logged an error, or if
it did not stop cleanly on SIGTERM.  Linux only (/proc).
"""

import argparse
import os
import random
import re
import select
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CERTS = os.path.join(ROOT, "tests", "certs")
HOST = "soak.test"          # the configured hostname
TIMEOUT = 2                 # the server's `timeout`: stalled clients are cut off
MAX_SIZE = 1000000          # the server's `max_message_size`
CLIENT_TIMEOUT = 30         # seconds a client waits for anything
LATE = TIMEOUT + 3          # a stalled client cut off later than this is an error
TIMEOUT_REPLY = b"421 4.4.2 " + HOST.encode() + b" Error: timeout exceeded\r\n"
REPLY_LINE = re.compile(rb"^\d{3}[ -][^\r\n]*\r\n$")
MESSAGE = (b"From: soak@example.com\r\nTo: sink@example.com\r\n"
           b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <soak@example.com>\r\n"
           b"Subject: soak\r\n\r\n" + b"All work and no play.\r\n" * 40)


class Anomaly(Exception):
    """The server did something a client did not expect."""


# ----- a raw client ---------------------------------------------------------

class Client:
    """A socket that speaks bytes and checks replies."""

    def __init__(self, address, context=None):
        self.sock = socket.create_connection(address, timeout=CLIENT_TIMEOUT)
        if context is not None:
            try:
                self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
            except BaseException:
                self.sock.close()
                raise
        self.buf = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise Anomaly("connection closed; unread %r" % self.buf[:80])
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        line += b"\n"
        if not REPLY_LINE.match(line):
            raise Anomaly("malformed reply line %r" % line[:80])
        return line

    def reply(self):
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return b"".join(lines)

    def expect(self, prefix):
        reply = self.reply()
        if not reply.startswith(prefix):
            raise Anomaly("expected %r, got %r" % (prefix, reply[:80]))
        return reply

    def eof(self):
        """Read to the end; the bytes left, which must be well-formed lines."""
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                rest, self.buf = self.buf, b""
                return rest
            self.buf += data

    def reset(self):
        """Close with an RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def _cut_off(client, started):
    """The 421 of a timeout, then EOF, no later than LATE seconds."""
    rest = client.eof()
    elapsed = time.monotonic() - started
    if not rest.endswith(TIMEOUT_REPLY):
        raise Anomaly("no timeout reply: %r" % rest[-80:])
    if not TIMEOUT - 0.2 <= elapsed <= LATE:
        raise Anomaly("cut off after %.2f s with timeout = %d" % (elapsed, TIMEOUT))


# ----- scenarios: one iteration each; raise Anomaly on a surprise --------------

def normal(ctx, rng):
    with smtplib.SMTP(*ctx.address, local_hostname="localhost",
                      timeout=CLIENT_TIMEOUT) as client:
        refused = client.sendmail("soak@example.com", ["sink@example.com"], MESSAGE)
        if refused:
            raise Anomaly("refused %r" % refused)


def pipelined(ctx, rng):
    with Client(ctx.address) as client:
        client.expect(b"220 ")
        client.send(b"EHLO localhost\r\n" + b"NOOP\r\n" * 1000 +
                    b"MAIL FROM:<soak@example.com>\r\nRCPT TO:<sink@example.com>\r\n"
                    b"DATA\r\n" + MESSAGE + b".\r\nQUIT\r\n")
        client.expect(b"250-" + HOST.encode())
        for _ in range(1000):
            client.expect(b"250 2.0.0 OK\r\n")
        for prefix in (b"250 2.1.0 OK\r\n", b"250 2.1.5 OK\r\n", b"354 ",
                       b"250 2.0.0 OK: queued as <", b"221 2.0.0 Goodbye\r\n"):
            client.expect(prefix)
        if client.eof():
            raise Anomaly("data after QUIT")


def stall(ctx, rng):
    kind = rng.choice(("idle", "trickle", "data", "bdat"))
    with Client(ctx.address) as client:
        client.expect(b"220 ")
        if kind == "data":
            client.send(b"HELO localhost\r\nMAIL FROM:<a@example.com>\r\n"
                        b"RCPT TO:<b@example.com>\r\nDATA\r\n")
            for prefix in (b"250 ", b"250 ", b"250 ", b"354 "):
                client.expect(prefix)
            client.send(b"Subject: stalled\r\n\r\nhalf a li")
        elif kind == "bdat":
            client.send(b"BDAT 1000 LAST\r\nonly ten.")
        started = time.monotonic()
        if kind == "trickle":       # the line's deadline is not moved by each byte
            while time.monotonic() - started < TIMEOUT - 0.5:
                client.send(b"X")
                if select.select([client.sock], [], [], 0.3)[0]:
                    break
        _cut_off(client, started)


def reset(ctx, rng):
    client = Client(ctx.address)
    try:
        client.expect(b"220 ")
        client.send(b"EHLO localhost\r\nMAIL FROM:<a@example.com>\r\n"
                    b"RCPT TO:<b@example.com>\r\nDATA\r\n")
        for prefix in (b"250-", b"250 2.1.0", b"250 2.1.5", b"354 "):
            client.expect(prefix)
        client.send(MESSAGE * rng.randint(1, 50))
    finally:
        client.reset()


def _garbage_line(rng):
    kind = rng.randrange(8)
    if kind == 0:       # raw bytes, never starting with a letter
        return bytes([rng.choice(b"0123456789!#$%&*+-/=?^_`{|}~\x00\x01\x1b\x7f\xff")]) + \
            bytes(rng.choice(range(256)) for _ in range(rng.randrange(60))).replace(
                b"\n", b"")
    if kind == 1:
        return b"NOOP " + bytes(rng.choice(range(1, 256)) for _ in range(20)).replace(
            b"\n", b"")
    if kind == 2:
        return rng.choice((b"MAIL FROM:", b"RCPT TO:", b"VRFY ", b"EXPN ", b"HELP ",
                           b"HELO ")) + rng.choice((
                               b"<\xff\xfe@\x00>", b"<>", b"<a@b> SIZE=x BODY=\xc3",
                               b"\x1b[31m", b"", b"<" + b"a" * 600 + b"@b>"))
    if kind == 3:
        return b"\xc3\x28\xa0\xa1 invalid utf-8 \xed\xa0\x80"
    if kind == 4:
        return b"X" * 100000
    if kind == 5:
        return b"RSET"
    if kind == 6:
        return b"\r\r\r\t\x0b\x0c"
    return b""


def garbage(ctx, rng):
    with Client(ctx.address) as client:
        client.expect(b"220 ")
        for _ in range(40):
            line = _garbage_line(rng)
            client.send(line + rng.choice((b"\r\n", b"\n")))
            reply = client.reply()
            if reply.startswith(b"502 5.5.3"):     # the 10th unknown, long lines too
                if client.eof():
                    raise Anomaly("data after 502 5.5.3")
                return
            if len(line) > 12288 and reply != b"500 5.5.2 Line too long\r\n":
                raise Anomaly("100 KB line: %r" % reply[:80])
        client.send(b"QUIT\r\n")
        client.expect(b"221 ")


def big(ctx, rng):
    with Client(ctx.address) as client:
        client.expect(b"220 ")
        too_big = rng.random() < 0.5
        client.send(b"EHLO localhost\r\nMAIL FROM:<a@example.com>\r\n"
                    b"RCPT TO:<b@example.com>\r\nDATA\r\n")
        for prefix in (b"250-", b"250 2.1.0", b"250 2.1.5", b"354 "):
            client.expect(prefix)
        if too_big:     # a 1 MB header line and more
            client.send(b"X-Long: " + b"x" * 1000000 + b"\r\n\r\n" + b"y" * 500000 +
                        b"\r\n.\r\n")
            client.expect(b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
        else:
            client.send(b"Subject: big\r\n\r\n" + b"z" * (MAX_SIZE - 100) + b"\r\n.\r\n")
            client.expect(b"250 2.0.0 OK: queued as <")
        client.send(b"QUIT\r\n")
        client.expect(b"221 ")


def connect(ctx, rng):
    for _ in range(20):
        socket.create_connection(ctx.address, timeout=CLIENT_TIMEOUT).close()


def tls(ctx, rng):
    if rng.random() < 0.5:
        client = smtplib.SMTP_SSL(*ctx.tls_address, local_hostname="localhost",
                                  timeout=CLIENT_TIMEOUT, context=ctx.tls_context)
    else:
        client = smtplib.SMTP(*ctx.address, local_hostname="localhost",
                              timeout=CLIENT_TIMEOUT)
    with client:
        if not isinstance(client, smtplib.SMTP_SSL):
            client.starttls(context=ctx.tls_context)
        refused = client.sendmail("soak@example.com", ["sink@example.com"], MESSAGE)
        if refused:
            raise Anomaly("refused %r" % refused)


def tls_stall(ctx, rng):
    """Cut off in time with nothing, or only a TLS alert record (type 21)."""
    with Client(ctx.tls_address) as client:
        if rng.random() < 0.5:
            client.send(b"\x16\x03\x01\x02\x00\x01")    # half a ClientHello
        started = time.monotonic()
        rest = client.eof()
        elapsed = time.monotonic() - started
        if rest[:1] not in (b"", b"\x15") or not TIMEOUT - 0.2 <= elapsed <= LATE:
            raise Anomaly("TLS stall: %r after %.2f s" % (rest[:80], elapsed))


# ----- running them -----------------------------------------------------------

class Context:
    def __init__(self, address, tls_address, tls_context, seed):
        self.address, self.tls_address = address, tls_address
        self.tls_context, self.seed = tls_context, seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts = {}            # scenario -> [ok, anomalies]
        self.anomalies = []         # the first few, as text


def _loop(ctx, name, func, index):
    rng = random.Random("%s-%s-%d" % (ctx.seed, name, index))
    counts = ctx.counts.setdefault(name, [0, 0])
    while not ctx.stop.is_set():
        try:
            func(ctx, rng)
            ok = True
        except (Anomaly, OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            ok = False
            with ctx.lock:
                if len(ctx.anomalies) < 20:
                    ctx.anomalies.append("%s: %s: %s" % (name, type(exc).__name__, exc))
        with ctx.lock:
            counts[0 if ok else 1] += 1


def _sample(pid):
    status = {}
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return (int(status["VmRSS"].split()[0]), int(status["Threads"]),
            len(os.listdir("/proc/%d/fd" % pid)))


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(args, tmp, with_tls):
    """(process, address, tls_address, log path), retrying a port lost to a race."""
    for _ in range(5):
        port, tls_port = _free_port(), _free_port()
        lines = ["[blackhole]", "listen = 127.0.0.1:%d" % port, "hostname = " + HOST,
                 "timeout = %d" % TIMEOUT, "max_message_size = %d" % MAX_SIZE,
                 "max_connections = 10000"]
        if with_tls:
            lines += ["tls_listen = 127.0.0.1:%d" % tls_port,
                      "tls_cert = " + os.path.join(CERTS, "server.pem"),
                      "tls_key = " + os.path.join(CERTS, "server.key"),
                      "tls_dhparams = " + os.path.join(CERTS, "dhparams.pem")]
        config = os.path.join(tmp, "soak.ini")
        with open(config, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        log_path = os.path.join(tmp, "server.log")
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, args.blackhole, "-c", config],
                                    stdout=log_file, stderr=log_file, cwd=ROOT)
        expected = 2 if with_tls else 1
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            with open(log_path, "rb") as handle:
                if handle.read().count(b"listening on") >= expected:
                    return proc, ("127.0.0.1", port), ("127.0.0.1", tls_port), log_path
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        with open(log_path, "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
        if "cannot bind" not in text:
            sys.exit("soak: the server did not start:\n" + text)
    sys.exit("soak: no free ports after 5 tries")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Soak-test blackhole.py.")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--blackhole", default=os.path.join(ROOT, "blackhole.py"))
    args = parser.parse_args(argv)
    if not os.path.isdir("/proc/self/fd"):
        sys.exit("soak: needs Linux /proc")
    duration = args.seconds if args.seconds is not None else args.minutes * 60
    seed = args.seed if args.seed is not None else random.randrange(2 ** 32)
    with_tls = os.path.exists(os.path.join(CERTS, "server.pem"))
    warmup = min(30.0, duration / 5)
    interval = min(max(duration / 10, 5.0), 60.0)
    print("soak: %.0f s, warm-up %.0f s, seed %d, TLS %s" % (
        duration, warmup, seed, "on" if with_tls else "off (no tests/certs)"), flush=True)

    with tempfile.TemporaryDirectory(prefix="blackhole-soak-") as tmp:
        proc, address, tls_address, log_path = _start_server(args, tmp, with_tls)
        try:
            return _soak(proc, address, tls_address, log_path, duration, warmup,
                         interval, seed, with_tls)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _soak(proc, address, tls_address, log_path, duration, warmup, interval, seed,
          with_tls):
    context = None
    if with_tls:
        context = ssl.create_default_context(cafile=os.path.join(CERTS, "ca.pem"))
    ctx = Context(address, tls_address, context, seed)
    scenarios = [("normal", normal, 3), ("pipelined", pipelined, 1), ("stall", stall, 4),
                 ("reset", reset, 1), ("garbage", garbage, 1), ("big", big, 1),
                 ("connect", connect, 1)]
    if with_tls:
        scenarios += [("tls", tls, 1), ("tls-stall", tls_stall, 1)]
    rows = []

    def row(label, started):
        rss, threads, fds = _sample(proc.pid)
        with ctx.lock:
            done = sum(ok + bad for ok, bad in ctx.counts.values())
        rows.append((label, time.monotonic() - started, rss, threads, fds, done))
        print("soak: %-8s %6.0f s  rss %7d kB  threads %4d  fds %4d  sessions %d"
              % rows[-1], flush=True)
        return rss, threads, fds

    started = time.monotonic()
    base = row("start", started)
    threads = []
    for name, func, count in scenarios:
        for index in range(count):
            thread = threading.Thread(target=_loop, args=(ctx, name, func, index),
                                      name="soak-%s-%d" % (name, index), daemon=True)
            thread.start()
            threads.append(thread)
    end_at = started + duration
    ctx.stop.wait(min(warmup, duration))
    warm = row("warm-up", started)
    next_at = time.monotonic() + interval
    while time.monotonic() < end_at:
        ctx.stop.wait(max(min(next_at, end_at) - time.monotonic(), 0))
        if time.monotonic() < end_at:
            row("running", started)
            next_at += interval
    peak = row("load end", started)
    ctx.stop.set()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT + 10)
    stuck = [thread.name for thread in threads if thread.is_alive()]
    deadline = time.monotonic() + TIMEOUT + 10     # sessions end asynchronously
    while _sample(proc.pid)[1:] != base[1:] and time.monotonic() < deadline:
        time.sleep(0.1)
    end = row("end", started)

    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(log_path, "rb") as handle:
            if b"counters:" in handle.read():
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(10)
    except subprocess.TimeoutExpired:
        status = None
    with open(log_path, "rb") as handle:
        log_lines = handle.read().decode("utf-8", "replace").splitlines()

    print()
    print("| sample | seconds | RSS kB | threads | fds | client sessions |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, elapsed, rss, nthreads, fds, done in rows:
        print("| %s | %.0f | %d | %d | %d | %d |" % (label, elapsed, rss, nthreads, fds, done))
    print()
    print("| scenario | ok | unexpected |")
    print("| --- | ---: | ---: |")
    for name, (ok, bad) in sorted(ctx.counts.items()):
        print("| %s | %d | %d |" % (name, ok, bad))
    print()
    for line in log_lines:
        if "counters:" in line:
            print("server " + line)

    problems = []
    if end[0] > warm[0] * 1.2:
        problems.append("RSS grew from %d kB after warm-up to %d kB (more than 20%%)"
                        % (warm[0], end[0]))
    if end[1] != base[1]:
        problems.append("threads: %d at start, %d at the end" % (base[1], end[1]))
    if end[2] != base[2]:
        problems.append("fds: %d at start, %d at the end" % (base[2], end[2]))
    if stuck:
        problems.append("client threads stuck: " + ", ".join(stuck))
    bad = sum(b for _, b in ctx.counts.values())
    if bad:
        problems.append("%d unexpected results (seed %d), first ones:\n    %s" % (
            bad, seed, "\n    ".join(ctx.anomalies)))
    errors = [line for line in log_lines if line.startswith("blackhole: error:") or
              line.startswith("Traceback")]
    if errors:
        problems.append("the server logged errors:\n    " + "\n    ".join(errors[:20]))
    if status != 0:
        problems.append("the server exited with %r on SIGTERM" % status)
    print("soak: peak RSS under load %d kB, threads %d, fds %d" % peak)
    if problems:
        print("soak: FAILED\n  " + "\n  ".join(problems))
        return 1
    print("soak: ok: RSS %d kB after warm-up, %d kB at the end; threads %d -> %d; "
          "fds %d -> %d" % (warm[0], end[0], base[1], end[1], base[2], end[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
