//! A private bpffs mount of the test's own, unmounted and removed on drop.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A bpffs mounted on a fresh directory under the temp dir. Unmounting it drops every pin in
/// it (and so the pinned links, which detaches programs no process holds any more).
pub struct BpfFs {
    pub dir: PathBuf,
}

impl BpfFs {
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique_name(prefix));
        std::fs::create_dir(&dir)?;
        let target = CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: valid NUL-terminated strings; no mount data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            return Err(std::io::Error::other(format!(
                "mount -t bpf on {}: {err}",
                dir.display()
            )));
        }
        Ok(BpfFs { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The pin directory zbridge's loader gets on this mount (a subdirectory, as
    /// `/sys/fs/bpf/zbridge` is on a node).
    pub fn pin_dir(&self) -> PathBuf {
        self.dir.join("zbridge")
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.dir.as_os_str().as_bytes()) {
            // SAFETY: a valid path; MNT_DETACH so that a still-open pin does not keep it busy.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!(
                    "testkit: cannot unmount {}: {}",
                    self.dir.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
