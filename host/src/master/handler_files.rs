//! Which version each handler file on disk holds, for `host status` to
//! say when a file differs from what its group runs (a build not reloaded
//! yet, or a pinned group).
//!
//! Status is asked often (scripts poll it) and a handler is megabytes, so
//! a file is hashed again only when its inode, size or modification time
//! changed since it was last hashed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use crate::versions::store::hash_bytes;

/// What identifies one state of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    device: u64,
    inode: u64,
    size: u64,
    modified_ns: i128,
}

/// The hash of each handler file last looked at; see the module docs.
#[derive(Default)]
pub struct HandlerFiles {
    hashed: RefCell<HashMap<PathBuf, (FileStamp, String)>>,
}

impl HandlerFiles {
    /// The sha256 of the file at `path` now; `None` when it cannot be
    /// read (missing for a moment while it is replaced, say).
    pub fn hash(&self, path: &Path) -> Option<String> {
        let meta = std::fs::metadata(path).ok()?;
        let stamp = FileStamp {
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            modified_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        };
        let mut hashed = self.hashed.borrow_mut();
        if let Some((seen, hash)) = hashed.get(path) {
            if *seen == stamp {
                return Some(hash.clone());
            }
        }
        let hash = hash_bytes(&std::fs::read(path).ok()?);
        hashed.insert(path.to_owned(), (stamp, hash.clone()));
        Some(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_hashed_again_once_it_is_replaced() {
        let dir = std::env::temp_dir().join(format!("host-handler-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("handler.so");
        std::fs::write(&path, "one").unwrap();
        let files = HandlerFiles::default();
        assert_eq!(files.hash(&path), Some(hash_bytes(b"one")));
        assert_eq!(
            files.hash(&path),
            Some(hash_bytes(b"one")),
            "from the cache"
        );
        let next = dir.join("next.so");
        std::fs::write(&next, "two!").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert_eq!(files.hash(&path), Some(hash_bytes(b"two!")));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(files.hash(&path), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
