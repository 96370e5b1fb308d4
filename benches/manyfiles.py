#!/usr/bin/env python3
"""Peak memory on a tree of many small files (issue 14: at most 150 MB at
300,000 files, both ends), in one run.

    benches/manyfiles.py [--files 300000] [--work DIR] [--bin-dir DIR] [--rsync]

Makes --files small files (50-400 random bytes, 100 a directory) once in
--work, then pushes the tree (`sync-cli push` to a `sync-agent replica` on
127.0.0.1) onto a new ext4 filesystem (as e2e.py's --fresh-fs), then once
more unchanged. Prints each push's wall time, the push's peak RSS and the
replica's (its VmHWM after the push: the peak of its life so far). With
--rsync, also `rsync -aAXHD --numeric-ids --delete` over ssh of the same
two runs, onto a filesystem of its own, for the walls' ratio.
"""
import argparse
import json
import os
import random
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import e2e  # noqa: E402

ROOT = os.path.dirname(HERE)


def make_tree(src, files):
    """`files` small files under `src`, 100 a directory, made once."""
    done = src + ".done"
    if os.path.exists(done) and open(done).read() == str(files):
        return
    shutil.rmtree(src, ignore_errors=True)
    r = random.Random(7)
    for n in range(files):
        d = os.path.join(src, f"d{n // 10000:03d}", f"s{n // 100:05d}")
        if n % 100 == 0:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{n % 100:03d}.txt"), "wb") as f:
            f.write(r.randbytes(r.randint(50, 400)))
    with open(done, "w") as f:
        f.write(str(files))


def push_runs(a, src, dst):
    fs = e2e.FreshFs(a.work, "push", dst, 8 << 30)
    cli, agent = os.path.join(a.bin_dir, "sync-cli"), os.path.join(a.bin_dir, "sync-agent")
    state = os.path.join(a.work, "state")
    shutil.rmtree(state, ignore_errors=True)
    rep = e2e.Agent(agent, cli, a.work, dst, state)
    rows = {}
    try:
        for run in ("first", "nochange"):
            out, wall, _cpu, rss = e2e.timed([cli, "push", src, "--to", rep.addr, "--identity", rep.ids["src"][0],
                                              "--peer", rep.ids["rep"][1], "--json", "--state-dir", state])
            json.loads(out)
            rows[run] = dict(wall_s=round(wall, 2), push_rss_mb=round(rss / 1024),
                             replica_rss_mb=round(e2e.peak_rss_kb(rep.p.pid) / 1024))
            print(f"push {run}: {json.dumps(rows[run])}", flush=True)
    finally:
        rep.stop()
        fs.remove()
    return rows


def rsync_runs(a, src, dst):
    ssh = e2e.setup_ssh(a.work)
    fs = e2e.FreshFs(a.work, "rsync", dst, 8 << 30)
    rows = {}
    try:
        for run in ("first", "nochange"):
            r = e2e.rsync_run(ssh, src, dst)
            rows[run] = dict(wall_s=round(r["wall"], 2), rss_mb=round(r["rss_mb"]))
            print(f"rsync {run}: {json.dumps(rows[run])}", flush=True)
    finally:
        fs.remove()
        e2e.stop_ssh(a.work)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=300_000)
    ap.add_argument("--work", default="/var/tmp/understudy-many")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--rsync", action="store_true", help="also time rsync over ssh")
    a = ap.parse_args()
    e2e.exit_on_signals()
    os.makedirs(a.work, exist_ok=True)
    src, dst = os.path.join(a.work, "src"), os.path.join(a.work, "dst")
    make_tree(src, a.files)
    result = {"files": a.files, "push": push_runs(a, src, dst)}
    if a.rsync:
        result["rsync"] = rsync_runs(a, src, dst)
        for run in ("first", "nochange"):
            result[f"{run}_ratio"] = round(result["push"][run]["wall_s"] / max(result["rsync"][run]["wall_s"], 1e-6), 2)
    peak = max(max(r["push_rss_mb"], r["replica_rss_mb"]) for r in result["push"].values())
    result["peak_rss_mb"] = peak
    result["target_150_mb_met"] = peak <= 150
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
