#!/usr/bin/env python3
"""How long the flash attention kernels' grids take under the BD3 training mask when
blocks start in the order of their linear index (as GPUs dispatch them) and each runs
for its visited tiles plus one (loading its rows, writing its output), on a GPU with
`slots` resident blocks. A model of the tail, not a measurement: it compares the old
grid (tiles fastest, so the last (sequence, head)'s longest tile starts at the end)
with the current one ((sequence, head) fastest, tiles longest first), against the
ideal of perfectly balanced work.

    python3 scripts/flash-schedule.py [--length 1024] [--block 4] [--rows 96] [--slots 396]

Defaults: `small` at batch 8 (8 × 12 heads), an H200's 132 SMs × 3 blocks.
"""
import argparse
import heapq

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=1024)
p.add_argument("--block", type=int, default=4)
p.add_argument("--rows", type=int, default=96, help="sequences × heads")
p.add_argument("--slots", type=int, default=132 * 3, help="blocks resident at once")
a = p.parse_args()

L, blk, T = a.length, a.block, 64
tiles = 2 * L // T


def allowed(q, k):
    # docs/bd3lm.md §2.2: block-diagonal ∪ offset-block-causal ∪ block-causal over x_t ⊕ x_0.
    qc, kc = q >= L, k >= L
    qb, kb = (q - (L if qc else 0)) // blk, (k - (L if kc else 0)) // blk
    return (qb == kb and qc == kc) or (not qc and kc and kb < qb) or (qc and kc and kb <= qb)


# A 64 × 64 tile pair is visited when some pair in it is allowed (the mask is constant on
# block × block squares, so their corners decide).
visited = [[any(allowed(q, k) for q in range(qt * T, qt * T + T, blk) for k in range(kt * T, kt * T + T, blk))
            for kt in range(tiles)] for qt in range(tiles)]
query_work = [sum(row) for row in visited]
key_work = [sum(visited[q][k] for q in range(tiles)) for k in range(tiles)]


def makespan(works):
    free = [0.0] * a.slots
    end = 0.0
    for w in works:
        t = heapq.heappop(free) + 1 + w
        end = max(end, t)
        heapq.heappush(free, t)
    return end


print(f"| kernel | visited tiles a (sequence, head) | old grid | longest first | balanced |")
print(f"|---|---:|---:|---:|---:|")
for name, work, order in [("forward, dQ", query_work, range(tiles - 1, -1, -1)), ("dK/dV", key_work, range(tiles))]:
    old = [work[x] for _ in range(a.rows) for x in range(tiles)]
    new = [work[t] for t in order for _ in range(a.rows)]
    ideal = sum(w + 1 for w in old) / a.slots
    print(f"| {name} | {sum(work)} | {makespan(old):.1f} | {makespan(new):.1f} | {ideal:.1f} |")
print(f"\n(tile-times; L = {L}, block {blk}, {a.rows} (sequence, head) rows, {a.slots} resident blocks)")
