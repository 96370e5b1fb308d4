//! Helpers: the built binaries, tree builders, comparisons.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A binary of the workspace, built by `cargo test --workspace` beside this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo test --workspace`",
        p.display()
    );
    p
}

/// Runs a command and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs `sync-cli` with arguments.
pub fn cli(args: &[&std::ffi::OsStr]) -> Output {
    run(Command::new(bin("sync-cli")).args(args))
}

/// `sync-cli mirror SRC DST --json`, which must succeed; returns the summary.
pub fn mirror_ok(src: &Path, dst: &Path) -> serde_json::Value {
    let out = cli(&[
        "mirror".as_ref(),
        src.as_os_str(),
        dst.as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(
        out.status.success(),
        "mirror failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("summary JSON")
}

/// A shell command that must succeed.
pub fn sh(script: &str) -> String {
    let out = run(Command::new("bash").arg("-ec").arg(script));
    assert!(
        out.status.success(),
        "`{script}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rsync fidelity check of DESIGN.md invariant 3: prints nothing when equal.
pub fn rsync_diff(src: &Path, dst: &Path) -> String {
    let out = run(Command::new("rsync")
        .args(["-naAXHDc", "--numeric-ids", "--delete", "--itemize-changes"])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display())));
    assert!(
        out.status.success(),
        "rsync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `getfacl -RPn` and `getfattr -RPhd -m - -e hex` of a tree, run from inside it so
/// that the two trees' dumps compare; each dump's entries (one block per file)
/// sorted by path, since the order of a directory's entries is the
/// filesystem's (ext4 hashes names, tmpfs lists the newest first).
pub fn acl_xattr_dumps(root: &Path) -> (String, String) {
    let acl = run(Command::new("getfacl")
        .args(["-RPn", "."])
        .current_dir(root));
    let xat = run(Command::new("getfattr")
        .args(["-RPhd", "-m", "-", "-e", "hex", "."])
        .current_dir(root));
    let sorted = |out: &[u8]| {
        let text = String::from_utf8_lossy(out);
        let mut blocks: Vec<&str> = text.split("\n\n").filter(|b| !b.is_empty()).collect();
        blocks.sort_unstable();
        blocks.join("\n\n")
    };
    (sorted(&acl.stdout), sorted(&xat.stdout))
}

/// Asserts the three fidelity checks and `sync-cli verify`.
pub fn assert_identical(src: &Path, dst: &Path) {
    let d = rsync_diff(src, dst);
    assert!(d.is_empty(), "rsync sees differences:\n{d}");
    assert_eq!(
        acl_xattr_dumps(src),
        acl_xattr_dumps(dst),
        "ACL/xattr dumps differ"
    );
    let out = cli(&["verify".as_ref(), src.as_os_str(), dst.as_os_str()]);
    assert!(
        out.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Every path below `root` whose name is one of our temp names.
pub fn temp_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_name().as_bytes().starts_with(b".understudy.tmp.") {
                out.push(p.clone());
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            }
        }
    }
    out
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// A tmpfs mount that is unmounted on drop.
pub struct Tmpfs(pub tempfile::TempDir);

impl Tmpfs {
    pub fn new(opts: &str) -> Self {
        let d = tempfile::tempdir().expect("tempdir");
        sh(&format!(
            "mount -t tmpfs -o {opts} understudy-test {}",
            d.path().display()
        ));
        Self(d)
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// A running agent process, killed on drop.
pub struct Agent {
    pub child: std::process::Child,
    pub addr: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// SIGKILL, now.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sync-cli keygen --dir DIR`, returning the node id.
pub fn keygen(dir: &Path) -> String {
    let out = cli(&["keygen".as_ref(), "--dir".as_ref(), dir.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `sync-agent replica` on `listen` (e.g. 127.0.0.1:0); returns once it listens.
pub fn replica_on(
    root: &Path,
    identity: &Path,
    allow: &str,
    listen: &str,
    extra: &[&str],
) -> Agent {
    AgentCmd::replica(root, identity, allow, listen)
        .args(extra)
        .start()
}

/// `sync-agent replica` on a free loopback port.
pub fn replica(root: &Path, identity: &Path, allow: &str, extra: &[&str]) -> Agent {
    replica_on(root, identity, allow, "127.0.0.1:0", extra)
}

/// `sync-agent source` towards `addr`.
pub fn source(root: &Path, identity: &Path, peer: &str, addr: &str, extra: &[&str]) -> Agent {
    AgentCmd::source(root, identity, peer, addr)
        .args(extra)
        .start()
}

/// The root hash of a tree, as `verify` computes it (excluding `skip` patterns).
pub fn root_hash(root: &Path, exclude: &[String]) -> Option<[u8; 32]> {
    let opts = sync_core::scan::ScanOptions {
        filter: sync_core::filter::Filter::new(exclude).ok()?,
        ..Default::default()
    };
    sync_core::scan::scan(root, &opts)
        .ok()
        .map(|m| m.root_hash())
}

/// Waits until both trees have the same root hash; panics with the differences
/// after `secs`.
pub fn wait_converged(src: &Path, dst: &Path, secs: u64, exclude: &[String]) {
    eventually_or(
        "the trees to converge",
        std::time::Duration::from_secs(secs),
        || {
            let (a, b) = (root_hash(src, exclude), root_hash(dst, exclude));
            a.is_some() && a == b
        },
        || {
            let out = cli(&["verify".as_ref(), src.as_os_str(), dst.as_os_str()]);
            String::from_utf8_lossy(&out.stdout).into_owned()
        },
    );
}

/// A pair of identities: (source dir, source id, replica dir, replica id).
pub fn identities(base: &Path) -> (PathBuf, String, PathBuf, String) {
    let (a, b) = (base.join("id-src"), base.join("id-rep"));
    let (ai, bi) = (keygen(&a), keygen(&b));
    (a, ai, b, bi)
}

/// `sync-agent replica` on a free loopback port, its log (stderr) going to `log`.
pub fn replica_logged(
    root: &Path,
    identity: &Path,
    allow: &str,
    log: &Path,
    env: &[(&str, &str)],
) -> Agent {
    AgentCmd::replica(root, identity, allow, "127.0.0.1:0")
        .envs(env)
        .log(log)
        .start()
}

/// Peak resident set (VmHWM) of a running process, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Path, mode, uid, gid, inode, link count and content (or link target).
pub type Snap = (PathBuf, u32, u32, u32, u64, u64, Vec<u8>);

/// Content, mode, owner and inode of every entry below `dir` (and `dir` itself),
/// for "sentinels outside the root unchanged" checks.
pub fn snapshot(dir: &Path) -> Vec<Snap> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let content = if m.is_file() {
            std::fs::read(&p).unwrap_or_default()
        } else if m.file_type().is_symlink() {
            std::fs::read_link(&p)
                .map(|t| t.into_os_string().into_vec())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                stack.push(e.path());
            }
        }
        out.push((p, m.mode(), m.uid(), m.gid(), m.ino(), m.nlink(), content));
    }
    out.sort();
    out
}

use std::os::unix::ffi::OsStringExt as _;

/// `sync-cli status --json` of the agent whose control socket is `control`
/// (through a minimal config written in `dir`); null while it (re)starts.
pub fn control_status(dir: &Path, identity: &Path, control: &Path) -> serde_json::Value {
    let cfg = dir.join("status.toml");
    let body = format!(
        "[node]\nidentity = \"{}\"\ncontrol = \"{}\"\n",
        identity.display(),
        control.display()
    );
    std::fs::write(&cfg, body).unwrap();
    let out = cli(&[
        "status".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        "--json".as_ref(),
    ]);
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Two trees and two identities in one temp dir, for a source and a replica agent.
pub struct Pair {
    pub t: tempfile::TempDir,
    pub src: std::path::PathBuf,
    pub dst: std::path::PathBuf,
    pub sid: std::path::PathBuf,
    pub rid: std::path::PathBuf,
    pub s_id: String,
    pub r_id: String,
    /// The tmpfs `t` lies on, if any (unmounted after `t` is removed).
    _fs: Option<Tmpfs>,
}

/// A fresh [`Pair`] whose source holds one file.
pub fn pair() -> Pair {
    pair_in(None)
}

/// A fresh [`Pair`] on a tmpfs of its own, for tests of many files: on this
/// disk (ext4 mounted with `discard`) removing 20,000 files takes ~50 s, more
/// than the test; a tmpfs goes at once.
pub fn pair_on_tmpfs() -> Pair {
    pair_in(Some(Tmpfs::new("size=2g")))
}

fn pair_in(fs: Option<Tmpfs>) -> Pair {
    let t = match &fs {
        Some(fs) => tempfile::tempdir_in(fs.path()).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    // So that "converged" means the first full round was applied, not that two
    // empty trees look alike.
    std::fs::write(src.join("seed"), b"seed").unwrap();
    let (sid, s_id, rid, r_id) = identities(t.path());
    Pair {
        t,
        src,
        dst,
        sid,
        rid,
        s_id,
        r_id,
        _fs: fs,
    }
}

/// `sync-cli status --json` of the agent whose control socket is `control`.
pub fn agent_status(p: &Pair, control: &Path) -> serde_json::Value {
    control_status(p.t.path(), &p.sid, control)
}

/// What a condition polled by [`eventually`] returns: `bool` (true: done) or
/// `Option<T>` (`Some(t)`: done, with `t`).
pub trait Ready {
    /// What [`eventually`] returns once done.
    type Out;
    /// `Some` once done.
    fn ready(self) -> Option<Self::Out>;
}

impl Ready for bool {
    type Out = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Ready for Option<T> {
    type Out = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// Polls `f` until it is done (true, or `Some`), first every 5 ms then every
/// 50 ms (or as long as a look takes, if longer); panics naming `what` after
/// `timeout`.
pub fn eventually<R: Ready>(
    what: &str,
    timeout: std::time::Duration,
    f: impl FnMut() -> R,
) -> R::Out {
    eventually_or(what, timeout, f, String::new)
}

/// [`eventually`], with `diag()` (logs, the last status) in the panic.
pub fn eventually_or<R: Ready>(
    what: &str,
    timeout: std::time::Duration,
    mut f: impl FnMut() -> R,
    diag: impl FnOnce() -> String,
) -> R::Out {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        let looked = Instant::now();
        if let Some(out) = f().ready() {
            return out;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}\n{}", diag());
        }
        // A costly look (hashing two big trees) waits as long as it took:
        // the agents it waits for get the CPU.
        std::thread::sleep(pause.max(looked.elapsed()));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The status an agent's control socket answers (in-process, fast enough to
/// sample a round in progress); `None` while it (re)starts.
pub fn socket_status(control: &Path) -> Option<serde_json::Value> {
    let query = || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let st = rt.block_on(sync_agent::control::query(control)).ok()?;
        serde_json::to_value(&st).ok()
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        // Called from an async test: a runtime may not block on another.
        std::thread::scope(|s| s.spawn(query).join().ok().flatten())
    } else {
        query()
    }
}

/// How to start one `sync-agent`; [`AgentCmd::start`] returns once it is
/// ready: it printed `listening ADDR` (an agent that listens says so on its
/// first line of stdout, by design) and, with a control socket, that socket
/// answers a status request.
pub struct AgentCmd {
    cmd: Command,
    listens: bool,
    control: Option<PathBuf>,
    log: Option<(PathBuf, bool)>,
    addr: String,
}

impl AgentCmd {
    fn new(args: &[&std::ffi::OsStr], listens: bool, addr: &str) -> Self {
        let mut cmd = Command::new(bin("sync-agent"));
        cmd.args(args);
        Self {
            cmd,
            listens,
            control: None,
            log: None,
            addr: addr.to_string(),
        }
    }

    /// `sync-agent --config CONFIG` of a config that sets `[node] listen`.
    pub fn config(config: &Path) -> Self {
        Self::new(&["--config".as_ref(), config.as_os_str()], true, "")
    }

    /// `sync-agent replica --listen LISTEN --allow ALLOW` of `root` as `identity`.
    pub fn replica(root: &Path, identity: &Path, allow: &str, listen: &str) -> Self {
        Self::new(
            &[
                "replica".as_ref(),
                "--listen".as_ref(),
                listen.as_ref(),
                "--allow".as_ref(),
                allow.as_ref(),
                "--root".as_ref(),
                root.as_os_str(),
                "--identity".as_ref(),
                identity.as_os_str(),
            ],
            true,
            "",
        )
    }

    /// `sync-agent source --connect ADDR --peer PEER` of `root` as `identity`.
    pub fn source(root: &Path, identity: &Path, peer: &str, addr: &str) -> Self {
        Self::new(
            &[
                "source".as_ref(),
                "--connect".as_ref(),
                addr.as_ref(),
                "--peer".as_ref(),
                peer.as_ref(),
                "--root".as_ref(),
                root.as_os_str(),
                "--identity".as_ref(),
                identity.as_os_str(),
            ],
            false,
            addr,
        )
    }

    /// More arguments.
    pub fn args(mut self, extra: &[&str]) -> Self {
        self.cmd.args(extra);
        self
    }

    /// Environment variables (log filter, failpoints).
    pub fn envs(mut self, env: &[(&str, &str)]) -> Self {
        self.cmd.envs(env.iter().copied());
        self
    }

    /// Its log (stderr) in `log`, made anew (else: discarded).
    pub fn log(mut self, log: &Path) -> Self {
        self.log = Some((log.to_path_buf(), false));
        self
    }

    /// Its log (stderr) appended to `log` (one log over restarts).
    pub fn log_append(mut self, log: &Path) -> Self {
        self.log = Some((log.to_path_buf(), true));
        self
    }

    /// Its control socket is `control` (`--control` is passed when
    /// `pass` is set; a config names its own): ready once it answers.
    pub fn control(mut self, control: &Path, pass: bool) -> Self {
        if pass {
            self.cmd.arg("--control").arg(control);
        }
        self.control = Some(control.to_path_buf());
        self
    }

    /// Starts it; returns once it is ready (the agent's log in the panic
    /// should it never be).
    pub fn start(mut self) -> Agent {
        use std::process::Stdio;
        let stderr = match &self.log {
            Some((l, append)) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(*append)
                    .truncate(!*append)
                    .open(l)
                    .unwrap_or_else(|e| panic!("log {}: {e}", l.display())),
            ),
            None => Stdio::null(),
        };
        let stdout = if self.listens {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let mut child = self
            .cmd
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {:?}: {e}", self.cmd));
        let log = self.log.clone().map(|(l, _)| l);
        let diag = move || {
            log.map(|l| std::fs::read_to_string(l).unwrap_or_default())
                .unwrap_or_default()
        };
        let addr = if self.listens {
            listening_or(&mut child, diag.clone())
        } else {
            self.addr
        };
        let mut agent = Agent { child, addr };
        if let Some(control) = &self.control {
            let exited = diag.clone();
            eventually_or(
                "the agent's control socket to answer",
                std::time::Duration::from_secs(20),
                || {
                    if let Ok(Some(st)) = agent.child.try_wait() {
                        panic!("the agent exited ({st}):\n{}", exited.clone()());
                    }
                    socket_status(control).is_some()
                },
                diag,
            );
        }
        agent
    }
}

/// The address an agent prints on its first line of stdout (`listening
/// ADDR`), with `diag()` in the panic should it say anything else.
fn listening_or(child: &mut std::process::Child, diag: impl FnOnce() -> String) -> String {
    use std::io::{BufRead, BufReader};
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().expect("agent stdout piped")).read_line(&mut line);
    match line.trim().strip_prefix("listening ") {
        Some(addr) => addr.to_string(),
        None => panic!("agent said {line:?}:\n{}", diag()),
    }
}

/// A WAL database at `db` with table `t(k, v)` of `rows` rows of `size`
/// random bytes; its connection, still open.
pub fn wal_table(db: &Path, rows: u32, size: u32) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    c.execute_batch(&format!(
        "CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {rows})
         INSERT INTO t SELECT i, randomblob({size}) FROM n;"
    ))
    .unwrap();
    c
}
