//! Two agents in two network namespaces joined by a veth pair, the path
//! between them losing 5 %, reordering 25 %, duplicating 2 % and delaying
//! 10 ms of the packets: the trees converge and each change is applied once.
//!
//! The impairment is `tc qdisc ... netem` when the kernel has it; when it does
//! not (this CI's kernel has no `sch_netem`), a relay inside the replica's
//! namespace does the same to every UDP datagram in both directions. The
//! agents bind only to the namespaces' own 10.x addresses; the namespaces are
//! deleted on drop, also when the test fails.

use crate::util::*;
use std::collections::BinaryHeap;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Two namespaces and the veth pair between them, deleted on drop.
struct Netns {
    a: String,
    b: String,
    addr_a: String,
    addr_b: String,
}

impl Netns {
    fn new() -> Self {
        let id = std::process::id() % 10_000;
        let net = 100 + std::process::id() % 150;
        let n = Self {
            a: format!("us{id}a"),
            b: format!("us{id}b"),
            addr_a: format!("10.{net}.77.1"),
            addr_b: format!("10.{net}.77.2"),
        };
        // From here on, Drop removes whatever was made.
        sh(&format!(
            r#"
ip netns add {a}
ip netns add {b}
ip link add {a}v type veth peer name {b}v
ip link set {a}v netns {a}
ip link set {b}v netns {b}
ip -n {a} addr add {aa}/24 dev {a}v
ip -n {b} addr add {ab}/24 dev {b}v
ip -n {a} link set {a}v up
ip -n {b} link set {b}v up
ip -n {a} link set lo up
ip -n {b} link set lo up
"#,
            a = n.a,
            b = n.b,
            aa = n.addr_a,
            ab = n.addr_b
        ));
        n
    }

