//! Hooks: the operator's shell commands around a failover (`stop_source`,
//! `start_source`, `stop_replica`, `start_replica`), e.g. `docker stop jellyfin`.
//!
//! A hook runs as `sh -c COMMAND` with `UNDERSTUDY_FOLDER` and `UNDERSTUDY_HOOK`
//! in its environment, stdin from /dev/null, in a process group of its own. The
//! last 4 KiB of its stdout and stderr are kept. At the timeout the whole group
//! is killed (SIGKILL), so a hook's children do not outlive it.
//!
//! A failure is a [`HookError`] (inside the `anyhow::Error`, so callers can
//! downcast it to get the output) whose text names the hook, its command and
//! what happened: `hook stop_source ("docker stop jellyfin") failed: exit status 1:
//! <last stderr line>` or `... timed out after 120 s`.

use anyhow::{Context, Result};
use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt};

/// How much of each of stdout and stderr is kept: the last 4 KiB.
pub const OUTPUT_TAIL: usize = 4096;

/// How long to wait for a hook's output to end once it has exited (a background
/// child it left may keep the pipe open).
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// What a hook did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutput {
    /// Its exit code; 128 + the signal number if a signal ended it (as a shell
    /// reports it), -1 if it did not end by itself (timeout).
    pub status: i32,
    /// The last [`OUTPUT_TAIL`] bytes of its stdout (invalid UTF-8 replaced).
    pub stdout: String,
    /// The last [`OUTPUT_TAIL`] bytes of its stderr (invalid UTF-8 replaced).
    pub stderr: String,
    /// From spawn to exit (or to the kill).
    pub elapsed: Duration,
}

/// How a hook failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookFailure {
    /// It exited with a non-zero code.
    Exit(i32),
    /// A signal ended it.
    Signal(i32),
    /// It ran past its timeout and was killed with its process group.
    Timeout(Duration),
}

/// A hook that failed or timed out, with its output.
#[derive(Debug, Clone)]
pub struct HookError {
    /// The hook's name (`stop_source`).
    pub name: String,
    /// Its command line.
    pub command: String,
    /// What happened.
    pub failure: HookFailure,
    /// What it printed, and how long it ran.
    pub output: HookOutput,
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hook {} ({:?}) ", self.name, self.command)?;
        match &self.failure {
            HookFailure::Timeout(t) => return write!(f, "timed out after {}", secs(*t)),
            HookFailure::Exit(code) => write!(f, "failed: exit status {code}")?,
            HookFailure::Signal(sig) => write!(f, "failed: killed by signal {sig}")?,
        }
        if let Some(line) = last_line(&self.output.stderr) {
            write!(f, ": {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for HookError {}

/// `120 s`, `0.3 s`.
fn secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        let s = format!("{:.3}", d.as_secs_f64());
        format!("{} s", s.trim_end_matches('0').trim_end_matches('.'))
    }
}

fn last_line(text: &str) -> Option<&str> {
    text.lines().map(str::trim).rfind(|l| !l.is_empty())
}

/// The last `OUTPUT_TAIL` bytes read so far, shared with the reading task so
/// that what was read survives the task being cut off.
type Tail = Arc<Mutex<Vec<u8>>>;

fn read_tail<R: AsyncRead + Unpin + Send + 'static>(
    mut r: R,
    tail: Tail,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let Ok(mut t) = tail.lock() else { break };
                    t.extend_from_slice(&buf[..n]);
                    if t.len() > OUTPUT_TAIL {
                        let excess = t.len() - OUTPUT_TAIL;
                        t.drain(..excess);
                    }
                }
            }
        }
    })
}

