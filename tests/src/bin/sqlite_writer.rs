//! A live SQLite writer for the integration tests: two databases, `a.db` and
//! `b.db`, in one directory, and one transaction at a time over both (`b` is
//! attached to `a`), each writing the same counter to both.
//!
//! ```text
//! sqlite_writer --dir DIR [--journal wal|delete] [--rate TX_PER_S] [--seconds N]
//!               [--log FILE] [--pad-kib KIB] [--rollback-every N]
//! ```
//!
//! Every committed counter is appended to the log (stdout by default) as one
//! line, written after its COMMIT returned, so the log is exactly the set of
//! committed values (plus the starting one). Every `--rollback-every`th
//! transaction instead writes a marker counter (≥ 1e9) and rewrites enough
//! padding to spill SQLite's small page cache (uncommitted frames in the WAL,
//! uncommitted pages in the database file in rollback mode), then rolls back:
//! a replica that ever shows a marker shipped an uncommitted state.
//!
//! Stops at SIGTERM or SIGINT, or after `--seconds`; then prints
//! `commits N`, `rollbacks N` and `worst_commit_ms X` (from `BEGIN IMMEDIATE`
//! to the end of `COMMIT`, lock waits included) on stderr.

use rand::{Rng, RngCore};
use rusqlite::Connection;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Rows of padding (4000 bytes each) per database.
const ROW: usize = 4000;
/// Padding rows rewritten per committed transaction in each database.
const REWRITE: usize = 4;
/// Page cache of the writer, in pages: small so that big transactions spill.
const CACHE_PAGES: usize = 64;
/// Counters written by rolled-back transactions start here.
const MARKER: i64 = 1_000_000_000;

struct Opts {
    dir: PathBuf,
    journal: String,
    rate: Option<f64>,
    seconds: Option<f64>,
    log: Option<PathBuf>,
    pad_kib: usize,
    rollback_every: u64,
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "sqlite_writer: {msg}\nusage: sqlite_writer --dir DIR [--journal wal|delete] \
         [--rate TX_PER_S] [--seconds N] [--log FILE] [--pad-kib KIB] [--rollback-every N]"
    );
    std::process::exit(2)
}

fn parse() -> Opts {
    let mut o = Opts {
        dir: PathBuf::new(),
        journal: "wal".into(),
        rate: None,
        seconds: None,
        log: None,
        pad_kib: 3072,
        rollback_every: 50,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        let num = |v: String| -> f64 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{a}: not a number: {v}")))
        };
        match a.as_str() {
            "--dir" => o.dir = val().into(),
            "--journal" => o.journal = val(),
            "--rate" => o.rate = Some(num(val())),
            "--seconds" => o.seconds = Some(num(val())),
            "--log" => o.log = Some(val().into()),
            "--pad-kib" => o.pad_kib = num(val()) as usize,
            "--rollback-every" => o.rollback_every = num(val()) as u64,
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    if o.dir.as_os_str().is_empty() {
        usage("--dir is required");
    }
    if !["wal", "delete"].contains(&o.journal.as_str()) {
        usage("--journal is wal or delete");
    }
    o
}

fn main() {
    if let Err(e) = run(parse()) {
        eprintln!("sqlite_writer: {e}");
        std::process::exit(1);
    }
}

#[allow(unsafe_code)] // installing a signal handler that only stores an atomic
fn on_stop_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
}

fn random_blob(rng: &mut impl RngCore) -> Vec<u8> {
    let mut v = vec![0u8; ROW];
    rng.fill_bytes(&mut v);
    v
}

