"""A small real Jupyter kernel for load tests: pyzmq and the standard library only, one thread.

    python -S loadtest_kernel.py -f CONNECTION_FILE

It reads a standard connection file, binds shell/iopub/stdin/control/hb, signs every message with the
connection's key (hmac-sha256) and speaks enough of the protocol (5.3) for a gateway and its clients:

* ``kernel_info_request`` (shell or control) → ``kernel_info_reply``;
* ``execute_request`` → status busy, ``execute_input``, a ``stream`` that echoes the code, ``execute_result``,
  ``execute_reply``, status idle. ``stream N`` sends N stream messages (``"0\\n"``, ``"1\\n"``, ...) instead of
  the echo, all at once; ``stream N every S`` sends one every S seconds while the kernel keeps serving
  control and heartbeat (an interrupt ends it with a ``KeyboardInterrupt`` error reply);
* ``comm_info``/``is_complete``/``complete``/``inspect``/``history`` requests get empty answers;
* ``interrupt_request`` (control) → reply; SIGINT interrupts the running request and never kills the kernel;
* ``shutdown_request`` (shell or control) → reply (and on iopub, as ipykernel does), then exit 0;
* heartbeat: a REP socket that echoes.

No ipykernel, jupyter_client, hashlib (libcrypto) or uuid: about 15 MB resident, so that a thousand of them fit
on a small machine. With ``-S`` the interpreter skips ``site``; the venv's site-packages is added by hand.
It exits when the process that started it (``JPY_PARENT_PID``) is gone, so a killed gateway leaves none behind.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

try:
    import zmq
except ImportError:  # started with -S: add the venv's (or the installation's) site-packages, skip site's .pth work
    _lib = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    sys.path += [os.path.join(os.path.dirname(os.path.dirname(sys.executable)), _lib), os.path.join(sys.prefix, _lib)]
    import zmq

try:
    from _sha256 import sha256  # the interpreter's own SHA-256: hashlib would map libcrypto (+4 MB resident)
except ImportError:  # Python 3.12+
    from _sha2 import sha256  # type: ignore[no-redef]
from _operator import _compare_digest

DELIM = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"
#: Seconds between checks that the parent process is still there.
PARENT_CHECK = 5.0
LANGUAGE_INFO = {"name": "python", "version": sys.version.split()[0], "mimetype": "text/x-python",
                 "file_extension": ".py", "pygments_lexer": "ipython3", "codemirror_mode": {"name": "ipython", "version": 3},
                 "nbconvert_exporter": "python"}


class Signer:
    """HMAC-SHA256 (RFC 2104) over the four message parts, with the interpreter's builtin SHA-256."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        if len(key) > 64:
            key = sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = sha256(bytes(b ^ 0x36 for b in key))
        self._outer = sha256(bytes(b ^ 0x5C for b in key))

    def sign(self, parts: list[bytes]) -> bytes:
        if not self.key:
            return b""
        inner = self._inner.copy()
        for part in parts:
            inner.update(part)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest().encode()

    def verify(self, signature: bytes, parts: list[bytes]) -> bool:
        return not self.key or _compare_digest(signature, self.sign(parts))


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


class Job:
    """A paced ``stream N every S`` request in progress."""

    def __init__(self, idents: list[bytes], parent: dict, count: int, every: float) -> None:
        self.idents, self.parent, self.every = idents, parent, every
        self.remaining, self.sent = count, 0
        self.next_at = time.monotonic()


