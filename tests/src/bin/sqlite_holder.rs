//! An application that has lost its POSIX locks on its own database and goes
//! on writing through its connection (closing any descriptor of a file drops
//! all of a process's locks on it: SQLite's "How To Corrupt" §2.2, Jellyfin
//! issue 18100). The integration tests check that the agent's connections
//! never delete such an application's log from under it.
//!
//! ```text
//! sqlite_holder DB
//! ```
//!
//! Opens `DB` in WAL mode, inserts `before`, opens and closes a plain
//! descriptor of the file (the locks go), prints `ready`; at each line on
//! stdin inserts that line and prints `wrote`; exits at end of input.

use rusqlite::Connection;
use std::io::{BufRead, Write};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args_os()
        .nth(1)
        .ok_or("usage: sqlite_holder DB")?;
    let c = Connection::open(&path)?;
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
    // no automatic checkpoints: the log keeps what this process wrote
    c.pragma_update(None, "wal_autocheckpoint", 0)?;
    c.execute_batch("CREATE TABLE IF NOT EXISTS t(x TEXT); INSERT INTO t VALUES ('before');")?;
    drop(std::fs::File::open(&path)?);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        c.execute("INSERT INTO t VALUES (?1)", [line?])?;
        writeln!(out, "wrote")?;
        out.flush()?;
    }
    Ok(())
}
