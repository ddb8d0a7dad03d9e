//! Who may write the pin directory: the loader refuses a pin directory (or a directory above
//! it on the bpffs) that another user owns or that group or others can write, pins nothing
//! there, and makes its own directories 0700. Each test has its own bpffs mount and cgroup.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{bpffs, config};
use programmer::layout;
use programmer::{Loaded, PinDirError, ProgramError};
use testkit::TestCgroup;

/// The uid of `nobody`: a user other than root.
const OTHER_UID: u32 = 65534;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

/// Loads and expects the refusal of `path` for `why`; returns the error's text.
fn refused(fs: &testkit::BpfFs, cg: &TestCgroup, path: &Path, why: &str) -> String {
    let err = match Loaded::load_and_attach(config(fs, cg)) {
        Ok(_) => panic!("loaded with {} not private", path.display()),
        Err(e) => e,
    };
    let text = err.to_string();
    match &err {
        ProgramError::PinDir(PinDirError::NotPrivate { path: p, .. }) => {
            assert_eq!(p, path, "{text}")
        }
        other => panic!("not a pin directory refusal: {other}"),
    }
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains(why), "{text}");
    text
}

#[test]
fn a_pin_dir_another_user_owns_is_refused_and_nothing_is_pinned_there() {
    if !testkit::require_root("a_pin_dir_another_user_owns_is_refused_and_nothing_is_pinned_there")
    {
        return;
    }
    let cg = TestCgroup::new("pin-owner").unwrap();
    let fs = bpffs("pin-owner");
    let pin_dir = fs.pin_dir();
    std::fs::create_dir(&pin_dir).unwrap();
    chmod(&pin_dir, 0o700);
    std::os::unix::fs::chown(&pin_dir, Some(OTHER_UID), Some(OTHER_UID)).unwrap();

    let text = refused(&fs, &cg, &pin_dir, "another user owns it");
    assert!(text.contains("uid 65534"), "{text}");
    assert!(
        is_empty(&pin_dir),
        "something was pinned in a directory root does not own"
    );
    // `run` and `doctor` see the same.
    assert!(matches!(
        programmer::check_pin_dir(&pin_dir),
        Err(PinDirError::NotPrivate { uid: OTHER_UID, .. })
    ));
}

/// A pin directory that is another user's symbolic link to a directory of root's is refused:
/// its owner could point it elsewhere.
#[test]
fn a_pin_dir_that_is_another_users_symlink_is_refused() {
    if !testkit::require_root("a_pin_dir_that_is_another_users_symlink_is_refused") {
        return;
    }
    let cg = TestCgroup::new("pin-symlink").unwrap();
    let fs = bpffs("pin-symlink");
    let target = fs.path().join("roots");
    std::fs::create_dir(&target).unwrap();
    chmod(&target, 0o700);
    std::os::unix::fs::symlink(&target, fs.pin_dir()).unwrap();
    std::os::unix::fs::lchown(fs.pin_dir(), Some(OTHER_UID), Some(OTHER_UID)).unwrap();

    let text = refused(
        &fs,
        &cg,
        &fs.pin_dir(),
        "another user owns this symbolic link",
    );
    assert!(text.contains("uid 65534"), "{text}");
    assert!(is_empty(&target), "something was pinned behind the link");
}

#[test]
fn a_pin_dir_others_can_write_is_refused_even_with_the_sticky_bit() {
    if !testkit::require_root("a_pin_dir_others_can_write_is_refused_even_with_the_sticky_bit") {
        return;
    }
    let cg = TestCgroup::new("pin-mode").unwrap();
    let fs = bpffs("pin-mode");
    let pin_dir = fs.pin_dir();
    std::fs::create_dir(&pin_dir).unwrap();
    for bad in [0o777, 0o1777, 0o770, 0o702] {
        chmod(&pin_dir, bad);
        let text = refused(&fs, &cg, &pin_dir, "group or others can write it");
        assert!(text.contains(&format!("mode {bad:04o}")), "{text}");
        assert!(is_empty(&pin_dir), "mode {bad:o}: something was pinned");
    }
}

/// Above the pin directory, a directory others can write is refused, unless it has the sticky
/// bit (as the default bpffs root, mode 1777, has): then nobody else can remove or rename the
/// root-owned pin directory in it.
#[test]
fn a_parent_others_can_write_is_refused_unless_sticky() {
    if !testkit::require_root("a_parent_others_can_write_is_refused_unless_sticky") {
        return;
    }
    let cg = TestCgroup::new("pin-parent").unwrap();
    let fs = bpffs("pin-parent");
    let shared = fs.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o777);
    let mut cfg = config(&fs, &cg);
    cfg.pin_dir = shared.join("zbridge");
    let err = Loaded::load_and_attach(cfg.clone()).err().expect("refused");
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "{} is owned by uid 0 with mode 0777",
            shared.display()
        )) && text.contains("no sticky bit"),
        "{text}"
    );
    assert!(is_empty(&shared), "the pin directory was made in it");

    // The same directory owned by another user is refused, sticky or not.
    chmod(&shared, 0o1777);
    std::os::unix::fs::chown(&shared, Some(OTHER_UID), None).unwrap();
    let text = Loaded::load_and_attach(cfg.clone())
        .err()
        .expect("refused")
        .to_string();
    assert!(text.contains("another user owns it"), "{text}");

    // Root's, sticky: fine; the pin directory in it is made 0700.
    std::os::unix::fs::chown(&shared, Some(0), None).unwrap();
    let loaded = Loaded::load_and_attach(cfg.clone()).expect("load under a sticky parent");
    assert_eq!(mode(&cfg.pin_dir), 0o700);
    assert_eq!(
        loaded.report().links_created.len(),
        programmer::object::PROGRAMS.len()
    );
}

