#!/usr/bin/env python3
"""Draws the burst bench's CSVs as PNGs.

- Per-second timelines (benches/burst.rs --timeline FILE): sign-ins completed per
  second, and the worst CreateChallenge latency in each second.
  Usage: python3 benches/chart.py OUT.png LABEL=timeline.csv [LABEL=timeline.csv ...]
- A soak (--soak MINUTES --soak-csv FILE): the broker's RSS (and its heap, where
  the CSV has it) and the store's records and its file on disk, minute by minute,
  with the RSS 10 minutes in marked.
  Usage: python3 benches/chart.py --soak OUT.png soak.csv

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


def soak(out, path):
    minutes, rss, records, signins, file_mb, heap = [], [], [], [], [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            minutes.append(float(row["seconds"]) / 60)
            rss.append(float(row["rss_mb"]))
            records.append(float(row["store_records"]) / 1000)
            signins.append(int(row["signins"]))
            file_mb.append(float(row.get("file_mb") or 0))
            heap.append(float(row.get("heap_mb") or 0))
    rate = signins[-1] / (minutes[-1] * 60) if minutes[-1] > 0 else 0
    fig, (top, bottom, disk) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    top.plot(minutes, rss, color="tab:blue", label="RSS")
    if any(heap):
        top.plot(minutes, heap, color="tab:cyan", label="heap allocated")
    at_10 = next((r for m, r in zip(minutes, rss) if m >= 10), None)
    if at_10 is not None:
        top.axhline(at_10, color="grey", linestyle=":", label=f"10 minutes in: {at_10:.1f} MB")
        top.axhspan(at_10, at_10 * 1.02, color="tab:green", alpha=0.15, label="+2 %")
        top.legend(loc="lower right")
    top.set_ylabel("broker RSS (MB)")
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    bottom.plot(minutes, records, color="tab:orange")
    bottom.set_ylabel("store records (thousands)")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    disk.plot(minutes, file_mb, color="tab:purple")
    disk.set_ylabel("store file (MB)")
    disk.set_ylim(bottom=0)
    disk.set_xlabel("minutes since the sign-ins began")
    disk.grid(alpha=0.3)
    fig.suptitle(
        f"pushmatch soak: {minutes[-1]:.0f} minutes at {rate:.0f} sign-ins/s, embedded store "
        "(2 cores, load generator included)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--soak":
        return soak(sys.argv[2], sys.argv[3])
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
