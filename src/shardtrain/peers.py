"""Fail fast: when one rank dies or fails, every rank ends within seconds, and one line says why.

Without this, a rank whose peer died (kill -9, the OOM killer, a lost node) waits in its next
collective until train.dist_timeout (600 s); and a rank that raised could stay alive after its
traceback, its interpreter joining loader workers that ignore SIGTERM (the job never ended).

How: `fail_fast()` wraps training. In a multi-process run it starts a PeerLink, a daemon thread
joining every rank in a star around rank 0 over plain TCP (rank 0's address travels once through
the rendezvous store at MASTER_ADDR:MASTER_PORT). Both ends send a heartbeat every
train.peer_timeout/10 seconds. A connection that closes without a goodbye means the process on
the other end died (the kernel closes its sockets however it dies): rank 0 learns it at once, and
a silent peer (a powered-off node, a network partition) after train.peer_timeout. Then:
- rank 0 prints one line naming the dead rank, its host and pid, tells every rank to stop, and
  exits ExitCode.PEER_FAILED (4); the others exit 4 without a word;
- when rank 0 itself is the one that died, every surviving node prints that line once (its local
  rank 0) and exits 4;
- a rank that fails by itself (a user error, a bug) reports to rank 0, which prints its line once
  for the whole job and stops the others with the same exit code; a bug's traceback is printed
  by the rank that hit it.
Processes end with os._exit after SIGKILLing their loader workers: nothing can wait on a dead peer
in a process-group destructor or on a worker in an atexit join. A single-process run just kills
its loader workers before the error propagates as usual.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import selectors
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from shardtrain.errors import ExitCode, UserError

HUB_KEY = "shardtrain/peers/hub/{}"  # per torch elastic restart: the agent's store outlives one
RESUME_HINT = ("stopping every rank; run the job again with the same --out and --resume auto to "
               "continue from its last checkpoint")


@dataclass
class Peer:
    sock: socket.socket
    rank: int = -1
    host: str = "?"
    pid: int = 0
    seen: float = 0.0  # time.monotonic() of the last message
    said_bye: bool = False
    buffer: bytes = b""

    def name(self) -> str:
        return f"rank {self.rank} (pid {self.pid} on {self.host})"


class PeerLink:
    """Rank 0 is the hub, every other rank a spoke; see the module docstring."""

    def __init__(self, rank: int, local_rank: int, timeout: float, store_addr: str,
                 store_port: int, setup_timeout: float):
        self.rank, self.local_rank = rank, local_rank
        self.timeout, self.interval = timeout, max(1.0, timeout / 10)
        self.store_addr, self.store_port, self.setup_timeout = store_addr, store_port, setup_timeout
        self.peers: dict[socket.socket, Peer] = {}
        self.send_lock = threading.Lock()
        self.connected = threading.Event()
        self.ending = False  # aborting, or closed after success: no more verdicts
        self.thread = threading.Thread(target=self.run, name="shardtrain-peers", daemon=True)
        self.hub_key = HUB_KEY.format(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    # ---- the thread ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            listener = self.connect()
        except Exception:  # noqa: BLE001 - no link: the collectives' own timeout still applies
            return
        self.connected.set()
        self.serve(listener)

    def connect(self) -> socket.socket | None:
        from torch.distributed import TCPStore

        store = TCPStore(self.store_addr, self.store_port, None, False,
                         timeout=timedelta(seconds=self.setup_timeout))
        if self.rank == 0:
            listener = socket.create_server(("", 0))
            store.set(self.hub_key, json.dumps({
                "addr": route_address(self.store_addr), "port": listener.getsockname()[1],
                "host": socket.gethostname(), "pid": os.getpid()}))
            return listener
        hub = json.loads(store.get(self.hub_key))
        sock = socket.create_connection((hub["addr"], hub["port"]), timeout=self.setup_timeout)
        self.add_peer(Peer(sock, rank=0, host=hub["host"], pid=hub["pid"]))
        self.send(sock, {"t": "hello", "rank": self.rank, "host": socket.gethostname(),
                         "pid": os.getpid()})
        return None

    def serve(self, listener: socket.socket | None) -> None:
        selector = selectors.DefaultSelector()
        if listener is not None:
            selector.register(listener, selectors.EVENT_READ)
        for sock in list(self.peers):
            selector.register(sock, selectors.EVENT_READ)
        next_beat = 0.0
        while True:
            for key, _ in selector.select(timeout=0.5):
                if key.fileobj is listener:
                    sock, _ = listener.accept()
                    self.add_peer(Peer(sock))
                    selector.register(sock, selectors.EVENT_READ)
                elif key.fileobj in self.peers:
                    self.receive(self.peers[key.fileobj], selector)
            now = time.monotonic()
            if now >= next_beat:
                self.broadcast({"t": "beat"})
                next_beat = now + self.interval
            for peer in list(self.peers.values()):
                if not peer.said_bye and now - peer.seen > self.timeout:
                    selector.unregister(peer.sock)
                    del self.peers[peer.sock]
                    self.lost(peer, f"no heartbeat for {self.timeout:.0f} s")

    def receive(self, peer: Peer, selector) -> None:
        try:
            data = peer.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            selector.unregister(peer.sock)
            del self.peers[peer.sock]
            peer.sock.close()
            if not peer.said_bye:
                self.lost(peer, "its connection closed: the process is gone")
            return
        peer.seen = time.monotonic()
        peer.buffer += data
        while b"\n" in peer.buffer:
            line, peer.buffer = peer.buffer.split(b"\n", 1)
            try:
                self.handle(peer, json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue  # not ours: ignore it

    def handle(self, peer: Peer, message: dict) -> None:
        kind = message["t"]
        if kind == "hello":
            peer.rank, peer.host, peer.pid = message["rank"], message["host"], message["pid"]
        elif kind == "bye":
            peer.said_bye = True
        elif kind == "fail" and self.rank == 0:
            self.abort(message["code"], message["line"])
        elif kind == "abort":  # rank 0 printed why
            end_process(message["code"])

    def lost(self, peer: Peer, why: str) -> None:
        """A peer died: rank 0 says so for the job; a spoke that lost rank 0 says so per node."""
        peer.sock.close()
        if self.ending or peer.rank < 0:  # not a rank (it never said hello): nothing to end
            return
        line = f"shardtrain: error: {peer.name()} died ({why}): {RESUME_HINT}"
        if self.rank == 0:
            self.abort(ExitCode.PEER_FAILED, line)
        else:
            if self.local_rank == 0:
                print(line, file=sys.stderr, flush=True)
            end_process(ExitCode.PEER_FAILED)

    # ---- called from either thread --------------------------------------------------------------
    def abort(self, code: int, line: str) -> None:
        """Rank 0: print the job's one line, stop every rank, exit."""
        if self.ending:
            return
        self.ending = True
        if line:
            print(line, file=sys.stderr, flush=True)
        self.broadcast({"t": "abort", "code": int(code)})
        end_process(code)

    def fail(self, code: int, line: str) -> None:
        """This rank failed (main thread): have rank 0 print `line` once and stop everybody."""
        if self.rank == 0:
            self.abort(code, line)
        self.connected.wait(5)  # a failure right at start-up: give the link a moment
        self.ending = True
        self.broadcast({"t": "fail", "code": int(code), "line": line})
        time.sleep(0.2)  # let the message leave before the socket closes with the process
        end_process(code)  # unconnected: rank 0 fails the same way or hears of it in a collective

    def close(self) -> None:
        """Training ended normally on this rank: a closing connection is no longer a death."""
        self.ending = True
        self.broadcast({"t": "bye"})

    def add_peer(self, peer: Peer) -> None:
        peer.sock.settimeout(5)  # a peer that stopped reading must not block a send forever
        peer.seen = time.monotonic()
        self.peers[peer.sock] = peer

    def broadcast(self, message: dict) -> None:
        for sock in list(self.peers):
            self.send(sock, message)

    def send(self, sock: socket.socket, message: dict) -> None:
        with self.send_lock:
            try:
                sock.sendall(json.dumps(message).encode() + b"\n")
            except OSError:
                pass  # its end is gone: receive() reports it


