//! Issue 2, "Fidelity": every entry kind and every piece of metadata survives.

use crate::util::*;

/// Builds a tree with every entry kind and metadata case the issue names.
fn rich_tree(root: &std::path::Path) {
    let r = root.display();
    sh(&format!(
        r#"
cd {r}
mkdir -p dir/sub "with space" deep/a/b/c/d
printf 'hello\n' > dir/file
printf 'x%.0s' $(seq 1 5000) > dir/sub/bigger
: > empty
printf 'nl' > "$(printf 'new\nline')"
printf 'bytes' > "$(printf 'non-utf8-\xff\xfe')"
printf 'space' > "with space/a file"
ln -s dir/file rel-link
ln -s /etc/passwd abs-link
ln -s dangling-target dangling
ln dir/file hard-1
ln dir/file "with space/hard-2"
mkfifo fifo
mknod chardev c 1 3
mknod blockdev b 7 200
python3 -c "import socket; s=socket.socket(socket.AF_UNIX); s.bind('sock')"
printf 'suid' > suid; chmod 4755 suid
printf 'sgid' > sgid; chmod 2750 sgid
mkdir sticky; chmod 1777 sticky
printf 'nobody' > orphan; chown 99:100 orphan
chown -h 1234:5678 rel-link
chown 4321:8765 dir/sub
truncate -s 50M sparse; printf 'tail' >> sparse; printf 'head' | dd of=sparse conv=notrunc status=none
setfattr -n user.empty dir/file
setfattr -n user.binary -v 0x00ff10fe00 dir/file
setfattr -n user.text -v "hello world" dir
setfattr -n trusted.secret -v 0xdeadbeef orphan
setfattr -n trusted.onlink -v 1 -h rel-link
setfacl -m u:1000:rwx,g:1001:r-x dir/file
setfacl -m u:2000:r-x dir/sub
setfacl -d -m u:1000:rwx,g:1001:rx dir
setfacl -d -m o::- sticky
touch -h -d '2001-02-03 04:05:06.123456789' rel-link
touch -d '2011-12-13 14:15:16.987654321' dir/file empty
touch -d '1999-01-01 00:00:00.000000001' deep/a/b/c/d deep/a/b deep
touch -d '2020-02-29 12:00:00.5' dir/sub dir
"#
    ));
}

#[test]
fn mirror_preserves_everything() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    rich_tree(&src);
    let s = mirror_ok(&src, &dst);
    assert_identical(&src, &dst);
    assert!(s["files_total"].as_u64().unwrap() >= 10, "{s}");
    // sparse files stay sparse: 50 MiB apparent, a few blocks allocated
    let used: u64 = sh(&format!(
        "du -k --block-size=1K {}/sparse | cut -f1",
        dst.display()
    ))
    .trim()
    .parse()
    .unwrap();
    assert!(used < 1024, "sparse file takes {used} KiB on the replica");

    // Every kind of change, then a second mirror.
    sh(&format!(
        r#"
cd {}
rm -r deep/a/b
rm rel-link; mkdir rel-link; echo now-a-dir > rel-link/f
rm -r "with space"; ln -s dir "with space"
echo changed >> dir/file
chmod 0640 suid; chown 5:6 sgid
setfattr -x user.binary dir/file; setfattr -n user.new -v 1 empty
setfacl -x u:2000 dir/sub
touch -d '2030-01-01 00:00:00.000000042' orphan
ln orphan hard-3
"#,
        src.display()
    ));
    let s2 = mirror_ok(&src, &dst);
    assert_identical(&src, &dst);
    assert!(s2["files_deleted"].as_u64().unwrap() >= 2, "{s2}");
}

#[test]
fn verify_reports_differences_and_fails() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    rich_tree(&src);
    mirror_ok(&src, &dst);
    sh(&format!(
        "setfattr -n user.drift -v 1 {0}/empty; chmod 600 {0}/dir/file",
        dst.display()
    ));
    let out = cli(&["verify".as_ref(), src.as_os_str(), dst.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("differs: empty") && text.contains("user.drift"),
        "{text}"
    );
    assert!(
        text.contains("differs: dir/file") && text.contains("mode"),
        "{text}"
    );
    let roots: Vec<&str> = text.lines().filter(|l| l.contains(" root ")).collect();
    assert_eq!(roots.len(), 2);
    assert_ne!(
        roots[0].split_whitespace().last(),
        roots[1].split_whitespace().last()
    );
}

/// Issue 10 item 11: a live WAL database (commits still in its log) and one
/// closed cleanly (no log: the agent's connections make one and remove it)
/// are mirrored; `verify` finds the trees identical, comparing databases by
/// content, and the databases' directory keeps its mtime.
#[test]
fn verify_compares_live_databases_by_content() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(src.join("app")).unwrap();
    let open = |name: &str| {
        let c = rusqlite::Connection::open(src.join("app").join(name)).unwrap();
        c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        c.execute_batch(
            "CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 500)
             INSERT INTO t SELECT i, randomblob(200) FROM n;",
        )
        .unwrap();
        c
    };
    let live = open("live.db");
    open("closed.db").close().unwrap();
    assert!(src.join("app/live.db-wal").exists());
    assert!(!src.join("app/closed.db-wal").exists());
    sh(&format!("touch -d @1000000000 {}/app", src.display()));
    mirror_ok(&src, &dst);
    let out = cli(&["verify".as_ref(), src.as_os_str(), dst.as_os_str()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let mtime = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    assert_eq!(mtime(&src.join("app")), mtime(&dst.join("app")));
    // a commit the replica has not got is a difference
    live.execute("UPDATE t SET v = x'00' WHERE k = 7", [])
        .unwrap();
    let out = cli(&["verify".as_ref(), src.as_os_str(), dst.as_os_str()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("differs: app/live.db"), "{text}");
}
