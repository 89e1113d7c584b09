"""Report maths for load tests: locust's CSV -> latency percentiles, images/s, speedup ratios.

One *level* is one locust run of ``users`` closed-loop users for a fixed time against one
model. From locust's ``<prefix>_stats.csv`` (row ``Aggregated``):

* ``p50_ms`` / ``p95_ms`` / ``p99_ms``: locust's percentiles of the response time (locust keeps
  times rounded to two significant digits above 100 ms: 3432 ms is counted as 3400);
* ``rps``: locust's ``Requests/s`` = requests / (time of the last answer - test start);
* ``images_per_s`` = ``rps`` x (successful / all requests) x images per request.

Speedups (compressed vs baseline at the same number of users): latency ``baseline p50 /
compressed p50`` (likewise p95, p99) and throughput ``compressed images/s / baseline images/s``;
above 1 means the compressed model is faster.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

PERCENTILES = (50, 95, 99)
FIELDS = ("label", "model", "steps", "users", "duration_s", "requests", "failures", "p50_ms", "p95_ms", "p99_ms",
          "mean_ms", "rps", "images_per_s")


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):  # locust writes "N/A" for percentiles of an empty run
        return math.nan


def read_locust_stats(path: str | Path, name: str = "Aggregated") -> dict:
    """The row ``name`` of a locust ``*_stats.csv`` (``Aggregated``: all requests)."""
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Name") == name:
                return row
    raise ValueError(f"{path}: no row named {name!r} (not a locust --csv stats file?)")


def level_from_locust(row: dict, images_per_request: int = 1) -> dict:
    """Requests, failures, percentiles (ms), requests/s and images/s of one locust stats row."""
    requests, failures = int(row["Request Count"]), int(row["Failure Count"])
    rps = _num(row["Requests/s"])
    ok_share = (requests - failures) / requests if requests else 0.0
    out = {"requests": requests, "failures": failures, "mean_ms": _num(row["Average Response Time"]),
           "rps": rps, "images_per_s": rps * ok_share * images_per_request if requests else 0.0}
    for p in PERCENTILES:
        out[f"p{p}_ms"] = _num(row[f"{p}%"])
    return out


def check_response(status: int, text: str, n: int) -> str | None:
    """None when the answer holds ``n`` images, else why not (short, groups in locust's failure table)."""
    try:
        body = json.loads(text)
    except (ValueError, TypeError):
        return f"HTTP {status}: body is not JSON"
    if status != 200:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        return f"HTTP {status}: {err.get('code') or err.get('type') or 'error'}"
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != n or not all(d.get("b64_json") for d in data):
        return f"HTTP 200 without {n} b64_json image(s)"
    return None


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) without numpy; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize_latencies(latencies_ms: list[float], failures: int, images_per_request: int,
                        t_start: float | None, t_last: float | None) -> dict:
    """Exact percentiles of successful requests and images/s over ``[t_start, t_last]`` (locustfile's summary)."""
    ok = len(latencies_ms)
    span = (t_last - t_start) if (t_start is not None and t_last is not None and t_last > t_start) else math.nan
    out = {"requests": ok + failures, "failures": failures, "images_per_request": images_per_request,
           "mean_ms": sum(latencies_ms) / ok if ok else math.nan, "span_s": span,
           "rps": (ok + failures) / span if span == span else math.nan,
           "images_per_s": ok * images_per_request / span if span == span else math.nan}
    for p in PERCENTILES:
        out[f"p{p}_ms"] = percentile(latencies_ms, p)
    return out


def speedups(rows: list[dict], baseline: str = "baseline", compressed: str = "compressed") -> list[dict]:
    """Per number of users present for both models: latency (p50/p95/p99) and throughput ratios."""
    by = {(r["label"], r["users"]): r for r in rows}
    out = []
    for users in sorted({r["users"] for r in rows}):
        b, c = by.get((baseline, users)), by.get((compressed, users))
        if not b or not c:
            continue
        s = {"users": users}
        for p in PERCENTILES:
            s[f"p{p}_speedup"] = _ratio(b[f"p{p}_ms"], c[f"p{p}_ms"])
        s["throughput_speedup"] = _ratio(c["images_per_s"], b["images_per_s"])
        out.append(s)
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if (b and b == b and a == a) else math.nan


def write_csv(path: str | Path, rows: list[dict], fields=FIELDS) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    return path


