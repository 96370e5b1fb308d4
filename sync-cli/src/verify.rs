//! `verify`: compare two local trees by manifest (databases by content), or,
//! with `--config`, a folder's copies on its two hosts through the agents.

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use sync_core::manifest;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Source directory.
    #[arg(required_unless_present = "config", conflicts_with = "config")]
    src: Option<PathBuf>,
    /// Destination directory.
    #[arg(required_unless_present = "config", conflicts_with = "config")]
    dst: Option<PathBuf>,
    /// Compare a folder's two hosts instead, through the agents: run on the
    /// folder's source host with its agent config. A cut is taken (pending
    /// changes ship first) and both root hashes are compared; excludes and
    /// overlays are left out on both sides and databases compare by content.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The folder (with --config; needed when the agent has several).
    #[arg(long, requires = "config")]
    folder: Option<String>,
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
    let (Some(src_dir), Some(dst_dir)) = (a.src.clone(), a.dst.clone()) else {
        return crate::handover::verify_hosts(a.config.as_deref(), a.folder.clone(), a.json);
    };
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
        let l = s.spawn(|| by_content(&src_dir));
        let r = by_content(&dst_dir);
        (l.join(), r)
    });
    let src = src
        .map_err(|_| anyhow::anyhow!("scanner thread panicked"))?
        .with_context(|| format!("scanning source {}", src_dir.display()))?;
    let dst = dst.with_context(|| format!("scanning destination {}", dst_dir.display()))?;
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
