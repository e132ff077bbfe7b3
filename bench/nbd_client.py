"""A scripted NBD client for bench/targets.py: small writes and FLUSHes in a pattern, with
pauses at which the bench reads the relay's counters.

It needs libnbd's `nbd` module, which only Debian's /usr/bin/python3 has, so the bench
runs it as a child process (which also keeps the bench process idle while it is
measured):

    /usr/bin/python3 bench/nbd_client.py URI PLAN

PLAN is a JSON list of steps. After each step the client prints one JSON line with what
it timed, then waits for a line on stdin before the next step: between the two, the
bench reads what the store received so far, so "bytes sent before the FLUSH returned" is
read while nothing else is sent.

Steps ({"op": ..., ...}; offsets are multiples of 4 KiB below `span`, drawn from a
random.Random(seed)):
- scattered: `writes` 4 KiB writes at distinct random offsets, then one FLUSH;
  prints {"seconds": from the first write to the FLUSH's reply}.
- steps: `count` times a 4 KiB write at a random offset and a FLUSH;
  prints {"steps": [seconds of each write + FLUSH]}.
- spread: for each `chunk`-sized chunk below span, `per_chunk` bytes as `write`-sized
  writes at distinct random slots of the chunk, a FLUSH after every `flush_every`
  bytes and at the end; prints {"seconds": ..., "written": bytes}.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import nbd  # libnbd's binding: Debian's python3 only

BLOCK = 4096


def scattered(h: nbd.NBD, rng: random.Random, writes: int, span: int) -> dict:
    offsets = rng.sample(range(span // BLOCK), writes)
    started = time.monotonic()
    for index in offsets:
        h.pwrite(os.urandom(BLOCK), index * BLOCK)
    h.flush()
    return {"seconds": time.monotonic() - started}


def steps(h: nbd.NBD, rng: random.Random, count: int, span: int) -> dict:
    times = []
    for _ in range(count):
        data, offset = os.urandom(BLOCK), rng.randrange(span // BLOCK) * BLOCK
        started = time.monotonic()
        h.pwrite(data, offset)
        h.flush()
        times.append(time.monotonic() - started)
    return {"steps": times}


def spread(h: nbd.NBD, rng: random.Random, span: int, chunk: int, per_chunk: int,
           write: int, flush_every: int) -> dict:
    started, written, unflushed = time.monotonic(), 0, 0
    for base in range(0, span, chunk):
        for slot in rng.sample(range(chunk // write), per_chunk // write):
            h.pwrite(os.urandom(write), base + slot * write)
            written += write
            unflushed += write
            if unflushed >= flush_every:
                h.flush()
                unflushed = 0
    h.flush()
    return {"seconds": time.monotonic() - started, "written": written}


def main() -> None:
    uri, plan = sys.argv[1], json.loads(sys.argv[2])
    h = nbd.NBD()
    h.connect_uri(uri)
    for step in plan:
        op = step.pop("op")
        rng = random.Random(step.pop("seed", 1))
        result = {"scattered": scattered, "steps": steps, "spread": spread}[op](
            h, rng, **step)
        print(json.dumps(result), flush=True)
        sys.stdin.readline()
    h.shutdown()


if __name__ == "__main__":
    main()
