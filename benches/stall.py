#!/usr/bin/env python3
"""Issue 10 item 6: the worst commit of a rollback-journal database's writer
while the agents ship a round that also carries a big file.

    benches/stall.py [--file-mb 400] [--seconds 20] [--rate 30] [--work DIR] [--bin-dir DIR]
                     [--replica-dir DIR]

A writer (tests/src/bin/sqlite_writer, `--journal delete`) commits --rate
transactions a second to two databases for --seconds; 3 s in, a --file-mb
file of random bytes is written into the same tree. Run twice: with a
`sync-agent source` and `sync-agent replica` mirroring the tree on 127.0.0.1,
and with no agent at all. Prints the writer's worst commit (BEGIN IMMEDIATE to
the end of COMMIT, lock waits included) of each run, and how long the source
agent held each database snapshot (from its debug log). Needs root and a build of
the workspace's binaries (`cargo build --workspace --bins`, or --release with
--bin-dir target/release; sqlite_writer is taken from --bin-dir, else target/debug).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def writer_bin(args):
    """sqlite_writer from --bin-dir when it was built there, else target/debug."""
    here = os.path.join(args.bin_dir, "sqlite_writer")
    return here if os.path.exists(here) else os.path.join(ROOT, "target/debug/sqlite_writer")


def writer_run(args, src, with_agents):
    procs = []
    if with_agents:
        cli, agent = os.path.join(args.bin_dir, "sync-cli"), os.path.join(args.bin_dir, "sync-agent")
        ids = {}
        for who in ("s", "r"):
            d = os.path.join(args.work, f"id-{who}")
            if not os.path.exists(os.path.join(d, "cert.pem")):
                run([cli, "keygen", "--dir", d])
            ids[who] = (d, run([cli, "id", "--dir", d]).strip())
        dst = args.replica_dir or os.path.join(args.work, "dst")
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        rep = subprocess.Popen([agent, "replica", "--listen", "127.0.0.1:0", "--identity", ids["r"][0],
                                "--allow", ids["s"][1], "--root", dst], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
        addr = rep.stdout.readline().split()[1]
        log = open(os.path.join(args.work, "source.log"), "w")
        src_agent = subprocess.Popen([agent, "source", "--connect", addr, "--peer", ids["r"][1], "--root", src,
                                      "--identity", ids["s"][0]], stdout=subprocess.DEVNULL,
                                     stderr=log, env=dict(os.environ, UNDERSTUDY_LOG="info,sync_core::sqlite=debug"))
        procs = [src_agent, rep]
        time.sleep(2)
    w = subprocess.Popen([writer_bin(args), "--dir", src, "--journal", "delete",
                          "--rate", str(args.rate), "--seconds", str(args.seconds), "--log", os.devnull],
                         stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    with open(os.path.join(src, "big.bin"), "wb") as f:
        left = args.file_mb << 20
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n
    err = w.communicate()[1]
    for p in procs:
        p.terminate()
        p.wait()
    m = re.search(r"worst_commit_ms ([0-9.]+)", err)
    if not m:
        sys.exit(f"no worst_commit_ms from the writer: {err}")
    held = []
    if with_agents:
        log.close()
        with open(os.path.join(args.work, "source.log")) as f:
            held = [int(h) for h in re.findall(r"held_us=([0-9]+)", f.read())]
    return float(m.group(1)), held


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file-mb", type=int, default=400)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rate", type=int, default=30)
    ap.add_argument("--work", default="/var/tmp/understudy-stall")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target/debug"))
    ap.add_argument("--replica-dir", help="the replica's tree (default WORK/dst); on another "
                    "filesystem (e.g. /dev/shm) its writes and syncs do not compete with the writer's")
    args = ap.parse_args()
    out = {}
    for with_agents in (True, False):
        src = os.path.join(args.work, "src")
        shutil.rmtree(src, ignore_errors=True)
        os.makedirs(src)
        out["with_agents" if with_agents else "without_agents"] = writer_run(args, src, with_agents)
    (worst, held), (base, _) = out["with_agents"], out["without_agents"]
    print(f"worst rollback-journal commit while a {args.file_mb} MB file ships: "
          f"{worst:.1f} ms with the agents, {base:.1f} ms without")
    if held:
        held.sort()
        print(f"snapshots (SHARED locks) held by the source agent: {len(held)}, "
              f"median {held[len(held) // 2] / 1000:.2f} ms, longest {held[-1] / 1000:.2f} ms")


if __name__ == "__main__":
    main()
