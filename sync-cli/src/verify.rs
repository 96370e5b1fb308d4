//! `verify`: compare two local trees by manifest (databases by content).

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use sync_core::manifest;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Source directory.
    src: PathBuf,
    /// Destination directory.
    dst: PathBuf,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    identical: bool,
    source_root: String,
    destination_root: String,
    differences: Vec<String>,
}

pub fn verify(a: VerifyArgs) -> Result<ExitCode> {
    // Databases compare by their content (logs included), as a cut does.
    let opts = sync_core::scan::ScanOptions {
        databases: Some(Default::default()),
        ..Default::default()
    };
    let by_content = |root: &std::path::Path| -> Result<manifest::Manifest, sync_core::Error> {
        let (mut m, report) = sync_core::scan::scan_with(root, &opts, None)?;
        sync_core::sqlite::mark_by_content(root, &mut m, &report.databases)?;
        Ok(m)
    };
    let (src, dst) = std::thread::scope(|s| {
        let l = s.spawn(|| by_content(&a.src));
        let r = by_content(&a.dst);
        (l.join(), r)
    });
    let src = src
        .map_err(|_| anyhow::anyhow!("scanner thread panicked"))?
        .with_context(|| format!("scanning source {}", a.src.display()))?;
    let dst = dst.with_context(|| format!("scanning destination {}", a.dst.display()))?;
    let diffs = manifest::diff(&src, &dst);
    let r = Report {
        identical: diffs.is_empty() && src.root_hash() == dst.root_hash(),
        source_root: sync_core::hex(&src.root_hash()),
        destination_root: sync_core::hex(&dst.root_hash()),
        differences: diffs.iter().map(ToString::to_string).collect(),
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("source root      {}", r.source_root);
        println!("destination root {}", r.destination_root);
        for d in &r.differences {
            println!("{d}");
        }
        println!(
            "{}",
            if r.identical {
                "identical"
            } else {
                "DIFFERENT"
            }
        );
    }
    Ok(if r.identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
