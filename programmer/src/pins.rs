//! The pin directory: where it must be (on a bpffs), who may write it (root alone), and where
//! each map and link is pinned in it.
//!
//! The layout is versioned: `<pin dir>/v7/maps/<map>` and `<pin dir>/v7/links/<program>`
//! ([`layout::LAYOUT_VERSION`]).
//!
//! Pinned links keep the programs attached while no agent runs, so whoever can write a
//! directory on the way to them can detach capture (remove a link pin) or swap in maps of their
//! own. Every directory from the bpffs mount down to the pin directory must therefore be
//! root's and not writable by group or others. One exception, for the mount itself and the
//! directories above the pin directory: a world-writable directory with the sticky bit (what
//! `mount -t bpf bpf /sys/fs/bpf` gives: mode 1777) is safe, because the sticky bit lets nobody
//! but an entry's owner (or root) remove or rename it, and the entry below it (checked in turn)
//! is root's. The pin directory itself and what the loader creates in it are 0700.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, MapError};

use crate::layout;
use crate::ProgramError;

/// `BPF_FS_MAGIC` of statfs(2).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How to mount a bpffs that only root can write (the sticky, world-writable default is safe
/// too, see the module doc, but there is no reason for anyone else to write there).
pub const MOUNT_HINT: &str = "mount -t bpf -o mode=0700 bpf /sys/fs/bpf";

/// The mode of every directory the loader creates.
const DIR_MODE: u32 = 0o700;

/// Why a pin directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    #[error(
        "{path} is not on a bpf filesystem (filesystem magic {magic:#x}): pins work only \
         there; mount one (`{MOUNT_HINT}`) or choose a pin directory on one"
    )]
    NotBpffs { path: PathBuf, magic: i64 },
    /// A directory on the way to the pins that someone other than root could change.
    #[error(
        "{path} is owned by uid {uid} with mode {mode:04o}: {why}, who could then remove \
         zbridge's pins (and so stop capture); make it root's and not writable by others \
         (`chown root {path}; chmod go-w {path}`), or remove it and let zbridge create it"
    )]
    NotPrivate {
        path: PathBuf,
        uid: u32,
        mode: u32,
        why: &'static str,
    },
    #[error("{path}: {op}: {error}")]
    Io {
        path: PathBuf,
        op: &'static str,
        // Not `#[source]`: the message already ends with it.
        error: std::io::Error,
    },
}

fn io(path: &Path, op: &'static str, error: std::io::Error) -> PinDirError {
    PinDirError::Io {
        path: path.to_path_buf(),
        op,
        error,
    }
}

/// What [`check_pin_dir`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinDirStatus {
    /// Where the bpffs that holds (or will hold) the pin directory is mounted.
    pub mount: PathBuf,
    /// Whether the pin directory exists already.
    pub exists: bool,
}

fn statfs_magic(path: &Path) -> Result<i64, PinDirError> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|e| {
        io(
            path,
            "statfs",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        )
    })?;
    // SAFETY: a zeroed statfs is a valid out-parameter.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0 {
        return Err(io(path, "statfs", std::io::Error::last_os_error()));
    }
    Ok(fs.f_type as i64)
}

