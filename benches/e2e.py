#!/usr/bin/env python3
"""End-to-end comparison of understudy with rsync over ssh, on the same machine and
in the same run (this machine is shared and noisy: read the ratios).

    benches/e2e.py [--size small|large] [--runs 3] [--work DIR] [--release-dir DIR]

Needs root, the corpus scripts in ../shared/bench (or --bench-dir), rsync, acl,
attr and openssh-server (installed with apt when missing). It starts a private
sshd on 127.0.0.1:2222 with a throwaway key, so that rsync runs exactly as users
run it today: `rsync -aAXHD --numeric-ids --delete -e ssh SRC/ root@127.0.0.1:DST/`.

Each tool gets a fresh copy of the corpus (`src`) and an empty destination.
Scenarios, each the median of --runs:
  first      first mirror into an empty destination
  nochange   a run with nothing to do
  mutate     after ../shared/bench/mutate.py changed `src` in place
Tools: rsync, mirror (`sync-cli mirror`), push (`sync-cli push` to a replica
agent) and agents (a source agent's initial full round to a replica agent:
first only).
`sync-cli` runs keep their state (hash index, database cut state) in WORK/state,
as a user's repeated runs would; it is removed before each tool's first run.
Before each run the page cache is written back and the bench waits 31 s
(--no-settle skips it): a re-run comes minutes after the last, as a cron'd
one does, and whatever a tool leaves to do in the background after a run is
done by then (the kernel's writeback of rsync's unsynced copy; the replica
agent's scan of its tree after a round that changed it, which a push
arriving meanwhile waits for). On this machine's ext4 (no journal) files
created within minutes of a large delete cost several times more CPU,
whichever tool runs next (see `settle`), so each tool's destination is a new
ext4 filesystem of its own (loop-mounted, direct I/O; --no-fresh-fs: WORK).

Measures wall seconds, CPU seconds of the whole machine (/proc/stat, both ends and
ssh included), peak RSS of the client process (and of the replica agent for push),
and bytes on the wire: rsync's own "Total bytes sent/received" (before ssh
framing) against understudy's UDP payload bytes (QUIC headers included).
"""
import argparse
import atexit
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, text=True, capture_output=True, **kw).stdout


def cpu_jiffies():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = list(map(int, parts))
    idle = vals[3] + vals[4]
    return sum(vals) - idle


HZ = os.sysconf("SC_CLK_TCK")


