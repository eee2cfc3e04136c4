#!/usr/bin/env python3
"""Summarises `ncu --csv --page raw` files (scripts/gpu-profile.sh) as one
markdown table: per profiled kernel launch, its time, DRAM and SM throughput,
issue-slot use, occupancy, registers, instructions and the three largest
warp-stall reasons (cycles per issued instruction). Unknown or missing
metrics print as '-'."""
import csv
import io
import os
import re
import sys


def read_raw(path):
    """Rows of one raw-page CSV as dicts (the header line starts with "ID")."""
    text = open(path, errors="replace").read().splitlines()
    start = next((i for i, l in enumerate(text) if l.startswith('"ID"')), None)
    if start is None:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(l for l in text[start:] if l.startswith('"')))))
    header, body = rows[0], rows[1:]
    # the second row holds the units
    if body and not body[0][0].strip().isdigit():
        body = body[1:]
    return [dict(zip(header, r)) for r in body]


def num(row, key):
    v = row.get(key, "").replace(",", "")
    try:
        return float(v)
    except ValueError:
        return None


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def short(name):
    return re.sub(r"\(.*", "", name).replace("(anonymous namespace)::", "")[:40]


STALL = re.compile(r"smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio$")


def main(paths):
    print("| case | kernel | grid | us | DRAM % | SM % | issue % | occupancy % (theor.) | regs | "
          "instr (M) | cycles active % | top stalls (cycles per issue) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for path in paths:
        case = os.path.basename(path)[4:-4]
        for r in read_raw(path):
            dur = num(r, "gpu__time_duration.sum")
            unit_ns = True
            stalls = []
            for k, v in r.items():
                m = STALL.search(k)
                if m and m.group(1) not in ("selected",):
                    x = num(r, k)
                    if x is not None:
                        stalls.append((x, m.group(1)))
            stalls.sort(reverse=True)
            inst = num(r, "smsp__inst_executed.sum")
            act, ela = num(r, "sm__cycles_active.avg"), num(r, "sm__cycles_elapsed.avg")
            print("| {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} |".format(
                case, short(r.get("Kernel Name", "?")), r.get("Grid Size", "?"),
                fmt(dur / 1e3 if dur is not None and unit_ns else dur),
                fmt(num(r, "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed")),
                fmt(num(r, "sm__throughput.avg.pct_of_peak_sustained_elapsed")),
                fmt(num(r, "smsp__issue_active.avg.pct_of_peak_sustained_active")),
                fmt(num(r, "sm__warps_active.avg.pct_of_peak_sustained_active")),
                fmt(num(r, "sm__maximum_warps_per_active_cycle_pct")),
                fmt(num(r, "launch__registers_per_thread"), 0),
                fmt(inst / 1e6 if inst is not None else None, 2),
                fmt(100.0 * act / ela if act and ela else None),
                ", ".join(f"{n} {x:.1f}" for x, n in stalls[:3]) or "-"))


if __name__ == "__main__":
    main(sys.argv[1:])