fn run(o: Opts) -> Result<(), Box<dyn std::error::Error>> {
    on_stop_signals();
    let mut out: Box<dyn Write> = match &o.log {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let rows = (o.pad_kib * 1024 / ROW).max(8);
    let mut rng = rand::rng();

    let c = Connection::open(o.dir.join("a.db"))?;
    c.busy_timeout(Duration::from_secs(30))?;
    let b_path = o.dir.join("b.db");
    c.execute(
        "ATTACH DATABASE ?1 AS b",
        [b_path.to_str().ok_or("b.db path")?],
    )?;
    for schema in ["main", "b"] {
        let mode: String = c.query_row(
            &format!("PRAGMA {schema}.journal_mode = {}", o.journal),
            [],
            |r| r.get(0),
        )?;
        if mode != o.journal {
            return Err(format!("{schema}: journal_mode is {mode}, not {}", o.journal).into());
        }
        c.execute_batch(&format!(
            "PRAGMA {schema}.synchronous = NORMAL; PRAGMA {schema}.cache_size = {CACHE_PAGES};"
        ))?;
    }

    // Schema and padding, once; a rerun continues from the counter it holds.
    c.execute_batch("BEGIN IMMEDIATE")?;
    for schema in ["main", "b"] {
        c.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {schema}.counter(id INTEGER PRIMARY KEY, n INTEGER);
             INSERT OR IGNORE INTO {schema}.counter VALUES (1, 0);
             CREATE TABLE IF NOT EXISTS {schema}.padding(id INTEGER PRIMARY KEY, data BLOB);"
        ))?;
        let have: i64 =
            c.query_row(&format!("SELECT count(*) FROM {schema}.padding"), [], |r| {
                r.get(0)
            })?;
        let mut ins = c.prepare(&format!("INSERT INTO {schema}.padding VALUES (?1, ?2)"))?;
        for id in have as usize..rows {
            ins.execute(rusqlite::params![id as i64, random_blob(&mut rng)])?;
        }
    }
    let (na, nb): (i64, i64) = c.query_row(
        "SELECT (SELECT n FROM main.counter WHERE id = 1), (SELECT n FROM b.counter WHERE id = 1)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if na != nb {
        return Err(format!("a.db holds {na} and b.db {nb}: not the same counter").into());
    }
    c.execute_batch("COMMIT")?;
    writeln!(out, "{na}")?;
    out.flush()?;

    let started = Instant::now();
    let period = o.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let (mut n, mut commits, mut rollbacks, mut tx) = (na, 0u64, 0u64, 0u64);
    let mut worst = Duration::ZERO;
    while !STOP.load(Ordering::SeqCst)
        && o.seconds
            .is_none_or(|s| started.elapsed().as_secs_f64() < s)
    {
        tx += 1;
        let rollback = o.rollback_every > 0 && tx.is_multiple_of(o.rollback_every);
        let t0 = Instant::now();
        c.execute_batch("BEGIN IMMEDIATE")?;
        let value = if rollback { MARKER + n + 1 } else { n + 1 };
        let rewrite = if rollback {
            (CACHE_PAGES * 3).min(rows)
        } else {
            REWRITE
        };
        for schema in ["main", "b"] {
            c.execute(
                &format!("UPDATE {schema}.counter SET n = ?1 WHERE id = 1"),
                [value],
            )?;
            let mut up = c.prepare_cached(&format!(
                "UPDATE {schema}.padding SET data = ?2 WHERE id = ?1"
            ))?;
            for _ in 0..rewrite {
                let id = rng.random_range(0..rows) as i64;
                up.execute(rusqlite::params![id, random_blob(&mut rng)])?;
            }
        }
        if rollback {
            c.execute_batch("ROLLBACK")?;
            rollbacks += 1;
        } else {
            c.execute_batch("COMMIT")?;
            worst = worst.max(t0.elapsed());
            n = value;
            commits += 1;
            writeln!(out, "{n}")?;
            out.flush()?;
        }
        if let Some(p) = period {
            let next = started + p.mul_f64(tx as f64);
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    drop(c);
    eprintln!("commits {commits}");
    eprintln!("rollbacks {rollbacks}");
    eprintln!("worst_commit_ms {:.3}", worst.as_secs_f64() * 1000.0);
    Ok(())
}
