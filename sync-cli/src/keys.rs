//! `keygen` and `id`.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use sync_agent::Identity;

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Directory to write cert.pem and key.pem (mode 0600) into.
    #[arg(long)]
    dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct IdArgs {
    /// Identity directory written by `keygen`.
    #[arg(long)]
    dir: PathBuf,
}

pub fn keygen(a: KeygenArgs) -> Result<ExitCode> {
    let id = Identity::create(&a.dir)?;
    println!("{}", id.id());
    Ok(ExitCode::SUCCESS)
}

pub fn id(a: IdArgs) -> Result<ExitCode> {
    println!("{}", Identity::load(&a.dir)?.id());
    Ok(ExitCode::SUCCESS)
}
