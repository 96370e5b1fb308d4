//! Issue 2, "Confinement": nothing is written outside the destination.

use crate::util::*;

#[test]
fn symlinks_in_destination_are_replaced_never_followed() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, outside) = (
        t.path().join("src"),
        t.path().join("dst"),
        t.path().join("outside"),
    );
    for d in [&src, &dst, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(outside.join("sentinel"), b"keep me").unwrap();
    sh(&format!(
        r#"
cd {src}
mkdir -p d/e; echo inside > d/e/f; echo top > d/g
echo file > sentinel-link
mkdir -p x; echo deep > x/y
"#,
        src = src.display()
    ));
    sh(&format!(
        r#"
cd {dst}
ln -s {out} d
ln -s {out}/sentinel sentinel-link
mkdir x; ln -s {out} x/y
"#,
        dst = dst.display(),
        out = outside.display()
    ));
    let before = sh(&format!(
        "cd {} && ls -laR --time-style=full-iso . && md5sum sentinel",
        outside.display()
    ));
    mirror_ok(&src, &dst);
    let after = sh(&format!(
        "cd {} && ls -laR --time-style=full-iso . && md5sum sentinel",
        outside.display()
    ));
    assert_eq!(before, after, "something outside the destination changed");
    assert!(std::fs::symlink_metadata(dst.join("d")).unwrap().is_dir());
    assert!(
        std::fs::symlink_metadata(dst.join("sentinel-link"))
            .unwrap()
            .is_file()
    );
    assert_eq!(std::fs::read(dst.join("x/y")).unwrap(), b"deep\n");
    assert_identical(&src, &dst);
}
