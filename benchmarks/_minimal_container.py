#!/usr/bin/env python3
"""The floor for a Python container: the same protocol, only the necessary syscalls.

A single blocking epoll loop, no trio, no state machine, no deadlines, no
stats, hand-rolled struct parsing: it speaks wire protocol v1 to the same
worker (the trio hook) as far as ``bench_throughput.py`` needs (HELLO, PARK,
UNPARK, ACK). Per parked fd it makes the syscalls connpark's container makes
and cannot avoid: the socket wrap (getsockname), TCP_INFO, getpeername,
EPOLL_CTL_ADD, EPOLL_CTL_DEL and close (recvmsg/sendmsg are per batch, and
so is the close of an ACKed batch of consecutive fds: one close_range(2), as
connpark does). It does not check the token and pending limits, duplicates
or anything else.

    python benchmarks/_minimal_container.py SOCKET_PATH
"""

from __future__ import annotations

import _socket
import array
import os
import select
import socket
import struct
import sys

HEADER = struct.Struct("!IBBH")
PARK_HEAD = struct.Struct("!IH")
PARK_ENTRY = struct.Struct("!IBHI")
PARKED_HEAD = struct.Struct("!II")
RESULT = struct.Struct("!BQ")
WAKE_ENTRY = struct.Struct("!QBBHI")
U32 = struct.Struct("!I")
MORE = 1
BORROW = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
ANC = socket.CMSG_SPACE(253 * 4)
HELLO, WELCOME, PARK, PARKED, WAKE, ACK, UNPARK = 1, 2, 3, 4, 5, 6, 7
REQUESTED = 4


class Session:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []
        self.hello = False


def main(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)
    ep = select.epoll()
    parked_ep = select.epoll()  # parked fds: watched, never fired in the benchmark
    ep.register(listener.fileno(), select.EPOLLIN)
    sessions: dict[int, Session] = {}
    table: dict[int, tuple[int, bytes, bytes, int]] = {}  # ticket -> fd, token, pending, flags
    seq = 0
    mask = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
    while True:
        for fd, _ev in ep.poll():
            if fd == listener.fileno():
                conn, _ = listener.accept()
                sessions[conn.fileno()] = Session(conn)
                ep.register(conn.fileno(), select.EPOLLIN)
                continue
            s = sessions[fd]
            data, anc, _flags, _ = s.sock.recvmsg(1 << 16, ANC, socket.MSG_CMSG_CLOEXEC)
            if not data:
                ep.unregister(fd)
                s.sock.close()
                del sessions[fd]
                continue
            for _level, _kind, raw in anc:
                s.fds.extend(array.array("i", raw[: len(raw) - len(raw) % 4]))
            s.buf += data
            out = bytearray()
            out_fds: list[int] = []
            buf = s.buf
            pos = 0
            while len(buf) - pos >= 8:
                length, mtype, _fl, nfds = HEADER.unpack_from(buf, pos)
                if len(buf) - pos - 8 < length:
                    break
                body = pos + 8
                pos = body + length
                if mtype == HELLO:
                    welcome = struct.pack("!QIIHI", 1, 4096, 65536, 253, 1 << 20)
                    out += HEADER.pack(len(welcome), WELCOME, 0, 0) + welcome
                elif mtype == PARK:
                    rid, count = PARK_HEAD.unpack_from(buf, body)
                    fds, s.fds = s.fds[:nfds], s.fds[nfds:]
                    p = body + 6
                    res = bytearray(PARKED_HEAD.pack(rid, count))
                    for fd in fds:
                        _idle, flags, t, ln = PARK_ENTRY.unpack_from(buf, p)
                        p += 11
                        token = bytes(buf[p : p + t])
                        p += t
                        pending = bytes(buf[p : p + ln])
                        p += ln
                        sk = _socket.socket(socket.AF_INET, BORROW, 0, fd)  # getsockname
                        ok = sk.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] in (1, 8)
                        inet6 = ok and len(sk.getpeername()) == 4
                        sk.detach()
                        if not ok:
                            os.close(fd)
                            res += RESULT.pack(2, 0)
                            continue
                        parked_ep.register(fd, mask)
                        seq += 1
                        ticket = seq << 24 | fd
                        table[ticket] = (fd, token, pending, 2 if inet6 else 0)
                        res += RESULT.pack(0, ticket)
                    out += HEADER.pack(len(res), PARKED, 0, 0) + res
                elif mtype == UNPARK:
                    (count,) = U32.unpack_from(buf, body)
                    tickets = struct.unpack_from(f"!{count}Q", buf, body + 4)
                    for i in range(0, count, 253):
                        wake = bytearray(struct.pack("!H", min(253, count - i)))
                        wfds = []
                        for ticket in tickets[i : i + 253]:
                            fd, token, pending, flags = table[ticket]
                            parked_ep.unregister(fd)
                            wake += WAKE_ENTRY.pack(
                                ticket, REQUESTED, 1 | flags, len(token), len(pending)
                            )
                            wake += token + pending
                            wfds.append(fd)
                        _send(s.sock, out, out_fds)
                        out = bytearray(HEADER.pack(len(wake), WAKE, 0, len(wfds)) + wake)
                        out_fds = wfds
                        _send(s.sock, out, out_fds)
                        out, out_fds = bytearray(), []
                elif mtype == ACK:
                    (count,) = U32.unpack_from(buf, body)
                    acked = struct.unpack_from(f"!{count}Q", buf, body + 4)
                    done = [table.pop(t)[0] for t in acked]  # (a repeat: KeyError)
                    low = min(done, default=0)
                    if len(done) > 1 and max(done) - low == len(done) - 1:
                        os.closerange(low, low + len(done))  # consecutive: one close_range(2)
                    else:
                        for fd in done:
                            os.close(fd)
            del buf[:pos]
            _send(s.sock, out, out_fds)


def _send(sock: socket.socket, data: bytearray, fds: list[int]) -> None:
    if not data:
        return
    view = memoryview(data)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    while view:
        try:
            sent = sock.sendmsg([view], anc)
        except BlockingIOError:
            select.select([], [sock], [])
            continue
        anc = []
        view = view[sent:]


if __name__ == "__main__":
    main(sys.argv[1])
