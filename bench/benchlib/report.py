"""Summaries of the runs: median/min/max of each figure per MTA, and the
Postern/Postfix ratio of each figure per pair of runs."""

import statistics

FIGURES = [
    # key, label, unit, better ("higher"/"lower")
    ("accepted_per_s", "accepted", "msg/s", "higher"),
    ("delivered_per_s", "delivered", "msg/s", "higher"),
    ("cpu_s_per_1000", "CPU per 1000 msgs", "s", "lower"),
    ("peak_rss_mb", "peak RSS (tree)", "MB", "lower"),
    ("peak_pss_mb", "peak PSS (tree)", "MB", "lower"),
    ("latency_p50_ms", "DATA→250 p50", "ms", "lower"),
    ("latency_p99_ms", "DATA→250 p99", "ms", "lower"),
    ("transaction_p50_ms", "MAIL→250 p50", "ms", "lower"),
    ("transaction_p99_ms", "MAIL→250 p99", "ms", "lower"),
    ("idle_rss_kb_per_session", "RSS per idle session", "KB", "lower"),
    ("idle_pss_kb_per_session", "PSS per idle session", "KB", "lower"),
]


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def summarize(runs):
    """{(case, scenario): {figure: {"postfix": stats, "postern": stats,
    "ratio": stats}}} over the measured (non-warm-up) runs."""
    out = {}
    keys = []
    for r in runs:
        k = (r["case"], r["scenario"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        mine = [r for r in runs if (r["case"], r["scenario"]) == k and not r["warmup"]]
        by = {}
        for mta in ("postfix", "postern"):
            by[mta] = {r["pair"]: r for r in mine if r["mta"] == mta}
        figs = {}
        for key, *_ in FIGURES:
            entry = {}
            for mta in ("postfix", "postern"):
                entry[mta] = _stats([r.get(key) for r in by[mta].values()])
            ratios = []
            for pair, a in by["postfix"].items():
                b = by["postern"].get(pair)
                if b and a.get(key) and b.get(key) is not None:
                    ratios.append(b[key] / a[key])
            entry["ratio"] = _stats(ratios)
            if entry["ratio"]:
                entry["ratio"]["pairs"] = ratios
            if entry["postfix"] or entry["postern"]:
                figs[key] = entry
        out[k] = figs
    return out


def _fmt(v):
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _cell(s):
    if not s:
        return "–"
    return f"{_fmt(s['median'])} ({_fmt(s['min'])}–{_fmt(s['max'])})"


def markdown(summary, meta, runs=()):
    lines = [f"# Postern vs Postfix — {meta['started']}", ""]
    if meta.get("args", {}).get("dkim"):
        lines += ["**DKIM signing on** (`--dkim`): every message signed with one RSA-2048 "
                  "key, relaxed/relaxed, From oversigned: Postern in cleanup "
                  "(`dkim_signing_table`), Postfix through OpenDKIM as its milter "
                  "(`smtpd_milters`, OpenDKIM in Postfix's cgroup); smtp-sink counts one "
                  "DKIM-Signature per message.", ""]
    lines.append(f"Host: {meta['host']}, {meta['cpus']} CPUs, kernel {meta['kernel']}; "
                 f"Postfix {meta['postfix_version']}; Postern binaries {meta['postern_bin']}; "
                 f"{meta['runs']} measured run(s) per MTA per case after {meta['warmup']} warm-up(s), "
                 "MTAs alternating run by run.")
    lines.append("")
    if meta.get("disk"):
        lines.append("Disk limit (write + fsync + rename + fsync dir, files/s): " + ", ".join(
            f"{d['size']} B × {d['threads']} thread(s): {d['files_per_s']:.0f}" for d in meta["disk"]))
        lines.append("")
    loud = [r for r in runs if not r.get("quiet")]
    if loud:
        lines.append(f"{len(loud)} of {len(runs)} runs started on a machine that was "
                     f"not quiet within {meta['args']['quiet_wait']:g} s "
                     f"(idle CPU below {meta['args']['quiet_idle']:g}); see the JSON.")
        lines.append("")
    lines.append("Cells: median (min–max). Ratio = Postern ÷ Postfix, per pair of runs.")
    lines.append("")
    labels = {k: (label, unit, better) for k, label, unit, better in FIGURES}
    for (case, scenario), figs in summary.items():
        lines.append(f"## {case}, {scenario}")
        lines.append("")
        lines.append("| figure | Postfix | Postern | Postern/Postfix |")
        lines.append("|---|---|---|---|")
        for key, entry in figs.items():
            label, unit, better = labels[key]
            lines.append(f"| {label} ({unit}, {better} is better) | {_cell(entry['postfix'])} | "
                         f"{_cell(entry['postern'])} | {_cell(entry['ratio'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"
