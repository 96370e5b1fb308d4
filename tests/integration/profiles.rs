//! Issue 12: app profiles. A linuxserver-layout Jellyfin tree (config files at
//! the top, databases under `data/data/`) under `profile = "jellyfin"`: the
//! standby keeps its own banner and hardware-acceleration settings, caches,
//! transcodes and logs are not mirrored, and the databases are found as
//! databases. A folder with no profile that holds `transcodes/` is warned
//! about at start.

use crate::failover::{hosts, make_db, rows, text, wait_or};
use crate::util::*;

#[test]
fn profiles_json_lists_the_six_apps() {
    let out = cli(&["profiles".as_ref(), "--json".as_ref()]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "jellyfin",
            "home-assistant",
            "vaultwarden",
            "sonarr",
            "radarr",
            "plex"
        ]
    );
    let jf = &v["profiles"][0];
    assert_eq!(jf["layouts"].as_array().map(Vec::len), Some(2), "{jf}");
    let unknown = cli(&["profiles".as_ref(), "emby".as_ref()]);
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));
    assert!(text(&unknown).contains("emby"), "{}", text(&unknown));
}

#[test]
fn linuxserver_jellyfin_keeps_the_standbys_own_files_and_finds_its_databases() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = hosts(t.path(), "", "");
    for h in [&a, &b] {
        let cfg = std::fs::read_to_string(&h.config).unwrap();
        let cfg = cfg.replace("overlay = [", "profile = \"jellyfin\"\noverlay = [");
        std::fs::write(&h.config, cfg).unwrap();
    }
    let w = |root: &std::path::Path, rel: &str, body: &str| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    };
    w(&a.root, "system.xml", "<ServerConfiguration/>");
    w(&a.root, "branding.xml", "<Branding>master</Branding>");
    w(&a.root, "encoding.xml", "<Encoding>nvenc</Encoding>");
    w(&a.root, "cache/images/x.jpg", "cache");
    w(&a.root, "data/transcodes/seg1.ts", "transcode");
    w(&a.root, "log/log_20261203.log", "log");
    w(&a.root, "data/device.txt", "server-id-1");
    std::fs::create_dir_all(a.root.join("data/data")).unwrap();
    make_db(&a.root.join("data/data/library.db"), 50);
    w(&b.root, "branding.xml", "<Branding>standby</Branding>");
    w(&b.root, "encoding.xml", "<Encoding>vaapi</Encoding>");
    let (_aa, _ab) = (a.start(), b.start());
    wait_or(
        "the first mirror",
        30,
        || rows(&b.root.join("data/data/library.db")) == 50 && b.root.join("system.xml").exists(),
        || crate::failover::logs(&[&a, &b]),
    );
    let read = |rel: &str| std::fs::read_to_string(b.root.join(rel)).unwrap();
    assert_eq!(read("branding.xml"), "<Branding>standby</Branding>");
    assert_eq!(read("encoding.xml"), "<Encoding>vaapi</Encoding>");
    assert_eq!(read("data/device.txt"), "server-id-1");
    for gone in ["cache", "data/transcodes", "log"] {
        assert!(!b.root.join(gone).exists(), "{gone} was mirrored");
    }
    // The database went as a database (a cut), not as a file.
    let databases = || {
        a.status()["folders"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["role"] == "source").cloned())
            .and_then(|f| f["databases"].as_u64())
            .unwrap_or(0)
    };
    wait_or(
        "the round's end",
        30,
        || databases() >= 1,
        || a.status().to_string(),
    );
    let log = std::fs::read_to_string(a.dir.join("agent.log")).unwrap();
    assert!(log.contains("layout: linuxserver/hotio"), "{log}");
}

#[test]
fn a_folder_without_a_profile_holding_transcodes_is_warned_about() {
    let t = tempfile::tempdir().unwrap();
    let (a, _b) = hosts(t.path(), "", "");
    std::fs::create_dir_all(a.root.join("data/transcodes")).unwrap();
    std::fs::create_dir_all(a.root.join("cache")).unwrap();
    let _aa = a.start();
    let log = std::fs::read_to_string(a.dir.join("agent.log")).unwrap();
    assert!(
        log.contains("holds cache/, data/transcodes/") && log.contains("no profile"),
        "{log}"
    );
}
