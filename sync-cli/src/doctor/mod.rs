//! `doctor`: a preflight of this node for the folders of a config. Each check
//! is `ok`, `warn` or `fail` with a sentence; exit 0 when nothing fails, 1 when
//! something does, 2 on an error (the config cannot be read).

mod probe;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use sync_agent::config::{Config, Folder, Role};

/// What `doctor --help` says about exit codes.
pub const EXIT_CODES: &str = "Exit codes: 0 nothing failed (warnings are printed); 1 some check \
failed; 2 error (the config cannot be read or parsed).";

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The agent's config file.
    #[arg(long)]
    config: PathBuf,
    /// Print `{"checks": [{"name", "status", "detail"}]}`.
    #[arg(long)]
    json: bool,
}

/// One check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Fine.
    Ok,
    /// Works, but worth a look.
    Warn,
    /// Will not work as it should.
    Fail,
}

/// One check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked (`xattrs:FOLDER`).
    pub name: String,
    /// The verdict.
    pub status: Verdict,
    /// A sentence.
    pub detail: String,
}

#[derive(Debug, Default)]
struct Report(Vec<Check>);

impl Report {
    fn add(&mut self, name: impl Into<String>, status: Verdict, detail: impl Into<String>) {
        self.0.push(Check {
            name: name.into(),
            status,
            detail: detail.into(),
        });
    }
}

