"""docs/perf/serve.md and serve.json from scripts/serve-bench.sh's measurements."""
import datetime
import json
import sys

lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out, machine, max_tokens, per = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
baseline = next(l for l in lines if "baseline" in l)
plans = list(dict.fromkeys(l["plan"] for l in lines if "concurrency" in l and "plan" in l))
soak = next((l for l in lines if l.get("soak")), None)
soak_rss = next((l for l in lines if "soak_rss_kib" in l), None)
alive = next((l["soak_server_alive_at_end"] for l in lines if "soak_server_alive_at_end" in l), None)
data = {"date": datetime.date.today().isoformat(), "machine": machine, "model": "data/demo/dit.safetensors.gz (L = 128)",
        "max_tokens": int(max_tokens), "seconds_per_level": float(per), "baseline": baseline, "plans": {},
        "soak": soak, "soak_rss": soak_rss, "soak_server_alive_at_end": alive}
sections = []
for plan in plans:
    levels = [l for l in lines if l.get("plan") == plan and "concurrency" in l]
    rss = next(l["server_rss_kib"] for l in lines if l.get("plan") == plan and "server_rss_kib" in l)
    solo = next(l for l in levels if l["concurrency"] == 1)
    data["plans"][plan] = {"levels": levels, "server_rss_kib": rss}
    rows = [f"| {l['concurrency']} | {l['completions']} | {l['completions_per_s']:.2f} | "
            f"{l['completions_per_s'] / solo['completions_per_s']:.2f}× | {l['tokens_per_s']:.0f} | "
            f"{l['p50_s']:.2f} | {l['p99_s']:.2f} | {l['p99_s'] / solo['p50_s']:.2f}× | {l['failed']} | {l['refused_429']} |"
            for l in levels]
    c16 = next((l for l in levels if l["concurrency"] == 16), None)
    speed, tail = c16["completions_per_s"] / solo["completions_per_s"], c16["p99_s"] / solo["p50_s"]
    data["plans"][plan]["at_16"] = {"throughput_ratio": round(speed, 3), "p99_over_solo": round(tail, 3)}
    sections.append(f"""## Plan `{plan}`

| concurrency | completions | completions/s | vs one after another | tokens/s | p50 s | p99 s | p99 / solo | failed | 429 |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

At concurrency 16: **{speed:.2f}×** the completions/s of one after another (goal ≥ 8×), p99 **{tail:.2f}×** the
solo latency (goal ≤ 3×): {'met' if speed >= 8 and tail <= 3 else '**not met**'}. Server RSS {rss['start']} KiB after
start, {rss['after_levels']} KiB after the four levels.
""")
json.dump(data, open(f"{out}/serve.json", "w"), indent=1)
md = f"""# `did serve` under load

Measured {data['date']} on {machine}, by `scripts/serve-bench.sh` (raw figures: `serve.json`): the committed
demo model (`data/demo/`, byte-level DiT `tiny`, L = 128) on the CPU backend, `max_tokens` {max_tokens}, every
request with its own seed and one of 8 prompts, `did serve --max-batch 64 --queue 1024`. Each concurrency
level is a closed loop of C clients for {per} s (`benches/examples/serve_load.rs`). "One after another" is
concurrency 1 on the same server; solo latency is its median.

{chr(10).join(sections)}
Baseline as separate processes: {baseline['completions']} `did sample` runs one after another (the paper's plan,
each loading the model) took {baseline['seconds']} s: {baseline['completions_per_s']:.2f} completions/s, {baseline['mean_s']:.2f} s each.
"""
if soak:
    r = soak_rss["soak_rss_kib"]
    series = r["every_10_s"]
    q = max(1, len(series) // 4)
    second, last = series[q:2 * q], series[-q:]
    growth = (sum(last) / len(last)) / (sum(second) / len(second)) - 1 if second and last else float("nan")
    md += f"""
## Past the held load: overload soak

`did serve --max-batch 16 --queue 32` (the paper's plan) under {soak['concurrency']} clients for {soak['seconds']:.0f} s; a client
answered 429 waits its Retry-After (1 s) and tries again: {soak['completions']} completions
({soak['completions_per_s']:.2f}/s), {soak['refused_429']} answers 429, {soak['failed']} failed; the server was
{'alive' if alive else '**dead**'} at the end. Its RSS, read every 10 s: first {r['first']} KiB (before the load), largest
{r['max']} KiB, last {r['last']} KiB ({r['samples']} readings); the mean of the last quarter of the readings is
{growth * 100:+.1f} % against the second quarter's (after the warm-up). Every reading, in MiB:
{' '.join(str(round(x / 1024)) for x in series)}.
"""
open(f"{out}/serve.md", "w").write(md)