fn tail_text(tail: &Tail) -> String {
    let bytes = tail.lock().map(|t| t.clone()).unwrap_or_default();
    // The cut may split a UTF-8 sequence at the front: skip its continuation bytes.
    let start = bytes
        .iter()
        .position(|b| (b & 0xC0) != 0x80)
        .unwrap_or(bytes.len())
        .min(3);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Runs hook `name` (`command` through `sh -c`) for `folder`, killing it and its
/// process group after `timeout`.
///
/// # Errors
/// The shell cannot be started, or the hook exits non-zero, is killed by a
/// signal or times out: a [`HookError`] naming the hook and its command.
pub async fn run(name: &str, command: &str, folder: &str, timeout: Duration) -> Result<HookOutput> {
    let started = Instant::now();
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("UNDERSTUDY_FOLDER", folder)
        .env("UNDERSTUDY_HOOK", name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("hook {name} ({command:?}) could not start `sh`"))?;
    let pgid = child.id();
    tracing::info!(hook = name, folder, pid = ?pgid, "running hook: {command}");

    let (out, err): (Tail, Tail) = Default::default();
    let mut readers = Vec::new();
    if let Some(o) = child.stdout.take() {
        readers.push(read_tail(o, out.clone()));
    }
    if let Some(e) = child.stderr.take() {
        readers.push(read_tail(e, err.clone()));
    }

    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let elapsed = started.elapsed();
    let status = match waited {
        Ok(s) => Some(s.with_context(|| format!("hook {name} ({command:?}): waiting for it"))?),
        Err(_) => {
            // The group id is the shell's pid (process_group(0)); killing the group
            // also ends what the hook started. Then reap the shell.
            if let Some(pid) = pgid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
            None
        }
    };

    // Output normally ends with the process; a background child holding the pipe
    // gets a short grace, then we keep what was read.
    let drain = futures::future::join_all(readers.iter_mut());
    if tokio::time::timeout(DRAIN_GRACE, drain).await.is_err() {
        for r in &readers {
            r.abort();
        }
    }

    let mut output = HookOutput {
        status: -1,
        stdout: tail_text(&out),
        stderr: tail_text(&err),
        elapsed,
    };
    let failure = match status {
        None => HookFailure::Timeout(timeout),
        Some(s) => {
            if let Some(code) = s.code() {
                output.status = code;
                if code == 0 {
                    tracing::info!(
                        hook = name,
                        folder,
                        "hook done in {:.3} s",
                        elapsed.as_secs_f64()
                    );
                    return Ok(output);
                }
                HookFailure::Exit(code)
            } else {
                let sig = s.signal().unwrap_or(0);
                output.status = 128 + sig;
                HookFailure::Signal(sig)
            }
        }
    };
    Err(HookError {
        name: name.to_string(),
        command: command.to_string(),
        failure,
        output,
    }
    .into())
}

/// What a folder's `parity` command prints on this host (the app's version),
/// trimmed and cut to the wire's bound for text; a failure is its error
/// text. `None` when the folder has no such command. Both ends of a handover
/// call this, so their outputs compare alike.
pub async fn parity_output(hooks: &crate::config::Hooks, folder: &str) -> Option<String> {
    let cmd = hooks.parity.as_deref()?;
    let mut said = match run("parity", cmd, folder, hooks.timeout()).await {
        Ok(out) => out.stdout.trim().to_string(),
        Err(e) => format!("error: {e:#}"),
    };
    let mut end = said.len().min(proto::MAX_TEXT);
    while !said.is_char_boundary(end) {
        end -= 1;
    }
    said.truncate(end);
    Some(said)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn parity_output_is_trimmed_bounded_and_none_without_a_command() {
        let mut hooks = crate::config::Hooks::default();
        assert_eq!(super::parity_output(&hooks, "f").await, None);
        hooks.parity = Some("echo '  10.10.3  '".into());
        assert_eq!(
            super::parity_output(&hooks, "f").await.as_deref(),
            Some("10.10.3")
        );
        // Longer than the wire carries: cut the same way on both hosts.
        hooks.parity = Some("printf 'é%.0s' $(seq 3000)".into());
        let long = super::parity_output(&hooks, "f").await.unwrap_or_default();
        assert!(
            long.len() <= proto::MAX_TEXT && long.len() > 4000,
            "{}",
            long.len()
        );
        hooks.parity = Some("exit 3".into());
        let failed = super::parity_output(&hooks, "f").await.unwrap_or_default();
        assert!(failed.starts_with("error: "), "{failed}");
    }

    use super::*;

    #[tokio::test]
    async fn success_captures_output_and_environment() {
        let o = run(
            "start_replica",
            "echo \"$UNDERSTUDY_HOOK $UNDERSTUDY_FOLDER\"; echo warn >&2; read x || echo no-stdin",
            "jellyfin",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(o.status, 0);
        assert_eq!(o.stdout, "start_replica jellyfin\nno-stdin\n");
        assert_eq!(o.stderr, "warn\n");
    }

    #[tokio::test]
    async fn non_zero_exit_names_hook_command_and_last_stderr_line() {
        let cmd = "echo starting; echo 'first' >&2; echo 'Error: No such container: jellyfin' >&2; exit 1";
        let e = run("stop_source", cmd, "jf", Duration::from_secs(10))
            .await
            .unwrap_err();
        let text = format!("{e:#}");
        assert_eq!(
            text,
            format!(
                "hook stop_source ({cmd:?}) failed: exit status 1: Error: No such container: jellyfin"
            )
        );
        let he = e.downcast_ref::<HookError>().unwrap();
        assert_eq!(he.output.status, 1);
        assert_eq!(he.output.stdout, "starting\n");
        assert_eq!(he.failure, HookFailure::Exit(1));

        let e = run("stop_source", "exit 3", "jf", Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "hook stop_source (\"exit 3\") failed: exit status 3"
        );
    }

    #[tokio::test]
    async fn only_the_tail_of_the_output_is_kept() {
        let o = run(
            "start_source",
            "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done",
            "jf",
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        assert!(o.stdout.len() <= OUTPUT_TAIL, "{}", o.stdout.len());
        assert!(o.stdout.ends_with("line1999\n"));
        assert!(!o.stdout.contains("line0\n"));
    }

    #[tokio::test]
    async fn timeout_kills_the_hook_and_its_children() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("pid");
        // A child of the shell (not exec'd) must die with the group as well.
        let cmd = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let t0 = Instant::now();
        let e = run("stop_source", &cmd, "jf", Duration::from_millis(300))
            .await
            .unwrap_err();
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert!(took >= Duration::from_millis(300), "took {took:?}");
        assert_eq!(
            e.to_string(),
            format!("hook stop_source ({cmd:?}) timed out after 0.3 s")
        );
        let he = e.downcast_ref::<HookError>().unwrap();
        assert_eq!(he.output.status, -1);

        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The sleep was killed; it is reaped by init, so poll until it is gone.
        let gone = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(true)
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gone(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(pid), "sleep {pid} survived the timeout");
    }

    #[test]
    fn durations_print_like_the_messages_say() {
        assert_eq!(secs(Duration::from_secs(120)), "120 s");
        assert_eq!(secs(Duration::from_millis(300)), "0.3 s");
        assert_eq!(secs(Duration::from_millis(1250)), "1.25 s");
    }
}