/// On the default bpffs (root mode 1777), the loader makes the pin directory and the layout's
/// directories 0700, root's; and an existing root-owned 0755 directory (an older agent's) is
/// used as it is.
#[test]
fn the_loader_makes_its_pin_directories_0700() {
    if !testkit::require_root("the_loader_makes_its_pin_directories_0700") {
        return;
    }
    let cg = TestCgroup::new("pin-good").unwrap();
    let fs = bpffs("pin-good");
    assert_eq!(
        mode(fs.path()),
        0o1777,
        "a fresh bpffs is world-writable and sticky"
    );
    let status = programmer::check_pin_dir(&fs.pin_dir()).unwrap();
    assert_eq!((status.mount.as_path(), status.exists), (fs.path(), false));

    let loaded = Loaded::load_and_attach(config(&fs, &cg)).unwrap();
    let version = fs.pin_dir().join(layout::LAYOUT_VERSION);
    for dir in [
        fs.pin_dir(),
        version.clone(),
        version.join("maps"),
        version.join("links"),
    ] {
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid()),
            (0o700, 0),
            "{}",
            dir.display()
        );
    }
    drop(loaded);

    chmod(&fs.pin_dir(), 0o755);
    let again = Loaded::load_and_attach(config(&fs, &cg)).expect("a root-owned 0755 pin dir");
    assert_eq!(
        again.report().links_updated.len(),
        programmer::object::PROGRAMS.len()
    );
}

/// Off a bpffs, the error names the directory and says how to mount one that only root can
/// write.
#[test]
fn a_pin_dir_off_bpffs_is_refused_with_the_mount_hint() {
    let dir = tempfile::tempdir().unwrap();
    let pin_dir = dir.path().join("zbridge");
    let err = programmer::check_pin_dir(&pin_dir).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PinDirError::NotBpffs { .. }), "{text}");
    assert!(
        text.contains(&format!(
            "{} is not on a bpf filesystem",
            dir.path().display()
        )),
        "{text}"
    );
    assert!(
        text.contains("mount -t bpf -o mode=0700 bpf /sys/fs/bpf"),
        "{text}"
    );
    assert_eq!(
        programmer::pins::MOUNT_HINT,
        "mount -t bpf -o mode=0700 bpf /sys/fs/bpf"
    );
}

/// The programs attached to `cgroup`'s directory, as `bpftool cgroup show` lists them.
fn attached_programs(cg: &TestCgroup) -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cg.dir())
        .output()
        .expect("bpftool runs (Debian package `bpftool`)");
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array().unwrap().len()
}

/// An agent of the previous layout left its pins (links still attached, maps) under
/// `<pin dir>/v6`: the loader of this one removes them, so that the old programs no longer
/// run beside the new ones, and reports it. The old pins are made by loading this object and
/// renaming its version directory, which keeps its links attached.
#[test]
fn the_loader_removes_the_pins_of_the_previous_layout_version() {
    if !testkit::require_root("the_loader_removes_the_pins_of_the_previous_layout_version") {
        return;
    }
    assert_eq!(
        layout::LAYOUT_VERSION,
        "v7",
        "the previous version below is v6"
    );
    let cg = TestCgroup::new("pin-old").unwrap();
    let fs = bpffs("pin-old");
    drop(Loaded::load_and_attach(config(&fs, &cg)).unwrap());
    let old = fs.pin_dir().join("v6");
    std::fs::rename(fs.pin_dir().join(layout::LAYOUT_VERSION), &old).unwrap();
    let programs = programmer::object::PROGRAMS.len();
    assert_eq!(
        attached_programs(&cg),
        programs,
        "the old links hold theirs"
    );

    let loaded = Loaded::load_and_attach(config(&fs, &cg)).unwrap();
    assert_eq!(loaded.report().old_versions_removed, vec![old.clone()]);
    assert!(!old.exists());
    assert_eq!(loaded.report().links_created.len(), programs);
    // The kernel frees an unpinned link (and detaches its program) in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while attached_programs(&cg) != programs {
        assert!(
            std::time::Instant::now() < deadline,
            "the old programs still attached: {} programs",
            attached_programs(&cg)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