pub fn doctor(a: DoctorArgs) -> Result<ExitCode> {
    let mut r = Report::default();
    // A config others can write is a failed check, not the end of the checks.
    let trust = sync_agent::trust::check(&a.config, sync_agent::trust::Kind::Config);
    let config = match &trust {
        Ok(()) => {
            r.add(
                "config",
                Verdict::Ok,
                format!(
                    "{} parses and checks out; owner and modes trusted",
                    a.config.display()
                ),
            );
            Config::load(&a.config)?
        }
        Err(e) => {
            r.add("config", Verdict::Fail, format!("{e:#}"));
            let text = std::fs::read_to_string(&a.config)
                .with_context(|| format!("reading config {}", a.config.display()))?;
            toml::from_str(&text).with_context(|| format!("config {}", a.config.display()))?
        }
    };
    node_checks(&mut r, &config);
    for f in &config.folders {
        folder_checks(&mut r, f);
    }
    agent_checks(&mut r, &config);
    let failed = r.0.iter().any(|c| c.status == Verdict::Fail);
    if a.json {
        println!("{}", serde_json::json!({ "checks": r.0 }));
    } else {
        for c in &r.0 {
            let s = match c.status {
                Verdict::Ok => "ok",
                Verdict::Warn => "WARN",
                Verdict::Fail => "FAIL",
            };
            println!("{s:<5} {:<24} {}", c.name, c.detail);
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn node_checks(r: &mut Report, c: &Config) {
    match sync_agent::Identity::load(&c.node.identity) {
        Ok(id) => r.add("identity", Verdict::Ok, format!("node id {}", id.id())),
        Err(e) => r.add("identity", Verdict::Fail, format!("{e:#}")),
    }
    if let Some(state) = &c.node.state {
        match sync_agent::trust::check_dir_or_parent(state, sync_agent::trust::Kind::StateDir) {
            Ok(()) => r.add(
                "state_dir",
                Verdict::Ok,
                format!("{} is trusted", state.display()),
            ),
            Err(e) => r.add("state_dir", Verdict::Fail, format!("{e:#}")),
        }
    } else {
        r.add("state_dir", Verdict::Warn, "[node] state is not set: no fencing epochs are persisted, so failover and promote cannot run, and a restart rehashes every file");
    }
    match (probe::pid_ns(), std::fs::read_to_string("/proc/1/comm")) {
        (Some(ns), _) if ns == probe::INIT_PID_NS => r.add("pid_namespace", Verdict::Ok, "the host's PID namespace: the held-database guard sees every process"),
        (Some(_), comm) => r.add("pid_namespace", Verdict::Warn, format!(
            "a PID namespace of its own (pid 1 is {:?}): processes outside it are invisible, so the replica cannot tell that an application outside this container holds a database open; run the agent with the host's PID namespace (docker --pid=host)",
            comm.unwrap_or_default().trim()
        )),
        (None, _) => r.add("pid_namespace", Verdict::Warn, "cannot read /proc/self/ns/pid: is /proc mounted?"),
    }
}

fn folder_checks(r: &mut Report, f: &Folder) {
    let n = &f.name;
    let root = &f.path;
    match rustix::fs::statfs(root) {
        Ok(st) => {
            let (name, worry) = probe::fs_name(st.f_type as u64);
            match worry {
                None => r.add(
                    format!("fs_type:{n}"),
                    Verdict::Ok,
                    format!("{} is on {name}", root.display()),
                ),
                Some(w) => r.add(
                    format!("fs_type:{n}"),
                    Verdict::Warn,
                    format!("{} is on {name}: {w}", root.display()),
                ),
            }
            // The field types differ between targets.
            #[allow(clippy::unnecessary_cast)]
            let free = (st.f_bavail as u64).saturating_mul(st.f_bsize as u64);
            space(r, f, free);
        }
        Err(e) => r.add(
            format!("fs_type:{n}"),
            Verdict::Fail,
            format!("statfs {}: {e}", root.display()),
        ),
    }
    probe_checks(r, n, root);
    noisy(r, f);
}

fn space(r: &mut Report, f: &Folder, free: u64) {
    let s = probe::shape(&f.path);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let name = format!("free_space:{}", f.name);
    let what = if f.role == Role::Replica {
        "this replica's copy"
    } else {
        "the folder"
    };
    if free < s.largest {
        r.add(name, Verdict::Fail, format!("{:.2} GiB free, less than the largest file ({:.2} GiB): a round that changes it cannot stage it", gib(free), gib(s.largest)));
    } else if free < s.bytes {
        r.add(name, Verdict::Warn, format!("{:.2} GiB free, less than {what} ({:.2} GiB): a full re-mirror into another copy would not fit", gib(free), gib(s.bytes)));
    } else {
        r.add(
            name,
            Verdict::Ok,
            format!(
                "{:.2} GiB free for {what} of {:.2} GiB",
                gib(free),
                gib(s.bytes)
            ),
        );
    }
    let watches = probe::inotify_limit("max_user_watches");
    let instances = probe::inotify_limit("max_user_instances");
    let name = format!("inotify:{}", f.name);
    let dirs = if s.truncated {
        format!("over {}", s.dirs)
    } else {
        s.dirs.to_string()
    };
    match (watches, instances) {
        (Some(w), Some(i)) if s.dirs > w => r.add(name, Verdict::Fail, format!("{dirs} directories but fs.inotify.max_user_watches is {w}: raise it (sysctl fs.inotify.max_user_watches={}); the agent polls what it cannot watch", (s.dirs * 2).max(65_536))
            + &format!("; max_user_instances {i}")),
        (Some(w), Some(i)) if s.dirs * 2 > w || i < 8 => r.add(name, Verdict::Warn, format!("{dirs} directories, max_user_watches {w}, max_user_instances {i}: little headroom for other watchers (raise max_user_watches to {} or more, max_user_instances to 128)", (s.dirs * 2).max(65_536))),
        (Some(w), Some(i)) => r.add(name, Verdict::Ok, format!("{dirs} directories to watch; max_user_watches {w}, max_user_instances {i}")),
        _ => r.add(name, Verdict::Warn, "cannot read /proc/sys/fs/inotify: changes will only be found by rescans"),
    }
}

fn probe_checks(r: &mut Report, n: &str, root: &Path) {
    let p = match probe::Probe::new(root) {
        Ok(p) => p,
        Err(e) => {
            r.add(
                format!("probe:{n}"),
                Verdict::Fail,
                format!("cannot create a file in {}: {e}", root.display()),
            );
            return;
        }
    };
    let lost: Vec<String> = p
        .xattrs()
        .into_iter()
        .filter_map(|(ns, res)| res.err().map(|e| format!("{ns}.* ({e})")))
        .collect();
    if lost.is_empty() {
        r.add(
            format!("xattrs:{n}"),
            Verdict::Ok,
            "user.*, trusted.* and security.* xattrs are kept",
        );
    } else {
        r.add(
            format!("xattrs:{n}"),
            Verdict::Warn,
            format!(
                "not kept here: {}; such xattrs of the folder are reported and skipped",
                lost.join(", ")
            ),
        );
    }
    match p.acl() {
        Ok(()) => r.add(format!("acl:{n}"), Verdict::Ok, "POSIX ACLs are kept"),
        Err(e) => r.add(
            format!("acl:{n}"),
            Verdict::Warn,
            format!(
                "POSIX ACLs are not kept ({e}): mount with acl, or expect them reported and skipped"
            ),
        ),
    }
    match p.mtime_ns() {
        Ok(123_456_789) => r.add(format!("mtime_ns:{n}"), Verdict::Ok, "modification times keep nanoseconds"),
        Ok(ns) => r.add(format!("mtime_ns:{n}"), Verdict::Warn, format!("modification times are rounded (…123456789 ns came back as {ns}): files look changed to size+mtime comparisons across hosts")),
        Err(e) => r.add(format!("mtime_ns:{n}"), Verdict::Fail, format!("cannot set a modification time: {e}")),
    }
}

/// Warns about a `cache/`, `transcodes/`, `log/` or `logs/` directory
/// within three levels that the folder does not exclude (the same look the
/// agent takes at start).
fn noisy(r: &mut Report, f: &Folder) {
    let Ok(filter) = f.filter() else { return };
    let found = sync_agent::config::profiles::unexcluded_regenerable(&f.path, &filter);
    let name = format!("excludes:{}", f.name);
    if found.is_empty() {
        r.add(
            name,
            Verdict::Ok,
            "no cache, transcode or log directory left unexcluded",
        );
    } else {
        let list = found.join(", ");
        r.add(name, Verdict::Warn, format!("holds {list} not excluded: regenerable data that changes all the time costs bandwidth and lag; add exclude = [{}]",
            found.iter().map(|d| format!("\"{d}\"")).collect::<Vec<_>>().join(", ")));
    }
}

fn agent_checks(r: &mut Report, c: &Config) {
    let Some(sock) = &c.node.control else {
        r.add(
            "agent",
            Verdict::Warn,
            "[node] control is not set: the agent cannot be asked (status, failover)",
        );
        return;
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return r.add("agent", Verdict::Fail, format!("no runtime: {e}")),
    };
    let ask = sync_agent::control::request(sock, &sync_agent::control::Request::Status);
    let v = match rt
        .block_on(async { tokio::time::timeout(std::time::Duration::from_secs(5), ask).await })
    {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return r.add("agent", Verdict::Warn, format!("not reachable: {e:#}")),
        Err(_) => {
            return r.add(
                "agent",
                Verdict::Warn,
                format!("no answer on {} within 5 s", sock.display()),
            );
        }
    };
    let version = v["version"].as_str().unwrap_or("unknown");
    let mine = env!("CARGO_PKG_VERSION");
    let same = if version == mine {
        String::new()
    } else {
        format!(" (this sync-cli is {mine})")
    };
    r.add(
        "agent",
        Verdict::Ok,
        format!(
            "running as node {}, version {version}{same}, protocol {}",
            v["node"].as_str().unwrap_or("?"),
            v["protocol"]
        ),
    );
    for f in &c.folders {
        let rows: Vec<&serde_json::Value> = v["folders"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["folder"] == f.name.as_str())
                    .collect()
            })
            .unwrap_or_default();
        let name = format!("peer:{}", f.name);
        if let Some(l) = rows
            .iter()
            .find_map(|x| x["excluded_leftovers"].as_object())
            .filter(|l| l["count"].as_u64() > Some(0))
        {
            r.add(
                format!("excluded-leftovers:{}", f.name),
                Verdict::Warn,
                format!(
                    "{} excluded paths are present on this replica (mirrored before they were excluded), e.g. {}: set delete_excluded = true to remove them",
                    l["count"],
                    l["first"]
                ),
            );
        }
        if let Some(x) = rows.iter().find(|x| x["peer_software"].is_string()) {
            for (what, verdict, detail) in peer_build(version, x) {
                r.add(format!("{what}:{}", f.name), verdict, detail);
            }
        }
        match rows.iter().find(|x| x["connected"] == true) {
            Some(x) => r.add(name, Verdict::Ok, format!("connected as {} with {} (lag {} s)", x["role"].as_str().unwrap_or("?"), x["peer"].as_str().unwrap_or("?"), x["lag_s"])),
            None if rows.is_empty() => r.add(name, Verdict::Warn, "the agent does not report this folder (restart it to load this config?)"),
            None => r.add(name, Verdict::Warn, format!("no session with the peer: {}", rows.iter().find_map(|x| x["last_error"].as_str()).unwrap_or("not connected yet (is the other agent running, and UDP open between the hosts?)"))),
        }
    }
}

/// How far apart the two hosts' clocks may be before doctor warns: file times
/// are copied, not compared across clocks, but logs, lag and the handover
/// records are read side by side.
const SKEW_WARN_MS: i64 = 2_000;

/// The peer's build and clock, from a source row of the agent's status: its
/// version against this agent's (`mine`), its clock skew against the bound.
fn peer_build(mine: &str, row: &serde_json::Value) -> Vec<(&'static str, Verdict, String)> {
    let mut out = Vec::new();
    let theirs = row["peer_software"].as_str().unwrap_or("?");
    let want = format!("understudy {mine}");
    out.push(if theirs == want {
        (
            "peer-version",
            Verdict::Ok,
            format!("the peer runs {theirs}, as this host does"),
        )
    } else {
        (
            "peer-version",
            Verdict::Warn,
            format!("the peer runs {theirs}, this host {want}: upgrade both to the same release"),
        )
    });
    if let Some(skew) = row["peer_clock_skew_ms"].as_i64() {
        let detail =
            format!("the peer's clock is {skew:+} ms from this host's (at the session's start)");
        out.push(if skew.abs() <= SKEW_WARN_MS {
            ("clock", Verdict::Ok, detail)
        } else {
            (
                "clock",
                Verdict::Warn,
                format!("{detail}: run NTP (chrony, systemd-timesyncd) on both hosts"),
            )
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_version_and_clock_skew_are_judged() {
        let row =
            serde_json::json!({"peer_software": "understudy 0.1.0", "peer_clock_skew_ms": -40});
        let got = peer_build("0.1.0", &row);
        assert_eq!(
            got.iter().map(|c| c.1).collect::<Vec<_>>(),
            [Verdict::Ok, Verdict::Ok]
        );
        let row =
            serde_json::json!({"peer_software": "understudy 0.0.9", "peer_clock_skew_ms": 7_500});
        let got = peer_build("0.1.0", &row);
        assert_eq!(
            got.iter().map(|c| c.1).collect::<Vec<_>>(),
            [Verdict::Warn, Verdict::Warn]
        );
        assert!(
            got[0].2.contains("0.0.9") && got[1].2.contains("+7500 ms"),
            "{got:?}"
        );
        // No time said: no clock check.
        assert_eq!(
            peer_build("0.1.0", &serde_json::json!({"peer_software": "x"})).len(),
            1
        );
    }
}
