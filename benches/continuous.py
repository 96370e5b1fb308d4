#!/usr/bin/env python3
"""Continuous mode figures (issue 3), on this machine, in one run.

    benches/continuous.py [--work DIR] [--writes 1000] [--skip-large] [--latency-only]
                          [--bin-dir DIR] [--log-dir DIR]

1. Change-to-replica latency: single small-file writes on the source, each
   waited for on the replica (polled every 0.1 ms); p50 / p99 over --writes.
   Then the same while a 1 GiB file is written and shipped (issue 14: small
   changes never queued behind a large file): small writes from the first byte
   of the large file until it has landed on the replica; p50 / p99 / max.
2. A 10,000-file burst and one 1 GiB file: time from the first write until the
   replica's tree is identical (blake3 root hash), against `rsync -aAXHD
   --numeric-ids --delete -e ssh` of the same data to 127.0.0.1 (the same private
   sshd as e2e.py).
3. Idle source agent CPU and RSS while watching the `large` corpus of
   ../shared/bench/ (after the initial mirror has converged), over 30 s.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import e2e  # noqa: E402

ROOT = os.path.dirname(HERE)


LOG_DIR = None


def agents(cli, agent, work, src, dst, extra_src=()):
    ids = {}
    for n in ("s", "r"):
        d = os.path.join(work, "cid-" + n)
        if not os.path.exists(d):
            e2e.sh(f"{cli} keygen --dir {d}")
        ids[n] = (d, e2e.sh(f"{cli} id --dir {d}").strip())
    rep = subprocess.Popen([agent, "replica", "--root", dst, "--listen", "127.0.0.1:0", "--identity", ids["r"][0],
                            "--allow", ids["s"][1]], stdout=subprocess.PIPE, stderr=log("replica"), text=True)
    addr = rep.stdout.readline().split()[1]
    srcp = subprocess.Popen([agent, "source", "--root", src, "--connect", addr, "--identity", ids["s"][0],
                             "--peer", ids["r"][1], *extra_src], stdout=subprocess.DEVNULL, stderr=log("source"))
    return rep, srcp


def log(who):
    """The agent's stderr: appended to {--log-dir}/{who}.log when given."""
    if LOG_DIR is None:
        return subprocess.DEVNULL
    return open(os.path.join(LOG_DIR, f"{who}.log"), "a")


def root_hash(cli, a, b):
    out = subprocess.run([cli, "verify", a, b, "--json"], capture_output=True, text=True)
    return out.returncode == 0


def quick(d):
    n = size = 0
    for dirpath, dirs, files in os.walk(d):
        for f in files:
            try:
                size += os.lstat(os.path.join(dirpath, f)).st_size
                n += 1
            except FileNotFoundError:
                pass
    return n, size


