"""The chaos table in chaos/README.md, rewritten from a full run's summary (between markers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BEGIN, END = "<!-- chaos-table: begin -->", "<!-- chaos-table: end -->"


def table(summary: dict[str, Any]) -> str:
    v = summary["versions"]
    lines = [
        f"Run of {summary['date']}, nodeagent `{v['nodeagent']}`, Envoy {v['envoy']},"
        f" {summary['machine']['cores']} cores, {summary['wall_seconds']:.0f} s"
        " (`chaos/results/*.json`).",
        "",
        "| case | fault | load s | sent | failed | reached server | bypassed | plaintext"
        " frames | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for doc in summary["cases"].values():
        if "figures" not in doc:
            lines.append(f"| {doc['case']} | | | | | | | | ERROR: {'; '.join(doc['problems'])} |")
            continue
        f = doc["figures"]
        verdict = "ok" if doc["ok"] else "FAILED: " + "; ".join(doc["problems"])
        if doc["ok"] and f["failed"]:
            verdict += f" (failed: fail closed, all within the {len(doc['windows'])} faults)"
        lines.append(
            f"| {doc['case']} | {doc['fault']} | {doc['load_seconds']} | {f['sent']}"
            f" | {f['failed']} | {f['reached_server']} | {f['bypassed']}"
            f" | {f['plaintext_frames']} | {verdict} |"
        )
    for case, what in summary["not_yet"].items():
        lines.append(f"| {case} | {what} | | | | | | | **not yet** |")
    return "\n".join(lines)


def write_table(readme: Path, summary: dict[str, Any]) -> None:
    text = readme.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{BEGIN}\n{table(summary)}\n{END}{tail}")
