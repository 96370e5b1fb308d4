#!/usr/bin/env python3
"""SQLite benchmarks for issue 4, against rsync in the same run.

    benches/sqlite.py [--db-mb 1024] [--db-frac 0.01] [--runs 3] [--cuts 10] [--work DIR] [--bin-dir DIR]

1. **A 1% page change of a live database**: the `large` corpus's library.db
   (built with ../shared/bench/gen_corpus.py's own builder, --db-mb MB) mirrored by
   two config-driven agents on 127.0.0.1 (release build); ../shared/bench/mutate.py
   updates ~1% of its rows in one transaction (--touch/--add/--delete/--meta 0: the
   database alone). Measured per change: bytes the source sent (UDP, QUIC
   included), wall from mutate.py's exit to the replica's round applied, source
   agent CPU seconds from mutate.py's exit until then (and, apart, while
   mutate.py's 15 s transaction held the write lock and cuts waited on it),
   database pages written on the replica, the pages that really
   changed (page images compared in consistent backups before and after), and
   rsync (-a over ssh to 127.0.0.1, the way users run it) of the same database
   file from the same before-state to the same after-state. The bench's own
   writes (backups, rsync copies) are synced before each change, so the
   replica's fsyncs do not queue behind them.
2. **Writer stall during cuts**: a writer commits small transactions to the
   database as fast as it can while `sync-cli cut` runs --cuts times; the cut's
   own lock window (writer_stall_ms) and the writer's worst commit latency
   during the cuts against its worst with no cut.
3. **Failover**: `sync-cli failover` with no-op hooks, from command to promoted
   replica (the command returns once the replica answered "promoted").

Needs root, rsync and openssh-server (see e2e.py, whose ssh setup is reused).
It stops what it starts (its sshd on 127.0.0.1:2222, both agents, the writer)
however it ends: done, failed, Ctrl-C or SIGTERM; at its start a stale bench
sshd left on that port is stopped, anything else there stops the bench.
--bin-dir runs the sync-agent and sync-cli found there (nothing is built);
without it the release build of this checkout is built and run. The agents
inherit UNDERSTUDY_LOG; their logs are WORK/a/agent.log and WORK/b/agent.log.
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import e2e  # noqa: E402  (ssh setup, sh)


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def backup(src, dst):
    """A consistent copy of a live database (SQLite's online backup)."""
    if os.path.exists(dst):
        os.unlink(dst)
    s = sqlite3.connect(src)
    d = sqlite3.connect(dst)
    s.backup(d)
    d.close()
    s.close()


def page_hashes(path, size=4096):
    out = []
    with open(path, "rb") as f:
        while True:
            b = f.read(size)
            if not b:
                return out
            out.append(hashlib.blake2b(b, digest_size=16).digest())


class Host:
    def __init__(self, work, name, cli, agent):
        self.dir = os.path.join(work, name)
        self.root = os.path.join(self.dir, "app")
        os.makedirs(os.path.join(self.root, "data"), exist_ok=True)
        self.cli, self.agent = cli, agent
        idd = os.path.join(self.dir, "id")
        if not os.path.exists(os.path.join(idd, "cert.pem")):
            e2e.sh(f"{cli} keygen --dir {idd}")
        self.id = e2e.sh(f"{cli} id --dir {idd}").strip()
        self.config = os.path.join(self.dir, "understudy.toml")
        self.proc = None

    def write_config(self, port, role, peer, peer_port):
        hooks = "stop_source = \"true\"\nstart_source = \"true\"\nstart_replica = \"true\"\n"
        with open(self.config, "w") as f:
            f.write(f"""[node]
identity = "{self.dir}/id"
listen = "127.0.0.1:{port}"
control = "{self.dir}/control.sock"
state = "{self.dir}/state"

[[peer]]
id = "{peer.id}"
address = "127.0.0.1:{peer_port}"

[[folder]]
name = "app"
path = "{self.root}"
role = "{role}"
peers = ["{peer.id}"]

[folder.hooks]
{hooks}""")
        os.chmod(self.config, 0o600)

    def start(self):
        log = open(os.path.join(self.dir, "agent.log"), "a")
        self.proc = subprocess.Popen([self.agent, "--config", self.config], stdout=subprocess.PIPE,
                                     stderr=log, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("listening"), line

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def status(self):
        out = subprocess.run([self.cli, "status", "--config", self.config, "--json"], capture_output=True,
                             text=True)
        try:
            return [f for f in json.loads(out.stdout)["folders"] if f["folder"] == "app"][0]
        except (ValueError, IndexError, KeyError):
            return {}


def free_port():
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_applied(a, after_unix, rounds_before, timeout=600):
    """Until the source has no pending change and applied a round after `after_unix`."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        s = a.status()
        if (s.get("rounds", 0) > rounds_before and not s.get("pending_since_unix")
                and (s.get("last_applied_unix") or 0) > after_unix and s.get("files_pending") == 0):
            return s
        time.sleep(0.01)
    sys.exit("the replica did not catch up")


def rsync_change(work, ssh, before, after):
    """rsync of the database file from the before-state to the after-state."""
    src = os.path.join(work, "rsync-src")
    dst = os.path.join(work, "rsync-dst")
    for d in (src, dst):
        os.makedirs(d, exist_ok=True)
    shutil.copyfile(before, os.path.join(dst, "library.db"))
    shutil.copyfile(after, os.path.join(src, "library.db"))
    os.utime(os.path.join(src, "library.db"), None)
    e2e.sh("sync")
    t0 = time.monotonic()
    out = e2e.sh(f"rsync -a --numeric-ids --stats -e '{ssh}' {src}/ root@127.0.0.1:{dst}/")
    wall = time.monotonic() - t0
    sent = int([l for l in out.splitlines() if l.startswith("Total bytes sent")][0].split(":")[1]
               .strip().replace(",", ""))
    return sent, wall


def writer(path, stop, lat, rows):
    con = sqlite3.connect(path, isolation_level=None, timeout=30)
    r = random.Random(7)
    while not stop.is_set():
        t0 = time.monotonic()
        con.execute("BEGIN IMMEDIATE")
        con.execute("UPDATE UserDatas SET playCount=playCount+1 WHERE rowid=?", (r.randint(1, rows),))
        con.execute("COMMIT")
        lat.append((time.monotonic(), time.monotonic() - t0))
    con.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db-mb", type=int, default=1024)
    ap.add_argument("--db-frac", type=float, default=0.01, help="fraction of rows mutate.py updates")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cuts", type=int, default=10)
    ap.add_argument("--work", default="/var/tmp/understudy-sqlite")
    ap.add_argument("--bin-dir", "--release-dir", dest="bin_dir",
                    help="run the binaries found here (default: build this checkout's release build)")
    shared = os.path.join(ROOT, "..", "shared", "bench")
    ap.add_argument("--bench-dir", default=shared if os.path.isdir(shared) else "/work/shared/bench",
                    help="where gen_corpus.py and mutate.py are (default: ../shared/bench)")
    a = ap.parse_args()
    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    bin_dir = a.bin_dir
    if not bin_dir:
        e2e.sh(f"cd {ROOT} && cargo build --release -q -p sync-agent -p sync-cli")
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        bin_dir = os.path.join(target, "release")
    cli, agent = os.path.join(bin_dir, "sync-cli"), os.path.join(bin_dir, "sync-agent")
    for b in (cli, agent):
        if not os.access(b, os.X_OK):
            sys.exit(f"{b}: no such executable (--bin-dir)")
    ssh = e2e.setup_ssh(work)
    try:
        bench(a, work, cli, agent, ssh)
    finally:
        e2e.stop_ssh(work)


def bench(a, work, cli, agent, ssh):
    pristine = os.path.join(work, f"library-{a.db_mb}m.db")
    if not os.path.exists(pristine):
        sys.path.insert(0, a.bench_dir)
        import gen_corpus
        gen_corpus.build_library_db(pristine, random.Random(1001), a.db_mb, print)
    A, B = Host(work, "a", cli, agent), Host(work, "b", cli, agent)
    for h in (A, B):
        shutil.rmtree(h.root)
        os.makedirs(os.path.join(h.root, "data"))
        shutil.rmtree(os.path.join(h.dir, "state"), ignore_errors=True)
    shutil.copyfile(pristine, os.path.join(A.root, "data/library.db"))
    pa, pb = free_port(), free_port()
    A.write_config(pa, "source", B, pb)
    B.write_config(pb, "replica", A, pa)
    db = os.path.join(A.root, "data/library.db")
    size_mb = os.path.getsize(db) / 2**20
    results = {"db_mb": round(size_mb), "runs": []}
    try:
        B.start()
        t0 = time.time()
        A.start()
        s = wait_applied(A, t0, 0)
        results["initial_mirror_s"] = round(s["last_applied_unix"] - t0, 2)
        print(f"database {size_mb:.0f} MB; initial mirror {results['initial_mirror_s']} s", flush=True)

        for run in range(a.runs):
            before = os.path.join(work, "before.db")
            after = os.path.join(work, "after.db")
            backup(db, before)
            # The bench's own writes (this backup, the last run's and its rsync
            # copies: GBs) are written back now, not by the kernel's 30 s
            # flusher in the middle of the next measurement, where every
            # fsync of the replica's round would queue behind them.
            os.sync()
            time.sleep(1.0)  # let the agents settle
            s0 = A.status()
            cpu0 = proc_cpu(A.proc.pid)
            t_start = time.time()
            subprocess.run([sys.executable, os.path.join(a.bench_dir, "mutate.py"), A.root, "--seed", str(run + 1), "--db-frac", str(a.db_frac),
                            "--touch", "0", "--add", "0", "--delete", "0", "--meta", "0", "--no-page-report"],
                           check=True, capture_output=True)
            t_end = time.time()
            cpu_mid = proc_cpu(A.proc.pid)
            s1 = wait_applied(A, t_end, s0.get("rounds", 0))
            time.sleep(0.5)
            s1 = A.status()
            cpu1 = proc_cpu(A.proc.pid)
            backup(db, after)
            hb, ha = page_hashes(before), page_hashes(after)
            changed = sum(1 for i in range(min(len(hb), len(ha))) if hb[i] != ha[i]) + abs(len(ha) - len(hb))
            rs_bytes, rs_wall = rsync_change(work, ssh, before, after)
            r = {
                "pages_changed": changed,
                "changed_bytes": changed * 4096,
                "pages_written": s1["db_pages_total"] - s0["db_pages_total"],
                "bytes_sent": s1["wire_bytes_total"] - s0["wire_bytes_total"],
                "wall_s": round(s1["last_applied_unix"] - t_end, 3),
                "mutate_s": round(t_end - t_start, 2),
                "source_cpu_s": round(cpu1 - cpu_mid, 3),
                "source_cpu_during_txn_s": round(cpu_mid - cpu0, 3),
                "rsync_bytes": rs_bytes,
                "rsync_wall_s": round(rs_wall, 3),
            }
            r["bytes_vs_changed"] = round(r["bytes_sent"] / max(1, r["changed_bytes"]), 3)
            r["bytes_vs_rsync"] = round(r["bytes_sent"] / max(1, rs_bytes), 3)
            print(json.dumps(r), flush=True)
            results["runs"].append(r)

        # Writer stall during cuts.
        rows = sqlite3.connect(db).execute("SELECT max(rowid) FROM UserDatas").fetchone()[0]
        stop, lat = threading.Event(), []
        th = threading.Thread(target=writer, args=(db, stop, lat, rows), daemon=True)
        th.start()
        windows, stalls = [], []
        try:
            time.sleep(2.0)
            quiet_end = time.monotonic()
            for _ in range(a.cuts):
                c0 = time.monotonic()
                out = subprocess.run([cli, "cut", "--config", A.config, "--json"], capture_output=True, text=True)
                c1 = time.monotonic()
                windows.append((c0, c1))
                try:
                    stalls.append(json.loads(out.stdout)["writer_stall_ms"])
                except (ValueError, KeyError):
                    print("cut failed:", out.stdout, out.stderr)
                time.sleep(0.3)
        finally:
            stop.set()
            th.join()
        base = [d for (t, d) in lat if t < quiet_end]
        during = [d for (t, d) in lat if any(c0 <= t <= c1 + 0.05 for c0, c1 in windows)]
        results["cuts"] = {
            "cut_lock_window_ms_median": round(statistics.median(stalls), 3) if stalls else None,
            "cut_lock_window_ms_max": round(max(stalls), 3) if stalls else None,
            "writer_worst_commit_ms_during_cuts": round(1e3 * max(during), 2) if during else None,
            "writer_worst_commit_ms_without_cuts": round(1e3 * max(base), 2) if base else None,
            "writer_commits": len(lat),
        }
        print(json.dumps(results["cuts"]), flush=True)

        # Failover with no-op hooks.
        time.sleep(1.0)
        t0 = time.monotonic()
        out = subprocess.run([cli, "failover", "--config", A.config, "--json"], capture_output=True, text=True)
        results["failover_s"] = round(time.monotonic() - t0, 3)
        rep = json.loads(out.stdout) if out.stdout else {}
        results["failover_ok"] = rep.get("ok")
        print(json.dumps({"failover_s": results["failover_s"], "ok": rep.get("ok"),
                          "error": rep.get("error")}), flush=True)
    finally:
        A.stop()
        B.stop()
    keys = ["bytes_sent", "bytes_vs_changed", "wall_s", "source_cpu_s", "rsync_bytes", "rsync_wall_s"]
    results["median"] = {k: statistics.median(r[k] for r in results["runs"]) for k in keys}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
