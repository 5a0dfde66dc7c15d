#!/usr/bin/env python3
"""Draws the burst bench's per-second timelines (benches/burst.rs --timeline FILE)
as one PNG: sign-ins completed per second, and the worst CreateChallenge latency
in each second.

Usage: python3 benches/chart.py OUT.png LABEL=timeline.csv [LABEL=timeline.csv ...]
Needs matplotlib (pip install matplotlib).
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    seconds, signins, worst = [], [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            seconds.append(int(row["second"]))
            signins.append(int(row["signins"]))
            worst.append(float(row["create_max_ms"]))
    return seconds, signins, worst


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out = sys.argv[1]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for spec in sys.argv[2:]:
        label, path = spec.split("=", 1)
        seconds, signins, worst = read(path)
        top.plot(seconds, signins, label=label)
        bottom.plot(seconds, worst, label=label)
    top.set_ylabel("sign-ins completed / s")
    top.legend()
    top.grid(alpha=0.3)
    bottom.set_ylabel("worst CreateChallenge (ms)")
    bottom.set_xlabel("seconds since the burst began")
    bottom.set_yscale("log")
    bottom.grid(alpha=0.3)
    fig.suptitle("pushmatch sign-in burst (2 cores, load generator and mocks included)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