class LoadTestKernel:
    """The kernel: sockets, a poll loop, and one handler per message type."""

    def __init__(self, info: dict) -> None:
        key = info.get("key", "")
        scheme = info.get("signature_scheme", "hmac-sha256")
        if key and scheme != "hmac-sha256":
            raise SystemExit(f"loadtest_kernel: unsupported signature_scheme {scheme!r} (only hmac-sha256)")
        self.signer = Signer(key.encode() if isinstance(key, str) else key)
        self.session = os.urandom(16).hex()
        self.counter = 0
        self.execution_count = 0
        self.interrupted = False
        self.job: Job | None = None
        self.exiting = False
        self.ctx = zmq.Context(io_threads=1)
        transport, ip = info.get("transport", "tcp"), info.get("ip", "127.0.0.1")

        def bind(kind: int, name: str) -> zmq.Socket:
            sock = self.ctx.socket(kind)
            sock.linger = 1000  # the last replies (shutdown) still go out when we close
            port = info[f"{name}_port"]
            sock.bind(f"{transport}://{ip}:{port}" if transport == "tcp" else f"{transport}://{ip}-{port}")
            return sock

        self.shell = bind(zmq.ROUTER, "shell")
        self.control = bind(zmq.ROUTER, "control")
        self.stdin = bind(zmq.ROUTER, "stdin")
        self.iopub = self.ctx.socket(zmq.PUB)
        self.iopub.sndhwm = 0  # a load test counts every message: never drop output for a slow subscriber
        self.iopub.linger = 1000
        port = info["iopub_port"]
        self.iopub.bind(f"{transport}://{ip}:{port}" if transport == "tcp" else f"{transport}://{ip}-{port}")
        self.hb = bind(zmq.REP, "hb")
        self.parent_pid = int(os.environ.get("JPY_PARENT_PID", "0") or 0)

    # -- messages ---------------------------------------------------------------------------------
    def send(self, sock: zmq.Socket, msg_type: str, content: dict, parent: dict | None, idents: list[bytes] = ()) -> None:
        self.counter += 1
        header = {"msg_id": f"{self.session}_{os.getpid()}_{self.counter}", "msg_type": msg_type,
                  "session": self.session, "username": "loadtest", "date": now_iso(), "version": PROTOCOL_VERSION}
        parts = [json.dumps(header).encode(), json.dumps(parent or {}).encode(), b"{}", json.dumps(content).encode()]
        sock.send_multipart([*idents, DELIM, self.signer.sign(parts), *parts])

    def recv(self, sock: zmq.Socket) -> tuple[list[bytes], dict, dict] | None:
        frames = sock.recv_multipart()
        try:
            split = frames.index(DELIM)
        except ValueError:
            return None
        idents, signature, parts = frames[:split], frames[split + 1], frames[split + 2:split + 6]
        if len(parts) < 4 or not self.signer.verify(signature, parts):
            return None  # unsigned or forged: ignored, as ipykernel does
        try:
            return idents, json.loads(parts[0]), json.loads(parts[3])
        except ValueError:
            return None

    def status(self, state: str, parent: dict) -> None:
        self.send(self.iopub, "status", {"execution_state": state}, parent)

    def reply(self, sock: zmq.Socket, idents: list[bytes], parent: dict, content: dict) -> None:
        self.send(sock, parent["msg_type"].replace("_request", "_reply"), content, parent, idents)

    # -- handlers ---------------------------------------------------------------------------------
    def handle(self, sock: zmq.Socket, idents: list[bytes], header: dict, content: dict) -> None:
        msg_type = header.get("msg_type", "")
        if msg_type == "execute_request" and sock is self.shell:
            self.status("busy", header)
            self.execute(idents, header, content)
            return
        self.status("busy", header)
        if msg_type == "kernel_info_request":
            self.reply(sock, idents, header, {
                "status": "ok", "protocol_version": PROTOCOL_VERSION, "implementation": "loadtest",
                "implementation_version": "1.0", "language_info": LANGUAGE_INFO,
                "banner": "load-test kernel (echoes code)", "help_links": [], "debugger": False})
        elif msg_type == "shutdown_request":
            reply = {"status": "ok", "restart": bool(content.get("restart", False))}
            self.reply(sock, idents, header, reply)
            self.send(self.iopub, "shutdown_reply", reply, header)  # ipykernel 5+ says it on iopub too
            self.exiting = True
        elif msg_type == "interrupt_request" and sock is self.control:
            self.interrupted = True
            self.reply(sock, idents, header, {"status": "ok"})
        elif msg_type == "comm_info_request":
            self.reply(sock, idents, header, {"status": "ok", "comms": {}})
        elif msg_type == "is_complete_request":
            self.reply(sock, idents, header, {"status": "complete"})
        elif msg_type == "complete_request":
            pos = content.get("cursor_pos", 0)
            self.reply(sock, idents, header, {"status": "ok", "matches": [], "cursor_start": pos, "cursor_end": pos,
                                              "metadata": {}})
        elif msg_type == "inspect_request":
            self.reply(sock, idents, header, {"status": "ok", "found": False, "data": {}, "metadata": {}})
        elif msg_type == "history_request":
            self.reply(sock, idents, header, {"status": "ok", "history": []})
        elif msg_type.endswith("_request"):
            self.reply(sock, idents, header, {"status": "error", "ename": "NotImplementedError",
                                              "evalue": f"the load-test kernel does not answer {msg_type}",
                                              "traceback": []})
        self.status("idle", header)

    def execute(self, idents: list[bytes], header: dict, content: dict) -> None:
        code = str(content.get("code", ""))
        silent = bool(content.get("silent", False))
        if not silent:
            self.execution_count += 1
            self.send(self.iopub, "execute_input", {"code": code, "execution_count": self.execution_count}, header)
        self.interrupted = False
        words = code.split()
        if len(words) in (2, 4) and words[0] == "stream" and words[1].isdigit() and (len(words) == 2 or words[2] == "every"):
            count = int(words[1])
            every = float(words[3]) if len(words) == 4 else 0.0
            if every > 0:
                self.job = Job(idents, header, count, every)  # the poll loop sends them, then finishes the request
                return
            for i in range(count):
                if self.interrupted:
                    break
                self.send(self.iopub, "stream", {"name": "stdout", "text": f"{i}\n"}, header)
        elif not silent:
            self.send(self.iopub, "stream", {"name": "stdout", "text": code + "\n"}, header)
        self.finish(idents, header, silent, code)

    def finish(self, idents: list[bytes], header: dict, silent: bool = False, result: str | None = None) -> None:
        if self.interrupted:
            error = {"status": "error", "ename": "KeyboardInterrupt", "evalue": "", "traceback": ["KeyboardInterrupt"]}
            self.send(self.iopub, "error", {k: v for k, v in error.items() if k != "status"}, header)
            self.send(self.shell, "execute_reply", {**error, "execution_count": self.execution_count}, header, idents)
        else:
            if not silent and result is not None:
                self.send(self.iopub, "execute_result", {"execution_count": self.execution_count,
                                                          "data": {"text/plain": repr(result)}, "metadata": {}}, header)
            self.send(self.shell, "execute_reply", {"status": "ok", "execution_count": self.execution_count,
                                                    "user_expressions": {}, "payload": []}, header, idents)
        self.interrupted = False
        self.status("idle", header)

    def step_job(self) -> None:
        job = self.job
        assert job is not None
        if self.interrupted or job.remaining <= 0:
            self.job = None
            self.finish(job.idents, job.parent, result=None)
            return
        now = time.monotonic()
        while job.remaining > 0 and job.next_at <= now:
            self.send(self.iopub, "stream", {"name": "stdout", "text": f"{job.sent}\n"}, job.parent)
            job.sent += 1
            job.remaining -= 1
            job.next_at += job.every

    # -- loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_sigint)
        poller = zmq.Poller()
        for sock in (self.control, self.hb, self.stdin):
            poller.register(sock, zmq.POLLIN)
        shell_polled = False
        next_parent_check = time.monotonic() + PARENT_CHECK
        while not self.exiting:
            if shell_polled != (self.job is None):  # a busy kernel reads no new shell requests, like ipykernel
                shell_polled = self.job is None
                if shell_polled:
                    poller.register(self.shell, zmq.POLLIN)
                else:
                    poller.unregister(self.shell)
            now = time.monotonic()
            wait = next_parent_check - now
            if self.job is not None:
                wait = min(wait, self.job.next_at - now)
            # whole milliseconds, rounded up: zmq truncates, and a 0 ms timeout would spin until the next message
            events = dict(poller.poll(max(math.ceil(wait * 1000), 0)))
            if self.hb in events:
                self.hb.send_multipart(self.hb.recv_multipart())
            for sock in (self.control, self.shell):
                if sock in events:
                    msg = self.recv(sock)
                    if msg is not None:
                        self.handle(sock, *msg)
            if self.stdin in events:
                self.stdin.recv_multipart()  # nobody asked for input: nothing to answer
            if self.job is not None and not self.exiting:
                self.step_job()
            if time.monotonic() >= next_parent_check:
                next_parent_check = time.monotonic() + PARENT_CHECK
                if self.parent_pid and os.getppid() != self.parent_pid:
                    break  # our starter is gone (killed gateway): end rather than linger as an orphan
        for sock in (self.shell, self.control, self.stdin, self.iopub, self.hb):
            sock.close()
        self.ctx.term()
        return 0

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.interrupted = True  # the running request ends with KeyboardInterrupt; the kernel lives on


def main(argv: list[str]) -> int:
    path = None
    for i, arg in enumerate(argv):
        if arg in ("-f", "--f", "--connection-file") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith(("--f=", "--connection-file=")):
            path = arg.split("=", 1)[1]
    if not path:
        print("usage: loadtest_kernel.py -f CONNECTION_FILE", file=sys.stderr)
        return 2
    with open(path) as f:
        info = json.load(f)
    return LoadTestKernel(info).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
