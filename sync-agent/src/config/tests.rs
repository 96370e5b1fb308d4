//! Config parsing and validation.

use super::*;

fn write(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("understudy.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn base(dir: &Path, id: &str) -> String {
    format!(
        "[node]\nidentity = \"{d}\"\nlisten = \"127.0.0.1:7878\"\n\n[[peer]]\nid = \"{id}\"\naddress = \"127.0.0.1:7879\"\n\n[[folder]]\nname = \"jf\"\npath = \"{d}\"\nrole = \"source\"\npeers = [\"{id}\"]\nprofile = \"jellyfin\"\n",
        d = dir.display()
    )
}

#[test]
fn shipped_sample_parses() {
    let text = include_str!("../../../dist/examples/understudy.toml");
    let c: Config = toml::from_str(text).unwrap();
    assert_eq!(c.folders[0].profile.as_deref(), Some("jellyfin"));
    assert!(profiles::find("jellyfin").is_some());
    let f = &c.folders[0];
    f.sqlite_matcher().unwrap();
    f.overlay_paths().unwrap();
    assert!(f.overlays().len() > 2, "{:?}", f.overlays());
    assert!(Hook::ALL.iter().all(|h| f.hooks.command(*h).is_some()));
    assert!(f.hooks.timeout_secs.is_some());
}

#[test]
fn good_config_loads_and_typos_are_named() {
    let d = tempfile::tempdir().unwrap();
    let id = crate::Identity::generate().unwrap().id().to_string();
    let p = write(d.path(), &base(d.path(), &id));
    let c = Config::load(&p).unwrap();
    assert!(
        c.folders[0]
            .filter()
            .unwrap()
            .excludes(&sync_core::RelPath::new(&b"cache"[..]).unwrap(), true)
    );

    let p = write(d.path(), &base(d.path(), &id).replace("role =", "rol ="));
    let e = format!("{:#}", Config::load(&p).unwrap_err());
    assert!(e.contains("rol") && e.contains("line"), "{e}");

    let other = crate::Identity::generate().unwrap().id().to_string();
    let p = write(
        d.path(),
        &base(d.path(), &id).replace(
            &format!("peers = [\"{id}\"]"),
            &format!("peers = [\"{other}\"]"),
        ),
    );
    let e = format!("{:#}", Config::load(&p).unwrap_err());
    assert!(e.contains("not declared"), "{e}");

    let p = write(
        d.path(),
        &base(d.path(), &id).replace(
            &format!("path = \"{}\"", d.path().display()),
            "path = \"/nonexistent/x\"",
        ),
    );
    let e = format!("{:#}", Config::load(&p).unwrap_err());
    assert!(
        e.contains("/nonexistent/x") && e.contains("folder jf"),
        "{e}"
    );

    let p = write(
        d.path(),
        &base(d.path(), &id).replacen(
            &format!("identity = \"{}\"", d.path().display()),
            "identity = \"/nonexistent/id\"",
            1,
        ),
    );
    let e = format!("{:#}", Config::load(&p).unwrap_err());
    assert!(e.contains("/nonexistent/id") && e.contains("keygen"), "{e}");
}

#[test]
fn sqlite_overlay_and_hooks_parse() {
    let d = tempfile::tempdir().unwrap();
    let id = crate::Identity::generate().unwrap().id().to_string();
    let text = format!(
        "{}sqlite = [\"data/*.db\", \"*.sqlite\"]\noverlay = [\"config/network.xml\", \"config/branding.xml\", \"banner/\"]\n\n[folder.hooks]\nstop_source = \"docker stop jellyfin\"\nstart_replica = \"docker start jellyfin\"\ntimeout_secs = 30\n",
        base(d.path(), &id)
    );
    let c = Config::load(&write(d.path(), &text)).unwrap();
    let f = &c.folders[0];

    let m = f.sqlite_matcher().unwrap();
    let p = |s: &str| RelPath::new(s.as_bytes()).unwrap();
    assert!(m.matches(&p("data/library.db")));
    assert!(m.matches(&p("data/jellyfin.db")));
    assert!(m.matches(&p("a/b/plugins.sqlite")));
    assert!(!m.matches(&p("config/library.db")), "data/*.db is anchored");
    assert!(!m.matches(&p("data/sub/x.db")), "* stays in one directory");
    assert!(!m.matches(&p("data/library.db-wal")));
    assert!(!m.is_empty());
    assert!(SqliteMatcher::default().is_empty());
    assert!(!SqliteMatcher::default().matches(&p("data/library.db")));

    // Profile overlays first (both Jellyfin layouts'), then the folder's
    // own, each once.
    assert_eq!(
        f.overlays(),
        [
            "config/branding.xml",
            "config/encoding.xml",
            "branding.xml",
            "encoding.xml",
            "config/network.xml",
            "banner/"
        ]
    );
    assert_eq!(f.overlay_paths().unwrap()[5], p("banner"));

    assert_eq!(
        f.hooks.command(Hook::StopSource),
        Some("docker stop jellyfin")
    );
    assert_eq!(
        f.hooks.command(Hook::StartReplica),
        Some("docker start jellyfin")
    );
    assert_eq!(f.hooks.command(Hook::StartSource), None);
    assert_eq!(f.hooks.command(Hook::StopReplica), None);
    assert_eq!(f.hooks.timeout(), Duration::from_secs(30));
    assert_eq!(Hook::StopReplica.to_string(), "stop_replica");

    // Without the new keys: the profile's databases and overlays, no hooks.
    let c = Config::load(&write(d.path(), &base(d.path(), &id))).unwrap();
    let f = &c.folders[0];
    let m = f.sqlite_matcher().unwrap();
    assert!(m.matches(&p("data/data/library.db")) && !m.matches(&p("a/b/plugins.sqlite")));
    assert_eq!(
        f.overlays(),
        [
            "config/branding.xml",
            "config/encoding.xml",
            "branding.xml",
            "encoding.xml"
        ]
    );
    assert_eq!(f.hooks, Hooks::default());
    assert_eq!(f.hooks.timeout(), Hooks::DEFAULT_TIMEOUT);
    let no_profile = base(d.path(), &id).replace("profile = \"jellyfin\"\n", "");
    let c = Config::load(&write(d.path(), &no_profile)).unwrap();
    assert!(c.folders[0].overlays().is_empty());
    assert!(c.folders[0].sqlite_matcher().unwrap().is_empty());
    let unknown = base(d.path(), &id).replace("\"jellyfin\"", "\"emby\"");
    let c = Config::load(&write(d.path(), &unknown));
    let e = format!("{:#}", c.err().unwrap_or_else(|| anyhow::anyhow!("loaded")));
    assert!(e.contains("emby") && e.contains("plex"), "{e}");
}

#[test]
fn bad_hooks_overlays_and_sqlite_globs_are_named() {
    let d = tempfile::tempdir().unwrap();
    let id = crate::Identity::generate().unwrap().id().to_string();
    let load = |extra: &str| {
        let text = format!("{}{extra}", base(d.path(), &id));
        Config::load(&write(d.path(), &text)).map(|_| ())
    };

    let e = format!(
        "{:#}",
        load("\n[folder.hooks]\nstop_source = \"true\"\nstop_sorce = \"x\"\n").unwrap_err()
    );
    assert!(e.contains("stop_sorce") && e.contains("line 18"), "{e}");

    let e = format!(
        "{:#}",
        load("\n[folder.hooks]\nstart_source = \"  \"\n").unwrap_err()
    );
    assert!(e.contains("folder jf: hooks.start_source is empty"), "{e}");

    let e = format!(
        "{:#}",
        load("\n[folder.hooks]\ntimeout_secs = 0\n").unwrap_err()
    );
    assert!(e.contains("timeout_secs"), "{e}");

    for bad in ["../etc/passwd", "/etc/passwd", "a//b", "/"] {
        let e = format!("{:#}", load(&format!("overlay = [{bad:?}]\n")).unwrap_err());
        assert!(e.contains("folder jf: overlay") && e.contains(bad), "{e}");
    }

    let e = format!("{:#}", load("sqlite = [\"data/{a.db\"]\n").unwrap_err());
    assert!(e.contains("folder jf") && e.contains("data/{a.db"), "{e}");

    let e = format!("{:#}", load("sqlite = \"data/*.db\"\n").unwrap_err());
    assert!(e.contains("sqlite") && e.contains("line"), "{e}");
}

/// Issue 9: a standby without its peer's address ran until it was
/// promoted, then exited at every start.
#[test]
fn issue9_promotable_replica_needs_its_peers_address() {
    let d = tempfile::tempdir().unwrap();
    let id = crate::Identity::generate().unwrap().id().to_string();
    let replica = base(d.path(), &id).replace("role = \"source\"", "role = \"replica\"");
    Config::load(&write(d.path(), &replica)).unwrap();

    let no_address = replica.replace("address = \"127.0.0.1:7879\"\n", "");
    let e = format!(
        "{:#}",
        Config::load(&write(d.path(), &no_address)).unwrap_err()
    );
    assert!(
        e.contains("folder jf") && e.contains("address") && e.contains(&id),
        "{e}"
    );
    // A replica that is never promoted needs none.
    let never = format!("{no_address}failover = false\n");
    let c = Config::load(&write(d.path(), &never)).unwrap();
    assert!(!c.folders[0].failover);

    // Host names are accepted and kept as written; bad shapes are named.
    let named = replica.replace("127.0.0.1:7879", "jellyfin-b.lan:7879");
    let c = Config::load(&write(d.path(), &named)).unwrap();
    let peer: NodeId = id.parse().unwrap();
    assert_eq!(
        c.peer_address(&peer).unwrap().as_str(),
        "jellyfin-b.lan:7879"
    );
    let bad = replica.replace("127.0.0.1:7879", "jellyfin-b.lan");
    let e = format!("{:#}", Config::load(&write(d.path(), &bad)).unwrap_err());
    assert!(e.contains("address") && e.contains("no port"), "{e}");
}

#[test]
fn issue13_http_token_lag_bound_and_alerts_are_checked_and_named() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let id = crate::Identity::generate().unwrap().id().to_string();
    let with_node =
        |extra: &str| base(d.path(), &id).replace("[node]\n", &format!("[node]\n{extra}\n"));
    let err = |text: String| format!("{:#}", Config::load(&write(d.path(), &text)).unwrap_err());

    let c = Config::load(&write(d.path(), &with_node("http = \"127.0.0.1:9810\""))).unwrap();
    assert_eq!(c.node.http, Some("127.0.0.1:9810".parse().unwrap()));
    assert_eq!(c.folders[0].max_lag(), 30.0);
    let e = err(with_node("http = \"localhost-9810\""));
    assert!(e.contains("http") && e.contains("line"), "{e}");
    let e = err(with_node("http = \"0.0.0.0:9810\""));
    assert!(
        e.contains("[node] http") && e.contains("http_token_file"),
        "{e}"
    );

    let token = d.path().join("http.token");
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let node = format!(
        "http = \"0.0.0.0:9810\"\nhttp_token_file = \"{}\"",
        token.display()
    );
    let e = err(with_node(&node));
    assert!(
        e.contains("http_token_file") && e.contains("chmod 600"),
        "{e}"
    );
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    Config::load(&write(d.path(), &with_node(&node))).unwrap();

    let lag = |v: &str| {
        base(d.path(), &id).replace("profile =", &format!("max_lag_secs = {v}\nprofile ="))
    };
    assert_eq!(
        Config::load(&write(d.path(), &lag("2"))).unwrap().folders[0].max_lag(),
        2.0
    );
    let e = err(lag("0"));
    assert!(e.contains("max_lag_secs"), "{e}");

    let alert = |body: &str| format!("{}\n[[alert]]\n{body}\n", base(d.path(), &id));
    let c = Config::load(&write(
        d.path(),
        &alert("url = \"http://127.0.0.1:8080/x\"\nformat = \"ntfy\""),
    ))
    .unwrap();
    assert_eq!(c.alerts.len(), 1);
    let e = err(alert("url = \"https://ntfy.sh/x\""));
    assert!(e.contains("[[alert]] #1") && e.contains("url"), "{e}");
    let e = err(alert("url = \"http://h/\"\nevents = [\"lagg\"]"));
    assert!(e.contains("events") && e.contains("lagg"), "{e}");
    let e = err(alert("url = \"http://h/\"\nformat = \"slack\""));
    assert!(e.contains("format") || e.contains("slack"), "{e}");
}

