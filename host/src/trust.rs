//! Who may change what the host loads: OpenSSH's StrictModes, for handler
//! files and the run directory.
//!
//! A host started as root runs whatever bytes it loads as root, so a file is
//! trusted only if nobody else can change it: the file and every directory
//! from `/` down to it must be owned by root or by the user the host runs
//! as, and must not be writable by group or others. A directory that others
//! may write to is acceptable only with the sticky bit (like `/tmp`), where
//! they cannot rename or delete an entry they do not own, and the entries
//! below it are checked for their owner like every other component.
//! Symbolic links are resolved first, so a link cannot lead the check
//! around a directory that others control.

use std::fs;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// The owners whose files the host trusts: root and the user it runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owners {
    uid: u32,
}

impl Owners {
    /// Root and the effective user of this process.
    pub fn current() -> Owners {
        Owners {
            uid: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Root and the user the host runs as: `user` from the config when the
    /// host will switch to it, else the effective user.
    pub fn for_user(user: Option<&str>) -> Owners {
        user.and_then(|name| nix::unistd::User::from_name(name).ok().flatten())
            .map_or_else(Owners::current, |user| Owners {
                uid: user.uid.as_raw(),
            })
    }

    /// Whether a file owned by `uid` is trusted.
    pub fn trust(&self, uid: u32) -> bool {
        uid == 0 || uid == self.uid
    }

    fn describe(&self) -> String {
        if self.uid == 0 {
            "root".to_owned()
        } else {
            format!("root or uid {} (which host runs as)", self.uid)
        }
    }
}

/// Resolves `path` and checks that only trusted owners can change it or any
/// directory above it; returns the resolved path. The error names the
/// component that fails and why.
pub fn check_path(path: &Path, owners: Owners) -> Result<PathBuf> {
    let real = fs::canonicalize(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut component = PathBuf::new();
    let parts: Vec<_> = real.components().collect();
    for (i, part) in parts.iter().enumerate() {
        component.push(part);
        let last = i + 1 == parts.len();
        let meta = fs::symlink_metadata(&component)
            .with_context(|| format!("cannot read {}", component.display()))?;
        check_entry(&component, &meta, owners, last)?;
    }
    Ok(real)
}

/// Checks one file or directory (already resolved) for its owner and mode.
/// `last` is the entry the caller cares about; above it, a directory that
/// others can write to is acceptable only when sticky.
pub fn check_entry(path: &Path, meta: &fs::Metadata, owners: Owners, last: bool) -> Result<()> {
    if !owners.trust(meta.uid()) {
        bail!(
            "{} is owned by uid {}, not by {}; another user could replace what host loads",
            path.display(),
            meta.uid(),
            owners.describe()
        );
    }
    let mode = meta.mode();
    let writable = mode & 0o022 != 0;
    let sticky_dir = meta.is_dir() && mode & 0o1000 != 0 && !last;
    if writable && !sticky_dir {
        let who = if mode & 0o002 != 0 {
            "other users"
        } else {
            "its group"
        };
        bail!(
            "{} is writable by {who} (mode {:04o}){}",
            path.display(),
            mode & 0o7777,
            if meta.is_dir() && !last {
                ", who could put another file in its place"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Checks a directory the host keeps its state in: the path down to it as
/// [`check_path`], and every entry inside it, recursively, for its owner
/// (and files and directories for their mode). A directory prepared by
/// another user is refused, never adopted.
pub fn check_tree(dir: &Path, owners: Owners) -> Result<()> {
    let real = check_path(dir, owners)?;
    check_inside(&real, owners)
}

fn check_inside(dir: &Path, owners: Owners) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        let meta = fs::symlink_metadata(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if meta.file_type().is_symlink() || meta.file_type().is_socket() {
            // Only the owner check applies: a link's own mode means nothing,
            // and the control socket is re-created at every start.
            if !owners.trust(meta.uid()) {
                check_entry(&path, &meta, owners, true)?;
            }
            continue;
        }
        check_entry(&path, &meta, owners, true)?;
        if meta.is_dir() {
            check_inside(&path, owners)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("host-trust-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn a_link_into_a_writable_directory_is_followed_and_refused() {
        let dir = temp("link");
        let open = dir.join("ww");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        fs::write(open.join("a.so"), b"x").unwrap();
        fs::set_permissions(open.join("a.so"), fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink("ww/a.so", dir.join("cur.so")).unwrap();
        let error = check_path(&dir.join("cur.so"), Owners::current()).unwrap_err();
        let text = format!("{error:#}");
        assert!(
            text.contains(&format!("{} is writable by other users", open.display())),
            "{text}"
        );
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(
            check_path(&dir.join("cur.so"), Owners::current()).unwrap(),
            fs::canonicalize(open.join("a.so")).unwrap()
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_group_writable_file_is_refused_even_in_a_safe_directory() {
        let dir = temp("mode");
        let file = dir.join("h.so");
        fs::write(&file, b"x").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o664)).unwrap();
        let text = format!("{:#}", check_path(&file, Owners::current()).unwrap_err());
        assert!(
            text.contains("is writable by its group (mode 0664)"),
            "{text}"
        );
        fs::set_permissions(&file, fs::Permissions::from_mode(0o1666)).unwrap();
        assert!(
            check_path(&file, Owners::current()).is_err(),
            "sticky is no excuse for a file"
        );
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        check_path(&file, Owners::current()).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
