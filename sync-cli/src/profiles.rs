//! `profiles`: the app profiles a folder's `profile` key can name, with what
//! each brings (excludes, databases, overlays, identity files, a parity
//! command), per image layout.

use anyhow::Result;
use clap::Args;
use std::fmt::Write as _;
use std::process::ExitCode;
use sync_agent::config::profiles::{PROFILES, Profile};

#[derive(Args, Debug)]
pub struct ProfilesArgs {
    /// Only this profile.
    name: Option<String>,
    /// Print them as one JSON object: `{"profiles": [...]}`.
    #[arg(long)]
    json: bool,
}

pub fn profiles(a: ProfilesArgs) -> Result<ExitCode> {
    let chosen: Vec<&Profile> = PROFILES
        .iter()
        .filter(|p| a.name.as_deref().is_none_or(|n| n == p.name))
        .collect();
    if chosen.is_empty() {
        anyhow::bail!(
            "no profile {:?} (known: {})",
            a.name.unwrap_or_default(),
            sync_agent::config::profiles::names()
        );
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "profiles": chosen }))?
        );
    } else {
        for p in chosen {
            print!("{}", human(p));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn human(p: &Profile) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{} ({})", p.name, p.app);
    let _ = writeln!(s, "  parity: {}", p.parity);
    for l in p.layouts {
        let _ = writeln!(s, "  layout: {}", l.name);
        for (what, list) in [
            ("markers", l.markers),
            ("excludes", l.excludes),
            ("databases", l.databases),
            ("overlays", l.overlays),
            ("identity", l.identity),
        ] {
            if !list.is_empty() {
                let _ = writeln!(s, "    {what}: {}", list.join(", "));
            }
        }
    }
    s.push('\n');
    s
}
