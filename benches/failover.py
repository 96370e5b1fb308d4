#!/usr/bin/env python3
"""Disaster-recovery figures for issue 9, on the `small` corpus.

    benches/failover.py [--runs 3] [--work DIR]

Two config-driven agents on 127.0.0.1 (release build), the `small` corpus of
../shared/bench (2,002 files, a 109 MB WAL database) on host A, mirrored to B.
Each run:

1. A's agent is killed (SIGKILL: the master host died) and ../shared/bench's
   mutate.py changes A's tree (writes B never received).
2. Once B's replica sees its source gone, `sync-cli promote` on B. Measured:
   from the command to B's `start_replica` hook running (the hook writes the
   time), and the command's own wall time.
3. A file is written on B (the new master takes writes), then A's agent is
   started again with its old config. Measured: from that start to A fenced
   (its status says replica) and to converged (`sync-cli cut` on B: both root
   hashes equal), and A's `diverged/` directory is checked to hold the writes
   it alone had.

Then B hands the folder back (`sync-cli failback`) for the next run. Needs root.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import e2e  # noqa: E402
from sqlite import Host, free_port  # noqa: E402


class HookedHost(Host):
    def write_config(self, port, role, peer, peer_port):
        super().write_config(port, role, peer, peer_port)
        mark = os.path.join(self.dir, "start_replica.at")
        with open(self.config) as f:
            text = f.read()
        text = text.replace('start_replica = "true"', f'start_replica = "date +%s.%N > {mark}"')
        with open(self.config, "w") as f:
            f.write(text)
        os.chmod(self.config, 0o600)

    def hook_time(self):
        try:
            with open(os.path.join(self.dir, "start_replica.at")) as f:
                return float(f.read().strip())
        except (OSError, ValueError):
            return None

    def kill9(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def rows(host):
    """The status rows of folder `app` on `host` (a source row and a replica row)."""
    out = subprocess.run([host.cli, "status", "--config", host.config, "--json"], capture_output=True, text=True)
    try:
        return [f for f in json.loads(out.stdout)["folders"] if f.get("folder") == "app"]
    except (ValueError, KeyError):
        return []


def role(host):
    """`source` when this node runs the folder's source loop, else `replica`."""
    rs = rows(host)
    if any(r.get("role") == "source" and r.get("connected") for r in rs):
        return "source"
    return "replica" if any(r.get("role") == "replica" for r in rs) else None


def replica_connected(host):
    return any(r.get("role") == "replica" and r.get("connected") for r in rows(host))


def until(what, f, timeout=120, step=0.01):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = f()
        if v:
            return v
        time.sleep(step)
    sys.exit(f"timed out waiting for {what}")


def epoch_file(host):
    """The persisted fencing state of folder `app` on `host`."""
    try:
        with open(os.path.join(host.dir, "state", "app.epoch")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def cut_matches(host):
    out = subprocess.run([host.cli, "cut", "--config", host.config, "--json"], capture_output=True, text=True)
    try:
        return json.loads(out.stdout).get("matched")
    except ValueError:
        return False


def one_run(A, B, bench_dir, seed):
    """A is the source and converged; returns the figures of one disaster."""
    A.kill9()
    subprocess.run([sys.executable, os.path.join(bench_dir, "mutate.py"), A.root, "--seed", str(seed),
                    "--no-page-report"], check=True, capture_output=True)
    until("B to see its source gone", lambda: not replica_connected(B), timeout=60)
    try:
        os.unlink(os.path.join(B.dir, "start_replica.at"))
    except FileNotFoundError:
        pass
    t0 = time.time()
    out = subprocess.run([B.cli, "promote", "--config", B.config, "--json"], capture_output=True, text=True)
    cmd_s = time.time() - t0
    if out.returncode != 0:
        sys.exit(f"promote failed: {out.stdout}{out.stderr}")
    hook = until("start_replica to run", B.hook_time, timeout=30)
    with open(os.path.join(B.root, f"written-on-b-{seed}"), "w") as f:
        f.write("the new master takes writes\n")
    t1 = time.time()
    A.start()
    until("A fenced", lambda: epoch_file(A).get("role") == "replica", timeout=120)
    fenced = time.time() - t1
    until("the trees to converge", lambda: cut_matches(B), timeout=300, step=0.05)
    converged = time.time() - t1
    diverged = next((r["diverged"] for r in rows(A) if r.get("diverged")), None)
    return {
        "promote_to_hook_s": round(hook - t0, 3),
        "promote_command_s": round(cmd_s, 3),
        "restart_to_fenced_s": round(fenced, 3),
        "restart_to_converged_s": round(converged, 3),
        "diverged": diverged,
        "diverged_files": sum(len(fs) for _, _, fs in os.walk(diverged)) if diverged else 0,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/understudy-failover")
    ap.add_argument("--release-dir", default=os.path.join(ROOT, "target/release"))
    ap.add_argument("--bench-dir", default=os.path.join(ROOT, "..", "shared", "bench"))
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    e2e.sh(f"cd {ROOT} && cargo build --release -q -p sync-agent -p sync-cli")
    cli, agent = os.path.join(a.release_dir, "sync-cli"), os.path.join(a.release_dir, "sync-agent")
    A, B = HookedHost(a.work, "a", cli, agent), HookedHost(a.work, "b", cli, agent)
    for h in (A, B):
        shutil.rmtree(h.root)
        os.makedirs(h.root)
        shutil.rmtree(os.path.join(h.dir, "state"), ignore_errors=True)
    e2e.sh(f"{sys.executable} {a.bench_dir}/gen_corpus.py {A.root} --size small >/dev/null")
    pa, pb = free_port(), free_port()
    A.write_config(pa, "source", B, pb)
    B.write_config(pb, "replica", A, pa)
    runs = []
    try:
        B.start()
        A.start()
        until("the first mirror", lambda: cut_matches(A), timeout=300, step=0.2)
        for run in range(a.runs):
            r = one_run(A, B, a.bench_dir, run + 1)
            runs.append(r)
            print(json.dumps(r), flush=True)
            # B hands the folder back to A for the next run.
            out = subprocess.run([cli, "failback", "--config", B.config, "--json"], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"failback failed: {out.stdout}{out.stderr}")
            until("A to be the source again", lambda: epoch_file(A).get("role") == "source", timeout=60)
            until("the trees to converge", lambda: cut_matches(A), timeout=300, step=0.05)
    finally:
        A.stop() if A.proc else None
        B.stop()
    keys = ["promote_to_hook_s", "promote_command_s", "restart_to_fenced_s", "restart_to_converged_s"]
    print(json.dumps({k: [r[k] for r in runs] for k in keys}))


if __name__ == "__main__":
    main()