def plot(path: str | Path, rows: list[dict], title: str = "") -> Path:
    """Two panels against users: latency p50 (solid) and p95 (dashed); images/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, label in enumerate(dict.fromkeys(r["label"] for r in rows)):
        rs = sorted((r for r in rows if r["label"] == label), key=lambda r: r["users"])
        users = [r["users"] for r in rs]
        name = f"{label}: {short_name(rs[0]['model'])}, {rs[0]['steps']} steps"
        color = f"C{i}"
        ax1.plot(users, [r["p50_ms"] / 1000 for r in rs], "o-", color=color, label=name + " p50")
        ax1.plot(users, [r["p95_ms"] / 1000 for r in rs], "s--", color=color, alpha=0.7, label=name + " p95")
        ax2.plot(users, [r["images_per_s"] for r in rs], "o-", color=color, label=name)
    for ax, ylabel in ((ax1, "request latency (s)"), (ax2, "throughput (images/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["users"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent users")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def short_name(model: str) -> str:
    """``tiny-sd`` stays; a folder path becomes its last component."""
    return Path(str(model).rstrip("/")).name or str(model)


def _f(x: float, nd: int = 0) -> str:
    return "n/a" if x != x else f"{x:,.{nd}f}"


def markdown(result: dict) -> str:
    """The report: what ran, per-level table, speedups."""
    m, rows = result["models"], result["rows"]
    lines = [f"# Load test: {short_name(m['compressed']['model'])} vs {short_name(m['baseline']['model'])}", "",
             f"Backend **{result['backend']}**" + (f", {result['threads']} threads" if result.get("threads") else
                                                  ", all cores") + f", {result['duration_s']:g} s per level, "
             f"closed-loop users (each sends its next request when the previous is answered), "
             f"{result['images_per_request']} image per request, guidance {result['guidance']:g}, "
             f"size {result['size'] or 'native'}, held-out scene prompts.", "",
             "| role | model | steps | what it is |", "|---|---|---:|---|"]
    for role in ("baseline", "compressed"):
        lines.append(f"| {role} | `{m[role]['model']}` | {m[role]['steps']} | {m[role]['what']} |")
    lines += ["", "| users | model | requests | failures | p50 (ms) | p95 (ms) | p99 (ms) | images/s |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["users"], r["label"])):
        lines.append(f"| {r['users']} | {r['label']} ({r['steps']} steps) | {r['requests']} | {r['failures']} | "
                     f"{_f(r['p50_ms'])} | {_f(r['p95_ms'])} | {_f(r['p99_ms'])} | {_f(r['images_per_s'], 3)} |")
    lines += ["", "Speedup of the compressed model (above 1 = faster): latency = baseline / compressed, "
              "throughput = compressed / baseline images/s.", "",
              "| users | p50 latency | p95 latency | p99 latency | throughput |", "|---:|---:|---:|---:|---:|"]
    for s in result["speedups"]:
        lines.append(f"| {s['users']} | {_f(s['p50_speedup'], 2)}x | {_f(s['p95_speedup'], 2)}x | "
                     f"{_f(s['p99_speedup'], 2)}x | {_f(s['throughput_speedup'], 2)}x |")
    lines += ["", f"![latency and throughput]({Path(result['files']['png']).name})", "",
              f"Machine: {result['machine_line']}", "",
              f"Command: `{result['command']}` ({result['wall_s']:.0f} s wall).", "",
              "Percentiles are locust's (response times rounded to two significant digits above 100 ms); "
              "images/s = locust's requests/s x share of successful requests x images per request. "
              "Locust runs on the same machine as the server and takes some of its CPU."]
    if result.get("notes"):
        lines += [""] + [f"* {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, result: dict) -> dict:
    """``report.md``, ``report.csv``, ``report.png`` and ``report.json`` in ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png", "json": out / "report.json"}
    result["files"] = {k: str(v) for k, v in files.items()}
    result["speedups"] = speedups(result["rows"])
    write_csv(files["csv"], result["rows"])
    plot(files["png"], result["rows"], title=f"{result['backend']}: {short_name(result['models']['compressed']['model'])} "
         f"({result['models']['compressed']['steps']} steps) vs {short_name(result['models']['baseline']['model'])} "
         f"({result['models']['baseline']['steps']} steps)")
    files["md"].write_text(markdown(result))
    files["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result["files"]
