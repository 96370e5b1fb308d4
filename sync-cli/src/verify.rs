//! `verify`: compare two local trees by manifest.

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
    let opts = sync_core::scan::ScanOptions::default();
    let (src, dst) = std::thread::scope(|s| {
        let l = s.spawn(|| sync_core::scan::scan(&a.src, &opts));
        let r = sync_core::scan::scan(&a.dst, &opts);
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