#[test]
fn id_maps_and_delete_excluded_load_and_bad_maps_are_named() {
    let d = tempfile::tempdir().unwrap();
    let id = crate::Identity::generate().unwrap().id().to_string();
    let good = format!(
        "{}uid_map = [\"1000:99\"]\ngid_map = [\"1000:100\"]\ndelete_excluded = true\noverlay = [\"banner.txt\"]\n",
        base(d.path(), &id)
    );
    let c = Config::load(&write(d.path(), &good)).unwrap();
    let f = &c.folders[0];
    let ids = f.id_map().unwrap();
    assert_eq!(ids.uid(1000, sync_core::idmap::Direction::ToLocal), 99);
    assert_eq!(ids.gid(1000, sync_core::idmap::Direction::ToLocal), 100);
    let sweep = f.sweep().unwrap();
    assert!(sweep.delete);
    let banner = sync_core::RelPath::new(&b"banner.txt"[..]).unwrap();
    assert!(sweep.overlays.excludes(&banner, false));
    let cache = sync_core::RelPath::new(&b"cache"[..]).unwrap();
    assert!(
        !sweep.overlays.excludes(&cache, true),
        "a profile exclude is no overlay"
    );

    let bad = good.replace("\"1000:100\"", "\"1000:100\", \"7:100\"");
    let e = format!("{:#}", Config::load(&write(d.path(), &bad)).unwrap_err());
    assert!(
        e.contains("folder jf") && e.contains("gid_map") && e.contains("7:100"),
        "{e}"
    );
}