def route_address(target: str) -> str:
    """This host's address on the route to `target` (what the other nodes can reach)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((socket.gethostbyname(target), 9))  # UDP: nothing is sent
            return probe.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def end_process(code: int) -> None:
    """Exit now: SIGKILL the loader workers (stateless), skip every destructor and atexit hook."""
    kill_children()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


def is_peer_error(error: BaseException) -> bool:
    """A collective or store failure, typically the echo of a peer that died."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL error"))


def start_link(timeout: float, setup_timeout: float) -> PeerLink | None:
    """A PeerLink for this rank when the launcher says there are several (else None)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    if world < 2 or timeout <= 0 or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return None
    link = PeerLink(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), timeout,
                    env["MASTER_ADDR"], int(env["MASTER_PORT"]), setup_timeout)
    link.thread.start()
    return link


@contextmanager
def fail_fast(peer_timeout: float, setup_timeout: float = 600):
    """Wrap a training run: see the module docstring."""
    # multiprocessing's resource tracker starts with the interpreter's -W options: after
    # end_process it then frees the killed workers' semaphores without a "leaked" warning
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    link = start_link(peer_timeout, setup_timeout)
    try:
        yield link
    except SystemExit:  # preempted (75) after end_training on every rank: a normal ending
        if link is not None:
            link.close()
        raise
    except KeyboardInterrupt:
        kill_children()
        if link is None:
            raise
        end_process(ExitCode.INTERRUPTED)
    except UserError as e:
        kill_children()
        if link is None:
            raise
        link.fail(e.exit_code, f"shardtrain: error: {e}")
    except Exception as e:  # noqa: BLE001 - a bug, or the echo of a peer that died
        kill_children()
        if link is None:
            raise
        if is_peer_error(e) and link.connected.is_set():
            time.sleep(2 * link.interval)  # the link ends this process if a peer died
        traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        link.fail(1, f"shardtrain: rank {link.rank} (pid {os.getpid()} on "
                     f"{socket.gethostname()}) crashed: {type(e).__name__}: {first}")
    else:
        if link is not None:
            link.close()


def kill_children() -> None:
    """SIGKILL the loader workers: they ignore SIGTERM (preemption), and an interpreter that
    exits with them alive waits for them forever in multiprocessing's atexit join."""
    for child in multiprocessing.active_children():
        child.kill()