/// Whether `uid` is someone zbridge trusts: root, or the agent's own user.
fn trusted_owner(uid: u32) -> bool {
    // SAFETY: geteuid cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// Refuses `dir` when someone other than root can change what is in it. `sticky_ok`: a
/// directory above the pin directory may be world-writable when it has the sticky bit.
fn check_private(dir: &Path, meta: &std::fs::Metadata, sticky_ok: bool) -> Result<(), PinDirError> {
    let mode = meta.mode() & 0o7777;
    let refuse = |why| PinDirError::NotPrivate {
        path: dir.to_path_buf(),
        uid: meta.uid(),
        mode,
        why,
    };
    if !meta.is_dir() {
        return Err(io(
            dir,
            "check pin directory",
            std::io::Error::other("not a directory"),
        ));
    }
    if !trusted_owner(meta.uid()) {
        return Err(refuse("another user owns it"));
    }
    if mode & 0o022 != 0 && !(sticky_ok && mode & libc::S_ISVTX != 0) {
        return Err(refuse(if sticky_ok {
            "group or others can write it (and it has no sticky bit)"
        } else {
            "group or others can write it"
        }));
    }
    Ok(())
}

/// Checks the pin directory without changing anything: it (or, when it does not exist yet,
/// its nearest existing parent) is on a bpffs, and it and every directory above it up to that
/// bpffs's mount are root's and writable by nobody else (see the module doc). For `run`
/// before it loads anything, and for `doctor`.
pub fn check_pin_dir(pin_dir: &Path) -> Result<PinDirStatus, PinDirError> {
    let mut probe = pin_dir;
    let exists = loop {
        match std::fs::metadata(probe) {
            Ok(_) => break probe == pin_dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                probe = probe
                    .parent()
                    .ok_or_else(|| io(pin_dir, "find a parent", e))?;
            }
            Err(e) => return Err(io(probe, "stat", e)),
        }
    };
    let magic = statfs_magic(probe)?;
    if magic != BPF_FS_MAGIC {
        return Err(PinDirError::NotBpffs {
            path: probe.to_path_buf(),
            magic,
        });
    }
    // From the nearest existing directory up to the mount (the last one on the same device).
    let mut dir = probe.to_path_buf();
    let mut meta = std::fs::metadata(&dir).map_err(|e| io(&dir, "stat", e))?;
    loop {
        check_private(&dir, &meta, !(exists && dir == pin_dir))?;
        // A symbolic link on the way is as good as its owner: its owner can point it elsewhere.
        let link = std::fs::symlink_metadata(&dir).map_err(|e| io(&dir, "stat", e))?;
        if link.is_symlink() && !trusted_owner(link.uid()) {
            return Err(PinDirError::NotPrivate {
                path: dir,
                uid: link.uid(),
                mode: link.mode() & 0o7777,
                why: "another user owns this symbolic link",
            });
        }
        let Some(parent) = dir.parent() else { break };
        let parent_meta = std::fs::metadata(parent).map_err(|e| io(parent, "stat", e))?;
        if parent_meta.dev() != meta.dev() {
            break;
        }
        dir = parent.to_path_buf();
        meta = parent_meta;
    }
    Ok(PinDirStatus { mount: dir, exists })
}

/// Makes `dir` 0700 (and the missing directories above it), then checks that it is private:
/// a directory someone else made first is refused, not used.
fn create_private_dir(dir: &Path) -> Result<(), PinDirError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| io(dir, "create directory", e))?;
    let meta = std::fs::metadata(dir).map_err(|e| io(dir, "stat", e))?;
    check_private(dir, &meta, false)
}

/// Checks the pin directory ([`check_pin_dir`]) and creates it and the current layout
/// version's `maps` and `links` under it, each 0700. For the loader.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<(), PinDirError> {
    check_pin_dir(pin_dir)?;
    create_private_dir(pin_dir)?;
    // Checked again now that it exists: created by someone else in between, it is refused.
    check_pin_dir(pin_dir)?;
    create_private_dir(&versioned_dir(pin_dir))?;
    create_private_dir(&maps_dir(pin_dir))?;
    create_private_dir(&links_dir(pin_dir))
}

/// `<pin dir>/<version>`.
pub fn versioned_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(layout::LAYOUT_VERSION)
}

/// Where the current layout's maps are pinned.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    versioned_dir(pin_dir).join("maps")
}

/// Where the current layout's links are pinned, one per program.
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    versioned_dir(pin_dir).join("links")
}

/// The kernel's `io::Error` in an aya map error (the call failed), or its text.
pub(crate) fn map_io_error(e: MapError) -> std::io::Error {
    match e {
        MapError::SyscallError(e) => e.io_error,
        MapError::KeyNotFound => std::io::Error::from_raw_os_error(libc::ENOENT),
        other => std::io::Error::other(other.to_string()),
    }
}

/// Opens one pinned map of the current layout version, untyped (aya has no typed map for
/// every type the object uses).
pub fn open_pinned_map_data(pin_dir: &Path, map: &'static str) -> Result<MapData, ProgramError> {
    let path = maps_dir(pin_dir).join(map);
    MapData::from_pin(&path).map_err(|e| {
        let e = map_io_error(e);
        ProgramError::Map {
            map,
            op: "open pinned map",
            error: std::io::Error::new(e.kind(), format!("{}: {e}", path.display())),
        }
    })
}

/// Opens one pinned map of the current layout version as aya's typed map `T` (`HashMap`,
/// `Array`, `PerCpuArray`, ...), which checks its key and value sizes.
pub fn open_typed<T>(pin_dir: &Path, map: &'static str) -> Result<T, ProgramError>
where
    T: TryFrom<Map, Error = MapError>,
{
    Map::from_map_data(open_pinned_map_data(pin_dir, map)?)
        .and_then(T::try_from)
        .map_err(|e| ProgramError::Map {
            map,
            op: "open pinned map",
            error: map_io_error(e),
        })
}
