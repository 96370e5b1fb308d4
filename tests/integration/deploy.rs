//! Issue 12: what the container image and the manifests promise, tested where
//! this machine can (no Docker daemon, no cluster): the binaries the
//! Dockerfile copies run from a root holding only them and the libraries
//! `ldd` names, and the compose files and Kubernetes manifests parse and say
//! what the docs say (host PID namespace, host network, the docker socket, a
//! cold standby, hooks limited to scaling the app), with agent configs the
//! agent's own parser accepts.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A root with `bins` in /usr/local/bin and the shared libraries they need.
fn clean_root(dir: &Path, bins: &[&str]) {
    for name in bins {
        let exe = bin(name);
        let ldd = Command::new("ldd").arg(&exe).output().unwrap();
        assert!(ldd.status.success(), "ldd {}", exe.display());
        for lib in String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let to = dir.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(lib, &to).unwrap();
        }
        let to = dir.join("usr/local/bin").join(name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&exe, &to).unwrap();
    }
}

fn chroot(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new("chroot")
        .arg(root)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_image_binaries_run_from_a_root_holding_only_them_and_their_libraries() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    clean_root(&root, &["sync-agent", "sync-cli"]);
    for dir in ["tmp", "src", "dst"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("src/a.txt"), "hello from a clean root").unwrap();
    let help = chroot(&root, &["/usr/local/bin/sync-agent", "--help"]);
    assert!(help.status.success(), "{help:?}");
    let keygen = chroot(
        &root,
        &["/usr/local/bin/sync-cli", "keygen", "--dir", "/id"],
    );
    assert!(keygen.status.success(), "{keygen:?}");
    assert!(root.join("id/key.pem").exists());
    // The main job, loopback QUIC included, with no /etc, /proc or /dev.
    let mirror = chroot(
        &root,
        &["/usr/local/bin/sync-cli", "mirror", "/src", "/dst"],
    );
    assert!(mirror.status.success(), "{mirror:?}");
    assert_eq!(
        std::fs::read_to_string(root.join("dst/a.txt")).unwrap(),
        "hello from a clean root"
    );
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("/out/sync-agent /out/sync-cli /usr/local/bin/"),
        "the Dockerfile copies the binaries tested here"
    );
}

/// Runs a python3 check over the manifests (Debian's python3-yaml).
fn python(script: &str) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn compose_files_run_the_agent_beside_the_app_with_a_cold_standby() {
    python(
        r#"
import yaml
for host, standby in (("a", False), ("b", True)):
    c = yaml.safe_load(open(f"dist/compose/host-{host}.yml"))["services"]
    agent, app = c["understudy"], c["jellyfin"]
    assert agent["pid"] == "host", host
    assert agent["network_mode"] == "host", host
    vols = agent["volumes"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in vols, host
    assert any(v.startswith("/etc/understudy:") and v.endswith(":ro") for v in vols), host
    cfg_vol = [v for v in app["volumes"] if v.endswith(":/config")][0].split(":")[0]
    assert f"{cfg_vol}:{cfg_vol}" in vols, (host, "the app folder at the same path")
    assert (app["restart"] == "no") == standby, host
    assert app["container_name"] == "jellyfin"
"#,
    );
}

#[test]
fn k8s_manifests_limit_the_hooks_and_carry_configs_the_agent_accepts() {
    let t = tempfile::tempdir().unwrap();
    let out = python(&format!(
        r#"
import yaml
docs = list(yaml.safe_load_all(open("dist/k8s/understudy.yaml")))
kinds = {{(d["kind"], d["metadata"]["name"]) for d in docs}}
for want in [("Role", "understudy-hooks"), ("Service", "understudy-a"), ("Service", "understudy-b"),
             ("Deployment", "jellyfin-a"), ("Deployment", "jellyfin-b")]:
    assert want in kinds, want
role = [d for d in docs if d["kind"] == "Role"][0]
for rule in role["rules"]:
    assert set(rule["verbs"]) <= {{"get", "patch", "list"}}, rule
    if rule["resources"] == ["deployments/scale"]:
        assert rule["resourceNames"] == ["jellyfin-a", "jellyfin-b"], rule
    else:
        assert rule["resources"] == ["pods"] and rule["verbs"] == ["list"], rule
apps = {{d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}}
assert apps["jellyfin-a"]["spec"]["replicas"] == 1 and apps["jellyfin-b"]["spec"]["replicas"] == 0
for me in "ab":
    svc = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == f"understudy-{{me}}"][0]
    assert svc["spec"]["ports"][0]["protocol"] == "UDP"
    pod = apps[f"understudy-{{me}}"]["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    cfg = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == f"understudy-{{me}}"][0]
    open(f"{dir}/{{me}}.toml", "w").write(cfg["data"]["understudy.toml"])
scale = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "understudy-scale"][0]
assert scale["data"]["scale.sh"] == open("dist/k8s/scale.sh").read(), "scale.sh and its ConfigMap differ"
print("ok")
"#,
        dir = t.path().display()
    ));
    assert_eq!(out.trim(), "ok");
    for me in ["a", "b"] {
        let c = sync_agent::config::Config::parse(&t.path().join(format!("{me}.toml")))
            .unwrap_or_else(|e| panic!("the {me} ConfigMap's config: {e:#}"));
        let f = &c.folders[0];
        assert_eq!(f.profile.as_deref(), Some("jellyfin"));
        assert!(
            f.filter().is_ok()
                && f.hooks
                    .command(sync_agent::config::Hook::StartReplica)
                    .is_some()
        );
        assert!(
            c.peers[0].address.is_some(),
            "peer addressed by service name"
        );
    }
}