def timed(argv, env=None):
    """Runs argv under /usr/bin/time; returns (stdout, wall, machine_cpu, peak_rss_kb)."""
    c0, t0 = cpu_jiffies(), time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-f", "RSSKB %M"] + argv, text=True, capture_output=True, env=env)
    wall = time.monotonic() - t0
    cpu = (cpu_jiffies() - c0) / HZ
    if p.returncode not in (0, 3):
        sys.exit(f"{argv[0]} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    rss = int([l for l in p.stderr.splitlines() if l.startswith("RSSKB ")][-1].split()[1])
    return p.stdout, wall, cpu, rss


SSH_PORT = 2222


def _listener_pids(port):
    """Pids of the processes listening on TCP `port` (`ss`), and whether anything listens."""
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return sorted({int(p) for p in re.findall(r"pid=(\d+)", out)}), bool(out.strip())


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_sshd(pid):
    """Whether `pid` is an sshd (by /proc/PID/comm: sshd rewrites its
    command line into one string, `sshd: /usr/sbin/sshd -f ... [listener]`)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "sshd"
    except OSError:
        return False


def _bench_running(pid):
    """Whether `pid` is a live bench script (another run of these benches)."""
    cmd = _cmdline(pid)
    return pid != os.getpid() and any(a.endswith(".py") and "bench" in a for a in cmd)


def _stale_bench_sshd(pid):
    """Whether `pid` is an sshd that setup_ssh started for a bench that is gone
    (its owner file names a dead process, or this one; or, with no owner file,
    from before owner files, no bench script runs at all)."""
    m = re.search(r"(?:^| )-f (\S+)", " ".join(_cmdline(pid)))
    if not _is_sshd(pid) or not m or os.path.basename(m.group(1)) != "sshd_config":
        return False
    conf = m.group(1)
    try:
        with open(os.path.join(os.path.dirname(conf), "sshd.owner")) as f:
            owner = int(f.read().strip())
    except (OSError, ValueError):
        return not any(_bench_running(int(p)) for p in os.listdir("/proc") if p.isdigit())
    try:
        os.kill(owner, 0)
        return owner == os.getpid()
    except OSError:
        return True


def _wait_gone(pid, timeout=5.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            os.kill(pid, 0)
        except OSError:
            return True
        time.sleep(0.02)
    return False


def free_ssh_port(port=SSH_PORT):
    """Makes sure 127.0.0.1:`port` is free: a stale bench sshd there is
    stopped (by its pid); anything else there stops the bench with its name."""
    pids, busy = _listener_pids(port)
    for pid in pids:
        if not _stale_bench_sshd(pid):
            sys.exit(f"port {port} is held by pid {pid} ({' '.join(_cmdline(pid)) or '?'}), not a stale "
                     "bench sshd: stop it (or wait for the bench that owns it) and run again")
        print(f"stopping a stale bench sshd on port {port} (pid {pid}: {' '.join(_cmdline(pid))})", flush=True)
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
    if busy and not pids:
        sys.exit(f"port {port} is in use by a process this user cannot see")


def exit_on_signals():
    """SIGTERM and SIGHUP end the bench like Ctrl-C does: `finally` blocks and
    atexit handlers run (a bench killed by them would otherwise leave its sshd
    and agents running)."""
    def bye(signum, _frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, bye)


def setup_ssh(work):
    for pkg, binary in (("openssh-server", "/usr/sbin/sshd"), ("rsync", "/usr/bin/rsync"), ("acl", "/usr/bin/setfacl"),
                        ("attr", "/usr/bin/setfattr"), ("time", "/usr/bin/time")):
        if not os.path.exists(binary):
            sh(f"apt-get install -y -qq {pkg}")
    work = os.path.abspath(work)
    key = os.path.join(work, "ssh_key")
    if not os.path.exists(key):
        sh(f"ssh-keygen -q -t ed25519 -N '' -f {key}")
        sh(f"ssh-keygen -q -t ed25519 -N '' -f {work}/host_key")
    os.makedirs("/root/.ssh", mode=0o700, exist_ok=True)
    pub = open(key + ".pub").read()
    ak = "/root/.ssh/authorized_keys"
    if pub not in (open(ak).read() if os.path.exists(ak) else ""):
        with open(ak, "a") as f:
            f.write(pub)
        os.chmod(ak, 0o600)
    os.makedirs("/run/sshd", exist_ok=True)
    free_ssh_port()
    with open(f"{work}/sshd_config", "w") as f:
        f.write(f"ListenAddress 127.0.0.1\nPort {SSH_PORT}\nHostKey {work}/host_key\n"
                "PermitRootLogin prohibit-password\n"
                f"PubkeyAuthentication yes\nPasswordAuthentication no\nUsePAM no\nPidFile {work}/sshd.pid\n")
    with open(f"{work}/sshd.owner", "w") as f:
        f.write(str(os.getpid()))
    # Stopped however the bench ends (done, failed, Ctrl-C, SIGTERM): a
    # listener left on 127.0.0.1:2222 breaks the next bench's rsync comparison.
    exit_on_signals()
    atexit.register(stop_ssh, work)
    sh(f"/usr/sbin/sshd -f {work}/sshd_config")
    time.sleep(0.3)
    return (f"ssh -p {SSH_PORT} -i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            "-o LogLevel=ERROR")


def stop_ssh(work):
    """Stops the sshd that setup_ssh started (by its pid file) and waits until
    it is gone. Safe to call twice."""
    try:
        with open(f"{work}/sshd.pid") as f:
            pid = int(f.read().strip())
        if _is_sshd(pid):
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid)
    except (OSError, ValueError):
        pass
    for f in ("sshd.pid", "sshd.owner"):
        try:
            os.unlink(os.path.join(work, f))
        except OSError:
            pass


def settle():
    """Writes back what setup wrote and waits for the dirty pages to expire.
    It does not wait out ext4's recently-deleted window: without a journal
    (this machine's root), the inode allocator skips, one by one, every free
    inode freed in the last 60 s, or 360 s while its inode-table block is dirty
    (`recently_deleted()` in fs/ext4/ialloc.c), so creating files within
    minutes of a big `rm -rf` costs several times more CPU, whichever tool runs
    next. --fresh-fs takes that out of the comparison."""
    sh("sync")
    expire = int(open("/proc/sys/vm/dirty_expire_centisecs").read()) / 100
    time.sleep(min(expire, 30) + 1)


class FreshFs:
    """A new ext4 filesystem (mkfs defaults, journal included, as a standby's
    disk is made) on a sparse image in `work`, loop-mounted with direct I/O
    at `dst`: no inode in it was ever freed, and its writes go to the disk
    once (not through the image file's page cache too)."""

    def __init__(self, work, name, dst, size):
        self.img, self.dst, self.dev = os.path.join(work, f"fs-{name}.img"), dst, None
        if os.path.ismount(dst):
            sh(f"umount {dst}")
        if os.path.exists(self.img):
            os.unlink(self.img)
        with open(self.img, "wb") as f:
            f.truncate(size)
        sh(f"mkfs.ext4 -q -F {self.img}")
        self.dev = sh(f"losetup --direct-io=on -f --show {self.img}").strip()
        os.makedirs(dst, exist_ok=True)
        sh(f"mount {self.dev} {dst}")
        atexit.register(self.remove)

    def remove(self):
        if self.dev is None:
            return
        subprocess.run(["umount", self.dst], capture_output=True)
        subprocess.run(["losetup", "-d", self.dev], capture_output=True)
        self.dev = None
        try:
            os.unlink(self.img)
        except OSError:
            pass


def tree_bytes(path):
    return int(sh(f"du -sb {path}").split()[0])


def rsync_run(ssh, src, dst):
    out, wall, cpu, rss = timed(["rsync", "-aAXHD", "--numeric-ids", "--delete", "--stats", "-e", ssh,
                                 src + "/", f"root@127.0.0.1:{dst}/"])
    sent = int(next(l for l in out.splitlines() if l.startswith("Total bytes sent")).split(":")[1].replace(",", ""))
    recv = int(next(l for l in out.splitlines() if l.startswith("Total bytes received")).split(":")[1].replace(",", ""))
    return dict(wall=wall, cpu=cpu, rss_mb=rss / 1024, wire=sent + recv)


def mirror_run(cli, src, dst, state):
    out, wall, cpu, rss = timed([cli, "mirror", src, dst, "--json", "--state-dir", state])
    s = json.loads(out)
    return dict(wall=wall, cpu=cpu, rss_mb=rss / 1024, wire=s["bytes_sent_wire"] + s["bytes_received_wire"])


def identities(cli, work):
    """The source's and the replica's identities (made once in `work`): {name: (dir, id)}."""
    ids = {}
    for n in ("src", "rep"):
        d = os.path.join(work, "id-" + n)
        if not os.path.exists(d):
            sh(f"{cli} keygen --dir {d}")
        ids[n] = (d, sh(f"{cli} id --dir {d}").strip())
    return ids


class Agent:
    def __init__(self, agent, cli, work, dst, state):
        self.state = state
        self.ids = identities(cli, work)
        self.p = subprocess.Popen([agent, "replica", "--root", dst, "--listen", "127.0.0.1:0",
                                   "--identity", self.ids["rep"][0], "--allow", self.ids["src"][1]],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.addr = self.p.stdout.readline().split()[1]
        self.cli = cli

    def run(self, src):
        out, wall, cpu, rss = timed([self.cli, "push", src, "--to", self.addr, "--identity", self.ids["src"][0],
                                     "--peer", self.ids["rep"][1], "--json", "--state-dir", self.state])
        s = json.loads(out)
        return dict(wall=wall, cpu=cpu, rss_mb=max(rss, peak_rss_kb(self.p.pid)) / 1024, wire=s["bytes_sent_wire"] + s["bytes_received_wire"])

    def stop(self):
        self.p.terminate()
        self.p.wait()


class Agents:
    """The agents' own initial mirror (issue 14: no slower than push): a
    replica agent, then a source agent on `src` from its start until it logs
    its first full round applied (scan, cut, transfer and the replica's sync
    included, as in push's wall). Only the first scenario applies: after it
    the agents stream changes as they happen (benches/continuous.py)."""

    def __init__(self, agent, cli, work, dst):
        self.agent, self.dst, self.ids = agent, dst, identities(cli, work)

    def first(self, src):
        env = dict(os.environ, UNDERSTUDY_LOG="info,sync_agent::continuous::drive=debug")
        rep = subprocess.Popen([self.agent, "replica", "--root", self.dst, "--listen", "127.0.0.1:0",
                                "--identity", self.ids["rep"][0], "--allow", self.ids["src"][1]],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            addr = rep.stdout.readline().split()[1]
            c0, t0 = cpu_jiffies(), time.monotonic()
            source = subprocess.Popen([self.agent, "source", "--root", src, "--connect", addr,
                                       "--identity", self.ids["src"][0], "--peer", self.ids["rep"][1]],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            try:
                wire = 0
                for line in source.stderr:
                    m = re.search(r"wire of the round.* sent=(\d+)", line)
                    if m:
                        wire += int(m.group(1))
                    if "full round applied" in line:
                        break
                else:
                    sys.exit(f"the source agent stopped before its first full round (exit {source.wait()})")
                wall, cpu = time.monotonic() - t0, (cpu_jiffies() - c0) / HZ
                rss = max(peak_rss_kb(source.pid), peak_rss_kb(rep.pid))
            finally:
                source.terminate()
                source.wait()
        finally:
            rep.terminate()
            rep.wait()
        return dict(wall=wall, cpu=cpu, rss_mb=rss / 1024, wire=wire)


def peak_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM")).split()[1])


def median(rows):
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["small", "large"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/understudy-e2e")
    ap.add_argument("--bench-dir", default=os.path.join(ROOT, "..", "shared", "bench"))
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--tools", default="rsync,mirror,push")
    ap.add_argument("--no-settle", action="store_true",
                    help="skip the writeback and 31 s pause before each run")
    ap.add_argument("--fresh-fs", action=argparse.BooleanOptionalAction, default=True,
                    help="each tool mirrors onto a new ext4 filesystem of its own (a loop-mounted image "
                         "in WORK): no tool pays for the inodes the bench freed before it (see settle); "
                         "--no-fresh-fs mirrors into WORK itself, as before session 9")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (owners, ACLs, trusted.* xattrs)")
    cli, agent = os.path.join(args.bin_dir, "sync-cli"), os.path.join(args.bin_dir, "sync-agent")
    if not os.path.exists(cli):
        sh("cargo build --release -p sync-cli -p sync-agent", cwd=ROOT)
    os.makedirs(args.work, exist_ok=True)
    ssh = setup_ssh(args.work)
    src0 = os.path.join(args.work, "src0")
    if not os.path.exists(os.path.join(src0, ".done")):
        shutil.rmtree(src0, ignore_errors=True)
        sh(f"python3 {args.bench_dir}/gen_corpus.py {src0} --size {args.size}")
        open(os.path.join(src0, ".done"), "w").close()
    # Each tool mirrors its own copy of the corpus, which mutate.py then
    # changes in place (as an application changes its /config): a tool that
    # keeps state between runs (push's --state-dir) is measured as users run
    # it, and every tool sees the same change.
    src = os.path.join(args.work, "src")
    state = os.path.join(args.work, "state")
    tools = args.tools.split(",")
    results = {t: {"first": [], "nochange": [], "mutate": []} for t in tools}
    for i in range(args.runs):
        for t in tools:
            dst = os.path.join(args.work, f"dst-{t}")
            if os.path.ismount(dst):
                sh(f"umount {dst}")
            for d in (dst, src, state):
                shutil.rmtree(d, ignore_errors=True)
            sh(f"cp -a {src0} {src}")
            os.makedirs(dst)
            fs = FreshFs(args.work, t, dst, max(4 << 30, 3 * tree_bytes(src0))) if args.fresh_fs else None
            if not args.no_settle:
                settle()
            if t == "agents":
                results[t]["first"].append(Agents(agent, cli, args.work, dst).first(src))
                if fs:
                    fs.remove()
                print(f"run {i + 1}/{args.runs} {t}: " + json.dumps(results[t]["first"][-1]), file=sys.stderr)
                continue
            ag = Agent(agent, cli, args.work, dst, state) if t == "push" else None
            run = {"rsync": lambda s: rsync_run(ssh, s, dst),
                   "mirror": lambda s: mirror_run(cli, s, dst, state),
                   "push": lambda s: ag.run(s)}[t]
            results[t]["first"].append(run(src))
            if not args.no_settle:
                settle()
            results[t]["nochange"].append(run(src))
            sh(f"python3 {args.bench_dir}/mutate.py {src} --seed 1 --no-page-report")
            if not args.no_settle:
                settle()
            results[t]["mutate"].append(run(src))
            if ag:
                ag.stop()
            if fs:
                fs.remove()
            print(f"run {i + 1}/{args.runs} {t}: " + json.dumps({k: v[-1] for k, v in results[t].items()}), file=sys.stderr)
    print(f"\ncorpus {args.size}, median of {args.runs}; ratio = understudy / rsync (lower is better)\n")
    print("| tool | scenario | wall s | CPU s | peak RSS MB | bytes on wire | wall ratio | wire ratio |")
    print("|---|---|---|---|---|---|---|---|")
    med = {t: {s: median(r) for s, r in sc.items() if r} for t, sc in results.items()}
    for s in ("first", "nochange", "mutate"):
        for t in tools:
            m = med[t].get(s)
            if m is None:
                continue
            base = med.get("rsync", {}).get(s)
            wr = f"{m['wall'] / base['wall']:.2f}" if base else "-"
            br = f"{m['wire'] / base['wire']:.2f}" if base and base["wire"] else "-"
            print(f"| {t} | {s} | {m['wall']:.3f} | {m['cpu']:.2f} | {m['rss_mb']:.0f} | {m['wire']:,} | {wr} | {br} |")
    print("\n" + json.dumps(med))
    subprocess.run(["pkill", "-f", f"sshd.*{args.work}/sshd_config"])


if __name__ == "__main__":
    main()
