//! Issue 12: uid/gid maps between hosts whose users differ (owners and POSIX
//! ACL entries, through a cut and a failover), and excluded leftovers swept
//! by `delete_excluded` or reported by status. Two config-driven agents.

use crate::failover::{HOOKS_A, HOOKS_B, Host, hosts, logs, text, wait_or};
use crate::util::*;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

/// Adds `lines` to the host's `[[folder]]`.
fn folder_lines(h: &Host, lines: &str) {
    let c = std::fs::read_to_string(&h.config).unwrap();
    let overlay = "overlay = [\"banner.txt\"]\n";
    assert!(c.contains(overlay));
    std::fs::write(
        &h.config,
        c.replace(overlay, &format!("{overlay}{lines}\n")),
    )
    .unwrap();
}

fn owner(p: &Path) -> Option<(u32, u32)> {
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.uid(), m.gid()))
}

/// `getfacl -n` of `p`: its named user and group entries.
fn named_acl(p: &Path) -> Vec<String> {
    sh(&format!("getfacl -n --omit-header '{}'", p.display()))
        .lines()
        .filter(|l| {
            (l.starts_with("user:") || l.starts_with("group:")) && l.split(':').nth(1) != Some("")
        })
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

fn owned_with_acl(p: &Path, uid: u32, gid: u32) {
    std::fs::write(p, "x").unwrap();
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
    sh(&format!(
        "setfacl -m u:{uid}:rw-,g:{gid}:r-- '{}'",
        p.display()
    ));
}

/// `sync-cli cut` on `h`, the source: both root hashes are the same.
fn cut_matches(h: &Host) {
    let out = h.cli(&["cut", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let cut: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cut["source_root"], cut["replica_root"], "{cut}");
}

#[test]
fn owners_and_acls_are_mapped_both_ways_across_a_failover() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = hosts(t.path(), HOOKS_A, HOOKS_B);
    folder_lines(&a, "uid_map = [\"99:1000\"]\ngid_map = [\"100:1000\"]");
    folder_lines(&b, "uid_map = [\"1000:99\"]\ngid_map = [\"1000:100\"]");
    owned_with_acl(&a.root.join("f.txt"), 1000, 1000);
    let (_agent_a, _agent_b) = (a.start(), b.start());
    let diag = || logs(&[&a, &b]);
    let on_b = b.root.join("f.txt");
    wait_or(
        "f.txt on b as 99:100",
        30,
        || owner(&on_b) == Some((99, 100)),
        diag,
    );
    assert_eq!(named_acl(&on_b), ["user:99:rw-", "group:100:r--"]);

    // The replica's tree, mapped back, hashes as the source's.
    cut_matches(&a);

    // After a failover, b's change comes back to a with a's ids.
    let out = a.cli(&["failover"]);
    assert!(out.status.success(), "{}\n{}", text(&out), diag());
    wait_or("b to drive a", 30, || b.source_connected(), diag);
    owned_with_acl(&b.root.join("g.txt"), 99, 100);
    let on_a = a.root.join("g.txt");
    wait_or(
        "g.txt on a as 1000:1000",
        30,
        || owner(&on_a) == Some((1000, 1000)),
        diag,
    );
    assert_eq!(named_acl(&on_a), ["user:1000:rw-", "group:1000:r--"]);
    assert_eq!(owner(&a.root.join("f.txt")), Some((1000, 1000)));
    assert_eq!(
        named_acl(&a.root.join("f.txt")),
        ["user:1000:rw-", "group:1000:r--"]
    );
    cut_matches(&b);
}

fn leftovers(h: &Host) -> serde_json::Value {
    h.status()["folders"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["role"] == "replica").cloned())
        .map(|f| f["excluded_leftovers"].clone())
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn excluded_leftovers_are_reported_then_swept_but_overlays_stay() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = hosts(t.path(), HOOKS_A, HOOKS_B);
    for h in [&a, &b] {
        folder_lines(h, "exclude = [\"cache/\"]");
    }
    std::fs::write(a.root.join("config.xml"), "<x/>").unwrap();
    std::fs::create_dir_all(b.root.join("cache/img")).unwrap();
    std::fs::write(b.root.join("cache/img/1.webp"), "mirrored before").unwrap();
    std::fs::write(b.root.join("banner.txt"), "standby").unwrap();
    let _agent_a = a.start();
    let mut agent_b = b.start();
    let diag = || logs(&[&a, &b]);
    wait_or("the report", 30, || leftovers(&b)["count"] == 1, diag);
    wait_or(
        "the first mirror",
        30,
        || b.root.join("config.xml").exists(),
        diag,
    );
    assert_eq!(leftovers(&b)["first"], serde_json::json!(["cache"]));
    let human = text(&b.cli(&["status"]));
    assert!(
        human.contains("1 excluded paths present on the replica"),
        "{human}"
    );
    assert!(b.root.join("cache/img/1.webp").exists());
    // doctor says so too, naming the path and the way out.
    let doc = text(&b.cli(&["doctor"]));
    assert!(
        doc.contains("excluded-leftovers:")
            && doc.contains("cache")
            && doc.contains("delete_excluded"),
        "{doc}"
    );

    // With delete_excluded, the next full round (the reconnect) sweeps it.
    agent_b.kill9();
    folder_lines(&b, "delete_excluded = true");
    let _agent_b = b.start();
    wait_or("the sweep", 60, || !b.root.join("cache").exists(), diag);
    assert_eq!(
        std::fs::read_to_string(b.root.join("banner.txt")).unwrap(),
        "standby"
    );
    // The sweep comes before the round's contents: the round applies too.
    std::fs::write(a.root.join("config.xml"), "<y/>").unwrap();
    wait_or(
        "the change after the sweep",
        30,
        || {
            std::fs::read_to_string(b.root.join("config.xml"))
                .ok()
                .as_deref()
                == Some("<y/>")
        },
        diag,
    );
}