    /// netem on both ends of the veth; false when the kernel lacks it.
    fn netem(&self) -> bool {
        [
            (&self.a, format!("{}v", self.a)),
            (&self.b, format!("{}v", self.b)),
        ]
        .iter()
        .all(|(ns, dev)| {
            Command::new("ip")
                .args(["netns", "exec", ns, "tc", "qdisc", "add", "dev", dev])
                .args(["root", "netem", "loss", "5%", "reorder", "25%"])
                .args(["duplicate", "2%", "delay", "10ms"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Enters the network namespace `ns` on the calling thread only.
fn enter(ns: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    // SAFETY: setns(2) on a valid namespace fd we hold open; CLONE_NEWNET only
    // changes the network namespace of this thread, which is a thread of our
    // own that makes sockets and exits.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// A datagram due at a time (min-heap by time, then order of arrival).
struct Due(Instant, u64, Vec<u8>);
impl PartialEq for Due {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Due {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.0, o.1).cmp(&(self.0, self.1))
    }
}

/// Forwards datagrams from `from` to wherever `to()` says, losing 5 %,
/// duplicating 2 %, delaying by 10 ms and holding 25 % back another 15 ms
/// (reordered behind later ones). Returns (forwarded, dropped, duplicated,
/// reordered).
fn impair(
    from: UdpSocket,
    out: UdpSocket,
    to: impl Fn(SocketAddr) -> Option<SocketAddr>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> [u64; 4] {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut queue = BinaryHeap::new();
    let mut stats = [0u64; 4];
    let mut n = 0u64;
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while queue.peek().is_some_and(|d: &Due| d.0 <= now) {
            let Due(_, _, pkt) = queue.pop().unwrap();
            if let Some(dest) = to(SocketAddr::from(([0, 0, 0, 0], 0))) {
                let _ = out.send_to(&pkt, dest);
                stats[0] += 1;
            }
        }
        let wait = queue
            .peek()
            .map(|d: &Due| d.0.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(20))
            .max(Duration::from_micros(200));
        from.set_read_timeout(Some(wait)).unwrap();
        let Ok((len, peer)) = from.recv_from(&mut buf) else {
            continue;
        };
        let _ = to(peer); // learn the client's address
        if rng.random_bool(0.05) {
            stats[1] += 1;
            continue;
        }
        let mut at = Instant::now() + Duration::from_millis(10);
        if rng.random_bool(0.25) {
            at += Duration::from_millis(15);
            stats[3] += 1;
        }
        let copies = if rng.random_bool(0.02) {
            stats[2] += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            n += 1;
            queue.push(Due(at, n, buf[..len].to_vec()));
        }
    }
    stats
}

/// The relay in namespace `ns`: listens on `listen`, forwards to `target`.
struct Relay {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<[u64; 4]>>,
}

impl Relay {
    fn start(ns: &str, listen: SocketAddr, target: SocketAddr) -> Self {
        let ns = ns.to_string();
        let (front, back) = std::thread::spawn(move || {
            enter(&ns);
            let front = UdpSocket::bind(listen).unwrap();
            let back = UdpSocket::bind(SocketAddr::new(listen.ip(), 0)).unwrap();
            (front, back)
        })
        .join()
        .unwrap();
        let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
        let stop = Arc::new(AtomicBool::new(false));
        let (f2, b2) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let up = {
            let (stop, client) = (stop.clone(), client.clone());
            std::thread::spawn(move || {
                impair(
                    front,
                    b2,
                    move |peer| {
                        if peer.port() != 0 {
                            *client.lock().unwrap() = Some(peer);
                        }
                        Some(target)
                    },
                    stop,
                    1,
                )
            })
        };
        let down = {
            let stop = stop.clone();
            std::thread::spawn(move || impair(back, f2, move |_| *client.lock().unwrap(), stop, 2))
        };
        Self {
            stop,
            threads: vec![up, down],
        }
    }

    fn stop(self) -> Vec<[u64; 4]> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    }
}

fn agent_in(ns: &str, args: &[&std::ffi::OsStr]) -> std::process::Child {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin("sync-agent"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn lossy_reordering_duplicating_link_converges_each_change_once() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(src.join("seed"), b"seed").unwrap();
    let (sid, s_id, rid, r_id) = identities(t.path());
    let net = Netns::new();
    let netem = net.netem();
    let replica_at = format!("{}:7001", net.addr_b);
    let relay_at: SocketAddr = format!("{}:7000", net.addr_b).parse().unwrap();
    // Without netem, the relay impairs the path; with it, the source connects
    // straight to the replica over the impaired veth.
    let relay = (!netem).then(|| Relay::start(&net.b, relay_at, replica_at.parse().unwrap()));
    let connect_to = if netem {
        replica_at.clone()
    } else {
        relay_at.to_string()
    };

    let replica = Agent {
        child: agent_in(
            &net.b,
            &[
                "replica".as_ref(),
                "--listen".as_ref(),
                replica_at.as_ref(),
                "--allow".as_ref(),
                s_id.as_ref(),
                "--root".as_ref(),
                dst.as_os_str(),
                "--identity".as_ref(),
                rid.as_os_str(),
            ],
        ),
        addr: replica_at.clone(),
    };
    let mut replica = replica;
    {
        use std::io::{BufRead, BufReader};
        let mut line = String::new();
        BufReader::new(replica.child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("listening"), "replica said {line:?}");
    }
    let _source = Agent {
        child: agent_in(
            &net.a,
            &[
                "source".as_ref(),
                "--connect".as_ref(),
                connect_to.as_ref(),
                "--peer".as_ref(),
                r_id.as_ref(),
                "--root".as_ref(),
                src.as_os_str(),
                "--identity".as_ref(),
                sid.as_os_str(),
            ],
        ),
        addr: connect_to.clone(),
    };
    wait_converged(&src, &dst, 60, &[]);

    // Each step one change, converged before the next; the inode each change
    // made on the replica must survive every later round (a change applied
    // again would be renamed over it).
    let mut made: Vec<(String, u64)> = Vec::new();
    let ino = |name: &str| std::fs::symlink_metadata(dst.join(name)).unwrap().ino();
    for i in 0..12 {
        let name = format!("f{i:02}");
        let body = if i % 3 == 0 {
            random_bytes(300 << 10, i) // requested on a stream
        } else {
            format!("small file {i}\n").into_bytes() // inline
        };
        std::fs::write(src.join(&name), &body).unwrap();
        wait_converged(&src, &dst, 60, &[]);
        made.push((name.clone(), ino(&name)));
    }
    sh(&format!(
        "cd {} && mkdir -p d/e && echo x > d/e/x && mv f01 d/moved && rm f02 && chmod 600 f03",
        src.display()
    ));
    wait_converged(&src, &dst, 60, &[]);
    for (name, inode) in &made {
        if ["f01", "f02", "f03"].contains(&name.as_str()) {
            continue;
        }
        assert_eq!(ino(name), *inode, "{name} was applied more than once");
    }
    assert_identical(&src, &dst);
    if let Some(r) = relay {
        let stats = r.stop();
        println!("relay (forwarded, dropped, duplicated, reordered) up/down: {stats:?}");
        assert!(stats.iter().all(|s| s[1] > 0 && s[3] > 0), "{stats:?}");
    } else {
        println!("tc netem impaired the veth pair");
    }
}