def wait_identical(cli, a, b, timeout=600):
    """Polls cheaply (file count and sizes) and confirms with `sync-cli verify`
    (content and all metadata), so that polling does not starve the agents."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if quick(a) == quick(b):
            t = time.monotonic()
            if root_hash(cli, a, b):
                return t
        time.sleep(0.1)
    sys.exit(f"{a} and {b} did not converge in {timeout} s")


def small_writes(src, dst, prefix, n, more=lambda: False):
    """Writes small files one at a time, each waited for on the replica: at
    least `n`, and on while `more()`; their latencies in ms."""
    lat = []
    i = 0
    while i < n or more():
        name = f"{prefix}{i:05d}"
        body = f"write {i}\n".encode()
        t0 = time.monotonic()
        with open(os.path.join(src, name), "wb") as f:
            f.write(body)
        target = os.path.join(dst, name)
        while True:
            try:
                with open(target, "rb") as f:
                    if f.read() == body:
                        break
            except FileNotFoundError:
                pass
            if time.monotonic() - t0 > 30:
                sys.exit(f"write {name} never reached the replica")
            time.sleep(0.0001)
        lat.append((time.monotonic() - t0) * 1000)
        time.sleep(0.005)
        i += 1
    return lat


def figures(lat):
    lat = sorted(lat)
    p99 = lat[max(0, int(len(lat) * 0.99) - 1)]
    return f"p50 {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms, max {lat[-1]:.1f} ms"


def latency_under_large_write(src, dst):
    """Small writes while a 1 GiB file is written and shipped."""
    big, size = os.path.join(src, "large.bin"), 1 << 30
    landed_path = os.path.join(dst, "large.bin")

    def landed():
        try:
            return os.path.getsize(landed_path) == size
        except FileNotFoundError:
            return False

    t0 = time.monotonic()
    w = subprocess.Popen(["sh", "-c", f"head -c {size} /dev/urandom > {big}"])
    lat = small_writes(src, dst, "u", 1, lambda: w.poll() is None or not landed())
    took = time.monotonic() - t0
    w.wait()
    os.remove(big)
    print(f"latency over {len(lat)} single small-file writes while a 1 GiB file was written and shipped "
          f"(landed {took:.1f} s after its first byte): {figures(lat)}; load average {os.getloadavg()[0]:.2f}")


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / e2e.HZ


def proc_mem(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/var/tmp/understudy-cont")
    ap.add_argument("--writes", type=int, default=1000)
    ap.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                      "release"),
                    help="where sync-cli and sync-agent are (default: $CARGO_TARGET_DIR/release, else target/release)")
    ap.add_argument("--log-dir", help="append the agents' stderr to source.log and replica.log here "
                    "(UNDERSTUDY_LOG=debug shows each round's phases)")
    ap.add_argument("--bench-dir", default=os.path.join(ROOT, "..", "shared", "bench"))
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--latency-only", action="store_true",
                    help="only the latency figures (idle, and under a 1 GiB write); no rsync, no sshd")
    args = ap.parse_args()
    global LOG_DIR
    LOG_DIR = args.log_dir
    cli, agent = os.path.join(args.bin_dir, "sync-cli"), os.path.join(args.bin_dir, "sync-agent")
    os.makedirs(args.work, exist_ok=True)
    ssh = None if args.latency_only else e2e.setup_ssh(args.work)

    # 1. latency
    src, dst = os.path.join(args.work, "lat-src"), os.path.join(args.work, "lat-dst")
    for d in (src, dst):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    rep, srcp = agents(cli, agent, args.work, src, dst)
    wait_identical(cli, src, dst)
    lat = small_writes(src, dst, "f", args.writes)
    print(f"latency over {len(lat)} single small-file writes: {figures(lat)}")
    latency_under_large_write(src, dst)
    if args.latency_only:
        srcp.terminate(); rep.terminate(); srcp.wait(); rep.wait()
        return

    # 2. burst of 10,000 files, then one 1 GiB file
    for what in ("burst", "gig"):
        src, dst = os.path.join(args.work, f"{what}-src"), os.path.join(args.work, f"{what}-dst")
        rdst = os.path.join(args.work, f"{what}-rsync")
        for d in (src, dst, rdst):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        srcp.terminate(); rep.terminate(); srcp.wait(); rep.wait()
        rep, srcp = agents(cli, agent, args.work, src, dst)
        wait_identical(cli, src, dst)
        t0 = time.monotonic()
        if what == "burst":
            for d in range(100):
                os.makedirs(os.path.join(src, f"d{d:03d}"))
                for f in range(100):
                    with open(os.path.join(src, f"d{d:03d}", f"f{f:03d}"), "wb") as fh:
                        fh.write(os.urandom(1024))
        else:
            e2e.sh(f"head -c 1073741824 /dev/urandom > {src}/big.bin")
        t_written = time.monotonic() - t0
        t_conv = wait_identical(cli, src, dst) - t0
        r = e2e.rsync_run(ssh, src, rdst)
        print(f"{what}: understudy converged {t_conv:.2f} s after the first write, {t_conv - t_written:.2f} s after "
              f"the last (writing took {t_written:.2f} s); rsync over ssh of the same data, started after the "
              f"last write: {r['wall']:.2f} s, {r['cpu']:.2f} CPU-s")

    # 3. idle CPU and RSS on the large corpus
    if not args.skip_large:
        srcp.terminate(); rep.terminate(); srcp.wait(); rep.wait()
        large = os.path.join(args.work, "large-src")
        if not os.path.exists(os.path.join(large, ".done")):
            shutil.rmtree(large, ignore_errors=True)
            e2e.sh(f"python3 {args.bench_dir}/gen_corpus.py {large} --size large")
            open(os.path.join(large, ".done"), "w").close()
        dst = os.path.join(args.work, "large-dst")
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        t0 = time.monotonic()
        rep, srcp = agents(cli, agent, args.work, large, dst)
        wait_identical(cli, large, dst, timeout=1200)
        print(f"large corpus: initial mirror by the agents converged in {time.monotonic() - t0:.1f} s")
        time.sleep(2)
        c0 = proc_cpu(srcp.pid), proc_cpu(rep.pid)
        time.sleep(30)
        c1 = proc_cpu(srcp.pid), proc_cpu(rep.pid)
        ms, mr = proc_mem(srcp.pid), proc_mem(rep.pid)
        print(f"idle 30 s watching {large}: source agent {c1[0] - c0[0]:.2f} CPU-s, RSS {ms['VmRSS']:.0f} MB "
              f"(peak {ms['VmHWM']:.0f} MB); replica agent {c1[1] - c0[1]:.2f} CPU-s, RSS {mr['VmRSS']:.0f} MB "
              f"(peak {mr['VmHWM']:.0f} MB)")
    srcp.terminate(); rep.terminate()
    subprocess.run(["pkill", "-f", f"sshd.*{args.work}/sshd_config"])


if __name__ == "__main__":
    main()
